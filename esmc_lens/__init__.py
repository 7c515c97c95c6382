"""esmc_lens: explainable multiple clustering with multimodal LLMs and the logit lens."""

__version__ = "0.1.0"
