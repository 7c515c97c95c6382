"""Where the lens's time goes, per image: the matrix product, softmax, top-k, and the cost
of fresh buffers against reused ones (``esmc_lens.lens.unembed.LensWorkspace``).

Shapes are the offline model's (d_model 576, vocabulary 49152, 651 cells per image: 31
stream indices x 21 prompt positions); the values are random, which does not change the
time of any of these kernels.

    python benchmarks/lens_parts.py --threads 1 --json > benchmarks/results/lens-parts-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--d-model", type=int, default=576)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--cells-per-image", type=int, default=651)
    p.add_argument("--images", type=int, default=2, help="images per chunk")
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from esmc_lens.lens.readout import topk_rows

    g = torch.Generator().manual_seed(0)
    rows = args.cells_per_image * args.images
    w = torch.randn(args.vocab, args.d_model, generator=g) * 0.05
    h = torch.randn(rows, args.d_model, generator=g) * 3
    logits, probs = torch.empty(rows, args.vocab), torch.empty(rows, args.vocab)
    torch.mm(h, w.T, out=logits)
    torch.softmax(logits, -1, out=probs)

    parts = {
        "matmul_into_reused_buffer": lambda: torch.mm(h, w.T, out=logits),
        "matmul_into_fresh_tensor": lambda: h @ w.T,
        "softmax_into_reused_buffer": lambda: torch.softmax(logits, -1, out=probs),
        "softmax_into_fresh_tensor": lambda: torch.softmax(logits, -1),
        "torch_topk": lambda: probs.topk(args.k, dim=-1),
        "topk_rows": lambda: topk_rows(probs, args.k),
    }
    best = {}
    for name, fn in parts.items():
        fn()  # warm-up
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        best[name] = min(times) / args.images  # seconds per image
    out = {"d_model": args.d_model, "vocab": args.vocab, "cells_per_image":
           args.cells_per_image, "images_per_chunk": args.images, "k": args.k,
           "threads": args.threads, "repeats": args.repeats,
           "seconds_per_image": best,
           "gflops_matmul": 2 * rows * args.d_model * args.vocab
           / (best["matmul_into_reused_buffer"] * args.images) / 1e9,
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        for name, sec in best.items():
            print(f"{name:28s} {1000 * sec:8.1f} ms per image")
        print(f"matmul at {out['gflops_matmul']:.0f} GFLOP/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
