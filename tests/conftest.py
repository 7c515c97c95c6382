"""Shared fixtures: models are built once per session; data paths skip with a reason."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ESMC_DATA", REPO.parent / "shared" / "data" / "esmc"))

# Two cores: keep torch from oversubscribing them while pytest and BLAS share the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_vlm():
    from esmc_lens.models.vlm import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def offline_vlm():
    from esmc_lens.models.vlm import load_model

    return load_model("offline")


@pytest.fixture(scope="session")
def flower_dir() -> Path:
    d = SHARED_DATA / "flower"
    if not d.is_dir():
        pytest.skip(f"ESMC flower data not found at {d} (set ESMC_DATA to the folder holding "
                    "'flower/'); it is not redistributed with esmc_lens")
    return d


def solid(rgb, size=(224, 224)):
    from PIL import Image

    return Image.new("RGB", size, rgb)


SOLID_COLOURS = {
    "red": (220, 20, 30), "green": (30, 160, 50), "blue": (30, 60, 200),
    "yellow": (250, 220, 30), "white": (255, 255, 255), "black": (0, 0, 0),
}


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two cores shared by several processes: a multi-threaded torch spends most of its time
    # in OpenMP barriers (a tiny capture goes from 0.3 s to 10 s), so use one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random 30 x 30 RGB PNGs ``img_00.png``... in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


CACHE_TENSORS = ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
                 "top_probs")


def assert_same_cache(a, b) -> None:
    """Two ``ResidualCache`` objects hold bit-identical tensors and the same metadata."""
    for name in CACHE_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.tokens == b.tokens and a.stream == b.stream and a.keywords == b.keywords
    assert a.image_ids == b.image_ids and a.prompts == b.prompts


def shard_dirs(cache_dir: Path) -> list[Path]:
    """The shard folders of every capture under a ``cached_capture`` store."""
    return sorted(p for p in cache_dir.glob("*/shards/*") if not p.name.startswith("."))


def shard_stats(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """inode and mtime of each shard's tensors: unchanged iff not rewritten."""
    return {p.name: ((p / "tensors.safetensors").stat().st_ino,
                     (p / "tensors.safetensors").stat().st_mtime_ns) for p in paths}
