"""Regenerate the README's lens heatmap: ``figures/readme_lens_heatmap.{pdf,png}``.

    python docs/readme_figure.py [--out figures]

The lens probability of each image's own colour word per (layer, prompt token), averaged
over solid red, green, blue and yellow images with "The color of the image is", on the
offline model (SmolLM2-135M + EfficientNet-Lite0, not LLaVA-1.5), drawn by
``esmc_lens.report.plotting.lens_heatmap`` on its shared log scale.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

COLOURS = {"red": (220, 20, 30), "green": (30, 160, 50), "blue": (30, 60, 200),
           "yellow": (250, 220, 30)}
PROMPT = "The color of the image is"


def main(argv=None) -> int:
    from PIL import Image

    from esmc_lens import capture, load_model
    from esmc_lens.localization.votes import cell_labels
    from esmc_lens.report.plotting import figure_style, lens_heatmap, save_figure, stamp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "figures")
    a = ap.parse_args(argv)
    vlm = load_model("offline")
    words = list(COLOURS)
    images = [Image.new("RGB", (224, 224), COLOURS[w]) for w in words]
    cache = capture(vlm, images, PROMPT, keywords=words, progress=False, image_ids=words)
    own = np.stack([cache.keyword_probs[i, :, :, i].numpy() for i in range(len(words))])
    values = own.mean(0)  # [layers, positions]
    import matplotlib.pyplot as plt

    with figure_style("two"):
        fig, ax = plt.subplots(figsize=(7.0, 3.4), layout="constrained")
        lens_heatmap(values, cache.stream, cell_labels(cache), ax=ax, tokens=cache.tokens[0],
                     cbar_label="p(own colour word), log")
        stamp(fig, "Logit lens: the image's own colour word per layer and prompt token",
              "offline (SmolLM2-135M + EfficientNet-Lite0; not LLaVA)")
    paths = save_figure(fig, "readme_lens_heatmap", a.out)
    print("wrote", ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
