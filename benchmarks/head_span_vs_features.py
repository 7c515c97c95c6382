"""The fast head (basis="span") against the |V|-space head (basis="features").

Three heads on the same target embeddings (offline model, "probs" space, every criterion of
the dataset in one run_esmc pass), alpha 0.3, 100 epochs, 10 seeds: the default head in the
span basis and on the features (NeuronAdam: the same head, so the same scores to fp rounding
and init draws), and the features head with per-weight Adam (the published code's optimizer).
NMI and RI mean and std, the head's own k-means NMI (the same partition in all three by
construction), and seconds per fit.

    python benchmarks/head_span_vs_features.py --dataset synthetic --json \\
        > benchmarks/results/head-span-vs-features-synthetic.json
    python benchmarks/head_span_vs_features.py --dataset flower --json \\
        > benchmarks/results/head-span-vs-features-flower.json

Synthetic: 96 images (make_synthetic_dataset seed 0), keywords from the model's own LM
(the run's default, label-free). Flowers: the README's keyword lists (user keywords).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

FLOWER = {"color": ("The color of the flower is",
                    "red,pink,white,yellow,purple,orange,blue"),
          "species": ("The species of the flower is",
                      "rose,tulip,daisy,lily,sunflower,orchid,hyacinth,carnation,iris,peony")}

HEADS = (("span", "neuron-adam"), ("features", "neuron-adam"), ("features", "adam"))


def embeddings(vlm, dataset: str, workdir: Path):
    from esmc_lens.data.dataset import load_dataset
    from esmc_lens.data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
    from esmc_lens.pipeline import as_criteria, localization_sample, select_keywords, shared_pass

    if dataset == "synthetic":
        ds = load_dataset(make_synthetic_dataset(workdir / "synthetic", n_images=96, seed=0))
        prompts = {c: SYNTHETIC_PROMPTS[c] for c in ds.criteria}
        keywords, source = None, "auto"
    else:
        root = Path(os.environ.get("ESMC_DATA", "../shared/data/esmc")) / "flower"
        ds = load_dataset(root)
        prompts = {c: p for c, (p, _) in FLOWER.items()}
        keywords, source = {c: k.split(",") for c, (_, k) in FLOWER.items()}, "user"
    criteria = as_criteria(prompts)
    kws = select_keywords(vlm, criteria, keywords, ds, source)
    sample = localization_sample(len(ds), 10, seed=0)
    _, embedded, _ = shared_pass(vlm, ds, criteria, kws, sample, vision=False, answers=False)
    return ds, {c.name: embedded[c.name] for c in criteria}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("synthetic", "flower"), default="synthetic")
    p.add_argument("--seeds", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from esmc_lens.cluster.baselines import head_scores
    from esmc_lens.models.vlm import load_model

    vlm = load_model("offline")
    started, load = time.strftime("%Y-%m-%d %H:%M:%S %Z"), os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        ds, emb = embeddings(vlm, args.dataset, Path(tmp))
    rows = []
    for crit, e in emb.items():
        y = ds.y(crit)
        k = len(ds.classes[crit])
        for basis, optimizer in HEADS:
            df = head_scores(e.X, y, k, 0.3, seeds=range(args.seeds), timing=True,
                             basis=basis, optimizer=optimizer,
                             progress=f"{crit} {basis} {optimizer} (seeds)")
            rows.append({"criterion": crit, "basis": basis, "optimizer": optimizer,
                         "target": e.labels,
                         "n_images": int(e.X.shape[0]), "dim": int(e.X.shape[1]),
                         "nmi_mean": float(df["nmi"].mean()),
                         "nmi_std": float(df["nmi"].std(ddof=0)),
                         "ri_mean": float(df["ri"].mean()), "ri_std": float(df["ri"].std(ddof=0)),
                         "kmeans_nmi_mean": float(df["kmeans_nmi"].mean()),
                         "seconds_per_fit": float(df["seconds"].mean()),
                         "nmi_per_seed": df["nmi"].round(6).tolist()})
            print(f"{crit:10s} {basis:8s} {optimizer:11s} NMI {rows[-1]['nmi_mean']:.4f} ± "
                  f"{rows[-1]['nmi_std']:.4f}  RI {rows[-1]['ri_mean']:.4f} ± "
                  f"{rows[-1]['ri_std']:.4f}  k-means {rows[-1]['kmeans_nmi_mean']:.4f}  "
                  f"{rows[-1]['seconds_per_fit']:.2f} s/fit", file=sys.stderr, flush=True)
    if args.json:
        print(json.dumps({"dataset": args.dataset, "model": "offline", "seeds": args.seeds,
                          "threads": args.threads, "date": started,
                          "loadavg_before": list(load), "loadavg_after": list(os.getloadavg()),
                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
