"""Every kind of bad input gets a clear answer (docs/errors.md has the table).

API: a specific exception type whose message names the bad thing and the fix, or a reported
skip / an ``EsmcWarning``. CLI (``esmc_lens.apps.cli.main``): exit code 2 and one line
``esmc-lens: error: ...`` on stderr, never a traceback.
"""

from __future__ import annotations

import errno
import functools
import re
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from esmc_lens import pipeline
from esmc_lens.apps.cli import main
from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.images import open_rgb
from esmc_lens.data.synthetic import make_synthetic_dataset
from esmc_lens.errors import (
    CaptureError,
    ConfigError,
    DataError,
    EsmcWarning,
    ImageError,
    ModelError,
)
from esmc_lens.models.vlm import load_model
from esmc_lens.pipeline import run_esmc
from esmc_lens.residual.capture import capture
from esmc_lens.residual.store import cached_capture
from esmc_lens.validate import check_finite, dataset_notes, keyword_notes

PROMPT = "The color of the object is"
KEYWORDS = ["red", "green", "blue", "yellow"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# -- helpers ----------------------------------------------------------------------------


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "Traceback" not in out
    return rc, out, err


def cli_error(capsys, *argv: str) -> str:
    """Run the CLI, expect exit 2 and exactly one error line; return that line."""
    rc, _, err = cli(capsys, *argv)
    errors = [ln for ln in err.splitlines() if ln.startswith("esmc-lens: error: ")]
    assert rc == 2, err
    assert len(errors) == 1, err
    return errors[0]


def png(path: Path, rgb=(200, 30, 30), size=(32, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path, format="PNG")
    return path


def noisy_jpeg(path: Path, seed: int = 0, size: int = 96) -> bytes:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(path, "JPEG")
    return path.read_bytes()


def layout(root: Path, spec: dict[str, dict[str, list[str]]]) -> Path:
    """``root/<criterion>/<class>/<name>``; one colour per name, so a name is one image."""
    for crit, classes in spec.items():
        (root / crit).mkdir(parents=True, exist_ok=True)
        for cls, names in classes.items():
            for name in names:
                h = zlib.crc32(name.encode())
                png(root / crit / cls / name, (h % 256, (h >> 8) % 256, (h >> 16) % 256))
    return root


def bomb_png(path: Path, side: int = 20000) -> Path:
    """A valid PNG header of side x side pixels (400 Mpx > 2 x PIL's limit), a few bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))

    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)  # 1-bit greyscale
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", n_images=8,
                                  image_size=32)


@pytest.fixture(scope="module")
def synth_ds(synth):
    return load_dataset(synth)


def run_args(data, out, *extra: str) -> list[str]:
    return ["run", "--model", "tiny", "--data", data, "--criterion", "color", "--prompt",
            PROMPT, "--keywords", ",".join(KEYWORDS), "--no-baselines", "--n-seeds", "1",
            "--n-samples", "4", "--quiet", "--out", out, *extra]


def fast_run(vlm, ds, **kw):
    params = {"criterion": "color", "keywords": KEYWORDS, "baselines": False, "n_seeds": 1,
              "epochs": 2, "n_samples": 4, "progress": False}
    prompt = kw.pop("prompt", PROMPT)
    params.update(kw)
    return run_esmc(vlm, ds, prompt, **params)


@pytest.fixture
def fast_cli_run(monkeypatch):
    """The CLI's pipeline with a 2-epoch head (the default 100 epochs only cost time)."""
    monkeypatch.setattr(pipeline, "run_esmc", functools.partial(run_esmc, epochs=2))


# -- 1-3: the data folder --------------------------------------------------------------


def test_data_dir_missing(tmp_path, capsys):
    missing = tmp_path / "no-such-data"
    with pytest.raises(DataError, match="does not exist; check the path"):
        load_dataset(missing)
    line = cli_error(capsys, *run_args(missing, tmp_path / "out"))
    assert str(missing) in line and "does not exist" in line


def test_data_dir_empty(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="has no criterion folders; expected the layout"):
        load_dataset(empty)
    line = cli_error(capsys, *run_args(empty, tmp_path / "out"))
    assert str(empty) in line and "<dataset>/<criterion>/<class>/<image>" in line


def test_data_path_is_a_file(tmp_path, capsys):
    f = png(tmp_path / "one.png")
    with pytest.raises(DataError, match="is a file; pass the dataset folder"):
        load_dataset(f)
    assert "is a file" in cli_error(capsys, *run_args(f, tmp_path / "out"))


# -- 4-6: criteria and classes -------------------------------------------------------------


def test_criterion_with_no_class(tmp_path, capsys):
    root = layout(tmp_path / "d", {"shape": {"round": ["a.png"], "square": ["b.png"]}})
    png(root / "color" / "a.png")  # a file, but no class folder
    with pytest.raises(DataError, match=r"color has no class folders; put each image in"):
        load_dataset(root)
    assert "has no class folders" in cli_error(capsys, *run_args(root, tmp_path / "out"))
    (root / "color" / "a.png").unlink()
    (root / "color" / "red").mkdir()
    (root / "color" / "red" / "notes.txt").write_text("class folders, but no images")
    with pytest.raises(DataError, match=r"color has no readable images in any class folder"):
        load_dataset(root)


def test_criterion_with_one_class(tmp_path, capsys, tiny_vlm):
    root = layout(tmp_path / "d", {"color": {"red": ["a.png", "b.png", "c.png"]},
                                   "shape": {"round": ["a.png"], "square": ["b.png", "c.png"]}})
    ds = load_dataset(root)  # loading is fine: other criteria may be used
    assert ds.classes["color"] == ["red"]
    with pytest.raises(DataError, match=r"has only the class 'red' .* at least two class"):
        fast_run(tiny_vlm, ds, n_clusters=2)
    line = cli_error(capsys, *run_args(root, tmp_path / "out"))
    assert f"{root / 'color'}" in line and "only the class 'red'" in line


def test_images_in_no_criterion_are_reported(tmp_path, tiny_vlm, capsys, fast_cli_run):
    root = layout(tmp_path / "d", {
        "color": {"red": ["a.png", "b.png"], "blue": ["c.png", "d.png"]},
        "shape": {"round": ["a.png", "e.png"], "square": ["b.png", "c.png", "d.png"]}})
    png(root / "loose.png")  # in no criterion
    png(root / "color" / "stray.png")  # in a criterion, in no class
    (root / "README.md").write_text("notes beside the data are not skipped images")
    ds = load_dataset(root)
    reasons = dict(zip(ds.skipped["path"], ds.skipped["reason"], strict=True))
    assert reasons[str(root / "loose.png")] == "file outside any criterion folder"
    assert "not in a class" in reasons[str(root / "color" / "stray.png")]
    assert str(root / "README.md") not in reasons
    # e.png is labelled for shape only: clustered, not scored for color
    assert "e.png" in ds.names and ds.y("color")[ds.names.index("e.png")] == -1
    notes = dataset_notes(ds, "color")
    assert "skipped 2 files" in notes[0]
    assert notes[1].startswith("1 of 5 images have no 'color' label")
    rc, _, err = cli(capsys, *run_args(root, tmp_path / "out"))
    assert rc == 0
    assert "esmc-lens: note: skipped 2 files" in err
    assert "1 of 5 images have no 'color' label" in err
    skipped = (tmp_path / "out" / "skipped.csv").read_text()
    assert "loose.png" in skipped and "stray.png" in skipped


def test_conflicting_labels(tmp_path, capsys):
    root = layout(tmp_path / "d", {"color": {"red": ["a.png", "b.png"], "blue": ["a.png"]}})
    with pytest.raises(DataError, match=r"conflicting labels for image 'a.png' under "
                                        r"criterion 'color'.*keep the file in one class"):
        load_dataset(root)
    line = cli_error(capsys, *run_args(root, tmp_path / "out"))
    assert str(root / "color" / "red" / "a.png") in line
    assert str(root / "color" / "blue" / "a.png") in line


# -- 7-11: files -----------------------------------------------------------------------------


def _two_class(root: Path) -> Path:
    return layout(root, {"color": {"red": ["a.png", "b.png"], "blue": ["c.png", "d.png"]}})


def test_non_image_files_are_skipped(tmp_path):
    root = _two_class(tmp_path / "d")
    (root / "color" / "red" / "notes.txt").write_text("not an image")
    (root / "color" / "red" / "fake.jpg").write_text("text with an image extension")
    ds = load_dataset(root)
    reasons = dict(zip(ds.skipped["path"], ds.skipped["reason"], strict=True))
    assert reasons[str(root / "color/red/notes.txt")] == "not an image (extension '.txt')"
    assert reasons[str(root / "color/red/fake.jpg")].startswith("unreadable image")
    assert ds.names == ["a.png", "b.png", "c.png", "d.png"]


def test_zero_byte_file(tmp_path, capsys):
    root = _two_class(tmp_path / "d")
    empty = root / "color" / "red" / "empty.jpg"
    empty.write_bytes(b"")
    ds = load_dataset(root)
    assert ds.skipped.set_index("path").loc[str(empty), "reason"] == (
        "unreadable image (empty file: 0 bytes)")
    with pytest.raises(ImageError, match=r"cannot decode image .*empty.jpg.*replace or delete"):
        open_rgb(empty)
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", empty, "--prompt", PROMPT)
    assert str(empty) in line and "replace or delete the file" in line


def test_truncated_jpeg(tmp_path, capsys):
    root = _two_class(tmp_path / "d")
    full = noisy_jpeg(root / "color" / "red" / "full.jpg")
    trunc = root / "color" / "red" / "trunc.jpg"
    trunc.write_bytes(full[: int(len(full) * 0.7)])
    good_png = (root / "color" / "red" / "a.png").read_bytes()
    (root / "color" / "red" / "trunc.png").write_bytes(good_png[:-30])  # CRC/IEND missing
    # PIL's verify() passes a JPEG cut in its scan data; the loader must not.
    with Image.open(trunc) as im:
        im.verify()
    trailer = root / "color" / "blue" / "trailer.jpg"  # valid JPEG + 8 KiB of trailer
    trailer.write_bytes(noisy_jpeg(tmp_path / "t.jpg", seed=1) + b"\x00" * 8192)
    ds = load_dataset(root)
    reasons = ds.skipped.set_index("path")["reason"]
    assert "truncated" in reasons[str(trunc)]
    assert reasons[str(root / "color" / "red" / "trunc.png")].startswith("unreadable image")
    assert "full.jpg" in ds.names and "trailer.jpg" in ds.names  # no false alarms
    assert str(trailer) not in reasons.index
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", trunc, "--prompt", PROMPT)
    assert str(trunc) in line and "truncated" in line


def test_png_with_wrong_extension_is_read_by_content(tmp_path):
    root = _two_class(tmp_path / "d")
    png(tmp_path / "x.png", rgb=(1, 2, 3)).rename(root / "color" / "red" / "png-data.jpg")
    Image.new("RGB", (32, 32), (250, 250, 250)).save(root / "color" / "blue" / "jpg-data.png",
                                                      format="JPEG")
    ds = load_dataset(root)
    assert ds.skipped.empty
    assert ds.open("png-data.jpg").getpixel((5, 5)) == (1, 2, 3)  # lossless: exact
    assert all(abs(v - 250) <= 2 for v in ds.open("jpg-data.png").getpixel((5, 5)))


def _mode_images() -> dict[str, tuple[Image.Image, str, tuple[int, int, int], int]]:
    """name -> (image, save format, expected RGB, tolerance)."""
    pal = Image.new("P", (32, 32), 1)
    pal.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    return {
        "grey16.png": (Image.fromarray(np.full((32, 32), 32768, np.uint16)), "PNG",
                       (128, 128, 128), 0),
        "grey16-white.png": (Image.fromarray(np.full((32, 32), 65535, np.uint16)), "PNG",
                             (255, 255, 255), 0),
        "grey.png": (Image.new("L", (32, 32), 77), "PNG", (77, 77, 77), 0),
        "bilevel.png": (Image.new("1", (32, 32), 1), "PNG", (255, 255, 255), 0),
        "rgba-clear.png": (Image.new("RGBA", (32, 32), (255, 0, 0, 0)), "PNG",
                           (255, 255, 255), 0),  # transparent -> white, not red
        "rgba-opaque.png": (Image.new("RGBA", (32, 32), (0, 0, 255, 255)), "PNG",
                            (0, 0, 255), 0),
        "grey-alpha.png": (Image.new("LA", (32, 32), (0, 0)), "PNG", (255, 255, 255), 0),
        "palette.png": (pal, "PNG", (10, 200, 30), 0),
        "cmyk.tif": (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "TIFF", (255, 0, 0), 0),
        "cmyk.jpg": (Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", (255, 0, 0), 8),
    }


def test_unusual_modes_are_converted_not_refused(tmp_path, tiny_vlm):
    root = tmp_path / "d"
    cases = _mode_images()
    for i, (name, (im, fmt, _, _)) in enumerate(cases.items()):
        path = root / "mode" / ("a" if i % 2 else "b") / name
        path.parent.mkdir(parents=True, exist_ok=True)
        im.save(path, format=fmt)
    ds = load_dataset(root)
    assert ds.skipped.empty and sorted(ds.names) == sorted(cases)
    for name, (_, _, rgb, tol) in cases.items():
        got = ds.open(name)
        assert got.mode == "RGB" and got.size == (32, 32), name
        assert all(abs(g - e) <= tol for g, e in zip(got.getpixel((16, 16)), rgb, strict=True)), (
            name, got.getpixel((16, 16)), rgb)
    cache = capture(tiny_vlm, ds, "The color is", batch_size=len(ds), progress=False)
    assert len(cache) == len(cases) and torch.isfinite(cache.states).all()


def test_decompression_bomb(tmp_path, capsys):
    root = _two_class(tmp_path / "d")
    bomb = bomb_png(root / "color" / "red" / "bomb.png")
    assert bomb.stat().st_size < 200
    ds = load_dataset(root)
    assert "decompression bomb" in ds.skipped.set_index("path").loc[str(bomb), "reason"]
    with pytest.raises(ImageError, match=r"too large to decode safely.*MAX_IMAGE_PIXELS"):
        open_rgb(bomb)
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", bomb, "--prompt", PROMPT)
    assert str(bomb) in line and "too large" in line


def test_missing_image_file(tmp_path, capsys):
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", tmp_path / "nope.jpg",
                     "--prompt", PROMPT)
    assert "nope.jpg does not exist: check the path" in line


# -- 12-15: settings ---------------------------------------------------------------------------


@pytest.mark.parametrize(("k", "match"), [(1, "at least 2 clusters"),
                                           (9, "more than the 8 images")])
def test_k_out_of_range(synth, synth_ds, tiny_vlm, tmp_path, capsys, k, match):
    with pytest.raises(ConfigError, match=match):
        fast_run(tiny_vlm, synth_ds, n_clusters=k)
    line = cli_error(capsys, *run_args(synth, tmp_path / "out", "--k", str(k)))
    assert "--k" in line and match in line


@pytest.mark.parametrize("alpha", [0.0, -0.1, 1.5, float("nan")])
def test_alpha_out_of_range(synth, synth_ds, tiny_vlm, tmp_path, capsys, alpha):
    with pytest.raises(ConfigError, match=r"alpha=.* must be in \(0, 1\]"):
        fast_run(tiny_vlm, synth_ds, alpha=alpha)
    line = cli_error(capsys, *run_args(synth, tmp_path / "out", "--alpha", str(alpha)))
    assert "--alpha" in line and "(0, 1]" in line


@pytest.mark.parametrize("tau", [1.0, -0.1])
def test_tau_out_of_range(synth, synth_ds, tiny_vlm, tmp_path, capsys, tau):
    with pytest.raises(ConfigError, match=r"tau=.* in \[0, 1\)"):
        fast_run(tiny_vlm, synth_ds, tau=tau)
    assert "--tau" in cli_error(capsys, *run_args(synth, tmp_path / "out", "--tau", str(tau)))


def test_bad_counts(synth, synth_ds, tiny_vlm, tmp_path, capsys):
    for kw, flag in (({"n_samples": 0}, "--n-samples"), ({"batch_size": -1}, "--batch-size"),
                     ({"n_seeds": 0}, "--n-seeds")):
        with pytest.raises(ConfigError, match=">= 1"):
            fast_run(tiny_vlm, synth_ds, **kw)
        value = str(next(iter(kw.values())))
        assert flag in cli_error(capsys, *run_args(synth, tmp_path / "out", flag, value))


# -- 16-18: prompts -------------------------------------------------------------------------


@pytest.mark.parametrize("prompt", ["", "   "])
def test_empty_prompt(synth, synth_ds, tiny_vlm, tmp_path, capsys, prompt):
    with pytest.raises(ConfigError, match="is empty: give the criterion as words"):
        fast_run(tiny_vlm, synth_ds, prompt=prompt)
    with pytest.raises(ConfigError, match="is empty"):
        capture(tiny_vlm, [Image.new("RGB", (30, 30))], prompt, progress=False)
    args = run_args(synth, tmp_path / "out")
    args[args.index("--prompt") + 1] = prompt
    assert "is empty" in cli_error(capsys, *args)


def test_prompt_with_image_placeholder(tiny_vlm, tmp_path, capsys):
    with pytest.raises(ConfigError, match="contains the image placeholder '<image>'"):
        capture(tiny_vlm, [Image.new("RGB", (30, 30))], "The <image> is", progress=False)
    img = png(tmp_path / "a.png")
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", img, "--prompt", "<image> x")
    assert "remove it from the prompt" in line


def test_prompt_longer_than_context(tiny_vlm, tmp_path, capsys):
    long_prompt = "red " * 600
    with pytest.raises(ConfigError, match=r"more than the model's context of 512: shorten"):
        capture(tiny_vlm, [Image.new("RGB", (30, 30))], long_prompt, progress=False)
    img = png(tmp_path / "a.png")
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", img, "--prompt", long_prompt)
    assert "context of 512" in line


# -- 19-20: keywords and tau (reported, not refused) ----------------------------------------------


def test_keywords_split_or_clashing_are_reported(synth_ds, tiny_vlm):
    tok = tiny_vlm.tokenizer
    kt_pieces = [tok.decode([i]) for i in tok.encode(" reds", add_special_tokens=False)]
    notes = keyword_notes(tok, ["red", "reds", "xyzzyq", "green"])
    assert len(notes) == 3, notes
    assert notes[0].startswith("keywords ['xyzzyq'] cannot be scored by the lens")
    assert notes[1].startswith("1 keyword(s) are not single tokens")
    assert f"'reds' -> ['{kt_pieces[0]}']" in notes[1] and "'green'" not in notes[1]
    # "reds" is scored by its first piece " red" (3 of 4 letters), the whole word "red"
    assert kt_pieces[0] == " red"
    assert notes[2] == ("keywords ['red', 'reds'] share a scoring token and get the same "
                        "lens score for it: keep one of them")
    assert keyword_notes(tok, KEYWORDS) == []
    with pytest.warns(EsmcWarning, match=r"\['xyzzyq'\] cannot be scored") as record:
        res = fast_run(tiny_vlm, synth_ds, keywords=["red", "xyzzyq"])
    assert any("are dropped" in str(w.message) for w in record)
    assert res.keywords.words == ["red"] and len(res.labels) == len(synth_ds)


def test_keywords_not_in_vocabulary_are_reported():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "red": 1, "green": 2}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="[UNK]")
    notes = keyword_notes(tok, ["red", "grün", "green"])
    assert len(notes) == 1
    assert notes[0].startswith("keywords ['grün'] cannot be scored by the lens")
    assert "unknown token" in notes[0]


def test_tau_so_high_that_no_cell_votes(synth, synth_ds, tiny_vlm, tmp_path, capsys,
                                        fast_cli_run):
    with pytest.warns(EsmcWarning, match=r"no \(image, keyword\) pair .* > tau=0.99.*"
                                         r"falling back.*Lower tau"):
        res = fast_run(tiny_vlm, synth_ds, tau=0.99)
    assert not res.localization.found and res.localization.max_votes == 0
    assert len(res.target) == 1 and set(res.labels) <= {0, 1, 2, 3}
    assert res.to_json()["localization"]["message"].startswith("no (image, keyword) pair")
    rc, _, err = cli(capsys, *run_args(synth, tmp_path / "out", "--tau", "0.99"))
    assert rc == 0
    warns = [ln for ln in err.splitlines()
             if ln.startswith("esmc-lens: warning: 'color': no (image")]
    assert len(warns) == 1 and "Lower tau" in warns[0]


def test_empty_keyword_list(synth, tmp_path, capsys):
    line = cli_error(capsys, *run_args(synth, tmp_path / "out", "--keywords", " , ,"))
    assert "no keywords in" in line and "red, white, pink" in line


# -- 21: models and devices -------------------------------------------------------------------


def test_unknown_model_while_offline(tmp_path, capsys, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelError, match=r"cannot load model 'no-such-org/no-such-llava'.*"
                                         r"--model offline"):
        load_model("no-such-org/no-such-llava", device="cpu")
    line = cli_error(capsys, "lens", "--model", "no-such-org/no-such-llava", "--image",
                     png(tmp_path / "a.png"), "--prompt", PROMPT)
    assert "no-such-org/no-such-llava" in line and "--model offline" in line
    with pytest.raises(ModelError, match=r"model directory .* does not exist"):
        load_model("./no/such/model", device="cpu")
    with pytest.raises(ModelError, match=f"cannot load model '{re.escape(str(tmp_path))}'"):
        load_model(str(tmp_path), device="cpu")  # a folder that is no checkpoint


def test_bad_device_or_dtype(tmp_path, capsys):
    bad_cuda = "cuda:99" if torch.cuda.is_available() else "cuda"
    with pytest.raises(ConfigError, match=r"--device.*(no CUDA GPU|only \d+ CUDA)"):
        load_model("tiny", device=bad_cuda)
    with pytest.raises(ConfigError, match="is not a device name"):
        load_model("tiny", device="gpu")
    with pytest.raises(ConfigError, match="use one of float16, bfloat16, float32"):
        load_model("tiny", dtype="float17")
    img = png(tmp_path / "a.png")
    assert "--device" in cli_error(capsys, "lens", "--model", "tiny", "--device", "gpu",
                                   "--image", img, "--prompt", PROMPT)
    assert "--dtype" in cli_error(capsys, "lens", "--model", "tiny", "--dtype", "int3",
                                  "--image", img, "--prompt", PROMPT)


def test_gpu_out_of_memory_on_the_cli(tmp_path, capsys, monkeypatch):
    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr("esmc_lens.models.vlm.load_model", oom)
    line = cli_error(capsys, "lens", "--model", "tiny", "--image", png(tmp_path / "a.png"),
                     "--prompt", PROMPT)
    assert "out of GPU memory: lower --batch-size" in line


# -- 22-23: folders that cannot be written -------------------------------------------------------


def test_cache_dir_read_only(readonly_dir, synth, tiny_vlm, tmp_path, capsys):
    with pytest.raises(CaptureError, match=r"capture cache directory .*ro.* is not writable "
                                           r".*ESMC_LENS_CACHE"):
        cached_capture(tiny_vlm, [Image.new("RGB", (30, 30))], PROMPT, readonly_dir,
                       progress=False)
    line = cli_error(capsys, *run_args(synth, tmp_path / "out", "--cache-dir", readonly_dir))
    assert str(readonly_dir) in line and "--cache-dir" in line
    line = cli_error(capsys, *run_args(synth, readonly_dir / "out"))
    assert "output folder" in line and "--out" in line


def test_cache_dir_full(tmp_path, tiny_vlm, monkeypatch, synth, capsys):
    import safetensors.torch

    real_save = safetensors.torch.save_file
    calls = []

    def save_until_full(tensors, filename, *a, **kw):
        calls.append(filename)
        if len(calls) > 1:  # the first batch fits, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(filename))
        return real_save(tensors, filename, *a, **kw)

    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    images = [Image.new("RGB", (30, 30), (i * 60, 0, 0)) for i in range(3)]
    cache_dir = tmp_path / "cache"
    with pytest.raises(CaptureError, match=r"capture cache directory .*cache is full "
                                           r"\(No space left on device\).*rerun resumes"):
        cached_capture(tiny_vlm, images, PROMPT, cache_dir, batch_size=1, progress=False)
    assert not list(cache_dir.rglob("*.part"))  # the half-written batch was removed
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    again = cached_capture(tiny_vlm, images, PROMPT, cache_dir, batch_size=1, progress=False)
    assert again.meta["capture_cache"]["loaded"] == 1
    assert again.meta["capture_cache"]["computed"] == 2
    # also on the CLI: exit 2, the folder and the fix named
    calls.clear()
    monkeypatch.setattr(safetensors.torch, "save_file", save_until_full)
    line = cli_error(capsys, *run_args(synth, tmp_path / "out", "--cache-dir",
                                       tmp_path / "cache2"))
    assert "is full" in line and "--cache-dir" in line


def test_output_path_is_a_file(synth, tmp_path, capsys):
    f = png(tmp_path / "out.png")
    line = cli_error(capsys, *run_args(synth, f))
    assert f"output folder {f} is a file, not a folder" in line


# -- 24: NaN / inf --------------------------------------------------------------------------


def test_nan_or_inf_features(synth, synth_ds, tmp_path, capsys, monkeypatch):
    vlm = load_model("tiny")
    vlm.layers[1].mlp.down_proj.weight.data[0, 0] = float("inf")  # an overflowing layer
    with pytest.raises(ConfigError, match=r"lens keyword probabilities of 4 of 4 images are "
                                          r"NaN or infinite \(img_.*--dtype float32"):
        fast_run(vlm, synth_ds)
    monkeypatch.setattr("esmc_lens.models.vlm.load_model", lambda *a, **k: vlm)
    line = cli_error(capsys, *run_args(synth, tmp_path / "out"))
    assert "NaN or infinite" in line and "--dtype float32" in line
    # a model that is fine on the sampled images but not on some others
    X = np.ones((5, 3))
    X[3, 1] = np.inf
    with pytest.raises(ConfigError, match=r"features of 1 of 5 images .*\(d.png\)"):
        check_finite(X, ["a.png", "b.png", "c.png", "d.png", "e.png"])
    check_finite(np.ones((2, 2)))  # finite: no error
