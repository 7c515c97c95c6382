"""One figure style for every esmc_lens figure, and the figures the library draws.

* :func:`figure_style` — fonts and sizes for one- and two-column papers, a colour-blind-safe
  palette (Okabe-Ito) and a perceptually uniform colormap (viridis).
* :func:`save_figure` — writes ``NAME.pdf`` and ``NAME.png`` side by side.
* :func:`lens_heatmap` — a layer x position heatmap (paper Figures 3, 7, 8).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000"]
ONE_COLUMN_IN = 3.4  # width of one column of a two-column paper, inches
TWO_COLUMN_IN = 7.0


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
        "image.cmap": "viridis", "figure.dpi": 150, "savefig.dpi": 300,
        "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42,
        "axes.spines.top": False, "axes.spines.right": False,
    }
    with mpl.rc_context(rc):
        yield {"figsize": (w, w * 0.75)}


def save_figure(fig, name: str, outdir: str | os.PathLike = "figures") -> list[Path]:
    """Save ``fig`` as ``outdir/name.pdf`` and ``outdir/name.png``; returns both paths."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{name}.{ext}" for ext in ("pdf", "png")]
    for p in paths:
        fig.savefig(p)
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
