"""``ResidualCache``: every layer's residual stream at the chosen prompt positions.

The one object the rest of esmc_lens reads (modelled on TransformerLens' ``ActivationCache``).
A typical session::

    >>> vlm = load_model("offline")                                     # doctest: +SKIP
    >>> cache = capture(vlm, images, "The color of the flower is")      # doctest: +SKIP
    >>> cache.states.shape      # [images, layers + 1, positions, d_model]   # doctest: +SKIP
    >>> cache.token_table()     # which token each position is           # doctest: +SKIP
    >>> h = cache.cell(layer=27, position="color")   # [images, d_model]  # doctest: +SKIP
    >>> probs, ids = top_k(h, Unembed.from_model(vlm), k=5)               # doctest: +SKIP
    >>> cache.save("runs/flowers-color"); ResidualCache.load("runs/flowers-color")  # doctest: +SKIP

Conventions
-----------
* Stream index ``s`` (axis 1): ``0`` is the embedding output (the input of decoder layer 0,
  image features already merged in); ``s = l + 1`` is the output of decoder layer ``l``.
  So ``states[:, -1]`` is the last layer's output *before* the final norm, and the lens of
  it equals the model's logits. ``stream`` lists the stored stream indices.
* ``positions[i, p]`` is the index of stored position ``p`` of image ``i`` in that image's
  *unpadded* token sequence (left padding removed), ``-1`` where a shorter prompt left
  the slot empty; ``tokens[i][p]`` is its token string.
* ``states`` are stored in fp16 by default (``store_dtype``); lens readouts computed during
  capture (``keyword_probs``, ``top_ids``, ``top_probs``) were taken in fp32 on the device.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch

from ..errors import CaptureError, ConfigError, EsmcWarning, write_failure

TENSOR_FIELDS = ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
            "top_probs")
# 2: cache.json also holds the SHA-256 of its own content (``meta_sha256``).
FORMAT_VERSION = 2
_DOC_KEYS = ("format_version", "tokens", "stream", "image_ids", "prompts", "meta",
             "keywords", "sha256")


def strip_token(tok: str) -> str:
    """A token string as a word: BPE/SentencePiece space markers removed, lower case."""
    return tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").strip().lower()


@dataclass
class ResidualCache:
    """Residual stream of every captured layer at the captured positions (see module doc).

    Attributes
    ----------
    states : [n_images, n_stream, n_positions, d_model]
    positions : [n_images, n_positions] long, unpadded token index or -1
    tokens : n_images lists of n_positions token strings ("" for empty slots)
    image_span : [n_images, 2] (start, stop) of the image tokens in the unpadded sequence
    stream : stored stream indices (0 = embeddings, l + 1 = after decoder layer l)
    image_ids : an identifier per image (file name or index)
    prompts : the criterion prompt of each image
    meta : model, formatted prompt, chat template, library versions, ...
    vision : [n_images, d_vision] what the vision side gives the language model, if
        captured: its blocks (e.g. the vision tower's pooled feature) side by side, named
        with their widths in ``meta["vision_blocks"]`` (:meth:`vision_blocks`)
    keywords, keyword_probs : keyword names and lens probabilities
        [n_images, n_stream, n_positions, n_keywords], if requested at capture
    top_ids, top_probs : [n_images, n_stream, n_positions, k] lens top-k, if requested
    """

    states: torch.Tensor
    positions: torch.Tensor
    tokens: list[list[str]]
    image_span: torch.Tensor
    stream: list[int]
    image_ids: list[str]
    prompts: list[str]
    meta: dict = field(default_factory=dict)
    vision: torch.Tensor | None = None
    keywords: list[str] | None = None
    keyword_probs: torch.Tensor | None = None
    top_ids: torch.Tensor | None = None
    top_probs: torch.Tensor | None = None

    # -- shape ---------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.states.shape[0]

    @property
    def n_positions(self) -> int:
        return self.states.shape[2]

    @property
    def d_model(self) -> int:
        return self.states.shape[3]

    def __repr__(self) -> str:
        return (f"ResidualCache(images={len(self)}, stream={self.stream[0]}..{self.stream[-1]} "
                f"({len(self.stream)}), positions={self.n_positions}, d_model={self.d_model}, "
                f"dtype={self.states.dtype}, model={self.meta.get('model')!r})")

    # -- indexing --------------------------------------------------------------------------
    def stream_index(self, layer: int) -> int:
        """Axis-1 index of stream index ``layer`` (negative counts from the last stored)."""
        if layer < 0:
            layer = self.stream[layer]
        try:
            return self.stream.index(layer)
        except ValueError:
            raise ConfigError(f"layer {layer} was not captured; captured stream indices are "
                              f"{self.stream[0]}..{self.stream[-1]}") from None

    def position_index(self, position: int | str) -> int:
        """Axis-2 index of a stored position, by slot number or by token (first match).

        A token is matched against every image's token strings with :func:`strip_token`;
        it must sit in the same slot for all images that have it.
        """
        if isinstance(position, int):
            if not -self.n_positions <= position < self.n_positions:
                raise ConfigError(f"position {position} out of range: {self.n_positions} "
                                  "positions were captured")
            return position % self.n_positions
        want = strip_token(position)
        slots = {next((p for p, t in enumerate(toks) if strip_token(t) == want), None)
                 for toks in self.tokens}
        slots.discard(None)
        if not slots:
            raise ConfigError(f"no captured position holds the token {position!r}; tokens "
                              f"are {self.tokens[0]}")
        if len(slots) > 1:
            raise ConfigError(f"token {position!r} sits in different slots {sorted(slots)} "
                              "across images (prompts differ): select it by slot number")
        return slots.pop()

    def vision_blocks(self) -> dict[str, slice]:
        """Column range of each vision-side block in :attr:`vision`, in order.

        Read from ``meta["vision_blocks"]`` (written by the capture); a cache saved before
        that record existed holds the vision tower's pooled feature alone.
        """
        if self.vision is None:
            raise ConfigError("the cache holds no vision features: capture(..., vision=True)")
        widths = self.meta.get("vision_blocks") or {"vision tower pooled": self.vision.shape[1]}
        if sum(widths.values()) != self.vision.shape[1]:
            raise ConfigError(f"meta['vision_blocks'] {widths} does not add up to the "
                              f"{self.vision.shape[1]} vision columns: capture it again")
        out, start = {}, 0
        for name, width in widths.items():
            out[name] = slice(start, start + int(width))
            start += int(width)
        return out

    def layer(self, layer: int) -> torch.Tensor:
        """States of one stream index: [n_images, n_positions, d_model]."""
        return self.states[:, self.stream_index(layer)]

    def cell(self, layer: int, position: int | str) -> torch.Tensor:
        """States at one (layer, position): [n_images, d_model]."""
        return self.states[:, self.stream_index(layer), self.position_index(position)]

    def token_table(self, image: int = 0) -> pd.DataFrame:
        """One row per stored position of ``image``: slot, sequence index and token."""
        return pd.DataFrame({
            "slot": range(self.n_positions),
            "seq_index": self.positions[image].tolist(),
            "token": self.tokens[image],
        })

    def position_labels(self, image: int = 0) -> list[str]:
        """Readable labels ``"12:color"`` of the stored positions (for plot axes)."""
        return [f"{int(i)}:{strip_token(t) or repr(t)}"
                for i, t in zip(self.positions[image], self.tokens[image], strict=True)]

    def select(self, images: Sequence[int] | torch.Tensor) -> ResidualCache:
        """A cache of a subset of images (in the given order)."""
        idx = torch.as_tensor(list(images), dtype=torch.long)
        pick = lambda t: None if t is None else t[idx]  # noqa: E731
        return ResidualCache(
            states=self.states[idx], positions=self.positions[idx],
            tokens=[self.tokens[i] for i in idx.tolist()], image_span=self.image_span[idx],
            stream=list(self.stream), image_ids=[self.image_ids[i] for i in idx.tolist()],
            prompts=[self.prompts[i] for i in idx.tolist()], meta=dict(self.meta),
            vision=pick(self.vision), keywords=self.keywords,
            keyword_probs=pick(self.keyword_probs), top_ids=pick(self.top_ids),
            top_probs=pick(self.top_probs),
        )

    # -- combining -------------------------------------------------------------------------
    @classmethod
    def concat(cls, caches: Sequence[ResidualCache]) -> ResidualCache:
        """Join caches of the same model, layers and keywords along the image axis.

        Position axes of different widths (prompts of different lengths) are right-padded
        with empty slots (position -1, zero states).
        """
        if not caches:
            raise ConfigError("concat needs at least one cache")
        first = caches[0]
        for c in caches[1:]:
            if c.stream != first.stream or c.keywords != first.keywords:
                raise ConfigError("caches differ in captured layers or keywords; capture them "
                                  "with the same settings to concatenate")
        width = max(c.n_positions for c in caches)

        def cat(name: str, fill) -> torch.Tensor | None:
            parts = [getattr(c, name) for c in caches]
            if any(p is None for p in parts):
                return None
            if name in ("states", "keyword_probs", "top_ids", "top_probs", "positions"):
                axis = 2 if name != "positions" else 1
                parts = [_pad_axis(p, axis, width, fill) for p in parts]
            return torch.cat(parts, dim=0)

        return cls(
            states=cat("states", 0), positions=cat("positions", -1),
            tokens=[t + [""] * (width - len(t)) for c in caches for t in c.tokens],
            image_span=cat("image_span", 0), stream=list(first.stream),
            image_ids=[i for c in caches for i in c.image_ids],
            prompts=[p for c in caches for p in c.prompts], meta=dict(first.meta),
            vision=cat("vision", 0), keywords=first.keywords,
            keyword_probs=cat("keyword_probs", 0), top_ids=cat("top_ids", 0),
            top_probs=cat("top_probs", 0),
        )

    # -- disk ----------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write ``path/tensors.safetensors`` and ``path/cache.json`` (each atomically).

        ``cache.json`` holds the SHA-256 of the tensor file and of its own content
        (``meta_sha256``), so :meth:`load` detects damage to either. A failed write (disk
        full, read-only) raises ``CaptureError`` and leaves no ``.part`` file behind.
        """
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {n: getattr(self, n).contiguous() for n in TENSOR_FIELDS
                   if getattr(self, n) is not None}
        tmp, tmpj = path / "tensors.safetensors.part", path / "cache.json.part"
        try:
            path.mkdir(parents=True, exist_ok=True)
            save_file(tensors, tmp)
            digest = file_sha256(tmp)
            doc = {
                "format_version": FORMAT_VERSION, "tokens": self.tokens, "stream": self.stream,
                "image_ids": self.image_ids, "prompts": self.prompts, "meta": self.meta,
                "keywords": self.keywords, "sha256": digest,
            }
            doc = json.loads(json.dumps(doc, default=str))  # the form load() reads back
            doc["meta_sha256"] = _doc_sha256(doc)
            tmpj.write_text(json.dumps(doc, indent=1))
            os.replace(tmp, path / "tensors.safetensors")
            os.replace(tmpj, path / "cache.json")
        except Exception as exc:
            failure = write_failure(exc)
            if failure is None:
                raise
            for f in (tmp, tmpj):
                f.unlink(missing_ok=True)
            reason, full = failure
            raise CaptureError(f"cannot write the cache {path} ({reason}): "
                               + ("free space on that disk or save elsewhere" if full else
                                  "save it to a folder you can write to")) from exc
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, verify: bool = True) -> ResidualCache:
        """Read a cache written by :meth:`save`.

        With ``verify`` the SHA-256 of the tensors and of the metadata are checked; the
        tensors' shapes are always checked against the metadata (images, layers,
        positions, keywords). Any mismatch raises ``CaptureError`` naming the file.
        """
        from safetensors.torch import load_file

        path = Path(path)
        try:
            doc = json.loads((path / "cache.json").read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CaptureError(f"{path} holds no readable esmc_lens cache ({exc})") from exc
        if not isinstance(doc, dict) or not set(_DOC_KEYS) <= set(doc):
            raise CaptureError(f"{path / 'cache.json'} is damaged (fields missing): delete "
                               f"{path} and capture again")
        version = doc.get("format_version")
        if version not in (1, FORMAT_VERSION):
            raise CaptureError(f"{path} was written in cache format {version!r}; this "
                               f"esmc_lens reads formats 1 and {FORMAT_VERSION}: capture again")
        file = path / "tensors.safetensors"
        if verify:
            if version == 1:
                warnings.warn(f"{path} was saved in cache format 1, whose metadata is not "
                              "checksummed; save it again to add one", EsmcWarning,
                              stacklevel=2)
            elif doc.get("meta_sha256") != _doc_sha256(doc):
                raise CaptureError(f"{path / 'cache.json'} is damaged (metadata checksum "
                                   f"mismatch): delete {path} and capture again")
            try:
                digest = file_sha256(file)
            except OSError as exc:
                raise CaptureError(f"{file} cannot be read ({exc.strerror or exc}): delete "
                                   f"{path} and capture again") from None
            if digest != doc["sha256"]:
                raise CaptureError(f"{file} is damaged (checksum mismatch): delete {path} and "
                                   "capture again")
        try:
            t = load_file(file)
        except Exception as exc:  # safetensors' own error type for a malformed file
            raise CaptureError(f"{file} cannot be read ({' '.join(str(exc).split())}): "
                               f"delete {path} and capture again") from None
        cache = cls(
            states=t.get("states"), positions=t.get("positions"), tokens=doc["tokens"],
            image_span=t.get("image_span"), stream=doc["stream"], image_ids=doc["image_ids"],
            prompts=doc["prompts"], meta=doc["meta"], vision=t.get("vision"),
            keywords=doc["keywords"], keyword_probs=t.get("keyword_probs"),
            top_ids=t.get("top_ids"), top_probs=t.get("top_probs"),
        )
        problem = cache.shape_problem()
        if problem is not None:
            raise CaptureError(f"{path} is damaged ({problem}): delete it and capture again")
        return cache

    def shape_problem(self) -> str | None:
        """Why the tensors do not fit the metadata (images, layers, positions), or None."""
        s = self.states
        if s is None or self.positions is None or self.image_span is None:
            return "states, positions or image_span missing"
        if s.ndim != 4:
            return f"states have {s.ndim} axes, not 4"
        n, n_stream, n_pos = s.shape[:3]
        lists = {"image_ids": self.image_ids, "prompts": self.prompts, "tokens": self.tokens}
        for name, value in lists.items():
            if not isinstance(value, list) or len(value) != n:
                return f"{name} do not match the {n} images of the states"
        if any(not isinstance(t, list) or len(t) != n_pos for t in self.tokens):
            return f"token lists do not match the {n_pos} positions of the states"
        if (not isinstance(self.stream, list) or len(self.stream) != n_stream
                or any(not isinstance(x, int) for x in self.stream)
                or self.stream != sorted(set(self.stream))):
            return f"stream {self.stream!r} does not list {n_stream} increasing layer indices"
        if tuple(self.positions.shape) != (n, n_pos):
            return f"positions have shape {tuple(self.positions.shape)}, not {(n, n_pos)}"
        if tuple(self.image_span.shape) != (n, 2):
            return f"image_span has shape {tuple(self.image_span.shape)}, not {(n, 2)}"
        if self.vision is not None and self.vision.shape[0] != n:
            return f"vision features hold {self.vision.shape[0]} images, not {n}"
        if (self.keyword_probs is None) != (self.keywords is None):
            return "keywords and their lens probabilities do not come together"
        if self.keyword_probs is not None and tuple(self.keyword_probs.shape) != (
                n, n_stream, n_pos, len(self.keywords)):
            return (f"keyword_probs have shape {tuple(self.keyword_probs.shape)}, not "
                    f"{(n, n_stream, n_pos, len(self.keywords))}")
        for name in ("top_ids", "top_probs"):
            t = getattr(self, name)
            if t is not None and tuple(t.shape[:3]) != (n, n_stream, n_pos):
                return f"{name} have shape {tuple(t.shape)}, not {(n, n_stream, n_pos)} + (k,)"
        return None


def _pad_axis(t: torch.Tensor, axis: int, width: int, fill) -> torch.Tensor:
    if t.shape[axis] == width:
        return t
    shape = list(t.shape)
    shape[axis] = width - t.shape[axis]
    return torch.cat([t, torch.full(shape, fill, dtype=t.dtype)], dim=axis)


def file_sha256(path: Path) -> str:
    """SHA-256 of a file's bytes, read in 4 MiB chunks (``OSError`` if it cannot be read)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _doc_sha256(doc: dict) -> str:
    """SHA-256 of a ``cache.json`` document without its own checksum (canonical JSON)."""
    body = {k: v for k, v in doc.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()
