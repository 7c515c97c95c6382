"""One lazy view of the images a run reads: PIL images, paths, NumPy arrays or an
``ImageDataset``.

Every image reaches the model as 8-bit RGB (transparency composited on white). Files are
turned upright by their EXIF orientation tag, and so are PIL images still as
``Image.open`` returned them (``im.format`` set); a PIL image made by any operation
(``convert``, ``transpose``, ``resize``, ...) is taken as it is, since its pixels may
already be upright while the tag it inherited is stale. NumPy arrays are taken as pixels:
``uint8`` of shape ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)``, or a stack
``(N, H, W[, C])`` of such images.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ConfigError
from .dataset import ImageDataset
from .images import open_rgb, to_rgb, upright

__all__ = ["ImageSource", "array_image", "image_items"]

_EXPECTED = ("an ImageDataset (load_dataset(folder)), or a list of PIL images, image paths "
             "or uint8 NumPy arrays (H, W[, 3 or 4])")


def array_image(a: np.ndarray, where: str = "image") -> Image.Image:
    """A uint8 array ``(H, W)``, ``(H, W, 3)`` or ``(H, W, 4)`` as a PIL image;
    ``ConfigError`` saying what was expected otherwise."""
    if a.dtype != np.uint8:
        raise ConfigError(
            f"{where} is a NumPy array of dtype {a.dtype}: images as arrays must be uint8 "
            "pixels 0..255 (for floats in [0, 1]: (a * 255).round().astype('uint8'))")
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4))) or 0 in a.shape:
        raise ConfigError(f"{where} is a NumPy array of shape {a.shape}: expected (H, W), "
                          "(H, W, 3) or (H, W, 4) (channels last)")
    return Image.fromarray(np.ascontiguousarray(a))


def image_items(images) -> list:
    """``images`` (anything but an ``ImageDataset``) as a list of single images, each a PIL
    image, a path or a uint8 array; ``ConfigError`` naming the first item that is none."""
    if isinstance(images, str | os.PathLike):
        raise ConfigError(
            f"images={str(images)!r} is a single path, not a list of images: pass "
            f"load_dataset({str(images)!r}) for a dataset folder, or [{str(images)!r}] for "
            "one image")
    if isinstance(images, np.ndarray):
        if images.ndim == 4 or (images.ndim == 3 and images.shape[-1] not in (1, 3, 4)):
            items = list(images)  # a stack (N, H, W[, C])
        else:
            items = [images]  # one image
    elif isinstance(images, Image.Image):
        items = [images]
    else:
        try:
            if iter(images) is images:  # a generator: a run reads the images more than once
                raise ConfigError(f"images is a one-shot {type(images).__name__} (a run reads "
                                  "the images more than once): pass a list, e.g. "
                                  "list(images)")
            items = list(images)
        except TypeError:
            raise ConfigError(f"images is a {type(images).__name__}: expected "
                              f"{_EXPECTED}") from None
    for i, im in enumerate(items):
        if isinstance(im, np.ndarray):
            array_image(im, f"image {i}")  # raises if not pixels
        elif not isinstance(im, Image.Image | str | os.PathLike):
            raise ConfigError(f"image {i} is a {type(im).__name__} ({im!r:.60}): expected "
                              f"{_EXPECTED}")
    return items


@dataclass
class ImageSource:
    """Uniform, lazy access to images given as PIL images, paths, arrays or a dataset."""

    n: int
    ids: list[str]
    load: Callable[[int], Image.Image]

    @classmethod
    def of(cls, images, ids: Sequence[str] | None = None) -> ImageSource:
        if isinstance(images, ImageSource):
            return images if ids is None else cls(images.n, list(ids), images.load)
        if isinstance(images, ImageDataset):
            return cls(len(images), list(ids or images.names), images.open)
        items = image_items(images)
        if not items:
            raise ConfigError(f"no images given: pass {_EXPECTED}")
        if ids is not None and len(ids) != len(items):
            raise ConfigError(f"{len(ids)} image ids for {len(items)} images: give one id "
                              "per image")

        def load(i: int) -> Image.Image:
            im = items[i]
            if isinstance(im, str | os.PathLike):
                return open_rgb(im)
            if isinstance(im, np.ndarray):
                im = array_image(im, f"image {i}")
            return to_rgb(upright(im) if getattr(im, "format", None) else im)

        default_ids = [Path(im).name if isinstance(im, str | os.PathLike) else str(i)
                       for i, im in enumerate(items)]
        return cls(len(items), list(ids or default_ids), load)
