"""The logit lens: read any residual-stream state as a next-token distribution.

``E_l(k) = W_U · norm(A_l(k))`` (paper eq. 3, with the final norm the published helper
forgot). :class:`Unembed` owns the final norm and the unembedding, so the lens of the last
layer is *exactly* the model's logits.

Everything here works on states shaped ``[..., d_model]`` and processes them in chunks of
rows, so the ``[..., vocab]`` tensor of a whole cache is never materialised unless asked
(:func:`lens_logits`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

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
    (``benchmarks/README.md``). :func:`~esmc_lens.residual.capture.capture` keeps one workspace for
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


def chunks(flat: torch.Tensor, chunk: int) -> Iterator[tuple[int, torch.Tensor]]:
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
        for s, rows in chunks(flat, chunk):
            out[s:s + rows.shape[0]] = unembed(rows, ws).float().to(out_device)
    return out.reshape(*states.shape[:-1], unembed.vocab_size)


def lens_probs(states: torch.Tensor, unembed: Unembed, chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """Softmax of :func:`lens_logits` (materialises [..., vocab])."""
    return torch.softmax(lens_logits(states, unembed, chunk), dim=-1)
