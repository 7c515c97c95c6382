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
