"""Models: one adapter (:class:`~esmc_lens.models.vlm.VLM`) over every vision-language model
esmc_lens reads (LLaVA from transformers, the offline model, tiny random models), and the
text encoder of the Output baseline."""
