"""Command line: ``esmc-lens lens | demo | run | bench | capture-shard`` (also
``python -m esmc_lens``; ``torchrun ... -m esmc_lens capture-shard`` for sharded capture).

Errors that come from bad input (every :class:`~esmc_lens.errors.EsmcError`) print one
line naming the problem and the fix and exit with status 2, without a traceback; so do a
full disk or a read-only folder met while writing, wherever they happen. Everything that
can be checked without the model (dataset, criterion, settings, keywords, seed, image
paths, ``--out``, ``--cache-dir``) is checked before the model loads.
"""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from ..errors import ConfigError, EsmcError, EsmcWarning, OutputError, write_failure
from ..lens.tokens import decode_each
from ..localization.keywords import CLASS_NAMES, KEYWORD_SOURCES
from ..validate import dataset_notes


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="offline",
                   help="'offline' (default), 'tiny', a hub id such as "
                        "llava-hf/llava-1.5-7b-hf, or a local directory")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: fp16 "
                                                 "on CUDA, fp32 on CPU)")


def cmd_lens(args: argparse.Namespace) -> int:
    """Top-k lens tokens for every layer and prompt position of one image."""
    from ..data.images import open_rgb
    from ..models.vlm import load_model
    from ..residual.capture import capture
    from ..validate import check_prompt

    if args.top_k < 1:
        raise ConfigError(f"--top-k {args.top_k}: give a positive number of tokens")
    check_prompt(args.prompt)
    image = open_rgb(args.image)  # a bad image fails before the model loads
    vlm = load_model(args.model, device=args.device, dtype=args.dtype)
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
                 "top": [{"token": t, "prob": round(float(q), 6)}
                         for t, q in zip(decode_each(tok, cache.top_ids[0, j, p].tolist()),
                                         cache.top_probs[0, j, p], strict=True)]}
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


def _criteria(args: argparse.Namespace) -> dict[str, str]:
    """``--criterion NAME --prompt TEXT`` pairs (repeatable, in order) as name -> prompt."""
    names, prompts = args.criterion or [], args.prompt or []
    if len(names) != len(prompts) or not names:
        raise ConfigError(f"give one --prompt per --criterion (got {len(names)} criteria and "
                          f"{len(prompts)} prompts), e.g. --criterion color --prompt 'The "
                          "color of the flower is' --criterion species --prompt 'The species "
                          "of the flower is'")
    if len(set(names)) != len(names):
        raise ConfigError(f"--criterion names repeat: {names}")
    return dict(zip(names, prompts, strict=True))


def _given_keywords(args: argparse.Namespace, n_criteria: int) -> list[str]:
    """The ``--keywords`` values that count: the last with one criterion (as for any
    repeated option), all of them with several."""
    given = args.keywords or []
    return given[-1:] if n_criteria == 1 else given


def _keywords(args: argparse.Namespace, names: list[str]):
    """``--keywords`` as run_esmc takes it: None, one list (or ``class-names``) for every
    criterion, or, given once per ``--criterion`` (in order), a mapping name -> list, where
    ``auto`` leaves that criterion to its default (the language model's keywords). With one
    criterion the last ``--keywords`` counts, as for any repeated option."""
    given = _given_keywords(args, len(names))
    if len(given) not in (0, 1, len(names)):
        raise ConfigError(f"give --keywords once (for every criterion) or once per --criterion "
                          f"({len(names)}: {', '.join(names)}); got {len(given)}")

    def parse(value: str):
        if value.strip().lower() == CLASS_NAMES:
            return CLASS_NAMES
        if value.strip().lower() == "auto":
            return None
        return [w for w in value.split(",") if w.strip()]

    if not given:
        return None
    if len(given) == 1:
        return parse(given[0])
    return {n: parse(v) for n, v in zip(names, given, strict=True)}


def _print_result(res) -> None:
    from ..cluster.baselines import format_mean_std

    loc = res.localization
    print(f"{res.model}: {res.criterion} ({res.n_images} images), target "
          f"{', '.join(res.target_labels)} in {res.space} space; {loc.evidence}")
    print(f"  {res.note}: {', '.join(res.keywords.words)}")
    if not res.scores.empty:
        print(format_mean_std(res.scores, ("nmi", "ri", "ari", "acc")).to_string())
    print(res.clusters[["cluster", "size", "name"]].to_string(index=False))


def cmd_run(args: argparse.Namespace) -> int:
    """The whole pipeline on one or several criteria of an ESMC-layout dataset."""
    from ..data.dataset import load_dataset
    from ..models.vlm import load_model
    from ..pipeline import run_esmc

    criteria = _criteria(args)
    ds = load_dataset(args.data, verify=True)
    missing = [c for c in criteria if c not in ds.criteria]
    if missing:
        raise ConfigError(f"--criterion {missing} not folders of {args.data}; its criteria are "
                          f"{ds.criteria}")
    _check_run_args(args, ds, criteria)  # everything that can fail before the model loads
    for c in criteria:
        for note in dataset_notes(ds, c, skipped_csv=f"{args.out}/skipped.csv"):
            print(f"esmc-lens: note: {note}", file=sys.stderr)
    vlm = load_model(args.model, device=args.device, dtype=args.dtype)
    keywords = _keywords(args, list(criteria))
    one = len(criteria) == 1
    name = next(iter(criteria))
    res = run_esmc(vlm, ds, criteria[name] if one else criteria,
                   criterion=name if one else None, n_clusters=args.k,
                   keywords=keywords, keyword_source=args.keyword_source, alpha=args.alpha,
                   tau=args.tau, n_samples=args.n_samples, space=args.space, seed=args.seed,
                   n_seeds=args.n_seeds, head_basis=args.head_basis,
                   head_optimizer=args.head_optimizer,
                   baselines=not args.no_baselines, batch_size=args.batch_size,
                   progress=not args.quiet, cache_dir=args.cache_dir)
    out = res.save(args.out, overwrite=args.overwrite, tables={"skipped.csv": ds.skipped})
    for r in ([res] if one else res.results.values()):
        _print_result(r)
    if not one:
        print("NMI between the criteria's clusterings and labels:")
        print(res.cross_criterion().round(4).to_string())
    print(f"wrote {out}/results.json")
    return 0


def results_table(run_dirs: list[str], dataset: str | None = None) -> str:
    """Markdown table of saved runs' NMI/RI (mean ± std) beside the paper's, if it has them.

    ``OutputError`` (with the fix) for a folder that is no complete run, or a run saved
    without labels (it has no scores to tabulate).
    """
    from ..report.paper_numbers import PAPER_MODEL, paper_scores
    from ..report.result import EsmcResult

    lines = ["| criterion | method | NMI (ours) | RI (ours) | NMI (paper) | RI (paper) | "
             "keywords (ours) |", "|---|---|---|---|---|---|---|"]
    notes = []
    for d in _run_folders(run_dirs):
        r = EsmcResult.load_json(d)
        if r["scores"] is None:
            raise OutputError(f"run {d} was saved without labels, so it has no scores to "
                              "tabulate: run it on a labelled criterion (esmc-lens run "
                              "--criterion ...; API: run_esmc(..., criterion=... or y_true=...))")
        notes.append(f"{r['criterion']}: {r.get('note') or 'model ' + r['model']}; target "
                     f"{', '.join(r['target_labels'])}, "
                     f"{(r.get('localization') or {}).get('evidence', '')}")
        source = ("class names: SUPERVISED LOCALIZATION" if r.get("supervised_localization")
                  else r.get("keyword_source") or "n/a")
        paper = paper_scores(dataset, r["criterion"]) if dataset else None
        blocks = {"ESMC": r["scores"], **(r["baselines"] or {})}
        for method, sc in blocks.items():
            if not isinstance(sc, dict) or not all(k in sc for k in _SCORE_KEYS):
                raise OutputError(f"{d}/results.json is incomplete (the {method!r} scores "
                                  "lack NMI/RI): run `esmc-lens run` again to rewrite it")
            p = paper.loc[method] if paper is not None and method in paper.index else None
            lines.append(
                f"| {r['criterion']} | {method} | {_num(sc['nmi'])} ± {_num(sc['nmi_std'])} | "
                f"{_num(sc['ri'])} ± {_num(sc['ri_std'])} | "
                f"{'' if p is None else f'{p.nmi:.4f}'} | {'' if p is None else f'{p.ri:.4f}'} | "
                f"{source} |")
    lines.append("\nOurs: mean ± std over seeds; " + " | ".join(notes) + ". "
                 f"Paper: {PAPER_MODEL} (the paper's numbers), Table 3.")
    return "\n".join(lines)


def _run_folders(run_dirs: list[str]) -> list[Path]:
    """Each single-criterion run folder; a multi-criterion folder stands for its criteria."""
    from ..report.result import read_run_json

    out = []
    for d in map(Path, run_dirs):
        doc = read_run_json(d)
        out.extend(d / c for c in doc["criteria"]) if "criteria" in doc else out.append(d)
    return out


_SCORE_KEYS = ("nmi", "nmi_std", "ri", "ri_std")


def _num(v) -> str:
    return "n/a" if v is None else f"{float(v):.4f}"


def cmd_diagnose(args: argparse.Namespace) -> int:
    """What the lens says at a saved run's target, scored against the labels."""
    from ..data.dataset import load_dataset
    from ..models.vlm import load_model
    from ..report.diagnose import readout_for_run
    from ..report.result import EsmcResult

    res = EsmcResult.load(args.run)
    if res.y_true is None or res.class_names is None:
        raise OutputError(f"run {args.run} was saved without labels: diagnose scores the "
                          "lens's reading against them; run it on a labelled criterion "
                          "(esmc-lens run --criterion ...; API: criterion= or y_true=)")
    ds = load_dataset(args.data)
    if list(ds.names) != list(res.image_ids):
        raise ConfigError(f"the images of --data {args.data} ({len(ds)}) are not the "
                          f"{res.n_images} images of run {args.run}: pass the run's own "
                          "dataset folder")
    if args.cache_dir is not None:
        from ..residual.store import CACHE_DIR_FIX
        from ..validate import check_writable_dir

        check_writable_dir(args.cache_dir, "capture cache directory (--cache-dir)",
                           CACHE_DIR_FIX)
    vlm = load_model(args.model or res.model, device=args.device, dtype=args.dtype)
    r = readout_for_run(vlm, ds, res, cache_dir=args.cache_dir, progress=not args.quiet)
    out = {"model": vlm.name, "criterion": res.criterion, "target": res.target_labels,
           "readout_nmi": r.nmi, "readout_acc": r.acc, "class_mass": r.class_mass,
           "unread_classes": r.unread,
           "crosstab": r.crosstab.to_dict(), "top_tokens": r.top_tokens.to_dict("records")}
    if args.json:
        json.dump(out, sys.stdout, indent=1, default=int)
        print()
        return 0
    print(f"{vlm.name}: {res.criterion}, target {', '.join(res.target_labels)}: the lens's "
          f"class word scores NMI {r.nmi:.4f}, ACC {r.acc:.4f}; class words hold "
          f"{r.class_mass:.1%} of the probability")
    if r.unread:
        print(f"class names the lens cannot score (their images count as misread): "
              f"{', '.join(r.unread)}")
    print(r.crosstab.to_string())
    print("most frequent top-1 lens tokens:", ", ".join(
        f"{t!r} x{n}" for t, n in zip(r.top_tokens["token"], r.top_tokens["images"],
                                       strict=True)))
    return 0


def cmd_table(args: argparse.Namespace) -> int:
    print(results_table(args.runs, args.dataset))
    return 0


def _check_run_args(args: argparse.Namespace, ds, criteria: dict[str, str]) -> None:
    from ..residual.store import CACHE_DIR_FIX
    from ..validate import check_keywords, check_output_dir, check_run, check_writable_dir

    for name, prompt in criteria.items():
        check_run(None, ds, prompt, criterion=name, n_images=len(ds),
                  n_clusters=args.k, alpha=args.alpha, tau=args.tau, n_samples=args.n_samples,
                  batch_size=args.batch_size, n_seeds=args.n_seeds, seed=args.seed)
    _keywords(args, list(criteria))  # as many as the criteria
    for kw in _given_keywords(args, len(criteria)) or [None]:
        check_keywords(None if (kw or "").strip().lower() in ("", "auto") else kw,
                       args.keyword_source)
    check_output_dir(args.out, overwrite=args.overwrite)
    if args.cache_dir is not None:
        check_writable_dir(args.cache_dir, "capture cache directory (--cache-dir)", CACHE_DIR_FIX)


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    run_demo(model=args.model, out=Path(args.out), figures=Path(args.figures),
             n_images=args.n_images, device=args.device, dtype=args.dtype)
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """Throughput and memory of capture against the bare forward pass and the naive way."""
    from .bench import main_from_args

    return main_from_args(args)


def cmd_capture_shard(args: argparse.Namespace) -> int:
    """This process's shard of a capture (one process, or one rank under torchrun)."""
    import torch

    from ..models.vlm import load_model
    from ..residual.distributed import capture_sharded, dist_env, list_images

    images = list_images(args.images)
    env = dist_env(device=args.device)
    try:
        vlm = load_model(args.model, device=env.device, dtype=args.dtype)
        pos = [x.strip() for x in args.positions.split(",") if x.strip()]
        if len(pos) == 1 and pos[0] in ("prompt", "all"):
            pos = pos[0]
        elif all(x.lstrip("-").isdigit() for x in pos):
            pos = [int(x) for x in pos]
        options = {"positions": pos,
                   "keywords": args.keywords.split(",") if args.keywords else None,
                   "top_k": args.top_k, "vision": args.vision,
                   "store_dtype": getattr(torch, args.store_dtype),
                   "layers": ([int(x) for x in args.layers.split(",")] if args.layers
                              else None)}
        summary, cache = capture_sharded(
            vlm, images, args.prompt, args.cache_dir, batch_size=args.batch_size,
            merge=not args.no_merge, env=env, progress=not args.quiet, engine=args.engine,
            image_ids=[str(p.relative_to(Path(args.images).expanduser())) for p in images],
            **options)
        if env.is_main:
            if cache is not None and args.out:
                cache.save(args.out)
                summary["out"] = str(args.out)
            print(json.dumps(summary, default=str) if args.json else
                  f"esmc-lens: {summary['n_images']} images in "
                  f"{len(summary['ranks'])} shard(s) under {summary['dir']}"
                  + (f"; merged cache written to {args.out}" if cache is not None and args.out
                     else ""))
    finally:
        import torch.distributed as dist

        if env.backend is not None and dist.is_initialized():
            dist.destroy_process_group()
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

    p = sub.add_parser("run", help="ESMC on one or several criteria of an ESMC-layout "
                                   "dataset (the same images, one clustering per criterion)")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="dataset root: <root>/<criterion>/<class>/")
    p.add_argument("--criterion", action="append", required=True,
                   help="a criterion folder of the dataset; repeat it with one --prompt each "
                        "for several criteria in one run")
    p.add_argument("--prompt", action="append", required=True,
                   help="the criterion's prompt, e.g. 'The color of the flower is'")
    p.add_argument("--k", type=int, default=None, help="clusters (default: number of classes)")
    p.add_argument("--keywords", action="append", default=None,
                   help="comma-separated keywords (default: the model's own language model "
                        f"answers 'What are common <criterion>s of <object>s?'); "
                        f"'{CLASS_NAMES}' localizes with the dataset's class names "
                        "(supervised: every output says so). Once for every criterion, or "
                        "once per --criterion in order ('auto': that criterion's default)")
    p.add_argument("--keyword-source", default="auto", choices=list(KEYWORD_SOURCES),
                   help="auto (default): --keywords if given, else the language model's; "
                        "class_names: supervised")
    p.add_argument("--alpha", type=float, default=0.3, help="pseudo-label ratio in (0, 1]")
    p.add_argument("--tau", type=float, default=0.2, help="vote threshold")
    p.add_argument("--n-samples", type=int, default=10, help="images sampled to localize")
    p.add_argument("--space", default="probs", choices=["probs", "logits", "hidden"],
                   help="target embedding space (default: lens probabilities, |V|-dim)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-seeds", type=int, default=10, help="seeds averaged in the scores")
    # cluster.head.BASES and OPTIMIZERS, spelled out so that building the parser imports no
    # torch (a test checks they agree)
    p.add_argument("--head-basis", default="auto", choices=["auto", "span", "features"],
                   help="where the clustering head runs: 'auto' (default; 'span' for more "
                        "features than images: the same head in the n-dimensional span of "
                        "the embeddings, ~100x faster) or 'features' (on the |V| axes)")
    p.add_argument("--head-optimizer", default="neuron-adam", choices=["neuron-adam", "adam"],
                   help="the head's optimizer: 'neuron-adam' (default; Adam with one second "
                        "moment per first-layer unit, the same path in either basis) or "
                        "'adam' (per-weight, as the published code; runs on the features)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-baselines", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--cache-dir", default=None,
                   help="keep captures on disk here; a rerun after a crash or kill resumes "
                        "from the saved batches (default: no capture cache)")
    p.add_argument("--out", required=True,
                   help="output folder, written whole (a temporary folder renamed into place)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing run folder at --out completely (default: refuse)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("table", help="markdown table of saved runs beside the paper's numbers")
    p.add_argument("runs", nargs="+", help="output folders of `esmc-lens run`")
    p.add_argument("--dataset", default=None, help="paper dataset name, e.g. flower")
    p.set_defaults(func=cmd_table)

    p = sub.add_parser("diagnose", help="what the lens says at a saved run's target, scored "
                                        "against the labels (why ESMC does or does not win)")
    _add_model_args(p)
    p.set_defaults(model=None)  # default: the run's own model
    p.add_argument("run", help="output folder of `esmc-lens run`")
    p.add_argument("--data", required=True, help="the run's dataset root")
    p.add_argument("--cache-dir", default=None, help="the run's --cache-dir (reuses its capture)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_diagnose)

    p = sub.add_parser("demo", help="the README's main job on the synthetic dataset")
    _add_model_args(p)
    p.add_argument("--out", default="outputs/demo")
    p.add_argument("--figures", default="figures")
    p.add_argument("--n-images", type=int, default=96)
    p.set_defaults(func=cmd_demo)

    from .bench import add_arguments as add_bench_arguments

    p = sub.add_parser("bench", help="throughput and memory: capture vs forward pass vs naive")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("capture-shard",
                       help="capture a folder of images to disk shards; under torchrun each "
                            "rank takes its share and rank 0 merges")
    _add_model_args(p)
    p.add_argument("--images", required=True, help="folder of image files (recursive)")
    p.add_argument("--prompt", required=True)
    p.add_argument("--cache-dir", default=None,
                   help="shard store (default $ESMC_LENS_CACHE/captures); shared by all ranks")
    p.add_argument("--out", default=None, help="write the merged cache here (rank 0)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--keywords", default=None, help="comma-separated keywords for the lens")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--layers", default=None, help="comma-separated stream indices (default all)")
    p.add_argument("--positions", default="prompt",
                   help="'prompt' (default), 'all', comma-separated sequence indices or words")
    p.add_argument("--vision", action="store_true", help="also keep pooled vision features")
    p.add_argument("--store-dtype", default="float16", choices=["float16", "bfloat16",
                                                                 "float32"])
    p.add_argument("--engine", default="auto", choices=["auto", "hooks", "nnsight"])
    p.add_argument("--no-merge", action="store_true", help="write shards only")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_capture_shard)
    return parser


_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """esmc_lens's own warnings as one line; others as Python prints them."""
    if issubclass(category, EsmcWarning):
        print(f"esmc-lens: warning: {' '.join(str(message).split())}", file=sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args)
    except EsmcError as exc:
        print(f"esmc-lens: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except Exception as exc:
        failure = write_failure(exc)
        if failure is not None and failure[1]:  # a full disk anywhere: no bug to trace
            print(f"esmc-lens: error: a disk is full ({' '.join(failure[0].split())}"
                  f"{_where(exc)}): free space or write elsewhere", file=sys.stderr)
            return 2
        if type(exc).__name__ != "OutOfMemoryError":  # torch.cuda.OutOfMemoryError
            raise
        print("esmc-lens: error: out of GPU memory: lower --batch-size (or use --dtype "
              "float16)", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = ("; run the same command again to resume from the saved batches"
                  if getattr(args, "cache_dir", None) else "")
        print(f"esmc-lens: interrupted{resume}", file=sys.stderr)
        return 130


def _where(exc: BaseException) -> str:
    name = getattr(exc, "filename", None)
    return f", writing {name}" if name else ""


if __name__ == "__main__":
    raise SystemExit(main())
