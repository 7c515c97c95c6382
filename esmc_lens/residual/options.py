"""What a capture keeps: one options object shared by every capture entry point.

:func:`~esmc_lens.residual.capture.capture`, :func:`~esmc_lens.residual.capture.iter_capture`,
:func:`~esmc_lens.residual.store.cached_capture`,
:func:`~esmc_lens.residual.distributed.capture_to_disk` and
:func:`~esmc_lens.residual.distributed.capture_sharded` take a :class:`CaptureOptions` (or
its fields as keyword arguments, which :meth:`CaptureOptions.of` merges into one), and the
disk cache keys a capture by :meth:`CaptureOptions.key_doc`. How a capture runs (batch size,
engine, remote, prefetch, progress) is not an option of what it keeps: those stay arguments.

>>> opts = CaptureOptions.of(keywords=["red", "white"], layers=[30, 29])
>>> opts.layers, opts.keywords
((29, 30), ('red', 'white'))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

import torch

from ..errors import ConfigError

__all__ = ["CaptureOptions", "PositionSpec"]

PositionSpec = str | slice | Sequence[int] | Sequence[str]


@dataclass(frozen=True)
class CaptureOptions:
    """What a capture keeps of the residual stream, and the lens readouts it computes.

    Attributes
    ----------
    positions : ``"prompt"`` (the tokens after the image), ``"all"``, a ``slice``, sequence
        indices (negative from the end) or token words: see
        :func:`~esmc_lens.residual.capture.resolve_positions`.
    layers : stream indices to keep (0 = embeddings, l + 1 = after decoder layer l), sorted
        and without repeats; ``None``: all ``n_layers + 1``.
    store_dtype : dtype of the stored states (fp16 halves the memory; float32 for exact
        comparisons).
    keywords : keywords whose lens probabilities are computed during capture.
    top_k : top-k lens tokens computed during capture (0: none).
    vision : also keep what the vision side gives the language model about each image.
    """

    positions: PositionSpec = "prompt"
    layers: tuple[int, ...] | None = None
    store_dtype: torch.dtype = torch.float16
    keywords: tuple[str, ...] | None = None
    top_k: int = 0
    vision: bool = False

    def __post_init__(self) -> None:
        # normalised once here, so equal captures have equal options (and cache keys)
        if self.layers is not None:
            if isinstance(self.layers, int | str) or not all(
                    isinstance(x, int) and not isinstance(x, bool) for x in self.layers):
                raise ConfigError(f"layers={self.layers!r}: give stream indices, e.g. "
                                  "[0, 15, 30]")
            object.__setattr__(self, "layers", tuple(sorted({int(x) for x in self.layers})))
        if self.keywords is not None:
            if isinstance(self.keywords, str):
                raise ConfigError(f"keywords={self.keywords!r}: give a list of words, e.g. "
                                  "['red', 'white']")
            object.__setattr__(self, "keywords", tuple(str(w) for w in self.keywords) or None)
        if not isinstance(self.store_dtype, torch.dtype):
            raise ConfigError(f"store_dtype={self.store_dtype!r}: give a torch dtype, e.g. "
                              "torch.float16")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"top_k={self.top_k!r} must be an int >= 0")

    @classmethod
    def of(cls, options: CaptureOptions | None = None, **overrides) -> CaptureOptions:
        """``options`` (default: the defaults) with ``overrides`` (field names) applied."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ConfigError(f"unknown capture options {unknown}; the options are "
                              f"{sorted(known)}")
        if options is not None and not isinstance(options, cls):
            raise ConfigError(f"options must be a CaptureOptions, got {type(options).__name__}")
        return replace(options or cls(), **overrides)

    def key_doc(self) -> dict:
        """The options as plain JSON data (what the disk cache's key hashes)."""
        def plain(v):
            if isinstance(v, torch.dtype):
                return str(v).replace("torch.", "")
            if isinstance(v, slice):
                return repr(v)
            if isinstance(v, str | int | float | bool) or v is None:
                return v
            return [x if isinstance(x, str | int | float) else repr(x) for x in v]
        return {f.name: plain(getattr(self, f.name)) for f in fields(self)}
