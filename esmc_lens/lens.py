"""The logit lens: read any residual-stream state as a next-token distribution.

``E_l(k) = W_U · norm(A_l(k))`` (paper eq. 3, with the final norm the published helper
forgot). :class:`Unembed` owns the final norm and the unembedding, so the lens of the last
layer is *exactly* the model's logits.

Everything here works on states shaped ``[..., d_model]`` and processes them in chunks of
rows, so the ``[..., vocab]`` tensor of a whole cache is never materialised unless asked
(:func:`lens_logits`).

Keyword rule
------------
A keyword's lens probability is the sum of the probabilities of the tokens that start its
surface variants: with and without a leading space, lower-case and capitalised
(``" red"``, ``"red"``, ``" Red"``, ``"Red"``), each distinct token id counted once; a
variant that the tokenizer starts with a bare space token (``"▁"`` + ``"red"``) is scored by
its first non-blank token. The lens predicts one next token, so a variant that splits into
several tokens can only be scored by its first piece, and a short piece says little: with
SmolLM2, ``"carnation"`` starts with ``" C"`` and ``"daisy"`` with ``"D"``, tokens that
begin thousands of words. So a variant's first piece counts only if it is a whole variant
(one token) or at least ``MIN_PIECE_CHARS`` (3) characters long; a keyword with no such
token is scored by its longest first pieces. :func:`keyword_token_ids` reports keywords
none of whose variants is a single token in ``multi_token``; two keywords sharing a token
get the same score, which is reported as a clash.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .errors import ConfigError

DEFAULT_CHUNK = 4096  # rows of d_model per lens chunk: 4096 x 32000 fp32 = 0.5 GB for LLaVA


class Unembed(nn.Module):
    """Final norm followed by the unembedding: ``logits = lm_head(norm(h))``.

    Shares (does not copy) the model's modules. Computes in float32 by default: an fp16
    model's lens is evaluated on up-cast copies of its weights so probabilities near the
    tau threshold do not depend on half-precision rounding.
    """

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, compute_dtype=torch.float32):
        super().__init__()
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.compute_dtype = compute_dtype

    @classmethod
    def from_model(cls, vlm, compute_dtype=torch.float32) -> Unembed:
        return cls(vlm.final_norm, vlm.lm_head, compute_dtype)

    @property
    def vocab_size(self) -> int:
        return self.lm_head.weight.shape[0]

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def forward(self, h: torch.Tensor, workspace: LensWorkspace | None = None) -> torch.Tensor:
        """[..., d_model] -> logits [..., vocab] in ``compute_dtype``.

        With a ``workspace`` the logits are written into its reused buffer (and so is the
        up-cast copy of an fp16 unembedding; the values are the same): the result is a view
        of that buffer, valid until the workspace is used again.
        """
        h = h.to(self.device)
        w, bias = self.lm_head.weight, getattr(self.lm_head, "bias", None)
        if self.compute_dtype is None or self.compute_dtype == w.dtype:
            normed = self.final_norm(h.to(w.dtype))
            if workspace is None:
                return self.lm_head(normed)
        else:
            with torch.autocast(self.device.type, enabled=False):
                normed = _float_norm(self.final_norm, h.to(self.compute_dtype))
            if workspace is None:  # fresh tensors: autograd may run through them
                logits = normed @ w.to(normed.dtype).T
                return logits if bias is None else logits + bias.to(logits.dtype)
            w = workspace.buffer("weight", w.shape, normed.dtype, w.device).copy_(w)
        rows = normed.reshape(-1, normed.shape[-1])  # torch.mm(out=) needs 2-D, no autograd
        out = workspace.buffer("logits", (rows.shape[0], w.shape[0]), normed.dtype, w.device)
        with torch.autocast(self.device.type, enabled=False):
            torch.mm(rows, w.T, out=out)
        if bias is not None:
            out.add_(bias.to(out.dtype))
        return out.view(*normed.shape[:-1], w.shape[0])


class LensWorkspace:
    """Buffers :func:`readout` reuses from one chunk, and one call, to the next.

    A fresh ``[chunk, vocab]`` fp32 tensor is fresh memory on the CPU, and page-faulting it
    in cost ~0.18 s per 256 MB here: a quarter of the offline model's lens
    (``benchmarks/README.md``). :func:`~esmc_lens.capture.capture` keeps one workspace for
    all its batches. A buffer is reallocated only when a larger or different one is asked
    for; a workspace is not for use by two threads at once.
    """

    def __init__(self) -> None:
        self._buffers: dict[str, torch.Tensor] = {}

    def buffer(self, name: str, shape: Sequence[int], dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
        """An uninitialised tensor of ``shape`` (its rows a view of the stored buffer)."""
        rows, *rest = shape
        buf = self._buffers.get(name)
        if (buf is None or buf.shape[0] < rows or list(buf.shape[1:]) != rest
                or buf.dtype != dtype or buf.device != torch.device(device)):
            buf = self._buffers[name] = torch.empty(rows, *rest, dtype=dtype, device=device)
        return buf[:rows]

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self._buffers.values())


def _float_norm(norm: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Apply an RMSNorm/LayerNorm in h's dtype (its weight up-cast), whatever its own dtype."""
    w = getattr(norm, "weight", None)
    if w is None or w.dtype == h.dtype:
        return norm(h)
    eps = getattr(norm, "variance_epsilon", getattr(norm, "eps", 1e-6))
    if isinstance(norm, nn.LayerNorm):
        return nn.functional.layer_norm(h, norm.normalized_shape, w.to(h.dtype),
                                        None if norm.bias is None else norm.bias.to(h.dtype), eps)
    # Llama-family RMSNorm: x * rsqrt(mean(x^2) + eps) * w
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w.to(h.dtype)


def _chunks(flat: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
    for start in range(0, flat.shape[0], chunk):
        yield start, flat[start:start + chunk]


def lens_logits(states: torch.Tensor, unembed: Unembed, chunk: int = DEFAULT_CHUNK,
                out_device: str | torch.device = "cpu") -> torch.Tensor:
    """Full lens logits [..., vocab] of ``states`` [..., d_model] (materialises everything).

    Use only for a handful of cells; prefer :func:`top_k` and :func:`keyword_probs`.
    """
    flat = states.reshape(-1, states.shape[-1])
    out = torch.empty(flat.shape[0], unembed.vocab_size, dtype=torch.float32, device=out_device)
    ws = LensWorkspace()
    with torch.inference_mode():
        for s, rows in _chunks(flat, chunk):
            out[s:s + rows.shape[0]] = unembed(rows, ws).float().to(out_device)
    return out.reshape(*states.shape[:-1], unembed.vocab_size)


def lens_probs(states: torch.Tensor, unembed: Unembed, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Softmax of :func:`lens_logits` (materialises [..., vocab])."""
    return torch.softmax(lens_logits(states, unembed, chunk), dim=-1)


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
        for s, rows in _chunks(flat, chunk):
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


# --------------------------------------------------------------------------------------
# Keywords -> token ids


@dataclass
class KeywordTokens:
    """Token ids that score each keyword, and what the rule had to compromise on."""

    keywords: list[str]
    groups: list[list[int]]  # ids summed for keyword j
    multi_token: list[str]  # keywords scored by the first of several tokens
    clashes: dict[int, list[str]]  # first-token id shared by several keywords


MIN_PIECE_CHARS = 3  # shortest first piece of a split keyword that scores it


def _variants(keyword: str) -> list[str]:
    w = keyword.strip()
    forms = dict.fromkeys([w, w.lower(), w[:1].upper() + w[1:]])
    return [p + f for f in forms for p in (" ", "")]


def keyword_token_ids(tokenizer, keywords: Sequence[str]) -> KeywordTokens:
    """Apply the documented keyword rule (module docstring) to ``keywords``."""
    groups, multi, owners = [], [], {}
    cleaned = []
    for kw in keywords:
        if not isinstance(kw, str) or not kw.strip():
            raise ConfigError(f"keyword {kw!r} is empty: give words such as 'red', 'white'")
        ids, pieces, single = [], {}, False
        for v in _variants(kw):
            toks = tokenizer.encode(v, add_special_tokens=False)
            # SentencePiece encodes " red" as ["▁", "red"] for some words: skip bare spaces.
            words = [t for t in toks if tokenizer.decode([t]).strip()]
            first = words[0] if words else (toks[0] if toks else None)
            if first is None:
                continue
            if len(words) <= 1:  # the whole variant is one token
                single = True
                if first not in ids:
                    ids.append(first)
            else:
                pieces.setdefault(first, len(tokenizer.decode([first]).strip()))
        # first pieces of split variants: only long ones (see "Keyword rule"), or, when
        # nothing else scores the keyword, its longest ones
        longest = max(pieces.values(), default=0)
        floor = MIN_PIECE_CHARS if ids or longest >= MIN_PIECE_CHARS else longest
        ids += [t for t, n in pieces.items() if n >= floor and t not in ids]
        if not single:  # no surface form is one token: scored by first pieces
            multi.append(kw.strip())
        if not ids:
            raise ConfigError(f"keyword {kw!r} encodes to no token in this tokenizer")
        for t in ids:
            owners.setdefault(t, []).append(kw.strip())
        groups.append(ids)
        cleaned.append(kw.strip())
    clashes = {t: o for t, o in owners.items() if len(set(o)) > 1}
    return KeywordTokens(cleaned, groups, multi, clashes)
