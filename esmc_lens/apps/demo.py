"""The README's main job: ESMC on the synthetic dataset, every criterion, with figures.

Run by ``make demo`` / ``esmc-lens demo``. Results are the *offline model's* (SmolLM2-135M +
EfficientNet-Lite0 with a training-free projector), not LLaVA-1.5's.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from ..cluster.baselines import format_mean_std
from ..data.dataset import load_dataset
from ..data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
from ..models.vlm import load_model
from ..pipeline import run_esmc
from ..report.plotting import method_bars_figure, save_figure, votes_figure
from ..report.result import MultiResult


def scores_frame(results: MultiResult) -> pd.DataFrame:
    """One row per (criterion, method): the run's scores, in the long form
    :func:`~esmc_lens.report.plotting.method_bars_figure` draws."""
    return pd.concat([r.scores.rename_axis("method").reset_index().assign(criterion=c)
                      for c, r in results.results.items() if not r.scores.empty],
                     ignore_index=True)


def run_demo(model: str = "offline", out: Path = Path("outputs/demo"),
             figures: Path = Path("figures"), n_images: int = 96, device=None, dtype=None,
             n_seeds: int = 10) -> MultiResult:
    """Every criterion of the synthetic dataset in one :func:`~esmc_lens.pipeline.run_esmc`
    call, with the keywords the model's own language model gives (label-free)."""
    import matplotlib.pyplot as plt

    data = make_synthetic_dataset(out.with_name(out.name + "-data"), n_images=n_images, seed=0)
    ds = load_dataset(data)
    vlm = load_model(model, device=device, dtype=dtype)
    label = "the offline model, not LLaVA-1.5" if model == "offline" else vlm.name
    print(f"model: {vlm.name} ({label}); keywords: the model's own language model's answers "
          "(label-free)")
    res = run_esmc(vlm, ds, {c: SYNTHETIC_PROMPTS[c] for c in ds.criteria}, alpha=0.3,
                   n_seeds=n_seeds)
    # the run's folder is written whole and replaced by each demo, so the data live beside it
    res.save(out, overwrite=True)
    for crit, r in res.results.items():
        sup = " (supervised localization)" if r.supervised else ""
        fig = votes_figure(r.localization, f"{crit}: '{r.prompt}'{sup}", what="probs_mean",
                           model=vlm.name)
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
    fig = method_bars_figure(scores_frame(res), vlm.name, metrics=("nmi",), errorbars=True,
                             title="Synthetic dataset: NMI per method (mean ± std over seeds)")
    paths = save_figure(fig, "demo_scores", figures)
    plt.close(fig)
    print(f"\nresults in {out}/, figures {', '.join(str(p) for p in paths)} and "
          f"{figures}/demo_votes_*.pdf|png")
    return res
