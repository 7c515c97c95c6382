"""What differs per vision-language model family, in one table.

transformers 5 gives every supported family the same outer shape (``model.model.<language
model>`` + ``model.lm_head``) and the same forward signature; what capture and the lens care
about differs, and lives here: where the decoder layers, final norm and vision tower are, which
tokens make up an image's block in the sequence, how a prompt is formatted, what the lens must
copy from the model's own logits (soft-capping), and what a position means (the caveats).

:func:`family_of` picks the family from a config (``model_type``; LLaVA configs whose vision
tower is Pixtral are the Pixtral family). Everything else reads :class:`Family` fields.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ModelError

# Idefics3 / SmolVLM tile markers: one per (row, column) of the image grid, up to 6 x 6.
IDEFICS3_TILES = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))


@dataclass(frozen=True)
class Family:
    """One family's adapter: module paths, image tokens, prompt style, caveats.

    Attributes
    ----------
    key : short name (``load_model("tiny:<key>")`` builds its tiny random model).
    name : what users call it.
    model_types : the ``config.model_type`` values it covers, each with the model class and
        the processor class its checkpoints ship.
    layers, norm, lm_head, vision_tower : dotted module paths relative to the HF model.
    image_markers : token strings that belong to an image's block besides the placeholder
        (``config.image_token_id``): start/end/row-break/tile tokens. The block runs from its
        first to its last such token; the prompt's positions are the tokens after it.
    prompt_style : default ``VLM.prompt_style`` ("plain": no chat template, the prompt goes to
        the processor as is).
    vision_feature : what the vision-only baseline reads: ``"pooler"`` (the vision tower's
        ``pooler_output``, one vector per image: CLIP) or ``"image_tokens"`` (the mean of the
        language model's input at the image's placeholder positions: the projected image
        features, one vector per image whatever the number of tiles or patches).
    nested_images : give the processor one list of images per prompt.
    logit_softcap : the model soft-caps its logits with ``text_config.final_logit_softcapping``
        (the lens must do the same to equal them).
    dynamic : the image-token count depends on the image's size.
    example : a hub id of a checkpoint of this family.
    caveats : what a position means here that it does not in LLaVA-1.5 (README table).
    """

    key: str
    name: str
    model_types: dict[str, tuple[str, str]]
    layers: str = "model.language_model.layers"
    norm: str = "model.language_model.norm"
    lm_head: str = "lm_head"
    vision_tower: str = "model.vision_tower"
    image_markers: tuple[str, ...] = ()
    prompt_style: str = "chat"
    vision_feature: str = "image_tokens"
    nested_images: bool = True
    logit_softcap: bool = False
    dynamic: bool = True
    example: str = ""
    caveats: str = ""

    def model_class(self, model_type: str) -> type:
        import transformers

        return getattr(transformers, self.model_types[model_type][0])

    def processor_name(self, model_type: str) -> str:
        return self.model_types[model_type][1]


FAMILIES: dict[str, Family] = {f.key: f for f in (
    Family(
        "llava", "LLaVA-1.5", {"llava": ("LlavaForConditionalGeneration", "LlavaProcessor")},
        vision_feature="pooler", nested_images=False, dynamic=False,
        example="llava-hf/llava-1.5-7b-hf",
        caveats="The paper's model and the reference path: 576 image tokens at every image "
                "size; the vision-only baseline reads CLIP's pooled output."),
    Family(
        "llava_next", "LLaVA-NeXT (1.6)",
        {"llava_next": ("LlavaNextForConditionalGeneration", "LlavaNextProcessor")},
        example="llava-hf/llava-v1.6-mistral-7b-hf",
        caveats="anyres: a base view plus a grid of crops chosen by the aspect ratio, with a "
                "newline feature per row, all at `<image>` positions: the count varies per "
                "image."),
    Family(
        "llava_onevision", "LLaVA-OneVision",
        {"llava_onevision": ("LlavaOnevisionForConditionalGeneration",
                             "LlavaOnevisionProcessor")},
        example="llava-hf/llava-onevision-qwen2-0.5b-ov-hf",
        caveats="anyres_max_9 over SigLIP crops, unpadded to the image's aspect ratio: the "
                "count varies per image."),
    Family(
        "qwen2_vl", "Qwen2-VL / Qwen2.5-VL",
        {"qwen2_vl": ("Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
         "qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")},
        vision_tower="model.visual", image_markers=("<|vision_start|>", "<|vision_end|>"),
        example="Qwen/Qwen2.5-VL-3B-Instruct",
        caveats="Native dynamic resolution: one token per 2 x 2 merged patches of the resized "
                "image. 3-D (M-RoPE) position ids are computed inside the model's forward from "
                "the ids, `image_grid_thw` and the attention mask: capture always runs that "
                "forward (an entry point that bypasses it would get the positions wrong)."),
    Family(
        "qwen3_vl", "Qwen3-VL",
        {"qwen3_vl": ("Qwen3VLForConditionalGeneration", "Qwen3VLProcessor")},
        vision_tower="model.visual", image_markers=("<|vision_start|>", "<|vision_end|>"),
        example="Qwen/Qwen3-VL-2B-Instruct",
        caveats="As Qwen2.5-VL (interleaved M-RoPE), plus DeepStack: features of early vision "
                "layers are added to the outputs of the first decoder layers at the image's "
                "positions. `output_hidden_states` and the captured states are the layer "
                "outputs before that addition, so at image positions of those layers they are "
                "not what the next layer reads; prompt positions are untouched (tested)."),
    Family(
        "gemma3", "Gemma 3", {"gemma3": ("Gemma3ForConditionalGeneration", "Gemma3Processor")},
        image_markers=("<start_of_image>", "<end_of_image>"), dynamic=False,
        example="google/gemma-3-4b-it",
        caveats="Its RMSNorm scales by (1 + w) in fp32: the lens runs the model's own norm "
                "module in fp32. Embeddings are scaled by sqrt(d) (stream 0 is the scaled "
                "embedding). An image's tokens attend to each other both ways; 256 tokens per "
                "image, more only with pan-and-scan crops (off by default)."),
    Family(
        "internvl", "InternVL (-hf checkpoints)",
        {"internvl": ("InternVLForConditionalGeneration", "InternVLProcessor")},
        image_markers=("<img>", "</img>"), example="OpenGVLab/InternVL3-1B-hf",
        caveats="Dynamic tiling: 1-12 tiles chosen by the aspect ratio plus a thumbnail, 256 "
                "tokens each. Only the transformers-native `-hf` checkpoints; the original "
                "`trust_remote_code` InternVLChatModel repositories are not supported."),
    Family(
        "idefics3", "Idefics3 / SmolVLM",
        {"idefics3": ("Idefics3ForConditionalGeneration", "Idefics3Processor"),
         "smolvlm": ("SmolVLMForConditionalGeneration", "SmolVLMProcessor")},
        layers="model.text_model.layers", norm="model.text_model.norm",
        vision_tower="model.vision_model",
        image_markers=("<fake_token_around_image>", "<global-img>", *IDEFICS3_TILES),
        example="HuggingFaceTB/SmolVLM2-2.2B-Instruct",
        caveats="The language model is `model.model.text_model`. Image splitting: a grid of "
                "tiles plus the whole image, with tile tokens and newlines inside the image's "
                "block. SmolVLM v1 checkpoints are `idefics3`; SmolVLM2 (`smolvlm`) needs "
                "`num2words` for its processor."),
    Family(
        "paligemma", "PaliGemma / PaliGemma 2",
        {"paligemma": ("PaliGemmaForConditionalGeneration", "PaliGemmaProcessor")},
        prompt_style="plain", nested_images=False, logit_softcap=True, dynamic=False,
        example="google/paligemma2-3b-pt-224",
        caveats="No chat template: the processor builds `<image>` x n, `<bos>`, the prompt, "
                "`\\n` (prompt_style 'plain'). The prefix (image and prompt) attends both ways, "
                "so a prompt position's state has seen the whole prompt; only its last token is "
                "trained to predict. PaliGemma 2 soft-caps logits (Gemma 2): so does the lens."),
    Family(
        "mistral3", "Mistral 3",
        {"mistral3": ("Mistral3ForConditionalGeneration", "PixtralProcessor")},
        image_markers=("[IMG_BREAK]", "[IMG_END]"),
        example="mistralai/Mistral-Small-3.1-24B-Instruct-2503",
        caveats="One `[IMG]` per 2 x 2 merged patches, `[IMG_BREAK]` after each row, "
                "`[IMG_END]` last: the count follows the image's size. PixtralProcessor needs "
                "torchvision (transformers 5.23 imports it); without it esmc_lens uses "
                "PixtralTextImageProcessor (the same token layout over PixtralImageProcessorPil)."),
    Family(
        "pixtral", "Pixtral",
        {"llava": ("LlavaForConditionalGeneration", "PixtralProcessor")},
        image_markers=("[IMG_BREAK]", "[IMG_END]"), example="mistral-community/pixtral-12b",
        caveats="A LLaVA config with a Pixtral vision tower: one `[IMG]` per patch, row breaks "
                "and an end token; the count follows the image's size. Processor: as Mistral 3."),
)}


def family_of(config) -> Family:
    """The family of a model config; a clear error listing the supported ones otherwise."""
    model_type = getattr(config, "model_type", None)
    if model_type == "llava":
        vision = getattr(getattr(config, "vision_config", None), "model_type", None)
        return FAMILIES["pixtral" if vision == "pixtral" else "llava"]
    for fam in FAMILIES.values():
        if model_type in fam.model_types:
            return fam
    archs = getattr(config, "architectures", None) or []
    supported = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in FAMILIES.values())
    raise ModelError(f"model_type {model_type!r} ({', '.join(archs) or 'no architectures'}) is "
                     f"not a supported vision-language family. Supported: {supported}")
