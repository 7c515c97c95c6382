"""Adam with one second moment per unit: the clustering head's axis-free optimizer.

Adam divides every weight's step by that weight's own gradient history, so its path depends
on the axes the weights are written in: the head on 49,152 vocabulary axes and the same head
on the n coordinates of its training rows' span would walk different paths. ``NeuronAdam``
keeps Adam's first moment per weight and bias correction, but pools the second moment of a
matrix over each output unit's row (the row's squared gradient norm, a sum, not a mean):

    m_t = b1 m + (1 - b1) g              [units, inputs]
    v_t = b2 v + (1 - b2) ||g_row||^2    [units, 1]
    w  -= lr * (m_t / (1 - b1^t)) / (sqrt(v_t / (1 - b2^t)) + eps)

A row's norm does not change when the input axes are rotated, so for any orthonormal ``Q``
the weights ``W`` on inputs ``x`` and ``W Q`` on inputs ``Q^T x`` follow the same path: the
head in the span basis *is* the paper's |V|-space head, not an approximation of it. (This is
the block-wise second moment of Adam-mini, Zhang et al. 2024, arXiv:2406.16793, with one
block per output unit and a sum, so that it does not depend on the number of inputs.)
Parameters in a group with ``pooled=False`` get Adam's per-weight second moment. Weight
decay is decoupled (AdamW's rule): an L2 term added to the gradient would leave the span.
"""

from __future__ import annotations

import torch

__all__ = ["NeuronAdam"]


class NeuronAdam(torch.optim.Optimizer):
    """Adam whose second moment is pooled over each row of a pooled group's matrices.

    Parameters
    ----------
    params : iterable of tensors or dicts
        As for :class:`torch.optim.Adam`; a group's ``pooled`` (default True) pools the
        second moment of its 2-D parameters over dim 1 (1-D parameters are never pooled).
    lr, betas, eps, weight_decay
        As for :class:`torch.optim.AdamW` (decoupled weight decay, default 0).
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0) -> None:
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      pooled=True))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                pool = group["pooled"] and p.dim() == 2
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["m"] = torch.zeros_like(p)
                    state["v"] = (p.new_zeros(p.shape[0], 1) if pool
                                  else torch.zeros_like(p))
                state["step"] += 1
                t = state["step"]
                m, v = state["m"], state["v"]
                # torch.optim.Adam's single-tensor arithmetic, term for term: unpooled
                # parameters get bit for bit its steps (tests/test_optim.py).
                m.lerp_(g, 1 - b1)
                if pool:
                    sq = torch.linalg.vector_norm(g, dim=1, keepdim=True).square_()
                    v.mul_(b2).add_(sq, alpha=1 - b2)
                else:
                    v.mul_(b2).addcmul_(g, g, value=1 - b2)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                denom = (v.sqrt() / (1 - b2 ** t) ** 0.5).add_(group["eps"])
                p.addcdiv_(m, denom, value=-group["lr"] / (1 - b1 ** t))
        return loss
