"""Per-batch cost of the two capture engines (plain hooks, nnsight) against a bare forward.

States only (no lens), every layer at the prompt positions; the three are interleaved and
the minimum over ``--repeats`` is kept, so a shared machine's load hits them alike.

    python benchmarks/engine_overhead.py --model tiny --layers 30 --batch-size 8
    python benchmarks/engine_overhead.py --model offline --batch-size 4 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--layers", type=int, default=None, help="decoder layers of the tiny model")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", default="The color of the object is")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    import numpy as np

    from esmc_lens.data.synthetic import OBJECT_COLORS, _render
    from esmc_lens.models.vlm import load_model
    from esmc_lens.residual.capture import _capture_prepared, _plan, _prepare

    extra = {"n_layers": args.layers} if args.model == "tiny" and args.layers else {}
    vlm = load_model(args.model, **extra)
    rng = np.random.default_rng(0)
    images = [_render("circle", list(OBJECT_COLORS.values())[i % 4], (255, 255, 255), 224, rng)
              for i in range(args.batch_size)]
    prep = _prepare(vlm, images, [args.prompt] * len(images), "prompt",
                    list(range(len(images))), [str(i) for i in range(len(images))])
    plans = {e: _plan(vlm, None, None, 0, False, e, False) for e in ("hooks", "nnsight")}

    def forward():
        with torch.inference_mode():
            vlm.model(**prep.enc, use_cache=False, logits_to_keep=1)

    runs = {"forward": forward,
            "hooks": lambda: _capture_prepared(vlm, prep, plans["hooks"], torch.float16),
            "nnsight": lambda: _capture_prepared(vlm, prep, plans["nnsight"], torch.float16)}
    for fn in runs.values():
        fn()  # warm-up
    times = {k: [] for k in runs}
    for _ in range(args.repeats):
        for k, fn in runs.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    best = {k: min(v) for k, v in times.items()}
    out = {"model": args.model, "n_layers": vlm.n_layers, "batch_size": args.batch_size,
           "tokens": int(prep.enc["input_ids"].shape[1]), "threads": args.threads,
           "repeats": args.repeats, "min_ms": {k: 1000 * v for k, v in best.items()},
           "overhead_ms": {k: 1000 * (best[k] - best["forward"]) for k in ("hooks", "nnsight")},
           "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    if args.json:
        print(json.dumps(out, indent=1))
    else:
        print(f"{args.model} ({vlm.n_layers} layers), batch {args.batch_size}, "
              f"{out['tokens']} tokens: " + ", ".join(
                  f"{k} {v:.1f} ms" for k, v in out["min_ms"].items()))
        print("overhead over the bare forward: " + ", ".join(
            f"{k} {v:+.1f} ms" for k, v in out["overhead_ms"].items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
