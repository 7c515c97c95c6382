"""PseudoLabelHead fit time against scikit-learn KMeans(n_init=10) as the number of images grows.

Features are |V| = 49152-dimensional probability vectors (softmax of 4 noisy cluster
centres), like the pipeline's default "probs" space on the offline model. The head's fit
includes its own KMeans(n_init=10); its MLP (|V| -> 512 -> K, 100 epochs, full batch, Adam)
costs a fixed ~25M-parameter update per epoch plus matmuls that grow with alpha * N.

    python benchmarks/head_vs_kmeans.py --sizes 16,128,512 --threads 1
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch


def features(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(scale=3.0, size=(k, dim))
    logits = centres[np.arange(n) % k] + rng.normal(scale=1.0, size=(n, dim))
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="16,128,512")
    p.add_argument("--dim", type=int, default=49152)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="device of the head (cpu, cuda)")
    p.add_argument("--basis", default="features", choices=["features", "span", "auto"],
                   help="PseudoLabelHead(basis=...): 'features' (default here) is the paper's "
                        "|V|-space head these figures were first taken with")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from sklearn.cluster import KMeans

    from esmc_lens.cluster.head import PseudoLabelHead

    rows = []
    for n in [int(s) for s in args.sizes.split(",")]:
        X = features(n, args.dim, args.k)
        PseudoLabelHead(n_clusters=args.k, epochs=2, random_state=0, device=args.device,
                        basis=args.basis).fit(X)
        t = time.perf_counter()
        KMeans(n_clusters=args.k, n_init=10, random_state=0).fit(X)
        km = time.perf_counter() - t
        t = time.perf_counter()
        PseudoLabelHead(n_clusters=args.k, random_state=0, device=args.device,
                        basis=args.basis).fit(X)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        head = time.perf_counter() - t
        rows.append({"n": n, "dim": args.dim, "kmeans_s": km, "head_s": head,
                     "head_over_kmeans": head / km})
        if not args.json:
            print(f"N={n:5d}  kmeans {km:7.2f} s  head {head:7.2f} s  ratio {head / km:6.1f}",
                  flush=True)
    if args.json:
        print(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                          "threads": args.threads, "device": args.device,
                          "basis": args.basis, "rows": rows},
                         indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
