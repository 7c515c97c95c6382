"""Tests of esmc_lens.data.dataset: ESMC-layout loading, label joins, image modes, error paths."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import SHARED_DATA
from PIL import Image

from esmc_lens.data import dataset as data_mod
from esmc_lens.data.dataset import ImageDataset, load_dataset
from esmc_lens.data.images import to_rgb
from esmc_lens.errors import DataError, EsmcError, ImageError

FLOWER = SHARED_DATA / "flower"  # ESMC_DATA, else ../shared/data/esmc beside the clone


def _img(path: Path, color: tuple[int, int, int] = (200, 10, 10), size: int = 8) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), color).save(path)
    return path


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    """Two criteria; 'd.png' labelled for color only; nested folders; junk files."""
    root = tmp_path / "toy"
    _img(root / "color/red/a.png", (250, 0, 0))
    _img(root / "color/red/b.png", (250, 0, 0))
    _img(root / "color/blue/c.png", (0, 0, 250))
    _img(root / "color/blue/d.png", (0, 0, 250))
    _img(root / "shape/round/a.png", (250, 0, 0))
    _img(root / "shape/round/nested deeper/c.png", (0, 0, 250))
    _img(root / "shape/boxy/b.png", (250, 0, 0))
    _img(root / "shape/boxy/.hidden.png")
    _img(root / ".cache/x/y.png")  # hidden criterion folder
    (root / "color/red/notes.txt").write_text("not an image")
    (root / "color/blue/broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    return root


def test_errors_hierarchy() -> None:
    assert issubclass(DataError, EsmcError) and issubclass(DataError, ValueError)
    assert issubclass(ImageError, DataError)


def test_load_joins_by_name_and_keeps_partial_labels(toy: Path) -> None:
    ds = load_dataset(toy)
    assert isinstance(ds, ImageDataset)
    assert ds.criteria == ["color", "shape"]
    assert ds.names == ["a.png", "b.png", "c.png", "d.png"]  # sorted by file name
    assert len(ds) == 4
    assert ds.classes == {"color": ["blue", "red"], "shape": ["boxy", "round"]}
    assert list(ds.labels.columns) == ["color", "shape", "path"]
    assert ds.labels.loc["c.png", "shape"] == "round"  # nested folder: first folder is class
    assert pd.isna(ds.labels.loc["d.png", "shape"])  # missing, not dropped
    np.testing.assert_array_equal(ds.y("color"), [1, 1, 0, 0])
    np.testing.assert_array_equal(ds.y("shape"), [1, 0, 1, -1])
    assert ds.y("shape").dtype == np.int64
    # path: first criterion (sorted) that holds the name
    assert ds.paths[0] == toy / "color/red/a.png"


def test_report_and_class_counts(toy: Path) -> None:
    ds = load_dataset(toy)
    rep = ds.report()
    assert rep.loc["color"].to_dict() == {"n_labelled": 4, "n_missing": 0, "n_classes": 2}
    assert rep.loc["shape"].to_dict() == {"n_labelled": 3, "n_missing": 1, "n_classes": 2}
    assert ds.class_counts("shape").to_dict() == {"boxy": 1, "round": 2}
    with pytest.raises(DataError, match="unknown criterion 'size'"):
        ds.class_counts("size")


def test_skipped_lists_junk_and_hidden_is_ignored(toy: Path) -> None:
    ds = load_dataset(toy)
    reasons = dict(zip(ds.skipped["path"], ds.skipped["reason"], strict=True))
    assert set(reasons) == {str(toy / "color/red/notes.txt"), str(toy / "color/blue/broken.jpg")}
    assert "not an image" in reasons[str(toy / "color/red/notes.txt")]
    assert "unreadable" in reasons[str(toy / "color/blue/broken.jpg")]
    assert ".hidden.png" not in ds.names and "y.png" not in ds.names


def test_without_verify_bad_file_fails_on_open(toy: Path) -> None:
    ds = load_dataset(toy, verify=False)
    assert "broken.jpg" in ds.names
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        ds.open("broken.jpg")
    with pytest.raises(ImageError, match=r"broken\.jpg"):
        list(ds.iter_images(batch_size=2))


def test_truncated_png_raises_image_error(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    good = _img(root / "c/k/good.png", size=64)
    # Random pixels so the compressed stream is long enough to cut in the middle.
    noisy = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noisy).save(good)
    raw = good.read_bytes()
    (root / "c/k/cut.png").write_bytes(raw[: len(raw) // 2])
    ds = load_dataset(root, verify=False)
    with pytest.raises(ImageError, match=r"cut\.png"):
        ds.open("cut.png")
    assert ds.open("good.png").size == (64, 64)
    assert "cut.png" not in load_dataset(root).names  # verify=True skips it up front


def test_decompression_bomb_raises(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "ds"
    _img(root / "c/k/big.png", size=20)  # 400 px
    ds = load_dataset(root)
    # Pillow errors above 2 * MAX_IMAGE_PIXELS; shrink the limit instead of writing a huge file.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match=r"big\.png.*MAX_IMAGE_PIXELS"):
        ds.open(0)


def test_decompression_bomb_skipped_by_verify(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "ds"
    _img(root / "c/k/big.png", size=20)
    _img(root / "c/k/small.png", size=4)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    ds = load_dataset(root)
    assert ds.names == ["small.png"]
    assert "too large" in ds.skipped.set_index("path").loc[str(root / "c/k/big.png"), "reason"]


def test_criteria_selection(toy: Path) -> None:
    ds = load_dataset(toy, criteria=["shape"])
    assert ds.criteria == ["shape"]
    assert ds.names == ["a.png", "b.png", "c.png"]  # d.png has no shape label
    with pytest.raises(DataError, match=r"\['size'\] not found.*available criteria"):
        load_dataset(toy, criteria=["size"])


def test_conflicting_label_raises(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _img(root / "color/red/x.png")
    _img(root / "color/blue/x.png")
    with pytest.raises(DataError, match=r"'x\.png'.*'blue'.*'red'"):
        load_dataset(root)


def test_duplicate_in_same_class_is_reported(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    _img(root / "color/red/x.png")
    _img(root / "color/red/sub/x.png")
    ds = load_dataset(root)
    assert ds.names == ["x.png"]
    assert ds.skipped["reason"].str.contains("duplicate").sum() == 1


@pytest.mark.parametrize(
    ("layout", "pattern"),
    [
        (None, "does not exist"),
        ([], "no criterion folders"),
        (["color/"], "no class folders"),
        (["color/red/"], "no readable images"),
        (["path/x/a.png"], "clashes with the 'path' column"),
    ],
)
def test_malformed_roots(tmp_path: Path, layout: list[str] | None, pattern: str) -> None:
    root = tmp_path / "ds"
    if layout is not None:
        root.mkdir()
        for entry in layout:
            if entry.endswith("/"):
                (root / entry).mkdir(parents=True)
            else:
                _img(root / entry)
    with pytest.raises(DataError, match=pattern):
        load_dataset(root)


def test_root_is_a_file(tmp_path: Path) -> None:
    f = tmp_path / "file.png"
    f.write_bytes(b"x")
    with pytest.raises(DataError, match="is a file"):
        load_dataset(f)


def test_open_by_index_and_name(toy: Path) -> None:
    ds = load_dataset(toy)
    im = ds.open(0)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (250, 0, 0)
    assert ds.open(np.int64(2)).getpixel((0, 0)) == (0, 0, 250)
    assert ds.open("c.png").getpixel((0, 0)) == (0, 0, 250)
    with pytest.raises(DataError, match=r"no image named 'zzz\.png'"):
        ds.open("zzz.png")
    with pytest.raises(DataError, match="out of range"):
        ds.open(4)


def test_iter_images_is_lazy_and_batched(toy: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ds = load_dataset(toy)
    opened: list[Path] = []
    real = data_mod.open_rgb

    def spy(path: Path, **kwargs) -> Image.Image:
        opened.append(Path(path))
        return real(path, **kwargs)

    monkeypatch.setattr(data_mod, "open_rgb", spy)
    it = ds.iter_images(batch_size=3)
    assert opened == []  # nothing decoded before the first batch is requested
    first = next(it)
    assert [n for n, _ in first] == ["a.png", "b.png", "c.png"] and len(opened) == 3
    rest = list(it)
    assert [[n for n, _ in b] for b in rest] == [["d.png"]]
    assert all(im.mode == "RGB" for _, im in first)
    with pytest.raises(ValueError, match="batch_size"):
        next(ds.iter_images(batch_size=0))


def test_subset(toy: Path) -> None:
    ds = load_dataset(toy)
    sub = ds.subset(["d.png", "a.png"])
    assert sub.names == ["d.png", "a.png"]
    assert sub.classes == ds.classes
    np.testing.assert_array_equal(sub.y("shape"), [-1, 1])
    np.testing.assert_array_equal(ds.y("shape"), [1, 0, 1, -1])  # parent untouched
    with pytest.raises(DataError, match="not in dataset"):
        ds.subset(["nope.png"])
    with pytest.raises(DataError, match="repeated"):
        ds.subset(["a.png", "a.png"])


# --- colour-mode conversion -------------------------------------------------------------


def test_to_rgb_16bit_scales_not_clips() -> None:
    arr = np.array([[0, 257 * 100, 65535, 128]], dtype=np.uint16)
    im = Image.fromarray(arr)
    assert im.mode.startswith("I;16")
    out = np.asarray(to_rgb(im))
    # round(v * 255 / 65535): 0 -> 0, 25700 -> 100, 65535 -> 255, 128 -> 0 (0.498 rounds down)
    np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 0])
    assert out.shape == (1, 4, 3)


def test_to_rgb_mode_i_treated_as_16bit() -> None:
    im = Image.fromarray(np.array([[0, 32768, 65535]], dtype=np.int32), mode="I")
    np.testing.assert_array_equal(np.asarray(to_rgb(im))[0, :, 1], [0, 128, 255])


def test_to_rgb_alpha_composited_on_white() -> None:
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (255, 0, 0, 255))
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (255, 0, 0)
    la = Image.new("LA", (1, 1), (0, 0))  # black, transparent
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    half = Image.new("RGBA", (1, 1), (0, 0, 0, 128))
    assert to_rgb(half).getpixel((0, 0)) == (127, 127, 127)


def test_to_rgb_palette_with_transparency() -> None:
    p = Image.new("P", (2, 1))
    p.putpalette([0, 0, 255, 10, 200, 10] + [0] * 762)
    p.putpixel((0, 0), 0)
    p.putpixel((1, 0), 1)
    p.info["transparency"] = 0
    out = to_rgb(p)
    assert out.getpixel((0, 0)) == (255, 255, 255) and out.getpixel((1, 0)) == (10, 200, 10)


def test_to_rgb_grey_cmyk_bilevel() -> None:
    assert to_rgb(Image.new("L", (1, 1), 77)).getpixel((0, 0)) == (77, 77, 77)
    assert to_rgb(Image.new("1", (1, 1), 1)).getpixel((0, 0)) == (255, 255, 255)
    assert to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0))).getpixel((0, 0)) == (255, 0, 0)
    rgb = Image.new("RGB", (1, 1), (1, 2, 3))
    assert to_rgb(rgb) is not rgb


def test_open_converts_files_of_every_mode(tmp_path: Path) -> None:
    root = tmp_path / "ds"
    k = root / "c/k"
    k.mkdir(parents=True)
    Image.fromarray(np.full((3, 3), 65535, dtype=np.uint16)).save(k / "g16.png")
    Image.new("L", (3, 3), 9).save(k / "grey.png")
    Image.new("RGBA", (3, 3), (0, 0, 0, 0)).save(k / "rgba.png")
    Image.new("LA", (3, 3), (0, 0)).save(k / "la.png")
    Image.new("CMYK", (3, 3), (0, 0, 0, 0)).save(k / "cmyk.tif")
    Image.new("P", (3, 3), 0).save(k / "pal.gif")
    ds = load_dataset(root)
    assert len(ds) == 6 and ds.skipped.empty
    expected = {
        "g16.png": (255, 255, 255),
        "grey.png": (9, 9, 9),
        "rgba.png": (255, 255, 255),
        "la.png": (255, 255, 255),
        "cmyk.tif": (255, 255, 255),
        "pal.gif": (0, 0, 0),
    }
    for name, pixel in expected.items():
        im = ds.open(name)
        assert im.mode == "RGB" and im.getpixel((1, 1)) == pixel, name


def test_flower_dataset_counts() -> None:
    if not FLOWER.is_dir():
        pytest.skip(f"ESMC flower dataset not found at {FLOWER} (shared data folder absent)")
    ds = load_dataset(FLOWER)
    assert len(ds) == 533
    assert ds.criteria == ["color", "species"]
    assert ds.class_counts("color").to_dict() == {
        "pink": 203,
        "purple": 48,
        "red": 68,
        "white": 112,
        "yellow": 102,
    }
    assert ds.class_counts("species").to_dict() == {
        "daisy": 127,
        "hyacinth": 41,
        "lily": 194,
        "rose": 171,
    }
    assert (ds.report()["n_missing"] == 0).all() and ds.skipped.empty
    assert ds.open(0).mode == "RGB"
