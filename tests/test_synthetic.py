"""Tests of esmc_lens.data.synthetic: determinism, layout, balance, labels vs pixels."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.synthetic import (
    BACKGROUND_COLORS,
    MANIFEST_NAME,
    OBJECT_COLORS,
    SYNTHETIC_KEYWORDS,
    SYNTHETIC_PROMPTS,
    make_synthetic_dataset,
)
from esmc_lens.errors import DataError

N = 40


@pytest.fixture(scope="module")
def synth(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("s") / "synth", n_images=N, seed=3)


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_constants() -> None:
    assert set(SYNTHETIC_PROMPTS) == set(SYNTHETIC_KEYWORDS) == {"shape", "color", "background"}
    for crit, classes in SYNTHETIC_KEYWORDS.items():
        assert len(classes) >= 4, crit
        assert all(c.isalpha() and c.islower() for c in classes)
    # colour words must say unambiguously which criterion they belong to
    assert not set(SYNTHETIC_KEYWORDS["color"]) & set(SYNTHETIC_KEYWORDS["background"])
    assert list(OBJECT_COLORS) == SYNTHETIC_KEYWORDS["color"]
    assert list(BACKGROUND_COLORS) == SYNTHETIC_KEYWORDS["background"]


def test_layout(synth: Path) -> None:
    assert json.loads((synth / MANIFEST_NAME).read_text())["seed"] == 3
    for crit, classes in SYNTHETIC_KEYWORDS.items():
        assert sorted(p.name for p in (synth / crit).iterdir()) == sorted(classes)
        files = sorted((synth / crit).glob("*/*.png"))
        assert len(files) == N
        assert sorted(f.name for f in files) == [f"img_{i:04d}.png" for i in range(N)]
    # the same image bytes under every criterion
    a = next((synth / "shape").glob("*/img_0007.png")).read_bytes()
    b = next((synth / "background").glob("*/img_0007.png")).read_bytes()
    assert a == b


def test_loaded_labels_balanced_and_complete(synth: Path) -> None:
    ds = load_dataset(synth)
    assert len(ds) == N
    assert sorted(ds.criteria) == sorted(SYNTHETIC_KEYWORDS)
    assert (ds.report()["n_missing"] == 0).all()
    for crit, classes in SYNTHETIC_KEYWORDS.items():
        assert sorted(ds.classes[crit]) == sorted(classes)
        counts = ds.class_counts(crit)
        assert counts.max() - counts.min() <= 1 and counts.sum() == N
    # the manifest beside the criteria is not an image: nothing is skipped
    assert (synth / MANIFEST_NAME).is_file() and ds.skipped.empty


def test_criteria_not_confounded(tmp_path: Path) -> None:
    ds = load_dataset(make_synthetic_dataset(tmp_path / "big", n_images=160, seed=0))
    # Independent permutations: no pair of criteria is a function of the other.
    for a, b in [("shape", "color"), ("shape", "background"), ("color", "background")]:
        table = pd.crosstab(ds.labels[a], ds.labels[b])
        assert (table > 0).sum().sum() >= 12, (a, b)  # most of the 16 cells populated
        assert (table.max(axis=1) < 40).all()  # no class of a maps to a single b


def test_pixels_match_labels(synth: Path) -> None:
    ds = load_dataset(synth)
    for name, im in (pair for batch in ds.iter_images(16) for pair in batch):
        arr = np.asarray(im).reshape(-1, 3)
        background = BACKGROUND_COLORS[ds.labels.loc[name, "background"]]
        obj = OBJECT_COLORS[ds.labels.loc[name, "color"]]
        assert tuple(np.asarray(im)[0, 0]) == background, name  # corner is background
        counts = Counter(map(tuple, arr.tolist()))
        others = {c: n for c, n in counts.items() if c != background}
        assert max(others, key=others.get) == obj, name  # dominant non-background colour
        assert set(counts) == {background, obj}, name  # no antialiasing / stray colours
        assert 0.05 < others[obj] / arr.shape[0] < 0.6, name  # object of sensible size


def test_shapes_differ_in_area_profile(synth: Path) -> None:
    # Stars are spiky: at the same circumradius they fill less of their bounding box than
    # squares. Check that the shape label shows up in the pixels on average.
    ds = load_dataset(synth)
    fill: dict[str, list[float]] = {c: [] for c in SYNTHETIC_KEYWORDS["shape"]}
    for name in ds.names:
        arr = np.asarray(ds.open(name))
        mask = np.any(arr != np.asarray(BACKGROUND_COLORS[ds.labels.loc[name, "background"]]), -1)
        ys, xs = np.nonzero(mask)
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill[ds.labels.loc[name, "shape"]].append(mask.sum() / box)
    mean = {k: float(np.mean(v)) for k, v in fill.items()}
    assert mean["star"] < mean["triangle"] < mean["circle"]
    assert mean["star"] < mean["square"]


def test_deterministic_and_seed_dependent(tmp_path: Path, synth: Path) -> None:
    again = make_synthetic_dataset(tmp_path / "again", n_images=N, seed=3)
    assert _files(again) == _files(synth)  # byte-identical, manifest included
    other = make_synthetic_dataset(tmp_path / "other", n_images=N, seed=4)
    assert _files(other) != _files(synth)


def test_idempotent(tmp_path: Path) -> None:
    root = make_synthetic_dataset(tmp_path / "d", n_images=8, seed=1, image_size=32)
    marker = next(root.glob("shape/*/img_0000.png"))
    mtime = marker.stat().st_mtime_ns
    assert make_synthetic_dataset(root, n_images=8, seed=1, image_size=32) == root
    assert marker.stat().st_mtime_ns == mtime  # not rewritten
    with pytest.raises(DataError, match="different synthetic dataset"):
        make_synthetic_dataset(root, n_images=8, seed=2, image_size=32)


def test_refuses_foreign_folder_and_bad_params(tmp_path: Path) -> None:
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "keep.txt").write_text("user data")
    with pytest.raises(DataError, match="not an empty folder"):
        make_synthetic_dataset(foreign)
    assert (foreign / "keep.txt").read_text() == "user data"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert len(load_dataset(make_synthetic_dataset(empty, n_images=4, image_size=16))) == 4
    with pytest.raises(ValueError, match="n_images"):
        make_synthetic_dataset(tmp_path / "x", n_images=3)
    with pytest.raises(ValueError, match="image_size"):
        make_synthetic_dataset(tmp_path / "x", image_size=8)
    assert not (tmp_path / "x").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp leftovers
