"""Tiny random models of every supported family, through the classes real checkpoints use.

``build_tiny_family(key)`` -> ``(model, processor)``: the family's ``...ForConditionalGeneration``
built from a tiny config of its own config classes (vision tower, projector, language model),
random weights (seeded), a byte-level BPE tokenizer trained in memory carrying the family's
special tokens, and the family's processor class over its PIL image processor (image-only
where transformers needs torchvision for the video half, see :mod:`.processors`). Sizes are
tiny but every dynamic-resolution mechanism is on: Qwen's min/max pixels, anyres grids,
InternVL and Idefics3 tiles, Pixtral's size-following grid.

The chat templates follow the shape of each family's checkpoint template (roles, where the
image placeholder goes, the generation prompt); a real checkpoint brings its own. Outputs of
these models mean nothing: they test code paths, positions and exactness.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import ConfigError
from .families import IDEFICS3_TILES
from .processors import PixtralTextImageProcessor, build_image_only
from .tiny import build_tiny_llava, build_tokenizer

D_MODEL, N_LAYERS = 64, 3


def _cfg(name: str, **kwargs):
    import transformers

    return getattr(transformers, name)(**kwargs)


def _ids(tok, *tokens: str) -> list[int]:
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def _text(tok, name: str, **kwargs):
    """A tiny language-model config of class ``name`` sized to ``tok``'s vocabulary."""
    base = dict(vocab_size=len(tok), hidden_size=D_MODEL, intermediate_size=2 * D_MODEL,
                num_hidden_layers=N_LAYERS, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, max_position_embeddings=1024, pad_token_id=tok.pad_token_id,
                bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                tie_word_embeddings=False)
    return _cfg(name, **(base | kwargs))


def _vision(name: str, **kwargs):
    base = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
    return _cfg(name, **(base | kwargs))


def _seeded(cls, config, seed: int):
    config.architectures = [cls.__name__]
    with torch.random.fork_rng(devices=[]):  # never move the caller's random stream
        torch.manual_seed(seed)
        model = cls(config).eval()
        # Weights transformers initialises to zero would hide what they carry: Gemma 3's
        # image projection (no image would reach the LM), Gemma's (1 + w) norm weights (the
        # lens would not see w), InternVL's position embeddings. Biases stay zero.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not name.endswith("bias") and not p.any():
                    p.normal_(0.0, 0.1 if p.dim() == 1 else 0.02)
    return model


def _chatml(image: str) -> str:
    """ChatML with the image placeholder before the text (Qwen-LM families)."""
    image = image.replace("\n", "\\n")
    return (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
        "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '" + image + "' }}"
        "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    )


CHATML = ["<|im_start|>", "<|im_end|>"]
QWEN_TEMPLATE = (  # Qwen2-VL: a default system turn, the image in a vision_start/end block
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
MISTRAL_INST_TEMPLATE = (  # LLaVA-NeXT (Mistral): [INST] <image>\n prompt [/INST]
    "{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' [/INST]' }}"
    "{% else %}{% for c in message['content'] %}{{ ' ' + c['text'] }}{% endfor %}"
    "{{ eos_token }}{% endif %}{% endfor %}"
)
PIXTRAL_TEMPLATE = (  # Pixtral / Mistral 3: <s>[INST][IMG]prompt[/INST]
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}[INST]"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}[IMG]"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{{ eos_token }}"
    "{% endif %}{% endfor %}"
)
GEMMA3_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}<start_of_turn>"
    "{{ 'model' if message['role'] == 'assistant' else message['role'] }}\n"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<start_of_image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_turn>\n"
    "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
IDEFICS3_TEMPLATE = (  # User:<image>prompt<end_of_utterance>\nAssistant:
    "{{ bos_token }}{% for message in messages %}{{ message['role'] | capitalize }}:"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>"
    "{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<end_of_utterance>\n"
    "{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"
)


def _qwen(version: str, seed: int):
    import transformers
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    tok = build_tokenizer(specials=[*CHATML, "<|vision_start|>", "<|vision_end|>",
                                    "<|image_pad|>", "<|video_pad|>"],
                          bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          named={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"})
    patch, merge = 4, 2
    img, vid, start, end = _ids(tok, "<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                "<|vision_end|>")
    # M-RoPE splits each head's 8 rotary frequencies over (time, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    vision = dict(depth=2, num_heads=2, patch_size=patch, spatial_merge_size=merge,
                  temporal_patch_size=2)
    if version == "2":
        vision |= dict(embed_dim=32, hidden_size=D_MODEL, mlp_ratio=2)
        names = ("Qwen2VLConfig", "Qwen2VLTextConfig", "Qwen2VLForConditionalGeneration",
                 "Qwen2VLProcessor")
    elif version == "2.5":
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=D_MODEL,
                       window_size=16, fullatt_block_indexes=[1])
        names = ("Qwen2_5_VLConfig", "Qwen2_5_VLTextConfig",
                 "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor")
    else:  # Qwen3-VL: DeepStack from both vision layers, interleaved M-RoPE
        vision |= dict(hidden_size=32, intermediate_size=64, out_hidden_size=D_MODEL,
                       num_position_embeddings=36, deepstack_visual_indexes=[0, 1])
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 2, 2],
                "mrope_interleaved": True}
        names = ("Qwen3VLConfig", "Qwen3VLTextConfig", "Qwen3VLForConditionalGeneration",
                 "Qwen3VLProcessor")
    config_cls, text_cls, model_cls, proc_cls = (getattr(transformers, n) for n in names)
    config = config_cls(text_config=_text(tok, text_cls.__name__, rope_parameters=rope),
                        vision_config=vision, image_token_id=img, video_token_id=vid,
                        vision_start_token_id=start, vision_end_token_id=end,
                        tie_word_embeddings=False)
    # 8 x 8 to 24 x 24 pixels after resizing: 1 to 9 image tokens, by the image's size
    improc = Qwen2VLImageProcessorPil(patch_size=patch, merge_size=merge, temporal_patch_size=2,
                                      min_pixels=8 * 8, max_pixels=24 * 24)
    proc = build_image_only(proc_cls, image_processor=improc, tokenizer=tok,
                            chat_template=QWEN_TEMPLATE)
    return _seeded(model_cls, config, seed), proc


def _llava_next(seed: int):
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import (
        LlavaNextImageProcessorPil,
    )

    tok = build_tokenizer(specials=["<image>", "[INST]", "[/INST]"])
    size, patch = 12, 4
    grids = [[12, 24], [24, 12], [24, 24]]  # anyres: the crop grid follows the aspect ratio
    config = LlavaNextConfig(
        vision_config=_vision("CLIPVisionConfig", image_size=size, patch_size=patch,
                              projection_dim=32),
        text_config=_text(tok, "MistralConfig"), image_grid_pinpoints=grids,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="default", vision_feature_layer=-2,
        image_seq_length=(size // patch) ** 2)
    improc = LlavaNextImageProcessorPil(size={"shortest_edge": size}, image_grid_pinpoints=grids,
                                        crop_size={"height": size, "width": size})
    proc = LlavaNextProcessor(image_processor=improc, tokenizer=tok, patch_size=patch,
                              vision_feature_select_strategy="default",
                              num_additional_image_tokens=1, chat_template=MISTRAL_INST_TEMPLATE)
    return _seeded(LlavaNextForConditionalGeneration, config, seed), proc


def _llava_onevision(seed: int):
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        LlavaOnevisionProcessor,
    )
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    tok = build_tokenizer(specials=[*CHATML, "<image>", "<video>"], bos=None, eos="<|im_end|>",
                          pad="<|endoftext|>",
                          named={"image_token": "<image>", "video_token": "<video>"})
    size, patch = 12, 4
    grids = [[12, 12], [12, 24], [24, 12], [24, 24]]
    img, vid = _ids(tok, "<image>", "<video>")
    config = LlavaOnevisionConfig(
        vision_config=_vision("SiglipVisionConfig", image_size=size, patch_size=patch),
        text_config=_text(tok, "Qwen2Config"), image_grid_pinpoints=grids,
        image_token_id=img, video_token_id=vid, vision_feature_select_strategy="full",
        vision_feature_layer=-1, vision_aspect_ratio="anyres_max_9")
    improc = LlavaOnevisionImageProcessorPil(size={"height": size, "width": size},
                                             image_grid_pinpoints=grids)
    proc = build_image_only(LlavaOnevisionProcessor, image_processor=improc, tokenizer=tok,
                            num_image_tokens=(size // patch) ** 2,
                            vision_feature_select_strategy="full",
                            vision_aspect_ratio="anyres_max_9", chat_template=_chatml("<image>\n"))
    return _seeded(LlavaOnevisionForConditionalGeneration, config, seed), proc


def _gemma3(seed: int):
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = build_tokenizer(specials=["<start_of_image>", "<end_of_image>", "<image_soft_token>",
                                    "<start_of_turn>", "<end_of_turn>"],
                          bos="<bos>", eos="<eos>", pad="<pad>",
                          named={"image_token": "<image_soft_token>",
                                 "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"})
    size, patch, per_image = 16, 4, 4  # 4 x 4 patches pooled to 2 x 2 soft tokens
    boi, eoi, img = _ids(tok, "<start_of_image>", "<end_of_image>", "<image_soft_token>")
    config = Gemma3Config(
        vision_config=_vision("SiglipVisionConfig", image_size=size, patch_size=patch),
        text_config=_text(tok, "Gemma3TextConfig", query_pre_attn_scalar=16, sliding_window=8),
        mm_tokens_per_image=per_image, boi_token_id=boi, eoi_token_id=eoi,
        image_token_id=img, tie_word_embeddings=False)
    # pan-and-scan stays off, as Gemma3Processor's defaults have it: one block per image
    improc = Gemma3ImageProcessorPil(size={"height": size, "width": size})
    proc = Gemma3Processor(image_processor=improc, tokenizer=tok, image_seq_length=per_image,
                           chat_template=GEMMA3_TEMPLATE)
    return _seeded(Gemma3ForConditionalGeneration, config, seed), proc


def _internvl(seed: int):
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    tok = build_tokenizer(specials=[*CHATML, "<img>", "</img>", "<IMG_CONTEXT>", "<video>"],
                          bos=None, eos="<|im_end|>", pad="<|endoftext|>",
                          named={"start_image_token": "<img>", "end_image_token": "</img>",
                                 "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
    size, patch = 16, 4
    per_tile = (size // patch) ** 2 // 4  # pixel shuffle by 0.5
    config = InternVLConfig(
        vision_config=_vision("InternVLVisionConfig", image_size=[size, size],
                              patch_size=[patch, patch]),
        text_config=_text(tok, "Qwen2Config"),
        image_token_id=tok.convert_tokens_to_ids("<IMG_CONTEXT>"), image_seq_length=per_tile,
        downsample_ratio=0.5, tie_word_embeddings=False)
    improc = GotOcr2ImageProcessorPil(size={"height": size, "width": size}, crop_to_patches=True,
                                      min_patches=1, max_patches=4)
    proc = build_image_only(InternVLProcessor, image_processor=improc, tokenizer=tok,
                            image_seq_length=per_tile, chat_template=_chatml("<IMG_CONTEXT>\n"))
    return _seeded(InternVLForConditionalGeneration, config, seed), proc


def _idefics3(kind: str, seed: int):
    import transformers

    specials = ["<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                *IDEFICS3_TILES]
    if kind == "idefics3":
        tok = build_tokenizer(specials=["<|begin_of_text|>", *specials], bos="<|begin_of_text|>",
                              eos="<end_of_utterance>", pad="<|finetune_right_pad_id|>")
        prefix = "Idefics3"
    else:  # SmolVLM2
        tok = build_tokenizer(specials=[*CHATML, *specials], bos="<|im_start|>",
                              eos="<end_of_utterance>", pad="<|im_end|>")
        prefix = "SmolVLM"
    size, patch = 16, 4
    per_tile = (size // patch) ** 2 // 4  # pixel shuffle, scale factor 2
    config = getattr(transformers, f"{prefix}Config")(
        vision_config=_vision(f"{prefix}VisionConfig", image_size=size, patch_size=patch),
        text_config=_text(tok, "LlamaConfig"), scale_factor=2,
        image_token_id=tok.convert_tokens_to_ids("<image>"))
    module = getattr(transformers.models, prefix.lower())
    improc_cls = getattr(getattr(module, f"image_processing_pil_{prefix.lower()}"),
                         f"{prefix}ImageProcessorPil")
    # images up to 32 px are split into 16 px tiles (plus the whole image at 16 px)
    improc = improc_cls(size={"longest_edge": 2 * size}, max_image_size={"longest_edge": size},
                        do_image_splitting=True)
    parts = dict(image_processor=improc, tokenizer=tok, image_seq_len=per_tile,
                 chat_template=IDEFICS3_TEMPLATE)
    proc_cls = getattr(transformers, f"{prefix}Processor")
    proc = proc_cls(**parts) if kind == "idefics3" else build_image_only(proc_cls, **parts)
    return _seeded(getattr(transformers, f"{prefix}ForConditionalGeneration"), config, seed), proc


def _paligemma(seed: int):
    from transformers import PaliGemmaConfig, PaliGemmaForConditionalGeneration, PaliGemmaProcessor
    from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

    tok = build_tokenizer(specials=["<image>"], bos="<bos>", eos="<eos>", pad="<pad>")
    size, patch = 16, 4
    improc = SiglipImageProcessorPil(size={"height": size, "width": size})
    improc.image_seq_length = (size // patch) ** 2  # as PaliGemma checkpoints' configs carry
    proc = PaliGemmaProcessor(image_processor=improc, tokenizer=tok)  # adds <loc>/<seg> tokens
    # PaliGemma 2: a Gemma 2 language model, which soft-caps its logits
    text = _text(tok, "Gemma2Config", query_pre_attn_scalar=16, sliding_window=8,
                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0)
    config = PaliGemmaConfig(
        vision_config=_vision("SiglipVisionConfig", image_size=size, patch_size=patch,
                              projection_dim=D_MODEL),
        text_config=text, projection_dim=D_MODEL,
        image_token_id=tok.convert_tokens_to_ids("<image>"), tie_word_embeddings=False)
    return _seeded(PaliGemmaForConditionalGeneration, config, seed), proc


def _pixtral(kind: str, seed: int):
    from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

    tok = build_tokenizer(specials=["[INST]", "[/INST]", "[IMG]", "[IMG_BREAK]", "[IMG_END]"])
    size, patch = 32, 4
    vision = _vision("PixtralVisionConfig", image_size=size, patch_size=patch, head_dim=16)
    img = tok.convert_tokens_to_ids("[IMG]")
    if kind == "pixtral":  # a LLaVA config with a Pixtral vision tower
        from transformers import LlavaConfig, LlavaForConditionalGeneration

        config = LlavaConfig(vision_config=vision, text_config=_text(tok, "MistralConfig"),
                             image_token_id=img, vision_feature_layer=-1,
                             vision_feature_select_strategy="full")
        model_cls, merge = LlavaForConditionalGeneration, 1
    else:
        from transformers import Mistral3Config, Mistral3ForConditionalGeneration

        config = Mistral3Config(vision_config=vision, text_config=_text(tok, "MistralConfig"),
                                image_token_id=img, spatial_merge_size=2,
                                tie_word_embeddings=False)
        model_cls, merge = Mistral3ForConditionalGeneration, 2
    improc = PixtralImageProcessorPil(size={"longest_edge": size},
                                      patch_size={"height": patch, "width": patch})
    proc = PixtralTextImageProcessor(image_processor=improc, tokenizer=tok, patch_size=patch,
                                     spatial_merge_size=merge, chat_template=PIXTRAL_TEMPLATE)
    return _seeded(model_cls, config, seed), proc


def _llava(seed: int, **kwargs):
    return build_tiny_llava(seed=seed, **kwargs)  # sizes may be given (load_model("tiny", ...))


# family key (see .families.FAMILIES) -> builder(seed); qwen2_5_vl and smolvlm are the second
# model types of their families
TINY_BUILDERS: dict[str, Callable[..., tuple]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": lambda seed: _qwen("2", seed),
    "qwen2_5_vl": lambda seed: _qwen("2.5", seed),
    "qwen3_vl": lambda seed: _qwen("3", seed),
    "gemma3": _gemma3,
    "internvl": _internvl,
    "idefics3": lambda seed: _idefics3("idefics3", seed),
    "smolvlm": lambda seed: _idefics3("smolvlm", seed),
    "paligemma": _paligemma,
    "mistral3": lambda seed: _pixtral("mistral3", seed),
    "pixtral": lambda seed: _pixtral("pixtral", seed),
}


def build_tiny_family(key: str, seed: int = 0, **kwargs):
    """(model, processor) of the tiny random model ``key`` (one of ``TINY_BUILDERS``).

    ``kwargs`` (LLaVA only) are :func:`~esmc_lens.models.tiny.build_tiny_llava`'s sizes.
    """
    if key not in TINY_BUILDERS:
        raise ConfigError(f"no tiny model {key!r}: use 'tiny:<name>' with one of "
                          f"{sorted(TINY_BUILDERS)}")
    return TINY_BUILDERS[key](seed, **kwargs)
