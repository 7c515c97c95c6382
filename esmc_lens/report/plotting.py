"""One visual language for every esmc_lens figure, and the figures the library draws.

* :func:`figure_style` — fonts and sizes for one- and two-column papers, a colour-blind-safe
  palette (Okabe-Ito) and a perceptually uniform colormap (viridis).
* :data:`METHOD_COLORS` / :func:`method_color` — one fixed colour per method in every figure.
* :func:`prob_norm` — the one colour scale of lens probabilities: logarithmic, from
  ``PROB_FLOOR`` to 1, shared by every panel and figure (a 6e-4 panel stays dark beside a
  0.25 one, as the paper's argument needs).
* :func:`token_label` / :func:`readable_tokens` — token strings as a reader reads them
  (``Ġcolor`` -> ``color``, ``Ċ`` -> ``↵``, a space token -> ``␣``, ``ass`` + ``istant`` ->
  ``ass‐`` + ``‐istant``).
* :func:`stamp` — the model, and QUICK for a smoke run, on every figure.
* :func:`save_figure` — writes ``NAME.pdf`` and ``NAME.png`` side by side.
* :func:`lens_heatmap` — a layer x position heatmap (paper Figures 3, 7, 8).
* the notebooks' figures (``*_figure``): lens examples (Figures 3, 7, 8), vote maps, prompt
  variants (Figure 10), alpha sweeps (Figure 6), method bars (Tables 1-3), image grids
  (Figure 9, cluster thumbnails), consistency (Figure 4), specificity (Figure 5), cost.

The prediction-trajectory view (top-1 lens token in each cell) is
:class:`esmc_lens.report.trajectory.LensTrajectory`.
"""

from __future__ import annotations

import ast
import contextlib
import math
import os
import textwrap
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np

# Okabe & Ito (2008): distinguishable under the common colour-vision deficiencies.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442",
           "#000000"]
#: One colour per method, the same in every figure (the paper's numbers are black).
METHOD_COLORS = {
    "ESMC": "#0072B2",
    "ESMC w/o head": "#56B4E9",
    "k-means (ESMC w/o head)": "#56B4E9",
    "Output": "#E69F00",
    "Vision only": "#009E73",
    "paper": "#000000",
}
_SPARE = ["#D55E00", "#CC79A7", "#F0E442", "#999999"]
ONE_COLUMN_IN = 3.4  # width of one column of a two-column paper, inches
TWO_COLUMN_IN = 7.0
SAVE_DPI = 300  # PNG resolution of saved figures
PROB_FLOOR = 1e-5  # lens probabilities below this share the darkest colour
HIGHLIGHT = "#D55E00"  # outline of a localized target cell
EMPTY_CELL = "#DDDDDD"  # a slot a shorter prompt left empty
MAX_LABEL_CHARS = 10


def method_color(method: str) -> str:
    """The fixed colour of ``method``; an unknown method gets a spare colour, stably."""
    if method in METHOD_COLORS:
        return METHOD_COLORS[method]
    if method.startswith("paper"):
        return METHOD_COLORS["paper"]
    return _SPARE[zlib.crc32(method.encode()) % len(_SPARE)]


def _use_headless_backend() -> None:
    import matplotlib

    if not os.environ.get("DISPLAY") and "inline" not in matplotlib.get_backend():
        with contextlib.suppress(Exception):
            matplotlib.use("Agg", force=False)


def style_rc(font_size: float = 8.0) -> dict:
    """esmc_lens' rc settings (what :func:`figure_style` applies)."""
    from cycler import cycler

    return {
        "font.size": font_size, "axes.titlesize": font_size + 1, "axes.labelsize": font_size,
        "xtick.labelsize": font_size - 1, "ytick.labelsize": font_size - 1,
        "legend.fontsize": font_size - 1, "axes.prop_cycle": cycler(color=PALETTE),
        "image.cmap": "viridis", "figure.dpi": 150, "savefig.dpi": SAVE_DPI,
        "savefig.bbox": "tight", "pdf.fonttype": 42, "ps.fonttype": 42,
        "axes.spines.top": False, "axes.spines.right": False,
    }


@contextlib.contextmanager
def figure_style(width: str = "one", font_size: float = 8.0) -> Iterator[dict]:
    """Context with esmc_lens' rc settings; yields ``{"figsize": (w, h)}`` for ``width``.

    Only the keys it sets are restored on exit. ``matplotlib.rc_context`` restores every
    key, and the first figure of a Jupyter kernel activates the inline backend inside the
    context (``interactive`` becomes True, the inline figure settings are set): restoring
    those switched inline display off for every later figure of the kernel.
    """
    import matplotlib as mpl

    _use_headless_backend()
    w = ONE_COLUMN_IN if width == "one" else TWO_COLUMN_IN
    rc = style_rc(font_size)
    old = {k: mpl.rcParams[k] for k in rc}
    mpl.rcParams.update(rc)
    try:
        yield {"figsize": (w, w * 0.75)}
    finally:
        mpl.rcParams.update(old)


def save_figure(fig, name: str, outdir: str | os.PathLike = "figures") -> list[Path]:
    """Save ``fig`` as ``outdir/name.pdf`` and ``outdir/name.png``; returns both paths.

    Cropped to everything drawn (a legend or label outside the axes is kept) at
    ``SAVE_DPI``, whether or not it is called inside :func:`figure_style`: figures are
    usually built inside the style's context and saved after it has closed. In a notebook,
    end the cell with the figure (or ``;``) rather than with this list.
    """
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [outdir / f"{name}.{ext}" for ext in ("pdf", "png")]
    for p in paths:
        fig.savefig(p, bbox_inches="tight", dpi=SAVE_DPI)
    return paths


# --------------------------------------------------------------------------------------
# Provenance and token labels


def provenance(model: str, quick: bool = False) -> str:
    """``"QUICK smoke run, not a result · model: …"`` or ``"model: …"``."""
    return f"QUICK smoke run, not a result · model: {model}" if quick else f"model: {model}"


def stamp(fig, title: str, model: str, quick: bool = False, fontsize: float = 8) -> None:
    """Title ``fig`` with ``title`` (prefixed ``QUICK ·`` in quick mode) and, on a second
    line, the model (and that a quick run is a smoke run)."""
    head = f"QUICK · {title}" if quick else title
    if quick:
        head += f"\nsmoke run on a few images, not a result · model: {model or '?'}"
    elif model:
        head += f"\nmodel: {model}"
    fig.suptitle(head, fontsize=fontsize)


_SPACE = "␣"
_NEWLINE = "↵"
_TAB = "⇥"
_JOIN = "‐"  # a word split across tokens: "ass‐" + "‐istant"


def _decode_marks(tok: str) -> str:
    """Byte-level BPE / SentencePiece markers as the characters they stand for."""
    return (tok.replace("Ġ", " ").replace("▁", " ").replace("Ċ", "\n").replace("ĉ", "\t")
            .replace("č", "\r"))


def token_label(tok: str, max_chars: int = MAX_LABEL_CHARS) -> str:
    """A token as a reader reads it: markers decoded, the word without its leading space,
    whitespace-only tokens as visible marks (``␣`` space, ``↵`` newline, ``⇥`` tab),
    an empty token as ``∅``, ``<|im_start|>`` as ``<im_start>``, long tokens cut with
    ``…``."""
    text = _decode_marks(tok)
    if not text:
        return "∅"
    if not text.strip():
        marks = text.replace("\r", "").replace(" ", _SPACE).replace("\n", _NEWLINE)
        marks = marks.replace("\t", _TAB)
        return marks[:4] + ("…" if len(marks) > 4 else "")
    word = text.strip().replace("\n", _NEWLINE)
    if word.startswith("<|") and word.endswith("|>"):  # a special token: <|im_start|>
        word = f"<{word[2:-2]}>"
    if len(word) > max_chars:
        word = word[: max_chars - 1] + "…"
    return word


def readable_tokens(tokens: Sequence[str], max_chars: int = MAX_LABEL_CHARS,
                    first_continues: bool = True) -> list[str]:
    """:func:`token_label` of each token of a sequence, with the pieces of a word split
    across tokens joined by ``‐`` (``assistant`` as ``ass`` + ``istant``: ``ass‐``,
    ``‐istant``), so a piece is not read as a word of its own. ``first_continues``: the
    tokens are a window of a longer sequence, so a first token that starts in lower case
    with no space marker is taken to continue a word before the window."""
    out = [token_label(t, max_chars) for t in tokens]
    text = [_decode_marks(t) for t in tokens]
    if tokens and first_continues and text[0][:1].islower():
        out[0] = _JOIN + out[0]  # "istant": its first piece lies before the window
    for i in range(1, len(tokens)):
        prev, cur = text[i - 1], text[i]
        # a piece continues a word when nothing separates it from an alphabetic token
        if (cur and prev and cur[0].isalpha() and prev[-1].isalpha()
                and not cur[0].isspace() and not prev.startswith("<")):
            out[i] = _JOIN + out[i]
            if not out[i - 1].endswith(_JOIN):
                out[i - 1] = out[i - 1] + _JOIN
    return out


def position_labels(labels: Sequence[str], tokens: Sequence[str] | None = None,
                    max_chars: int = MAX_LABEL_CHARS) -> list[str]:
    """Axis labels ``"seq:token"`` made readable.

    ``labels`` are the ``"seq_index:token"`` column labels of a vote map or a lens grid
    (:func:`esmc_lens.localization.votes.cell_labels`); with the raw ``tokens`` of the same
    slots, pieces of split words are marked too (:func:`readable_tokens`).
    """
    seqs, words = [], []
    for lab in labels:
        seq, _, rest = str(lab).partition(":")
        rest = rest.split("#")[0] if "#" in rest and rest[-1:].isdigit() else rest
        if len(rest) >= 2 and rest[0] == rest[-1] and rest[0] in "'\"":
            with contextlib.suppress(ValueError, SyntaxError):
                rest = ast.literal_eval(rest)  # cell_labels writes whitespace tokens as repr
        seqs.append(seq)
        words.append(rest)
    shown = (readable_tokens(tokens, max_chars) if tokens is not None
             else [token_label(w, max_chars) for w in words])
    return [f"{s}:{w}" if s.lstrip("-").isdigit() else w
            for s, w in zip(seqs, shown, strict=True)]


# --------------------------------------------------------------------------------------
# Heatmaps


def prob_norm(floor: float = PROB_FLOOR, vmax: float = 1.0):
    """The shared colour scale of lens probabilities: log, ``floor`` .. ``vmax``."""
    from matplotlib.colors import LogNorm

    return LogNorm(vmin=floor, vmax=vmax, clip=True)


def _cmap(name: str = "viridis"):
    import matplotlib as mpl

    return mpl.colormaps[name].with_extremes(bad=EMPTY_CELL)


def lens_heatmap(values: np.ndarray, layers: Sequence[int], positions: Sequence[str], *,
                 title: str = "", cbar_label: str = "lens probability", ax=None,
                 highlight: Sequence[tuple[int, int]] = (), vmax: float | None = None,
                 scale: str = "log", norm=None, colorbar: bool = True,
                 tokens: Sequence[str] | None = None, max_xticks: int = 40):
    """Heatmap of ``values`` [layers, positions] with layer rows (last layer on top).

    ``scale``: ``"log"`` (probabilities: :func:`prob_norm`, shared by every figure),
    ``"linear"`` (counts such as votes, from 0 to ``vmax``). ``norm`` overrides both (pass
    one norm to panels that are compared). NaN cells (empty slots) are grey.
    ``highlight`` lists (row, column) cells to outline (e.g. the localized target).
    ``positions`` are ``"seq:token"`` labels, shown readable (:func:`position_labels`;
    ``tokens``: the raw tokens of the same slots). Returns ``ax``; the image is
    ``ax.images[0]``.
    """
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm, Normalize
    from matplotlib.patches import Rectangle

    values = np.asarray(values, dtype=float)
    if ax is None:
        _, ax = plt.subplots(figsize=(max(3.0, 0.32 * len(positions) + 1.6),
                                      max(2.5, 0.12 * len(layers) + 1.2)))
    if norm is None:
        if scale == "log":
            norm = prob_norm(vmax=vmax or 1.0)
        elif scale == "linear":
            finite = values[np.isfinite(values)]
            top = vmax if vmax is not None else (float(finite.max()) if finite.size else 1.0)
            norm = Normalize(vmin=0, vmax=max(top, 1e-9))
        else:
            raise ValueError(f"scale={scale!r}: use 'log' or 'linear'")
    if isinstance(norm, LogNorm):  # a probability of 0 is below the floor, not empty
        values = np.where(np.isfinite(values), np.maximum(values, norm.vmin), np.nan)
    shown = np.ma.masked_invalid(values)
    im = ax.imshow(shown, aspect="auto", origin="lower", norm=norm, cmap=_cmap(),
                   interpolation="nearest")
    labels = position_labels(positions, tokens)
    step = max(1, math.ceil(len(labels) / max_xticks))
    ax.set_xticks(range(0, len(labels), step))
    ax.set_xticklabels(labels[::step], rotation=55, ha="right", rotation_mode="anchor")
    ystep = max(1, len(layers) // 10)
    ax.set_yticks(range(0, len(layers), ystep))
    ax.set_yticklabels([str(layers[i]) for i in range(0, len(layers), ystep)])
    ax.set_xlabel("prompt position (sequence index: token)")
    ax.set_ylabel("layer (0 = embeddings)")
    for r, c in highlight:
        ax.add_patch(Rectangle((c - 0.5, r - 0.5), 1, 1, fill=False, ec=HIGHLIGHT, lw=1.5))
    if title:
        ax.set_title(title)
    if colorbar:
        ax.figure.colorbar(im, ax=ax, label=cbar_label, fraction=0.046, pad=0.02)
    return ax


# --------------------------------------------------------------------------------------
# Figures of the notebooks (paper Figures 3-10). Each returns a matplotlib Figure drawn in
# ``figure_style`` and stamped with the model (and QUICK); save it with :func:`save_figure`.


def _fig(width: str = "two", height: float | None = None, nrows: int = 1, ncols: int = 1,
         **kw):
    import matplotlib.pyplot as plt

    w = ONE_COLUMN_IN if width == "one" else TWO_COLUMN_IN
    return plt.subplots(nrows, ncols, figsize=(w, height or w * 0.75 / max(1, ncols / 2)),
                        **kw)


def _shared_colorbar(fig, axes, norm, label: str):
    import matplotlib as mpl

    sm = mpl.cm.ScalarMappable(norm=norm, cmap=_cmap())
    return fig.colorbar(sm, ax=list(np.ravel(axes)), label=label, fraction=0.025, pad=0.02)


def lens_example_figure(example: dict, model: str, quick: bool = False):
    """Figure 3/7/8: an image and, per criterion, the lens probability of its true class name
    and of a wrong one over (layer, prompt position), on one shared log colour scale (the
    paper gives each panel its own bar; shared, a dark panel is a low probability).
    ``example`` is one item of :func:`esmc_lens.apps.workbench.lens_examples`."""
    panels = example["panels"]
    norm = prob_norm()
    with figure_style("two", font_size=7):
        n = len(panels)
        ncols = 1 + min(n, 2)
        nrows = math.ceil(n / 2)
        fig, axes = _fig("two", height=2.5 * nrows + 0.6, nrows=nrows, ncols=ncols,
                         squeeze=False, layout="constrained",
                         gridspec_kw={"width_ratios": [0.55] + [1] * (ncols - 1)})
        for r in range(nrows):
            axes[r][0].axis("off")
        axes[0][0].imshow(example["image"])
        axes[0][0].set_title(str(example["image_id"]), fontsize=6)
        heat = []
        for k, p in enumerate(panels):
            ax = axes[k // 2][1 + k % 2]
            g = p["grid"]
            lens_heatmap(g.to_numpy(dtype=float), list(g.index), list(g.columns), ax=ax,
                         norm=norm, colorbar=False, tokens=p.get("tokens"),
                         title=f"{p['criterion']}: p('{p['keyword']}')"
                               f"{' (true class)' if p['true'] else ' (wrong class)'}")
            ax.tick_params(axis="x", labelsize=5)
            heat.append(ax)
        for k in range(len(panels), nrows * 2):
            axes[k // 2][1 + k % 2].axis("off")
        _shared_colorbar(fig, heat, norm, "lens probability (log)")
        stamp(fig, "Logit lens by layer and prompt token", model, quick)
    return fig


def votes_figure(loc, title: str, what: str = "votes", model: str = "", quick: bool = False,
                 tokens: Sequence[str] | None = None):
    """Algorithm 1's vote map (``what="votes"``: counts, 0 .. the number of (image, keyword)
    pairs) or mean keyword probability (``"probs_mean"``: the shared log scale) over
    (layer, position), targets outlined."""
    frame = getattr(loc, what)
    rows = {s: i for i, s in enumerate(frame.index)}
    with figure_style("two"):
        fig, ax = _fig("two", height=3.4, layout="constrained")
        kw = ({"scale": "linear", "vmax": max(1, loc.n_pairs),
               "cbar_label": f"votes (of {loc.n_pairs} image x keyword pairs)"}
              if what == "votes" else {"cbar_label": "mean keyword probability (log)"})
        values = frame.to_numpy(dtype=float)
        lens_heatmap(values, list(frame.index), list(frame.columns),
                     ax=ax, highlight=[(rows[s], p) for s, p in loc.targets], tokens=tokens,
                     **kw)
        if what == "votes" and values.shape[1] <= 40:  # the counts, where there are any
            for r, c in np.argwhere(np.nan_to_num(values) > 0):
                light = values[r, c] > 0.6 * max(1, loc.n_pairs)
                ax.text(c, r, str(int(values[r, c])), ha="center", va="center", fontsize=5,
                        color="black" if light else "white")
        stamp(fig, title, model, quick)
    return fig


def prompt_heatmaps_figure(locs: dict, criterion: str, model: str, quick: bool = False):
    """Figure 10: the mean keyword probability map of each prompt variant of a criterion,
    one shared log colour scale. ``locs[(criterion, variant)] = (prompt, Localization)``."""
    items = [(v, pl) for (c, v), pl in locs.items() if c == criterion]
    norm = prob_norm()
    with figure_style("two", font_size=7):
        nrows = math.ceil(len(items) / 2)
        fig, axes = _fig("two", height=2.6 * nrows + 0.6, nrows=nrows, ncols=2,
                         squeeze=False, layout="constrained")
        for k, (variant, (prompt, loc)) in enumerate(items):
            ax = axes[k // 2][k % 2]
            f = loc.probs_mean
            rows = {s: i for i, s in enumerate(f.index)}
            lens_heatmap(f.to_numpy(dtype=float), list(f.index), list(f.columns), ax=ax,
                         title=f"{variant}: '{prompt}'", norm=norm, colorbar=False,
                         highlight=[(rows[s], p) for s, p in loc.targets])
            ax.tick_params(axis="x", labelsize=5)
        for k in range(len(items), axes.size):
            axes[k // 2][k % 2].axis("off")
        _shared_colorbar(fig, axes, norm, "mean keyword probability (log)")
        stamp(fig, f"{criterion}: keyword probability per prompt variant", model, quick)
    return fig


def sweep_figure(sweeps: dict, baselines: dict, model: str, x: str = "alpha",
                 quick: bool = False):
    """Figure 6: NMI (solid) and RI (dashed) against ``x`` per criterion (mean ± std over
    seeds) in ESMC's colour, with the k-means baseline as horizontal lines in its colour.
    ``sweeps[criterion]`` has columns ``x``, ``{nmi,ri}_{mean,std}``; ``baselines[criterion]``
    one row of the same metrics."""
    crits = list(sweeps)
    esmc, km = method_color("ESMC"), method_color("ESMC w/o head")
    with figure_style("two"):
        fig, axes = _fig("two", height=2.6, nrows=1, ncols=len(crits), squeeze=False,
                         layout="constrained")
        for ax, crit in zip(axes[0], crits, strict=True):
            df = sweeps[crit]
            for m, ls, mk in (("nmi", "-", "o"), ("ri", "--", "s")):
                ax.errorbar(df[x], df[f"{m}_mean"], yerr=df[f"{m}_std"], marker=mk, ms=3,
                            color=esmc, ls=ls, capsize=2, label=f"ESMC {m.upper()}")
                b = baselines.get(crit)
                if b is not None:
                    ax.axhline(float(b[f"{m}_mean"]), color=km, ls=ls, lw=1.2,
                               label=f"k-means (ESMC w/o head) {m.upper()}")
            ax.set_xlabel(x)
            ax.set_ylim(0, 1.02)
            ax.set_title(crit)
        axes[0][0].set_ylabel("score")
        axes[0][-1].legend(loc="lower right", fontsize=6)
        stamp(fig, "Pseudo-label ratio alpha (Figure 6)", model, quick)
    return fig


def method_bars_figure(df, model: str, metrics: Sequence[str] = ("nmi", "ri"),
                       paper_prefix: str = "paper_", title: str = "", quick: bool = False,
                       errorbars: bool = False):
    """Grouped bars of ``{metric}_mean`` per (criterion, method) in each method's fixed
    colour, with the paper's value of the same method as a black tick where the table has a
    ``paper_{metric}...`` column; ``errorbars``: ± ``{metric}_std`` (the spread over seeds)."""
    crits = list(dict.fromkeys(df["criterion"]))
    methods = list(dict.fromkeys(df["method"]))
    with figure_style("two"):
        fig, axes = _fig("two", height=2.8, nrows=1, ncols=len(metrics), squeeze=False,
                         layout="constrained")
        width = 0.8 / len(methods)
        for ax, m in zip(axes[0], metrics, strict=True):
            pcol = next((c for c in df.columns if c.startswith(f"{paper_prefix}{m}")), None)
            for j, meth in enumerate(methods):
                sub = df[df["method"] == meth].set_index("criterion").reindex(crits)
                xs = np.arange(len(crits)) + j * width
                err = sub[f"{m}_std"] if errorbars and f"{m}_std" in sub else None
                ax.bar(xs, sub[f"{m}_mean"], width, yerr=err, capsize=2, label=meth,
                       color=method_color(meth))
                if pcol is not None:
                    pv = sub[pcol].to_numpy(dtype=float)
                    ok = ~np.isnan(pv)
                    if ok.any():
                        ax.scatter(xs[ok], pv[ok], marker="_", s=160, lw=2,
                                   color=method_color("paper"), zorder=3,
                                   label="paper (LLaVA-1.5-7B)")
            ax.set_xticks(np.arange(len(crits)) + 0.4 - width / 2)
            ax.set_xticklabels(crits)
            ax.set_ylim(0, 1.05)
            ax.set_ylabel(m.upper())
        handles, labels = axes[0][0].get_legend_handles_labels()
        uniq = dict(zip(labels, handles, strict=True))
        fig.legend(uniq.values(), uniq.keys(), fontsize=6, loc="outside lower center",
                   ncol=min(len(uniq), 5), frameon=False)
        stamp(fig, title or "NMI and RI per method", model, quick)
    return fig


def caption_text(lines: Sequence[str], width: int = 34, max_lines: int = 6) -> str:
    """Caption lines wrapped at word boundaries (never cut mid-word; a caption longer than
    ``max_lines`` ends with ``…`` after its last whole word)."""
    out: list[str] = []
    for line in lines:
        out.extend(textwrap.wrap(" ".join(str(line).split()), width) or [""])
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = out[-1].rstrip(" ,.;:") + " …"
    return "\n".join(out)


def image_grid_figure(images: Sequence, captions: Sequence[str], title: str,
                      ncols: int = 3, thumb_in: float = 1.4, model: str = "",
                      quick: bool = False):
    """Images with multi-line captions (Figure 9's failure cases, cluster thumbnails)."""
    n = max(1, len(images))
    nrows = math.ceil(n / ncols)
    lines = max([c.count("\n") + 1 for c in captions] or [1])
    with figure_style("two", font_size=6):
        fig, axes = _fig("two", height=(thumb_in + 0.12 * lines + 0.2) * nrows + 0.5,
                         nrows=nrows, ncols=ncols, squeeze=False, layout="constrained")
        for k, ax in enumerate(axes.flat):
            ax.axis("off")
            if k < len(images):
                ax.imshow(images[k])
                ax.set_title(captions[k], fontsize=5.5, loc="left")
        stamp(fig, title, model, quick)
    return fig


def consistency_figure(summary, detail, model: str, quick: bool = False):
    """Figure 4: left, within-class similarity of the generated answers' text embeddings
    (Output's colour) vs of the target embeddings (ESMC's colour); right, the class name's
    lens probability at the target for every image (log scale, one column per class)."""
    with figure_style("two"):
        fig, (a, b) = _fig("two", height=2.6, nrows=1, ncols=2, layout="constrained")
        x = np.arange(len(summary))
        a.bar(x - 0.2, summary["answer_cosine"], 0.4, label="answers (text encoder)",
              color=method_color("Output"))
        a.bar(x + 0.2, summary["target_cosine"], 0.4, label="target embedding (lens)",
              color=method_color("ESMC"))
        a.set_xticks(x)
        a.set_xticklabels(summary["class"], rotation=30, ha="right", rotation_mode="anchor")
        a.set_ylabel("mean within-class cosine")
        a.set_ylim(0, 1.05)
        a.legend(fontsize=6)
        classes = list(summary["class"])
        for j, cls in enumerate(classes):
            v = detail.loc[detail["class"] == cls, "keyword_prob"].to_numpy(dtype=float)
            jitter = np.linspace(-0.15, 0.15, len(v)) if len(v) > 1 else np.zeros(len(v))
            b.scatter(j + jitter, np.maximum(v, PROB_FLOOR), s=8, color=method_color("ESMC"))
        b.set_yscale("log")
        b.set_ylim(PROB_FLOOR, 1.5)
        b.set_xticks(range(len(classes)))
        b.set_xticklabels(classes, rotation=30, ha="right", rotation_mode="anchor")
        b.set_ylabel("p(class name) at target (log)")
        tgt = summary["target"].iloc[0] if len(summary) else ""
        stamp(fig, f"Figure 4: consistency at {tgt} vs variety of answers", model, quick)
    return fig


def specificity_figure(df, criterion: str, other: str, model: str, quick: bool = False):
    """Figure 5: at ``criterion``'s target, the lens probability of each image's
    ``criterion`` class name vs its ``other`` class name (log-log); and how often the
    generated answer names each."""
    with figure_style("two"):
        fig, (a, b) = _fig("two", height=2.6, nrows=1, ncols=2, layout="constrained")
        pa = np.maximum(df[f"{criterion}_prob"].to_numpy(dtype=float), PROB_FLOOR)
        pb = np.maximum(df[f"{other}_prob"].to_numpy(dtype=float), PROB_FLOOR)
        a.scatter(pb, pa, s=10, color=method_color("ESMC"))
        a.plot([PROB_FLOOR, 1], [PROB_FLOOR, 1], ls="--", lw=0.8, color="gray")
        a.set_xscale("log")
        a.set_yscale("log")
        a.set_xlabel(f"p({other} class name)")
        a.set_ylabel(f"p({criterion} class name)")
        a.set_title(f"lens at {df.attrs.get('target', '')}")
        rates = [df[f"answer_names_{criterion}"].mean(), df[f"answer_names_{other}"].mean()]
        b.bar([0, 1], rates, color=method_color("Output"))
        b.set_xticks([0, 1])
        b.set_xticklabels([f"names the {criterion}", f"names the {other}"])
        b.set_ylim(0, 1.05)
        b.set_ylabel("share of generated answers")
        stamp(fig, "Figure 5: what the answer says vs what the target holds", model, quick)
    return fig


#: Table 4's columns as a reader names them.
COST_LABELS = {
    "localization_s": "localization: capture of the sampled images + vote (Algorithm 1)",
    "localization_capture_s": "localization capture (sampled images, every cell)",
    "vote_s": "vote (Algorithm 1)",
    "target_capture_s": "target capture (every image, target cell)",
    "total_s": "whole run",
}


def cost_label(column: str) -> str:
    """A readable name of a :func:`~esmc_lens.apps.workbench.cost_table` time column."""
    if column in COST_LABELS:
        return COST_LABELS[column]
    if column.startswith("head_train_s"):
        return "head training" + column[len("head_train_s"):]
    return column.removesuffix("_s").replace("_", " ")


def cost_figure(df, model: str, quick: bool = False):
    """Table 4 as bars: seconds per step and criterion (log scale: steps differ by orders
    of magnitude), legend in words."""
    cols = [c for c in df.columns if c.endswith("_s") or "_s (" in c]
    cols = [c for c in cols if c not in ("capture_per_image_s", "total_s")
            and not c.startswith("paper")]
    with figure_style("two"):
        fig, ax = _fig("two", height=2.8, layout="constrained")
        crits = list(df["criterion"])
        width = 0.8 / len(cols)
        for j, c in enumerate(cols):
            ax.bar(np.arange(len(crits)) + j * width, df[c], width, label=cost_label(c),
                   color=PALETTE[j % len(PALETTE)])
        ax.set_xticks(np.arange(len(crits)) + 0.4 - width / 2)
        ax.set_xticklabels(crits)
        ax.set_yscale("log")
        vals = df[cols].to_numpy(dtype=float)
        vals = vals[np.isfinite(vals) & (vals > 0)]
        if vals.size:  # bars start a decade below the fastest step, so each one shows
            ax.set_ylim(10 ** (math.floor(math.log10(vals.min())) - 1), vals.max() * 2)
        ax.set_ylabel("seconds (log)")
        fig.legend(fontsize=6, loc="outside right center", frameon=False)
        stamp(fig, f"Table 4: wall time per step on {df['device'].iloc[0]}", model, quick)
    return fig


def stream_figure(cache, image: int, grid, keyword: str, model: str, quick: bool = False):
    """How the residual stream grows and when the keyword appears, at the last prompt
    position of one image: left the norm of the state per layer, right the keyword's lens
    probability (log) per layer. ``grid``: the image's keyword grid
    (:func:`esmc_lens.localization.grid.keyword_grid`)."""
    norms = cache.states[image, :, -1].float().norm(dim=-1).numpy()
    with figure_style("two"):
        fig, (a, b) = _fig("two", height=2.4, nrows=1, ncols=2, layout="constrained")
        a.plot(cache.stream, norms, marker="o", ms=2, color=method_color("ESMC"))
        a.set_xlabel("layer (0 = embeddings)")
        a.set_ylabel("|h| at the last position")
        b.plot(grid.index, np.maximum(grid.iloc[:, -1].to_numpy(dtype=float), PROB_FLOOR),
               marker="o", ms=2, color=method_color("ESMC"))
        b.set_yscale("log")
        b.set_ylim(PROB_FLOOR, 1.5)
        b.set_xlabel("layer (0 = embeddings)")
        b.set_ylabel(f"p('{keyword}') (log)")
        stamp(fig, f"{cache.image_ids[image]}, last prompt token "
                   f"({token_label(cache.tokens[image][-1])})", model, quick)
    return fig
