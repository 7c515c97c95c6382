"""One lazy view of the images a run reads: PIL images, paths or an ``ImageDataset``."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from ..errors import ConfigError
from .dataset import ImageDataset
from .images import open_rgb


@dataclass
class ImageSource:
    """Uniform, lazy access to images given as PIL images, paths or an ``ImageDataset``."""

    n: int
    ids: list[str]
    load: Callable[[int], Image.Image]

    @classmethod
    def of(cls, images, ids: Sequence[str] | None = None) -> ImageSource:
        if isinstance(images, ImageSource):
            return images if ids is None else cls(images.n, list(ids), images.load)
        if isinstance(images, ImageDataset):
            return cls(len(images), list(ids or images.names), images.open)
        images = list(images)
        if not images:
            raise ConfigError("no images given: pass PIL images, paths, or a dataset")

        def load(i: int) -> Image.Image:
            im = images[i]
            if isinstance(im, str | os.PathLike):
                return open_rgb(im)
            return im.convert("RGB") if im.mode != "RGB" else im

        default_ids = [Path(im).name if isinstance(im, str | os.PathLike) else str(i)
                       for i, im in enumerate(images)]
        return cls(len(images), list(ids or default_ids), load)
