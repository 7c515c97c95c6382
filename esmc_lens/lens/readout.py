"""Lens readouts: what the pipeline keeps of the lens at each cell, without the vocabulary axis.

:func:`readout` computes keyword probabilities and top-k tokens of many states in chunks, in
the buffers of a :class:`~esmc_lens.lens.unembed.LensWorkspace`; only ``[..., K]`` and
``[..., k]`` leave the device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .unembed import DEFAULT_CHUNK, LensWorkspace, Unembed, chunks


@dataclass
class LensReadout:
    """What the pipeline keeps of the lens at each cell, without the vocabulary axis.

    ``keyword_probs`` [..., K] (K = number of keyword groups), ``top_ids`` / ``top_probs``
    [..., k]; a field is None when it was not asked for.
    """

    keyword_probs: torch.Tensor | None
    top_ids: torch.Tensor | None
    top_probs: torch.Tensor | None


def readout(states: torch.Tensor, unembed: Unembed, keyword_groups: Sequence[Sequence[int]] = (),
            k: int = 0, chunk: int = DEFAULT_CHUNK,
            out_device: str | torch.device = "cpu",
            workspace: LensWorkspace | None = None) -> LensReadout:
    """Keyword probabilities and top-k tokens of every cell of ``states`` [..., d_model].

    ``keyword_groups[j]`` lists the token ids whose probabilities are summed into keyword j
    (see :func:`keyword_token_ids`). Chunked over cells; only [..., K] and [..., k] leave
    the device. The logits and probabilities of a chunk live in ``workspace``'s buffers
    (a new :class:`LensWorkspace` when None; pass one to reuse them across calls).
    """
    ws = LensWorkspace() if workspace is None else workspace
    lead = states.shape[:-1]
    flat = states.reshape(-1, states.shape[-1])
    n = flat.shape[0]
    kw = top_i = top_p = None
    if keyword_groups:
        index, owner = _group_index(keyword_groups, unembed.device)
        kw = torch.zeros(n, len(keyword_groups), dtype=torch.float32, device=out_device)
    if k:
        top_i = torch.zeros(n, k, dtype=torch.long, device=out_device)
        top_p = torch.zeros(n, k, dtype=torch.float32, device=out_device)
    with torch.inference_mode():
        for s, rows in chunks(flat, chunk):
            logits = unembed(rows, ws).float()
            probs = torch.softmax(logits, dim=-1,
                                  out=ws.buffer("probs", logits.shape, logits.dtype,
                                                logits.device))
            e = s + rows.shape[0]
            if kw is not None:
                sums = torch.zeros(rows.shape[0], len(keyword_groups), device=probs.device)
                sums.index_add_(1, owner, probs[:, index])
                kw[s:e] = sums.to(out_device)
            if k:
                p, i = topk_rows(probs, k)
                top_p[s:e], top_i[s:e] = p.to(out_device), i.to(out_device)
    shape = lambda t: None if t is None else t.reshape(*lead, t.shape[-1])  # noqa: E731
    return LensReadout(shape(kw), shape(top_i), shape(top_p))


TOPK_BLOCK = 128  # columns per block in topk_rows


def topk_rows(x: torch.Tensor, k: int, block: int = TOPK_BLOCK
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``x.topk(k, dim=-1)`` of a 2-D ``x`` [rows, vocab], exact, faster on the CPU.

    torch's CPU top-k partially sorts a copy of each whole row (a quarter of the offline
    model's lens time). Here each row is cut into blocks of ``block`` columns: the k
    largest entries lie in the k blocks with the largest maxima (an entry of any other
    block is outranked by those k maxima, k distinct entries at least as large), so top-k
    runs on those k x ``block`` candidates only. The values equal ``torch.topk``'s; so do
    the indices unless entries tie at the k-th value, where either may be returned. On
    CUDA, or where blocks would not cut the work, it is ``torch.topk``.
    """
    n, v = x.shape
    n_blocks = v // block
    if x.device.type == "cuda" or n_blocks <= k or 4 * k * block > v:
        return x.topk(k, dim=-1)
    main = n_blocks * block
    maxima = x[:, :main].reshape(n, n_blocks, block).amax(-1)
    best = maxima.topk(k, dim=-1).indices  # [n, k]
    cols = (best[..., None] * block + torch.arange(block, device=x.device)).reshape(n, -1)
    if main < v:  # the last, partial block is always a candidate
        cols = torch.cat([cols, torch.arange(main, v, device=x.device).expand(n, -1)], dim=1)
    values, j = x.gather(1, cols).topk(k, dim=-1)
    return values, cols.gather(1, j)


def _group_index(groups: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    ids, owner = [], []
    for j, g in enumerate(groups):
        ids.extend(g)
        owner.extend([j] * len(g))
    return (torch.tensor(ids, dtype=torch.long, device=device),
            torch.tensor(owner, dtype=torch.long, device=device))


def top_k(states: torch.Tensor, unembed: Unembed, k: int = 5, chunk: int = DEFAULT_CHUNK):
    """(probs [..., k], ids [..., k]) of the lens of ``states`` [..., d_model]."""
    r = readout(states, unembed, k=k, chunk=chunk)
    return r.top_probs, r.top_ids


def keyword_probs(states: torch.Tensor, unembed: Unembed, keyword_groups: Sequence[Sequence[int]],
                  chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Lens probability [..., K] of each keyword group at each cell of ``states``."""
    return readout(states, unembed, keyword_groups=keyword_groups, chunk=chunk).keyword_probs
