"""The head's training loop before and after preallocating its first-layer gradients.

Before: autograd allocates the |V| x hidden gradient (100 MB for |V| = 49152) afresh every
step and ``zero_grad(set_to_none=True)`` frees it, so every step page-faults 100 MB in.
After (``PseudoLabelHead.fit``): the gradient is written into one buffer with the same
kernels. Both loops run on the same pseudo-labels, interleaved; results are bit-identical
(``tests/test_bench.py``), only the time differs.

    python benchmarks/head_fit_loop.py --n-train 5 --epochs 100 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from torch import nn


def _head(dim, hidden, k, seed):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, k))


def autograd_loop(inputs, targets, hidden, k, epochs, seed):
    """The loop as it was (full batch): autograd allocates every gradient."""
    gen = torch.Generator().manual_seed(seed)
    head = _head(inputs.shape[1], hidden, k, seed)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=gen)
        opt.zero_grad(set_to_none=True)
        loss = nn.functional.cross_entropy(head(inputs[order]), targets[order])
        loss.backward()
        opt.step()
    return head


def preallocated_loop(inputs, targets, hidden, k, epochs, seed):
    """The loop as ``PseudoLabelHead.fit`` runs it now."""
    gen = torch.Generator().manual_seed(seed)
    head = _head(inputs.shape[1], hidden, k, seed)
    opt = torch.optim.Adam(head.parameters(), lr=1e-3, fused=True)
    first, rest = head[0], head[1:]
    grad_w, grad_b = torch.empty_like(first.weight), torch.empty_like(first.bias)
    for _ in range(epochs):
        order = torch.randperm(inputs.shape[0], generator=gen)
        opt.zero_grad(set_to_none=True)
        x = inputs[order]
        with torch.no_grad():
            pre = first(x)
        pre.requires_grad_(True)
        loss = nn.functional.cross_entropy(rest(pre), targets[order])
        loss.backward()
        torch.mm(pre.grad.t(), x, out=grad_w)
        torch.sum(pre.grad, dim=0, out=grad_b)
        first.weight.grad, first.bias.grad = grad_w, grad_b
        opt.step()
    return head


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-train", type=int, default=5, help="pseudo-labelled samples")
    p.add_argument("--dim", type=int, default=49152)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    inputs = torch.from_numpy(rng.dirichlet(np.full(args.dim, 0.05), size=args.n_train)
                              .astype(np.float32))
    targets = torch.arange(args.n_train) % 4
    times = {"before": [], "after": []}
    for _ in range(args.repeats):  # interleaved
        for name, loop in (("before", autograd_loop), ("after", preallocated_loop)):
            t = time.perf_counter()
            loop(inputs, targets, 512, 4, args.epochs, 0)
            times[name].append(time.perf_counter() - t)
    a = autograd_loop(inputs, targets, 512, 4, 3, 0)
    b = preallocated_loop(inputs, targets, 512, 4, 3, 0)
    same = all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    out = {"n_train": args.n_train, "dim": args.dim, "epochs": args.epochs,
           "threads": args.threads, "before_s": min(times["before"]),
           "after_s": min(times["after"]), "bit_identical": same,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    out["speedup"] = out["before_s"] / out["after_s"]
    print(json.dumps(out, indent=1) if args.json else
          f"training loop ({args.epochs} epochs, {args.n_train} samples x {args.dim}): before "
          f"{out['before_s']:.1f} s, after {out['after_s']:.1f} s ({out['speedup']:.2f}x), "
          f"bit-identical: {same}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
