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
    from esmc_lens.backend import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def offline_vlm():
    from esmc_lens.backend import load_model

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
