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
    model's lens runs the model's own norm module and unembedding on up-cast copies of their
    weights (whatever the norm computes: Gemma's RMSNorm scales by ``1 + w``), so
    probabilities near the tau threshold do not depend on half-precision rounding.
    ``softcap``: the model soft-caps its logits (``cap * tanh(logits / cap)``, PaliGemma 2's
    Gemma 2); the lens does the same so its last layer equals the logits.
    """

    def __init__(self, final_norm: nn.Module, lm_head: nn.Module, compute_dtype=torch.float32,
                 softcap: float | None = None):
        super().__init__()
        self.final_norm = final_norm
        self.lm_head = lm_head
        self.compute_dtype = compute_dtype
        self.softcap = softcap

    @classmethod
    def from_model(cls, vlm, compute_dtype=torch.float32) -> Unembed:
        return cls(vlm.final_norm, vlm.lm_head, compute_dtype, softcap=vlm.logit_softcap)

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
                return self._cap(self.lm_head(normed))
        else:
            with torch.autocast(self.device.type, enabled=False):
                normed = float_module(self.final_norm, h.to(self.compute_dtype))
            if workspace is None:  # fresh tensors: autograd may run through them
                logits = normed @ w.to(normed.dtype).T
                return self._cap(logits if bias is None else logits + bias.to(logits.dtype))
            w = workspace.buffer("weight", w.shape, normed.dtype, w.device).copy_(w)
        rows = normed.reshape(-1, normed.shape[-1])  # torch.mm(out=) needs 2-D, no autograd
        out = workspace.buffer("logits", (rows.shape[0], w.shape[0]), normed.dtype, w.device)
        with torch.autocast(self.device.type, enabled=False):
            torch.mm(rows, w.T, out=out)
        if bias is not None:
            out.add_(bias.to(out.dtype))
        if self.softcap is not None:  # in place, the same operations as _cap
            out.div_(self.softcap).tanh_().mul_(self.softcap)
        return out.view(*normed.shape[:-1], w.shape[0])

    def _cap(self, logits: torch.Tensor) -> torch.Tensor:
        """The model's soft-capping, operation for operation (so equal bit for bit)."""
        if self.softcap is None:
            return logits
        return torch.tanh(logits / self.softcap) * self.softcap


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


def float_module(module: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """``module(h)`` with ``module``'s floating parameters and buffers cast to ``h``'s dtype.

    Runs the module's own forward (any norm: LayerNorm, Llama's ``w * x``, Gemma's
    ``(1 + w) * x``), on up-cast copies of its weights, without copying or changing it.
    """
    def cast(t: torch.Tensor) -> torch.Tensor:
        return t.to(h.dtype) if t.is_floating_point() else t

    state = {k: cast(v) for k, v in [*module.named_parameters(), *module.named_buffers()]}
    if all(v.dtype == h.dtype for v in state.values() if v.is_floating_point()):
        return module(h)
    return torch.func.functional_call(module, state, (h,))


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
