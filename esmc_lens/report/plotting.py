"""One figure style for every esmc_lens figure, and the figures the library draws.

* :func:`figure_style` — fonts and sizes for one- and two-column papers, a colour-blind-safe
  palette (Okabe-Ito) and a perceptually uniform colormap (viridis).
* :func:`save_figure` — writes ``NAME.pdf`` and ``NAME.png`` side by side.
* :func:`lens_heatmap` — a layer x position heatmap (paper Figures 3, 7, 8).
* the notebooks' figures (``*_figure``): lens examples (Figures 3, 7, 8), vote maps, prompt
  variants (Figure 10), alpha sweeps (Figure 6), method bars (Tables 1-3), image grids
  (Figure 9, cluster thumbnails), consistency (Figure 4), specificity (Figure 5), cost.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000"]
ONE_COLUMN_IN = 3.4  # width of one column of a two-column paper, inches
TWO_COLUMN_IN = 7.0
SAVE_DPI = 300  # PNG resolution of saved figures


def _use_headless_backend() -> None:
    import matplotlib

    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend():
        with contextlib.suppress(Exception):
            matplotlib.use("Agg", force=False)


@contextlib.contextmanager
def figure_style(width: str = "one", font_size: float = 8.0) -> Iterator[dict]:
    """Context with esmc_lens' rc settings; yields ``{"figsize": (w, h)}`` for ``width``."""
    import matplotlib as mpl
    from cycler import cycler

    _use_headless_backend()
    w = ONE_COLUMN_IN if width == "one" else TWO_COLUMN_IN
    rc = {
        "font.size": font_size, "axes.titlesize": font_size + 1, "axes.labelsize": font_size,
        "xtick.labelsize": font_size - 1, "ytick.labelsize": font_size - 1,
        "legend.fontsize": font_size - 1, "axes.prop_cycle": cycler(color=PALETTE),
        "image.cmap": "viridis", "figure.dpi": 150, "savefig.dpi": SAVE_DPI,
        "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42,
        "axes.spines.top": False, "axes.spines.right": False,
    }
    with mpl.rc_context(rc):
        yield {"figsize": (w, w * 0.75)}


def save_figure(fig, name: str, outdir: str | os.PathLike = "figures") -> list[Path]:
    """Save ``fig`` as ``outdir/name.pdf`` and ``outdir/name.png``; returns both paths.

    Cropped to everything drawn (a legend or label outside the axes is kept) at
    ``SAVE_DPI``, whether or not it is called inside :func:`figure_style`: figures are
    usually built inside the style's context and saved after it has closed.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{name}.{ext}" for ext in ("pdf", "png")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=SAVE_DPI)
    return paths


def lens_heatmap(values: np.ndarray, layers: Sequence[int], positions: Sequence[str], *,
                 title: str = "", cbar_label: str = "lens probability", ax=None,
                 highlight: Sequence[tuple[int, int]] = (), vmax: float | None = None):
    """Heatmap of ``values`` [layers, positions] with layer rows (last layer on top).

    ``highlight`` lists (row, column) cells to outline (e.g. the localized target).
    """
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    values = np.asarray(values, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.32 * len(positions) + 1.2),
                                      max(2.5, 0.12 * len(layers) + 1.0)))
    im = ax.imshow(values, aspect="auto", origin="lower", vmin=0,
                   vmax=vmax if vmax is not None else max(float(values.max()), 1e-9))
    ax.set_xticks(range(len(positions)))
    ax.set_xticklabels(positions, rotation=60, ha="right")
    step = max(1, len(layers) // 10)
    ax.set_yticks(range(0, len(layers), step))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), step)])
    ax.set_xlabel("prompt position")
    ax.set_ylabel("layer (0 = embeddings)")
    for r, c in highlight:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec="#D55E00", lw=1.5))
    if title:
        ax.set_title(title)
    ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.02)
    return ax


# --------------------------------------------------------------------------------------
# Figures of the notebooks (paper Figures 3-10). Each returns a matplotlib Figure drawn in
# ``figure_style``; save it with :func:`save_figure`. The model that produced the numbers is
# part of every title.


def _fig(width: str = "two", height: float | None = None, nrows: int = 1, ncols: int = 1,
         **kw):
    import matplotlib.pyplot as plt

    w = ONE_COLUMN_IN if width == "one" else TWO_COLUMN_IN
    return plt.subplots(nrows, ncols, figsize=(w, height or w * 0.75 / max(1, ncols / 2)),
                        **kw)


def lens_example_figure(example: dict, model: str):
    """Figure 3/7/8: an image and, per criterion, the lens probability of its true class name
    and of a wrong one over (layer, prompt position). Colour bars differ per panel, as in
    the paper. ``example`` is one item of :func:`esmc_lens.apps.workbench.lens_examples`."""
    panels = example["panels"]
    with figure_style("two", font_size=7):
        n = len(panels)
        ncols = 1 + min(n, 2)
        nrows = math.ceil(n / 2)
        fig, axes = _fig("two", height=2.3 * nrows, nrows=nrows, ncols=ncols,
                         squeeze=False, gridspec_kw={"width_ratios": [0.55] + [1] * (ncols - 1)})
        for r in range(nrows):
            axes[r][0].axis("off")
        axes[0][0].imshow(example["image"])
        axes[0][0].set_title(str(example["image_id"]), fontsize=6)
        for k, p in enumerate(panels):
            ax = axes[k // 2][1 + k % 2]
            g = p["grid"]
            lens_heatmap(np.nan_to_num(g.to_numpy()), list(g.index), list(g.columns), ax=ax,
                         title=f"{p['criterion']}: p('{p['keyword']}')"
                               f"{' (true)' if p['true'] else ''}")
            ax.tick_params(axis="x", labelsize=5)
        for k in range(len(panels), nrows * 2):
            axes[k // 2][1 + k % 2].axis("off")
        fig.suptitle(f"Logit lens by layer and prompt token; model: {model}", fontsize=8)
        fig.tight_layout()
    return fig


def votes_figure(loc, title: str, what: str = "votes"):
    """Algorithm 1's vote map (``what="votes"``) or mean keyword probability
    (``"probs_mean"``) over (layer, position), targets outlined."""
    frame = getattr(loc, what)
    rows = {s: i for i, s in enumerate(frame.index)}
    with figure_style("two"):
        fig, ax = _fig("two", height=3.0)
        lens_heatmap(np.nan_to_num(frame.to_numpy(dtype=float)), list(frame.index),
                     list(frame.columns), ax=ax, title=title,
                     cbar_label="votes" if what == "votes" else "mean keyword probability",
                     highlight=[(rows[s], p) for s, p in loc.targets])
        fig.tight_layout()
    return fig


def prompt_heatmaps_figure(locs: dict, criterion: str, model: str):
    """Figure 10: the mean keyword probability map of each prompt variant of a criterion.
    ``locs[(criterion, variant)] = (prompt, Localization)``."""
    items = [(v, pl) for (c, v), pl in locs.items() if c == criterion]
    with figure_style("two", font_size=7):
        fig, axes = _fig("two", height=2.4 * math.ceil(len(items) / 2),
                         nrows=math.ceil(len(items) / 2), ncols=2, squeeze=False)
        for k, (variant, (prompt, loc)) in enumerate(items):
            ax = axes[k // 2][k % 2]
            f = loc.probs_mean
            rows = {s: i for i, s in enumerate(f.index)}
            lens_heatmap(np.nan_to_num(f.to_numpy(dtype=float)), list(f.index),
                         list(f.columns), ax=ax, title=f"{variant}: '{prompt}'",
                         cbar_label="mean kw prob",
                         highlight=[(rows[s], p) for s, p in loc.targets])
            ax.tick_params(axis="x", labelsize=5)
        for k in range(len(items), axes.size):
            axes[k // 2][k % 2].axis("off")
        fig.suptitle(f"{criterion}: keyword probability per prompt variant; model: {model}",
                     fontsize=8)
        fig.tight_layout()
    return fig


def sweep_figure(sweeps: dict, baselines: dict, model: str, x: str = "alpha"):
    """Figure 6: NMI and RI against ``x`` per criterion (mean ± std over seeds), with the
    k-means baseline as a dashed line. ``sweeps[criterion]`` has columns ``x``,
    ``{nmi,ri}_{mean,std}``; ``baselines[criterion]`` one row of the same metrics."""
    crits = list(sweeps)
    with figure_style("two"):
        fig, axes = _fig("two", height=2.4, nrows=1, ncols=len(crits), squeeze=False)
        for ax, crit in zip(axes[0], crits, strict=True):
            df = sweeps[crit]
            for j, m in enumerate(("nmi", "ri")):
                c = PALETTE[j]
                ax.errorbar(df[x], df[f"{m}_mean"], yerr=df[f"{m}_std"], marker="o", ms=3,
                            color=c, capsize=2, label=f"ESMC {m.upper()}")
                b = baselines.get(crit)
                if b is not None:
                    ax.axhline(float(b[f"{m}_mean"]), color=c, ls="--", lw=1,
                               label=f"k-means {m.upper()}")
            ax.set_xlabel(x)
            ax.set_ylim(0, 1.02)
            ax.set_title(crit)
        axes[0][0].set_ylabel("score")
        axes[0][-1].legend(loc="lower right", fontsize=6)
        fig.suptitle(f"Pseudo-label ratio; model: {model}", fontsize=8)
        fig.tight_layout()
    return fig


def method_bars_figure(df, model: str, metrics: Sequence[str] = ("nmi", "ri"),
                       paper_prefix: str = "paper_", title: str = ""):
    """Grouped bars of ``{metric}_mean`` per (criterion, method), with the paper's value of
    the same method as a black tick where the table has a ``paper_{metric}...`` column."""
    crits = list(dict.fromkeys(df["criterion"]))
    methods = list(dict.fromkeys(df["method"]))
    with figure_style("two"):
        fig, axes = _fig("two", height=2.4, nrows=1, ncols=len(metrics), squeeze=False)
        width = 0.8 / len(methods)
        for ax, m in zip(axes[0], metrics, strict=True):
            pcol = next((c for c in df.columns if c.startswith(f"{paper_prefix}{m}")), None)
            for j, meth in enumerate(methods):
                sub = df[df["method"] == meth].set_index("criterion").reindex(crits)
                xs = np.arange(len(crits)) + j * width
                ax.bar(xs, sub[f"{m}_mean"], width, label=meth, color=PALETTE[j % 8])
                if pcol is not None:
                    pv = sub[pcol].to_numpy(dtype=float)
                    ok = ~np.isnan(pv)
                    if ok.any():
                        ax.scatter(xs[ok], pv[ok], marker="_", s=120, color="black",
                                   zorder=3, label="paper (LLaVA-1.5-7B)")
            ax.set_xticks(np.arange(len(crits)) + 0.4 - width / 2)
            ax.set_xticklabels(crits)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(m.upper())
        handles, labels = axes[0][0].get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        axes[0][-1].legend(uniq.values(), uniq.keys(), fontsize=6, loc="lower right",
                           framealpha=0.9)
        fig.suptitle(title or f"model: {model}", fontsize=8)
        fig.tight_layout()
    return fig


def image_grid_figure(images: Sequence, captions: Sequence[str], title: str,
                      ncols: int = 3, thumb_in: float = 1.4):
    """Images with multi-line captions (Figure 9's failure cases, cluster thumbnails)."""
    n = max(1, len(images))
    nrows = math.ceil(n / ncols)
    with figure_style("two", font_size=6):
        fig, axes = _fig("two", height=(thumb_in + 0.9) * nrows, nrows=nrows, ncols=ncols,
                         squeeze=False)
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < len(images):
                ax.imshow(images[k])
                ax.set_title(captions[k], fontsize=5.5, loc="left")
        fig.suptitle(title, fontsize=8)
        fig.tight_layout()
    return fig


def consistency_figure(summary, detail, model: str):
    """Figure 4: left, within-class similarity of the generated answers' text embeddings vs
    of the target embeddings; right, the class name's lens probability at the target for
    every image (one column of dots per class)."""
    with figure_style("two"):
        fig, (a, b) = _fig("two", height=2.4, nrows=1, ncols=2)
        x = np.arange(len(summary))
        a.bar(x - 0.2, summary["answer_cosine"], 0.4, label="answers (text encoder)",
              color=PALETTE[1])
        a.bar(x + 0.2, summary["target_cosine"], 0.4, label="target embedding (lens)",
              color=PALETTE[0])
        a.set_xticks(x)
        a.set_xticklabels(summary["class"], rotation=30)
        a.set_ylabel("mean within-class cosine")
        a.set_ylim(0, 1.05)
        a.legend(fontsize=6)
        classes = list(summary["class"])
        for j, cls in enumerate(classes):
            v = detail.loc[detail["class"] == cls, "keyword_prob"].to_numpy(dtype=float)
            jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(len(v))
            b.scatter(j + jitter, v, s=8, color=PALETTE[j % 8])
        b.set_xticks(range(len(classes)))
        b.set_xticklabels(classes, rotation=30)
        b.set_ylabel("p(class name) at target")
        tgt = summary["target"].iloc[0] if len(summary) else ""
        fig.suptitle(f"Consistency at {tgt} vs variety of answers; model: {model}", fontsize=8)
        fig.tight_layout()
    return fig


def specificity_figure(df, criterion: str, other: str, model: str):
    """Figure 5: at ``criterion``'s target, the lens probability of each image's
    ``criterion`` class name vs its ``other`` class name; and how often the generated
    answer names each."""
    with figure_style("two"):
        fig, (a, b) = _fig("two", height=2.3, nrows=1, ncols=2)
        pa = df[f"{criterion}_prob"].to_numpy(dtype=float)
        pb = df[f"{other}_prob"].to_numpy(dtype=float)
        a.scatter(pb, pa, s=10, color=PALETTE[0])
        hi = max(1e-3, np.nanmax(np.r_[pa, pb])) * 1.05
        a.plot([0, hi], [0, hi], ls="--", lw=0.8, color="gray")
        a.set_xlabel(f"p({other} name)")
        a.set_ylabel(f"p({criterion} name)")
        a.set_title(f"lens at {df.attrs.get('target', '')}")
        rates = [df[f"answer_names_{criterion}"].mean(), df[f"answer_names_{other}"].mean()]
        b.bar([0, 1], rates, color=[PALETTE[0], PALETTE[1]])
        b.set_xticks([0, 1])
        b.set_xticklabels([f"names {criterion}", f"names {other}"])
        b.set_ylim(0, 1.05)
        b.set_ylabel("share of generated answers")
        fig.suptitle(f"What the answer says vs what the target holds; model: {model}",
                     fontsize=8)
        fig.tight_layout()
    return fig


def cost_figure(df, model: str):
    """Table 4 as bars: seconds per step and criterion."""
    cols = [c for c in df.columns if c.endswith("_s") or "_s (" in c]
    cols = [c for c in cols if c != "capture_per_image_s"]
    with figure_style("two"):
        fig, ax = _fig("two", height=2.3)
        crits = list(df["criterion"])
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar(np.arange(len(crits)) + j * width, df[c], width, label=c)
        ax.set_xticks(np.arange(len(crits)) + 0.4 - width / 2)
        ax.set_xticklabels(crits)
        ax.set_ylabel("seconds")
        ax.legend(fontsize=6)
        ax.set_title(f"Wall time per step on {df['device'].iloc[0]}; model: {model}")
        fig.tight_layout()
    return fig
