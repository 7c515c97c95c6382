"""Could a lower-precision lens close the capture/forward gap? Time and error of the lens
in fp32 (what esmc_lens computes) against bf16 and fp16 matrix products.

The lens of every (layer, prompt position) cell costs the offline model about as much as its
forward pass (``benchmarks/README.md``). CPUs with AMX/AVX-512 run bf16 and fp16 matrix
products faster than fp32, but torch's CPU ``mm`` returns them in the input's precision (it
has no fp32-output variant), so the logits carry 3 significant digits. This script measures
the speed-up and what it does to the numbers Algorithm 1 uses: keyword probabilities, their
votes at ``tau`` and the top-1 token, on the offline model's real states.

    python benchmarks/lens_precision.py --n-images 4 --threads 1 --json \
        > benchmarks/results/lens-precision-cpu.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

KEYWORDS = ["red", "green", "blue", "yellow"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="offline")
    p.add_argument("--n-images", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    # 0.2 is the paper's; the offline model's colour probabilities on these images stay
    # far below it (max_keyword_prob), so the default counts votes at one they cross
    p.add_argument("--tau", type=float, default=0.01)
    p.add_argument("--prompt", default="The color of the object is")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import numpy as np

    from esmc_lens.data.synthetic import OBJECT_COLORS, _render
    from esmc_lens.lens.keyword_rule import keyword_token_ids
    from esmc_lens.lens.readout import readout
    from esmc_lens.lens.unembed import Unembed
    from esmc_lens.models.vlm import load_model
    from esmc_lens.residual.capture import capture

    vlm = load_model(args.model)
    rng = np.random.default_rng(0)
    colours = list(OBJECT_COLORS.values())
    images = [_render("circle", colours[i % len(colours)], (255, 255, 255), 224, rng)
              for i in range(args.n_images)]
    cache = capture(vlm, images, args.prompt, store_dtype=torch.float32, progress=False)
    states = cache.states.reshape(-1, vlm.d_model)  # every (image, layer, position) cell
    groups = keyword_token_ids(vlm.tokenizer, KEYWORDS).groups

    results, times = {}, {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16),
                        ("fp16", torch.float16)):
        unembed = Unembed.from_model(vlm, compute_dtype=dtype)
        best = float("inf")
        for _ in range(args.repeats):
            t = time.perf_counter()
            results[name] = readout(states, unembed, keyword_groups=groups, k=5)
            best = min(best, time.perf_counter() - t)
        times[name] = best

    ref = results["fp32"]
    out = {"model": vlm.name, "cells": int(states.shape[0]), "vocab": vlm.vocab_size,
           "d_model": vlm.d_model, "threads": args.threads, "repeats": args.repeats,
           "tau": args.tau, "max_keyword_prob": float(results["fp32"].keyword_probs.max()),
           "seconds": times, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
           "vs_fp32": {}}
    for name in ("bf16", "fp16"):
        r = results[name]
        diff = (r.keyword_probs - ref.keyword_probs).abs()
        near = ref.keyword_probs > 0.01  # relative error where probabilities matter
        votes_ref, votes = ref.keyword_probs > args.tau, r.keyword_probs > args.tau
        out["vs_fp32"][name] = {
            "speedup": times["fp32"] / times[name],
            "keyword_prob_max_abs_err": float(diff.max()),
            "keyword_prob_max_rel_err_above_0.01": float((diff[near] / ref.keyword_probs[near])
                                                         .max()) if near.any() else None,
            "top1_agreement": float((r.top_ids[:, 0] == ref.top_ids[:, 0]).float().mean()),
            "keyword_argmax_agreement": float((r.keyword_probs.argmax(-1)
                                               == ref.keyword_probs.argmax(-1)).float().mean()),
            "votes_fp32": int(votes_ref.sum()),
            "votes_changed": int((votes != votes_ref).sum()),
        }
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{out['cells']} cells x {out['vocab']} vocabulary, {args.threads} thread(s)")
        for name, v in out["vs_fp32"].items():
            print(f"{name}: {v['speedup']:.2f}x faster than fp32, keyword probability error "
                  f"max {v['keyword_prob_max_abs_err']:.2e} abs, top-1 agreement "
                  f"{v['top1_agreement']:.4f}, {v['votes_changed']} of {v['votes_fp32']} "
                  f"votes at tau={args.tau} changed")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
