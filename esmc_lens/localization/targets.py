"""Target embeddings: the per-image vectors that are clustered (paper §3.2, Algorithm 2 input).

For each target cell ``(stream index, slot)`` found by
:func:`esmc_lens.localization.votes.localize`, every image's residual state
``cache.states[:, stream, slot]`` is read in one of three spaces:

=========  ============================================================  ===========
space      vector                                                        dimension
=========  ============================================================  ===========
"logits"   logit lens ``lm_head(final_norm(h))`` (the paper's             ``|V|``
           vocabulary space, ``in_dim = 32000`` for LLaVA), float32
"probs"    softmax of the lens logits (rows sum to 1)                    ``|V|``
"hidden"   the raw residual state ``h`` (before the final norm), float32  ``d_model``
=========  ============================================================  ===========

The published code does not say whether its vocabulary vectors are logits or
probabilities; the paper's section 4.3 reads the target's values "after applying the softmax
function to embedding logits" (0.8194 and 0.7436 for "sky"), so "probs" is the default.
Several targets (tied cells of Algorithm 1) are concatenated along the feature axis in the
given order.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConfigError
from ..lens.unembed import DEFAULT_CHUNK, Unembed, lens_logits

__all__ = ["SPACES", "target_embeddings", "target_labels"]

SPACES = ("logits", "probs", "hidden")


def _as_cells(targets) -> list[tuple[int, int]]:
    """Cells from a Localization, one (stream, slot) pair, or a list of pairs."""
    cells = getattr(targets, "targets", targets)
    if (isinstance(cells, tuple) and len(cells) == 2
            and all(isinstance(c, int | np.integer) for c in cells)):
        cells = [cells]
    try:
        out = [(int(s), int(p)) for s, p in cells]
    except (TypeError, ValueError):
        raise ConfigError(f"targets={targets!r}: give a Localization or a list of "
                          "(stream index, slot) pairs") from None
    if not out:
        raise ConfigError("targets is empty: give at least one (stream index, slot) cell")
    return out


def target_labels(cache, targets) -> list[str]:
    """``E_l(seq_index:token)`` label of each target cell (image 0's tokens)."""
    labels = cache.position_labels()
    return [f"E_{s}({labels[cache.position_index(p)]})" for s, p in _as_cells(targets)]


def target_embeddings(cache, targets, space: str = "probs", unembed: Unembed | None = None,
                      chunk: int = DEFAULT_CHUNK) -> np.ndarray:
    """Per-image target embedding(s) in the chosen space.

    Parameters
    ----------
    cache : :class:`~esmc_lens.residual.cache.ResidualCache`
        ``states`` [n_images, n_stream, n_positions, d_model].
    targets : Localization, (stream index, slot), or list of them
        Stream index as in ``cache.stream`` (0 = embeddings, l + 1 = after decoder layer
        l), slot = axis-2 index of the stored positions.
    space : "probs" (default), "logits" or "hidden" (see the module table).
    unembed : :class:`~esmc_lens.lens.unembed.Unembed`, required for "logits"/"probs"
        (``Unembed.from_model(vlm)``).
    chunk : rows per lens chunk (bounds the device memory of one ``[chunk, |V|]`` block).

    Returns
    -------
    np.ndarray float32 [n_images, n_targets * dim]
        ``dim`` = ``|V|`` for "logits"/"probs", ``d_model`` for "hidden"; targets
        concatenated in order.
    """
    if space not in SPACES:
        raise ConfigError(f"space={space!r}: use one of {SPACES}")
    if space != "hidden" and unembed is None:
        raise ConfigError(f"space={space!r} needs the lens: pass unembed=Unembed.from_model(vlm)"
                          " (or use space='hidden', which needs no model)")
    cells = _as_cells(targets)
    parts = []
    for s, p in cells:
        axis1 = cache.stream_index(s)
        slot = cache.position_index(p)
        empty = (cache.positions[:, slot] < 0).nonzero().flatten().tolist()
        if empty:
            # A zeroed state would be clustered as if it were an image: tell the user.
            warnings.warn(f"target slot {slot} is empty for {len(empty)} image(s) (e.g. "
                          f"{empty[:5]}): their prompts are shorter; their embedding is the "
                          "lens of a zero state", stacklevel=2)
        h = cache.states[:, axis1, slot]  # [n, d]
        if space == "hidden":
            parts.append(h.float().cpu().numpy())
            continue
        logits = lens_logits(h, unembed, chunk=chunk)  # [n, V] float32 on the CPU
        if space == "probs":
            logits = torch.softmax(logits, dim=-1)
        parts.append(logits.numpy())
    return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
