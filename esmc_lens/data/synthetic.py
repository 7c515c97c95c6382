"""Synthetic multi-criteria image dataset in the ESMC layout, for tests and demos.

Each image shows one filled shape on a plain background and is labelled under three
independent criteria:

* ``shape``: circle, square, triangle, star
* ``color`` (of the object): red, green, blue, yellow
* ``background`` (its colour): white, black, gray, brown

Object and background colour names are disjoint single common English words, so a colour
keyword says unambiguously which criterion it belongs to, and every object colour contrasts
with every background colour. The backgrounds are plain (no texture) so their colour is the
only background cue. Each criterion's classes are balanced (counts differ by at most one)
and assigned by an independent random permutation, so no criterion predicts another beyond
chance. Object position, size and rotation are jittered.

The same PNG is written under every criterion (``<root>/<criterion>/<class>/img_XXXX.png``),
as ``load_dataset`` expects. Output is a pure function of ``(n_images, seed, image_size)``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from ..errors import DataError

__all__ = [
    "BACKGROUND_COLORS",
    "MANIFEST_NAME",
    "OBJECT_COLORS",
    "SHAPES",
    "SYNTHETIC_KEYWORDS",
    "SYNTHETIC_PROMPTS",
    "make_synthetic_dataset",
]

#: Shape classes.
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
#: Object colour classes and their exact RGB fill.
OBJECT_COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 60, 220),
    "yellow": (245, 215, 30),
}
#: Background colour classes and their exact RGB fill.
BACKGROUND_COLORS: dict[str, tuple[int, int, int]] = {
    "white": (255, 255, 255),
    "black": (0, 0, 0),
    "gray": (128, 128, 128),
    "brown": (110, 70, 35),
}

#: Criterion prompt per criterion (the text an MLLM continues).
SYNTHETIC_PROMPTS: dict[str, str] = {
    "shape": "The shape of the object is",
    "color": "The color of the object is",
    "background": "The color of the background is",
}
#: Class names (= keywords) per criterion.
SYNTHETIC_KEYWORDS: dict[str, list[str]] = {
    "shape": list(SHAPES),
    "color": list(OBJECT_COLORS),
    "background": list(BACKGROUND_COLORS),
}

MANIFEST_NAME = "manifest.json"
_FORMAT_VERSION = 1


def _balanced_labels(rng: np.random.Generator, n: int, n_classes: int) -> np.ndarray:
    """Class index per image: each class ``n // K`` or ``n // K + 1`` times, shuffled."""
    return rng.permutation(np.arange(n) % n_classes)


def _shape_points(
    shape: str, cx: float, cy: float, r: float, angle: float
) -> list[tuple[float, float]]:
    """Polygon vertices of a regular shape of circumradius ``r`` centred on (cx, cy)."""
    if shape == "square":
        n, radii = 4, [r]
    elif shape == "triangle":
        n, radii = 3, [r]
    elif shape == "star":
        n, radii = 10, [r, 0.45 * r]  # alternate outer / inner vertices
    else:
        raise ValueError(f"no polygon for shape {shape!r}")
    pts = []
    for i in range(n):
        a = angle + 2 * math.pi * i / n
        rad = radii[i % len(radii)]
        pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
    return pts


def _render(
    shape: str,
    fill: tuple[int, int, int],
    background: tuple[int, int, int],
    size: int,
    rng: np.random.Generator,
) -> Image.Image:
    """Draw one image, shape (size, size, 3) RGB."""
    im = Image.new("RGB", (size, size), background)
    draw = ImageDraw.Draw(im)
    r = float(rng.uniform(0.24, 0.32)) * size  # circumradius
    cx = size / 2 + float(rng.uniform(-0.1, 0.1)) * size
    cy = size / 2 + float(rng.uniform(-0.1, 0.1)) * size
    angle = float(rng.uniform(0.0, 2 * math.pi))
    if shape == "circle":
        rc = 0.85 * r  # similar area to the polygons
        draw.ellipse([cx - rc, cy - rc, cx + rc, cy + rc], fill=fill)
    else:
        draw.polygon(_shape_points(shape, cx, cy, r, angle), fill=fill)
    return im


def _manifest(n_images: int, seed: int, image_size: int) -> dict[str, object]:
    return {
        "generator": "esmc_lens.data.synthetic",
        "version": _FORMAT_VERSION,
        "n_images": n_images,
        "seed": seed,
        "image_size": image_size,
        "criteria": SYNTHETIC_KEYWORDS,
    }


def make_synthetic_dataset(
    root: str | os.PathLike[str], n_images: int = 120, seed: int = 0, image_size: int = 96
) -> Path:
    """Write the synthetic dataset to ``root`` (idempotent) and return ``root``.

    Parameters
    ----------
    root : path-like
        Target folder. Must not exist, be empty, or already hold this very dataset (same
        ``manifest.json``), in which case nothing is rewritten.
    n_images : int, default 120
        Number of images (>= 4, so every class of every criterion is present).
    seed : int, default 0
        Seed of all randomness; the same seed gives byte-identical PNG files.
    image_size : int, default 96
        Side of the square images in pixels (>= 16).

    Returns
    -------
    pathlib.Path
        ``root``, laid out as ``<root>/<criterion>/<class>/img_XXXX.png`` plus
        ``manifest.json``.

    Raises
    ------
    DataError
        ``root`` holds something else (another dataset, other parameters, or unrelated
        files).
    ValueError
        Invalid parameters.
    """
    for name, value, low in (("n_images", n_images, 4), ("image_size", image_size, 16)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    n_images, seed, image_size = int(n_images), int(seed), int(image_size)

    root = Path(root)
    manifest = _manifest(n_images, seed, image_size)
    manifest_path = root / MANIFEST_NAME
    if root.exists():
        if manifest_path.is_file():
            try:
                existing = json.loads(manifest_path.read_text())
            except (OSError, ValueError):
                existing = None
            if existing == manifest:
                return root
            raise DataError(
                f"{root} already holds a different synthetic dataset ({manifest_path} does "
                "not match the requested parameters); pass another root or delete the folder"
            )
        if not root.is_dir() or any(root.iterdir()):
            raise DataError(f"{root} exists and is not an empty folder; pass a new or empty folder")

    # Write into a sibling temp folder and rename at the end, so an interrupted run never
    # leaves a half-written dataset that looks complete.
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = root.parent / f".{root.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        _write(tmp, n_images, seed, image_size)
        (tmp / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        if root.exists():
            root.rmdir()  # empty, checked above
        os.replace(tmp, root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return root


def _write(folder: Path, n_images: int, seed: int, image_size: int) -> None:
    """Render all images and write each PNG under every criterion."""
    # Independent child streams: labels of each criterion and the geometry jitter do not
    # share random draws, so changing one criterion's classes leaves the others intact.
    streams = np.random.SeedSequence(seed).spawn(1 + len(SYNTHETIC_KEYWORDS))
    assign = {
        crit: _balanced_labels(np.random.default_rng(s), n_images, len(classes))
        for (crit, classes), s in zip(SYNTHETIC_KEYWORDS.items(), streams[1:], strict=True)
    }
    geometry = np.random.default_rng(streams[0])
    width = max(4, len(str(n_images - 1)))
    for crit, classes in SYNTHETIC_KEYWORDS.items():
        for cls in classes:
            (folder / crit / cls).mkdir(parents=True)
    for i in range(n_images):
        shape = SHAPES[assign["shape"][i]]
        color = SYNTHETIC_KEYWORDS["color"][assign["color"][i]]
        background = SYNTHETIC_KEYWORDS["background"][assign["background"][i]]
        im = _render(
            shape, OBJECT_COLORS[color], BACKGROUND_COLORS[background], image_size, geometry
        )
        buf = BytesIO()
        im.save(buf, format="PNG")  # no metadata: bytes depend on pixels only
        data = buf.getvalue()
        name = f"img_{i:0{width}d}.png"
        for crit, cls in (("shape", shape), ("color", color), ("background", background)):
            (folder / crit / cls / name).write_bytes(data)
