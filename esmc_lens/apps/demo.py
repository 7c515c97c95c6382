"""The README's main job: ESMC on the synthetic dataset, every criterion, with figures.

Run by ``make demo`` / ``esmc-lens demo``. Results are the *offline model's* (SmolLM2-135M +
EfficientNet-Lite0 with a training-free projector), not LLaVA-1.5's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..cluster.baselines import format_mean_std
from ..data.dataset import load_dataset
from ..data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
from ..models.vlm import load_model
from ..pipeline import run_esmc
from ..report.plotting import figure_style, lens_heatmap, save_figure
from ..report.result import EsmcResult, MultiResult


def vote_figure(result: EsmcResult, title: str):
    """Mean keyword lens probability per (layer, prompt position) with the target outlined."""
    import matplotlib.pyplot as plt

    loc = result.localization
    probs = loc.probs_mean
    rows = {s: i for i, s in enumerate(probs.index)}
    with figure_style("two") as st:
        fig, ax = plt.subplots(figsize=(st["figsize"][0], 3.2))
        lens_heatmap(probs.to_numpy(), list(probs.index), list(probs.columns), ax=ax,
                     title=title, cbar_label="mean keyword probability",
                     highlight=[(rows[s], p) for s, p in loc.targets])
    return fig


def scores_figure(tables: dict[str, pd.DataFrame], model: str):
    """NMI (mean ± std over seeds) of ESMC and baselines per criterion."""
    import matplotlib.pyplot as plt

    methods = list(next(iter(tables.values())).index)
    with figure_style("two") as st:
        fig, ax = plt.subplots(figsize=(st["figsize"][0], 2.6))
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            x = np.arange(len(tables)) + j * width
            ax.bar(x, [t.loc[m, "nmi_mean"] for t in tables.values()], width,
                   yerr=[t.loc[m, "nmi_std"] for t in tables.values()], label=m, capsize=2)
        ax.set_xticks(np.arange(len(tables)) + 0.4 - width / 2)
        ax.set_xticklabels(list(tables))
        ax.set_ylabel("NMI")
        ax.set_ylim(0, 1)
        ax.set_title(f"Synthetic dataset, model: {model}")
        ax.legend(ncol=len(methods), loc="upper center", bbox_to_anchor=(0.5, -0.15),
                  frameon=False)
    return fig


def run_demo(model: str = "offline", out: Path = Path("outputs/demo"),
             figures: Path = Path("figures"), n_images: int = 96, device=None, dtype=None,
             n_seeds: int = 10) -> MultiResult:
    """Every criterion of the synthetic dataset in one :func:`~esmc_lens.pipeline.run_esmc`
    call, with the keywords the model's own language model gives (label-free)."""
    import matplotlib.pyplot as plt

    data = make_synthetic_dataset(out / "data", n_images=n_images, seed=0)
    ds = load_dataset(data)
    vlm = load_model(model, device=device, dtype=dtype)
    label = "the offline model, not LLaVA-1.5" if model == "offline" else vlm.name
    print(f"model: {vlm.name} ({label}); keywords: the model's own language model's answers "
          "(label-free)")
    res = run_esmc(vlm, ds, {c: SYNTHETIC_PROMPTS[c] for c in ds.criteria}, alpha=0.3,
                   n_seeds=n_seeds)
    res.save(out)
    for crit, r in res.results.items():
        sup = " (supervised localization)" if r.supervised else ""
        fig = vote_figure(r, f"{crit}: '{r.prompt}' ({vlm.name}){sup}")
        save_figure(fig, f"demo_votes_{crit}", figures)
        plt.close(fig)
        print(f"\n== {crit}: {r.prompt!r}  target {', '.join(r.target_labels)} "
              f"({r.space} space; {r.localization.evidence})")
        print(f"keywords ({r.keyword_source}): {', '.join(r.keywords.words)}")
        print(format_mean_std(r.scores, ("nmi", "ri", "ari", "acc")).to_string())
        print(r.clusters[["cluster", "size", "name", "majority_label", "purity"]]
              .to_string(index=False))
    print("\nNMI between the criteria's clusterings and their labels:")
    print(res.cross_criterion().round(3).to_string())
    fig = scores_figure({c: r.scores for c, r in res.results.items()}, vlm.name)
    paths = save_figure(fig, "demo_scores", figures)
    plt.close(fig)
    print(f"\nresults in {out}/, figures {', '.join(str(p) for p in paths)} and "
          f"{figures}/demo_votes_*.pdf|png")
    return res
