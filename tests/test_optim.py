"""NeuronAdam: Adam's arithmetic where unpooled, and the same path in any orthonormal basis."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esmc_lens.cluster.optim import NeuronAdam


def _steps(opt_cls, params, loss_fn, n: int, **kw) -> list[torch.Tensor]:
    opt = opt_cls(params, **kw)
    for _ in range(n):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    return [p.detach().clone() for g in opt.param_groups for p in g["params"]]


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_unpooled_is_adam_bit_for_bit(weight_decay: float) -> None:
    """pooled=False (and every 1-D parameter) steps exactly as torch's single-tensor Adam
    (AdamW's decoupled decay): the same operations in the same order."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 7, generator=gen)
    w0, b0 = torch.randn(5, 7, generator=gen), torch.randn(5, generator=gen)

    def run(opt_cls, **kw):
        w, b = w0.clone().requires_grad_(), b0.clone().requires_grad_()
        group = {"params": [w, b]}
        if opt_cls is NeuronAdam:
            group["pooled"] = False
        return _steps(opt_cls, [group], lambda: ((x @ w.T + b).tanh() ** 2).sum(), 12,
                      lr=0.05, weight_decay=weight_decay, **kw)

    ours = run(NeuronAdam)
    theirs = run(torch.optim.AdamW, foreach=False, fused=False)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_pooled_second_moment_is_each_rows_squared_norm() -> None:
    """One step from zero state: m = (1 - b1) g, v = (1 - b2) ||g_row||^2, and the step is
    lr * g / ||g_row|| (bias correction cancels at t = 1), eps aside."""
    w = torch.tensor([[3.0, 4.0], [0.0, 2.0]], requires_grad=True)
    g = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    opt = NeuronAdam([w], lr=0.1, eps=0.0)
    w.grad = g.clone()
    opt.step()
    v = opt.state[w]["v"]
    assert v.shape == (2, 1)
    torch.testing.assert_close(v, torch.tensor([[0.001], [0.001]]), rtol=1e-6, atol=0)
    torch.testing.assert_close(w.detach(), torch.tensor([[3.0 - 0.06, 4.0 - 0.08],
                                                        [0.0 - 0.1, 2.0]]), rtol=0, atol=1e-6)


def test_rotating_the_inputs_leaves_the_path_unchanged() -> None:
    """W on x and W Q on Q^T x (Q orthonormal) follow one path under NeuronAdam, not under
    Adam: what lets the span head be the |V|-space head."""
    rng = np.random.default_rng(0)
    x = torch.tensor(rng.gamma(0.3, size=(24, 40)), dtype=torch.float64)
    y = torch.tensor(rng.integers(0, 3, size=24))
    q, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    q = torch.tensor(q)
    w0 = torch.tensor(rng.normal(size=(8, 40)) / 40 ** 0.5)
    w2 = torch.tensor(rng.normal(size=(3, 8)) / 8 ** 0.5)

    def run(opt_cls, inputs, first):
        w = first.clone().requires_grad_()
        v = w2.clone().requires_grad_()

        def loss():
            return torch.nn.functional.cross_entropy(torch.relu(inputs @ w.T) @ v.T, y)

        got = _steps(opt_cls, [{"params": [w]}, {"params": [v], **(
            {"pooled": False} if opt_cls is NeuronAdam else {})}], loss, 30, lr=0.01)
        return torch.relu(inputs @ got[0].T) @ got[1].T  # the outputs on the data

    raw = run(NeuronAdam, x, w0)
    rotated = run(NeuronAdam, x @ q, w0 @ q)
    torch.testing.assert_close(rotated, raw, rtol=1e-9, atol=1e-9)
    adam_raw = run(torch.optim.Adam, x, w0)
    adam_rotated = run(torch.optim.Adam, x @ q, w0 @ q)
    assert (adam_rotated - adam_raw).abs().max() > 1e-3  # per-weight Adam depends on axes
