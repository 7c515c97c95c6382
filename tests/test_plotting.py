"""esmc_lens.report.plotting: saved figures keep everything drawn, at the publication resolution."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pytest
from PIL import Image

from esmc_lens.report.plotting import SAVE_DPI, figure_style, save_figure  # headless backend


@pytest.mark.parametrize("inside_style", [True, False])
def test_saved_figure_keeps_a_legend_outside_the_axes(tmp_path, inside_style):
    with figure_style("one"):
        fig, ax = plt.subplots(figsize=(3, 2))
        ax.bar([0, 1], [1, 2], label="ESMC")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.4))  # below the figure
        if inside_style:
            paths = save_figure(fig, "legend", tmp_path)
    if not inside_style:  # how the demo and notebooks call it: after the style has closed
        paths = save_figure(fig, "legend", tmp_path)
    assert [p.suffix for p in paths] == [".pdf", ".png"]
    fig.canvas.draw()
    box = fig.get_tightbbox()  # inches, legend included
    assert box.y0 < 0  # the legend does lie outside the 2-inch canvas
    pad = plt.rcParams["savefig.pad_inches"]
    w, h = Image.open(paths[1]).size
    # text extents differ slightly between the screen and the saving dpi: 1%
    assert w == pytest.approx((box.width + 2 * pad) * SAVE_DPI, rel=0.01)
    assert h == pytest.approx((box.height + 2 * pad) * SAVE_DPI, rel=0.01)
    plt.close(fig)


# ------------------------------------------------------------------ one visual language


def test_figure_style_keeps_what_a_backend_set_inside_it():
    """The inline backend activates inside the first styled figure (interactive becomes
    True); rc_context restored it and hid every later figure of the kernel."""
    import matplotlib as mpl

    before = mpl.rcParams["interactive"], mpl.rcParams["font.size"]
    try:
        with figure_style("two", font_size=5):
            assert mpl.rcParams["font.size"] == 5
            mpl.rcParams["interactive"] = not before[0]  # what backend activation does
        assert mpl.rcParams["interactive"] is (not before[0])
        assert mpl.rcParams["font.size"] == before[1]
    finally:
        mpl.rcParams["interactive"] = before[0]


def test_token_labels_are_readable():
    from esmc_lens.report.plotting import position_labels, readable_tokens, token_label

    assert token_label("Ġcolor") == "color" and token_label("▁the") == "the"
    assert token_label("Ċ") == "↵" and token_label("ĊĊ") == "↵↵"
    assert token_label("Ġ") == "␣" and token_label(" ") == "␣" and token_label("") == "∅"
    assert token_label("Ġextraordinarily") == "extraordi…"
    toks = ["istant", "Ċ", "<|im_start|>", "ass", "istant", "Ċ", "The", "Ġcolor", "Ġis"]
    assert readable_tokens(toks) == ["‐istant", "↵", "<im_start>", "ass‐", "‐istant", "↵",
                                     "The", "color", "is"]
    assert readable_tokens(["istant"], first_continues=False) == ["istant"]
    # the labels of a vote map: whitespace tokens are written as repr by cell_labels
    assert position_labels(["39:'Ċ'", "149:is", "3:' '"]) == ["39:↵", "149:is", "3:␣"]
    assert position_labels(["140:<|im_start|>", "141:ass", "142:istant"],
                           tokens=["<|im_start|>", "ass", "istant"]) == [
        "140:<im_start>", "141:ass‐", "142:‐istant"]


def test_every_method_keeps_its_colour_and_the_paper_is_black():
    import pandas as pd
    from matplotlib.colors import to_hex

    from esmc_lens.report.plotting import METHOD_COLORS, method_bars_figure

    rows = [{"criterion": "color", "method": m, "nmi_mean": 0.5, "ri_mean": 0.6,
             "paper_nmi (LLaVA-1.5-7B)": 0.7 if m == "ESMC" else float("nan"),
             "paper_ri (LLaVA-1.5-7B)": 0.8 if m == "ESMC" else float("nan")}
            for m in ("Vision only", "ESMC", "Output")]  # an unusual order
    fig = method_bars_figure(pd.DataFrame(rows), "tiny", quick=True)
    ax = fig.axes[0]
    colours = [to_hex(p.get_facecolor()) for p in ax.patches]
    assert colours == [METHOD_COLORS["Vision only"].lower(), METHOD_COLORS["ESMC"].lower(),
                       METHOD_COLORS["Output"].lower()]
    ticks = [c for c in ax.collections if len(c.get_offsets())]
    assert [to_hex(t.get_facecolor()[0]) for t in ticks] == ["#000000"]
    title = fig._suptitle.get_text()
    assert title.startswith("QUICK ·") and "model: tiny" in title and "not a result" in title
    plt.close(fig)


def test_method_bars_draw_the_seed_spread_when_asked():
    import matplotlib.pyplot as plt
    import pandas as pd

    from esmc_lens.report.plotting import method_bars_figure

    rows = [{"criterion": c, "method": m, "nmi_mean": 0.5, "nmi_std": s}
            for c, m, s in (("color", "ESMC", 0.1), ("color", "Output", 0.0),
                            ("shape", "ESMC", 0.25), ("shape", "Output", 0.05))]
    plain = method_bars_figure(pd.DataFrame(rows), "tiny", metrics=("nmi",))
    assert not plain.axes[0].lines  # no error bars unless asked
    fig = method_bars_figure(pd.DataFrame(rows), "tiny", metrics=("nmi",), errorbars=True)
    spans = sorted(round(float(seg[1, 1] - seg[0, 1]), 6)
                   for col in fig.axes[0].collections for seg in col.get_segments())
    assert spans == [0.0, 0.1, 0.2, 0.5]  # 2 x std per bar
    plt.close(plain)
    plt.close(fig)


def test_compared_panels_share_one_log_scale():
    import numpy as np
    import pandas as pd

    from esmc_lens.report.plotting import PROB_FLOOR, lens_example_figure

    idx = pd.Index([0, 1, 2], name="layer")
    cols = pd.Index(["5:the", "6:color", "7:is"], name="position")
    bright = pd.DataFrame(np.full((3, 3), 1e-6), idx, cols)
    bright.iloc[2, 2] = 0.25
    dark = pd.DataFrame(np.full((3, 3), 1e-6), idx, cols)
    dark.iloc[2, 2] = 6e-4
    ex = {"image": np.zeros((4, 4, 3)), "image_id": "x", "panels": [
        {"criterion": "color", "keyword": "red", "true": True, "grid": bright},
        {"criterion": "color", "keyword": "blue", "true": False, "grid": dark}]}
    fig = lens_example_figure(ex, "tiny")
    ims = [ax.images[0] for ax in fig.axes if ax.images and ax.images[0].get_array().ndim == 2]
    assert len(ims) == 2
    assert ims[0].norm is ims[1].norm and ims[0].norm.vmin == PROB_FLOOR
    assert ims[0].norm.vmax == 1.0
    c_bright = ims[0].cmap(ims[0].norm(0.25))
    c_dark = ims[1].cmap(ims[1].norm(6e-4))
    assert c_bright != c_dark  # 0.25 is brighter than 6e-4, not the same top colour
    assert ims[1].norm(6e-4) < 0.6 < ims[0].norm(0.25)
    # one colour bar for the two panels
    assert sum(ax.get_label() == "<colorbar>" for ax in fig.axes) == 1
    plt.close(fig)


def test_captions_wrap_at_word_boundaries():
    from esmc_lens.report.plotting import caption_text

    answer = "The color of the flower is a deep shade of crimson red with white stripes"
    text = caption_text([f"answer: {answer}"], width=20, max_lines=3)
    words = set(answer.split()) | {"answer:", "…"}
    assert all(w in words for line in text.split("\n") for w in line.split())
    assert text.endswith("…") and len(text.split("\n")) == 3
    assert caption_text(["short"], width=20) == "short"
