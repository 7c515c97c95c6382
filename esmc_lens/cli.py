"""Command line: ``esmc-lens lens | demo | run`` (also ``python -m esmc_lens``).

Errors that come from bad input (every :class:`~esmc_lens.errors.EsmcError`) print one
line naming the problem and the fix and exit with status 2, without a traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import ConfigError, EsmcError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="offline",
                   help="'offline' (default), 'tiny', a hub id such as "
                        "llava-hf/llava-1.5-7b-hf, or a local directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: fp16 "
                                                 "on CUDA, fp32 on CPU)")


def cmd_lens(args: argparse.Namespace) -> int:
    """Top-k lens tokens for every layer and prompt position of one image."""
    from .backend import load_model
    from .capture import capture
    from .data import open_rgb

    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: give a positive number of tokens")
    vlm = load_model(args.model, device=args.device, dtype=args.dtype)
    image = open_rgb(args.image)
    cache = capture(vlm, [image], args.prompt, top_k=args.top_k, progress=False,
                    image_ids=[Path(args.image).name])
    tok = vlm.tokenizer
    out = {
        "model": vlm.name,
        "image": str(args.image),
        "prompt": args.prompt,
        "formatted_prompt": cache.meta["formatted_prompt"],
        "positions": [{"slot": p, "seq_index": int(i), "token": t}
                      for p, (i, t) in enumerate(zip(cache.positions[0].tolist(),
                                                     cache.tokens[0], strict=True))],
        "layers": [
            {"layer": s, "positions": [
                {"token": cache.tokens[0][p],
                 "top": [{"token": tok.decode([int(i)]), "prob": round(float(q), 6)}
                         for i, q in zip(cache.top_ids[0, j, p], cache.top_probs[0, j, p],
                                         strict=True)]}
                for p in range(cache.n_positions)]}
            for j, s in enumerate(cache.stream)
        ],
    }
    if args.json:
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        last = out["layers"][-1]
        print(f"{vlm.name}: {args.prompt!r} on {args.image} (last layer, top-{args.top_k})")
        for pos in last["positions"]:
            tops = ", ".join(f"{t['token']!r} {t['prob']:.2f}" for t in pos["top"])
            print(f"  {pos['token']!r:>14}  {tops}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on one criterion of an ESMC-layout dataset."""
    from .backend import load_model
    from .baselines import format_mean_std
    from .data import load_dataset
    from .pipeline import run_esmc

    ds = load_dataset(args.data, verify=True)
    if args.criterion not in ds.criteria:
        raise ConfigError(f"--criterion {args.criterion!r} is not a folder of {args.data}; "
                          f"its criteria are {ds.criteria}")
    if not ds.skipped.empty:
        print(f"esmc-lens: skipped {len(ds.skipped)} unreadable or non-image files "
              f"(listed in {args.out}/skipped.csv)", file=sys.stderr)
    vlm = load_model(args.model, device=args.device, dtype=args.dtype)
    keywords = args.keywords.split(",") if args.keywords else None
    res = run_esmc(vlm, ds, args.prompt, criterion=args.criterion, n_clusters=args.k,
                   keywords=keywords, keyword_source=args.keyword_source, alpha=args.alpha,
                   tau=args.tau, n_samples=args.n_samples, space=args.space, seed=args.seed,
                   n_seeds=args.n_seeds, baselines=not args.no_baselines,
                   batch_size=args.batch_size, progress=not args.quiet)
    out = res.save(args.out)
    ds.skipped.to_csv(out / "skipped.csv", index=False)
    print(f"{res.model}: {args.criterion} ({res.n_images} images), target "
          f"{', '.join(res.target_labels)} in {res.space} space")
    if not res.scores.empty:
        print(format_mean_std(res.scores, ("nmi", "ri", "ari", "acc")).to_string())
    print(res.clusters[["cluster", "size", "name"]].to_string(index=False))
    print(f"wrote {out}/results.json and {out}/assignments.csv")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, out=Path(args.out), figures=Path(args.figures),
             n_images=args.n_images, device=args.device, dtype=args.dtype)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="esmc-lens", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("lens", help="logit lens of one image at every layer and position")
    _add_model_args(p)
    p.add_argument("--image", required=True, help="an image file")
    p.add_argument("--prompt", required=True, help="criterion prompt, e.g. "
                                                   "'The color of the flower is'")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_lens)

    p = sub.add_parser("run", help="ESMC on one criterion of an ESMC-layout dataset")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="dataset root: <root>/<criterion>/<class>/")
    p.add_argument("--criterion", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--k", type=int, default=None, help="clusters (default: number of classes)")
    p.add_argument("--keywords", default=None, help="comma-separated keywords")
    p.add_argument("--keyword-source", default="auto",
                   choices=["auto", "user", "lm", "class_names"])
    p.add_argument("--alpha", type=float, default=0.3, help="pseudo-label ratio in (0, 1]")
    p.add_argument("--tau", type=float, default=0.2, help="vote threshold")
    p.add_argument("--n-samples", type=int, default=10, help="images sampled to localize")
    p.add_argument("--space", default="probs", choices=["probs", "logits", "hidden"],
                   help="target embedding space (default: lens probabilities, |V|-dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-seeds", type=int, default=10, help="seeds averaged in the scores")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="the README's main job on the synthetic dataset")
    _add_model_args(p)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--figures", default="figures")
    p.add_argument("--n-images", type=int, default=96)
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EsmcError as exc:
        print(f"esmc-lens: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("esmc-lens: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
