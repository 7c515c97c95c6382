"""Issue #13: what real folders, full disks and damaged caches do to a run.

Every test here but one (a regression row: --k 1) fails on main before this work (the
issue's cases and the ones found past it); docs/errors.md rows 47-81 point here. The fuzz
harness over generated hostile inputs is tests/test_fuzz.py.
"""

from __future__ import annotations

import errno
import functools
import json
import os
import shutil
import unicodedata
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import assert_same_cache, fill_disk, shard_dirs, write_images
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
    OutputError,
    WeightsError,
)
from esmc_lens.models.vlm import load_model
from esmc_lens.pipeline import run_esmc
from esmc_lens.report.result import EsmcResult
from esmc_lens.residual import store
from esmc_lens.residual.cache import ResidualCache
from esmc_lens.residual.capture import capture
from esmc_lens.residual.store import cached_capture

PROMPT = "The color of the object is"
KEYWORDS = ["red", "green", "blue", "yellow"]
FAST = {"criterion": "color", "keywords": KEYWORDS, "baselines": False, "n_seeds": 1,
        "epochs": 2, "n_samples": 4, "progress": False}

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def synth(tmp_path_factory) -> Path:
    return make_synthetic_dataset(tmp_path_factory.mktemp("data") / "syn", n_images=8,
                                  image_size=32)


@pytest.fixture
def cli_model(monkeypatch, tiny_vlm):
    """The CLI with the session's tiny model and a 2-epoch head (same code path, faster)."""
    monkeypatch.setattr("esmc_lens.models.vlm.load_model", lambda *a, **k: tiny_vlm)
    monkeypatch.setattr(pipeline, "run_esmc", functools.partial(run_esmc, epochs=2))


@pytest.fixture
def no_model(monkeypatch):
    """Any model load fails the test: the error must come before it."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the bad input was refused")

    monkeypatch.setattr("esmc_lens.models.vlm.load_model", refuse)


def cli(capsys, *argv) -> tuple[int, str]:
    rc = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    if rc == 2:
        assert len([ln for ln in err.splitlines() if ln.startswith("esmc-lens: error: ")]) == 1
    return rc, err


def run_args(data, out, *extra) -> list:
    return ["run", "--model", "tiny", "--data", data, "--criterion", "color", "--prompt",
            PROMPT, "--keywords", ",".join(KEYWORDS), "--no-baselines", "--n-seeds", "1",
            "--n-samples", "4", "--quiet", "--out", out, *extra]


def _flip_stream_entry(cache_json: Path, value: int) -> list[int]:
    """Flip one bit of the last digit of ``value`` in the file's ``stream`` list (the file
    stays valid JSON of the same length); return the stream the damaged file claims."""
    lines = cache_json.read_text().split("\n")
    head = next(i for i, ln in enumerate(lines) if ln.strip().startswith('"stream"'))
    row = next(i for i in range(head + 1, len(lines))
               if lines[i].strip().rstrip(",") == str(value))
    digit = lines[row].index(str(value)) + len(str(value)) - 1
    line = lines[row]
    lines[row] = line[:digit] + chr(ord(line[digit]) ^ 1) + line[digit + 1:]
    cache_json.write_text("\n".join(lines))
    return json.loads(cache_json.read_text())["stream"]


# -- the capture cache: everything read back is verified -----------------------------------


def test_damaged_metadata_gives_the_clean_target_not_a_silent_wrong_one(tiny_vlm, synth,
                                                                      tmp_path):
    """The issue's worst case: one flipped bit in a shard's JSON (the captured layer index)
    gave exit 0 with another target layer and other scores. Now the shard is named, set
    aside and recomputed, and the run equals a clean one."""
    ds = load_dataset(synth)
    cache = tmp_path / "cache"
    clean = run_esmc(tiny_vlm, ds, PROMPT, cache_dir=cache, batch_size=8, **FAST)
    stream_of_target = clean.target[0][0]
    loc_shard = next(p for p in shard_dirs(cache) if len(json.loads(
        (p / "cache.json").read_text())["stream"]) == tiny_vlm.n_layers + 1)
    before = json.loads((loc_shard / "cache.json").read_text())["stream"]
    claimed = _flip_stream_entry(loc_shard / "cache.json", stream_of_target)
    assert claimed != before and len(claimed) == len(before)  # the damage a reader would see
    # Read as stored, the damaged shard puts the target at another layer: the silent wrong
    # target of the issue (the tensors' checksum still matches).
    assert claimed[before.index(stream_of_target)] != stream_of_target
    with pytest.warns(EsmcWarning, match=r"capture cache shard .* is damaged \(.*metadata "
                                         r"checksum mismatch.*moved to .*damaged") as rec:
        again = run_esmc(tiny_vlm, ds, PROMPT, cache_dir=cache, batch_size=8, **FAST)
    shard_warnings = [str(w.message) for w in rec if "capture cache shard" in str(w.message)]
    assert len(shard_warnings) == 1 and str(loc_shard) in shard_warnings[0]
    assert again.target == clean.target
    assert again.target_labels == clean.target_labels
    np.testing.assert_array_equal(again.labels, clean.labels)
    assert again.scores.equals(clean.scores)
    assert (loc_shard.parent.parent / "damaged" / loc_shard.name / "cache.json").exists()
    assert (loc_shard / "cache.json").exists()  # recomputed in place
    third = run_esmc(tiny_vlm, ds, PROMPT, cache_dir=cache, batch_size=8, **FAST)
    assert third.meta["capture_cache"]["computed"] == 0 and third.target == clean.target


def test_with_several_shards_the_damaged_one_is_named(tiny_vlm, tmp_path):
    images = write_images(tmp_path / "img", 5)
    opts = {"layers": [0, 2, 3], "keywords": ["red", "blue"]}
    ref = capture(tiny_vlm, images, PROMPT, batch_size=1, progress=False, **opts)
    cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=1, progress=False,
                   **opts)
    shards = sorted(shard_dirs(tmp_path / "c"),
                    key=lambda p: json.loads((p / "cache.json").read_text())["image_ids"])
    victim = shards[3]  # img_03.png's batch
    _flip_stream_entry(victim / "cache.json", 2)
    with pytest.warns(EsmcWarning) as rec:
        healed = cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=1,
                                progress=False, **opts)
    msgs = [str(w.message) for w in rec if issubclass(w.category, EsmcWarning)]
    assert len(msgs) == 1
    assert str(victim) in msgs[0] and "batch 4 of 5: images img_03.png" in msgs[0]
    assert healed.meta["capture_cache"]["computed"] == 1
    assert_same_cache(ref, healed)


def test_a_valid_shard_of_another_capture_is_not_used(tiny_vlm, tmp_path):
    """Checksums right, content wrong (a shard copied in from another capture): the
    metadata is compared with what was asked for."""
    images = write_images(tmp_path / "img", 2)
    ref = cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=2,
                         progress=False, layers=[1, 2])
    (shard,) = shard_dirs(tmp_path / "c")
    other = capture(tiny_vlm, images, PROMPT, batch_size=2, progress=False, layers=[0, 1])
    other.save(shard)  # a complete, self-consistent shard of layers 0, 1
    with pytest.warns(EsmcWarning, match=r"its stream are \[0, 1\], expected \[1, 2\]"):
        again = cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=2,
                               progress=False, layers=[1, 2])
    assert_same_cache(ref, again)


def test_cache_files_with_shapes_that_disagree_with_their_metadata(tiny_vlm, tmp_path):
    images = write_images(tmp_path / "img", 2)
    cache = capture(tiny_vlm, images, PROMPT, batch_size=2, progress=False)
    cache.tokens = [t[:-1] for t in cache.tokens]  # one token fewer than positions
    cache.save(tmp_path / "bad")
    with pytest.raises(CaptureError, match=r"bad is damaged \(token lists do not match"):
        ResidualCache.load(tmp_path / "bad")
    # an old cache (format 1): loads, with a warning that its metadata is unchecked
    cache = capture(tiny_vlm, images, PROMPT, batch_size=2, progress=False)
    cache.save(tmp_path / "v1")
    doc = json.loads((tmp_path / "v1" / "cache.json").read_text())
    doc.pop("meta_sha256")
    doc["format_version"] = 1
    (tmp_path / "v1" / "cache.json").write_text(json.dumps(doc))
    with pytest.warns(EsmcWarning, match="format 1, whose metadata is not checksummed"):
        old = ResidualCache.load(tmp_path / "v1")
    assert_same_cache(cache, old)


def test_an_image_rewritten_during_a_cached_run_is_refused(tiny_vlm, tmp_path, monkeypatch):
    """Shards are keyed by content hashed at the start; a file rewritten before its batch
    is captured must not be stored under the old content's key."""
    images = write_images(tmp_path / "img", 3)
    real = store.save_shard
    calls = []

    def save_then_rewrite(*a, **k):
        calls.append(1)
        if len(calls) == 1:  # as batch 1 is saved, someone rewrites image 3
            Image.new("RGB", (30, 30), (1, 2, 3)).save(images[2])
        return real(*a, **k)

    monkeypatch.setattr(store, "save_shard", save_then_rewrite)
    with pytest.raises(ImageError, match=r"img_02.png changed on disk during the run"):
        cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=1,
                       progress=False)
    monkeypatch.setattr(store, "save_shard", real)
    again = cached_capture(tiny_vlm, images, PROMPT, tmp_path / "c", batch_size=1,
                           progress=False)
    assert again.meta["capture_cache"]["loaded"] == 2  # batches 1 and 2 were kept
    assert_same_cache(capture(tiny_vlm, images, PROMPT, batch_size=1, progress=False), again)


def test_a_shard_another_process_finished_first_is_kept(tiny_vlm, tmp_path):
    images = write_images(tmp_path / "img", 2)
    part = capture(tiny_vlm, images, PROMPT, batch_size=2, progress=False)
    path = tmp_path / "shards" / "k"
    path.parent.mkdir()
    store.save_shard(part, path, tmp_path)
    inode = (path / "tensors.safetensors").stat().st_ino
    store.save_shard(part, path, tmp_path)  # the second writer of the same shard
    assert (path / "tensors.safetensors").stat().st_ino == inode
    assert [p.name for p in path.parent.iterdir()] == ["k"]  # no .part left


# -- disks that fill up ---------------------------------------------------------------------


def test_disk_full_writing_a_shard_real_error_type(tiny_vlm, tmp_path, monkeypatch, synth,
                                                   capsys):
    """safetensors reports a full disk as its own SafetensorError, not OSError."""
    import safetensors
    import safetensors.torch

    def full(*a, **k):
        raise safetensors.SafetensorError(
            "Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    with pytest.raises(CaptureError, match=r"cache is full .*No space left.*rerun resumes"):
        cached_capture(tiny_vlm, [Image.new("RGB", (30, 30))], PROMPT, tmp_path / "cache",
                       progress=False)
    assert not list((tmp_path / "cache").rglob("*.part"))
    monkeypatch.setattr("esmc_lens.models.vlm.load_model", lambda *a, **k: tiny_vlm)
    rc, err = cli(capsys, *run_args(synth, tmp_path / "out", "--cache-dir", tmp_path / "c2"))
    assert rc == 2 and "is full" in err and "--cache-dir" in err
    assert not (tmp_path / "out").exists()


def test_disk_full_on_a_real_small_disk(small_disk, tiny_vlm, synth, tmp_path, capsys,
                                        cli_model):
    """A real ENOSPC from the kernel, for a shard and for the results: exit 2, and neither
    a 0-byte file nor a .part folder is left."""
    filler = fill_disk(small_disk, leave=16384)
    rc, err = cli(capsys, *run_args(synth, tmp_path / "out", "--cache-dir",
                                    small_disk / "cache"))
    assert rc == 2 and f"capture cache directory {small_disk / 'cache'} is full (" in err, err
    assert not [p for p in small_disk.rglob("*") if p.name.endswith(".part")]
    assert not (tmp_path / "out").exists()
    shutil.rmtree(small_disk / "cache")
    filler.unlink()
    fill_disk(small_disk, leave=16384)
    rc, err = cli(capsys, *run_args(synth, small_disk / "out"))
    assert rc == 2 and f"cannot write the results to {small_disk / 'out'}" in err, err
    assert "No space left on device" in err and "free space" in err
    assert [p.name for p in small_disk.iterdir()] == ["filler.bin"]


def test_disk_full_saving_results(tiny_vlm, synth, tmp_path, monkeypatch, capsys, cli_model):
    import esmc_lens.report.result as result_mod

    real = result_mod._write_file
    written = []

    def write_until_full(path, body, index):
        written.append(path.name)
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(path, body, index)

    monkeypatch.setattr(result_mod, "_write_file", write_until_full)
    rc, err = cli(capsys, *run_args(synth, tmp_path / "out"))
    assert rc == 2 and "cannot write the results" in err and "No space left" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no out, no .part


# -- the run's output folder is written whole -------------------------------------------------


def test_reusing_out_refuses_then_overwrite_replaces_completely(synth, tmp_path, capsys,
                                                                 cli_model):
    out = tmp_path / "out"
    with_baselines = [a for a in run_args(synth, out) if a != "--no-baselines"]
    rc, _ = cli(capsys, *with_baselines)  # per-seed CSVs of four methods
    assert rc == 0
    first = sorted(p.name for p in out.iterdir())
    assert "per_seed_Output.csv" in first and "skipped.csv" in first
    before = (out / "results.json").read_bytes()
    rc, err = cli(capsys, *run_args(synth, out))
    assert rc == 2 and "already holds a saved run" in err and "--overwrite" in err
    assert (out / "results.json").read_bytes() == before  # untouched
    rc, err = cli(capsys, *run_args(synth, out, "--overwrite", "--seed", "1"))
    assert rc == 0 and "replaced the previous run" in err
    second = sorted(p.name for p in out.iterdir())
    assert "per_seed_Output.csv" not in second  # nothing of the first run is left
    assert second == sorted(["assignments.csv", "per_seed_ESMC.csv", "result.pkl",
                             "results.json", "scores.csv", "skipped.csv", "votes.csv"])
    assert json.loads((out / "results.json").read_text())["settings"]["seed"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["out"]  # no temporary folders


def test_out_holding_other_files_is_never_replaced(synth, tmp_path, capsys, cli_model):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("keep me")
    rc, err = cli(capsys, *run_args(synth, out, "--overwrite"))
    assert rc == 2 and "holds files that no esmc-lens run wrote" in err
    assert (out / "thesis.tex").read_text() == "keep me"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert cli(capsys, *run_args(synth, empty))[0] == 0  # an empty folder is fine
    assert (empty / "results.json").exists()


def test_interrupted_save_leaves_the_previous_run_intact(tiny_vlm, synth, tmp_path,
                                                         monkeypatch):
    import esmc_lens.report.result as result_mod

    res = run_esmc(tiny_vlm, load_dataset(synth), PROMPT, **FAST)
    out = res.save(tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    real = result_mod._write_file

    def interrupted(path, body, index):
        if path.name == "scores.csv":
            raise KeyboardInterrupt
        return real(path, body, index)

    monkeypatch.setattr(result_mod, "_write_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        res.save(out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with pytest.raises(KeyboardInterrupt):
        res.save(tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_a_run_that_appears_at_out_meanwhile_is_not_mixed(tiny_vlm, synth, tmp_path,
                                                          monkeypatch):
    """Two runs with the same --out on a shared file system: the second rename fails, the
    first run's folder stays whole."""
    import esmc_lens.report.result as result_mod

    res = run_esmc(tiny_vlm, load_dataset(synth), PROMPT, **FAST)
    out = tmp_path / "out"
    real = result_mod.check_output_dir

    def other_run_finishes(path, overwrite=False):
        real(path, overwrite)
        path.mkdir()
        (path / "results.json").write_text("{}")  # the other run's folder

    monkeypatch.setattr(result_mod, "check_output_dir", other_run_finishes)
    with pytest.raises(OutputError, match="written by another run while this one ran"):
        res.save(out)
    assert [p.name for p in out.iterdir()] == ["results.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_results_json_is_strict_json(tiny_vlm, synth, tmp_path):
    res = run_esmc(tiny_vlm, load_dataset(synth), PROMPT, **FAST)
    res.timings["broken"] = float("nan")
    out = res.save(tmp_path / "out")
    doc = json.loads((out / "results.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert doc["timings_s"]["broken"] is None


# -- table / diagnose on what is not a complete labelled run ---------------------------------------


def test_table_and_diagnose_on_bad_run_folders(tiny_vlm, synth, tmp_path, capsys, no_model):
    missing = tmp_path / "nope"
    rc, err = cli(capsys, "table", missing)
    assert rc == 2 and f"run folder {missing} does not exist" in err
    rc, err = cli(capsys, "diagnose", missing, "--data", synth)
    assert rc == 2 and "does not exist" in err
    res = run_esmc(tiny_vlm, load_dataset(synth), PROMPT, **FAST)
    good = res.save(tmp_path / "good")
    text = (good / "results.json").read_text()
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    (trunc / "results.json").write_text(text[: len(text) // 2])
    (trunc / "result.pkl").write_bytes((good / "result.pkl").read_bytes()[:500])
    rc, err = cli(capsys, "table", trunc)
    assert rc == 2 and "is truncated or damaged" in err and "run `esmc-lens run` again" in err
    rc, err = cli(capsys, "diagnose", trunc, "--data", synth)
    assert rc == 2 and "result.pkl is damaged" in err
    partial = tmp_path / "partial"
    partial.mkdir()
    doc = json.loads(text)
    del doc["baselines"]
    (partial / "results.json").write_text(json.dumps(doc))
    rc, err = cli(capsys, "table", partial)
    assert rc == 2 and "is incomplete (no baselines)" in err
    # a run without labels: PIL images, no y_true
    ims = [Image.new("RGB", (32, 32), (i * 30, 0, 0)) for i in range(6)]
    unl = run_esmc(tiny_vlm, ims, PROMPT, n_clusters=2, keywords=KEYWORDS, baselines=False,
                   n_seeds=1, epochs=2, n_samples=4, progress=False)
    unl_dir = unl.save(tmp_path / "unlabelled")
    rc, err = cli(capsys, "table", unl_dir)
    assert rc == 2 and "saved without labels" in err and "--criterion" in err
    rc, err = cli(capsys, "diagnose", unl_dir, "--data", synth)
    assert rc == 2 and "saved without labels" in err
    rc, err = cli(capsys, "diagnose", good, "--data", tmp_path / "other-data")
    assert rc == 2 and "does not exist" in err


# -- settings and types, before the model loads --------------------------------------------------


@pytest.mark.parametrize(("extra", "match"), [
    (("--seed", "-1"), "seed=-1 (--seed) must be a whole number >= 0"),
    (("--keywords", " , ,"), "no keywords in"),
    (("--keyword-source", "user", "--keywords", ""), "needs keywords"),
    (("--k", "1"), "at least 2 clusters"),
])
def test_cli_settings_refused_before_the_model_loads(synth, tmp_path, capsys, no_model, extra,
                                                     match):
    args = run_args(synth, tmp_path / "out")
    if "--keywords" in extra:
        i = args.index("--keywords")
        del args[i:i + 2]
    rc, err = cli(capsys, *args, *extra)
    assert rc == 2 and match in err


def test_the_boundary_knows_the_pipelines_choices():
    from esmc_lens import validate
    from esmc_lens.localization import keywords

    assert keywords.KEYWORD_SOURCES is validate.KEYWORD_SOURCES  # one definition


def test_lens_checks_the_image_before_the_model_loads(tmp_path, capsys, no_model):
    rc, err = cli(capsys, "lens", "--model", "offline", "--image", tmp_path / "no.jpg",
                  "--prompt", PROMPT)
    assert rc == 2 and "no.jpg does not exist" in err


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"seed": 0.5}, r"seed=0.5 \(--seed\) must be a whole number"),
    ({"seed": -3}, r"seed=-3"),
    ({"n_clusters": 2.0}, r"n_clusters=2.0 \(--k\) must be a whole number \(an int\)"),
    ({"keyword_source": "gpt4"}, r"keyword_source='gpt4'.*use one of auto, user, lm, "
                                 r"class_names"),
    ({"space": "vocab"}, r"space='vocab'.*probs, logits, hidden"),
    ({"keywords": ["red", 3]}, r"keywords must be words \(str\)"),
    ({"y_true": [0, 1]}, r"y_true must be 8 integer labels"),
    ({"criterion": 3}, r"criterion=3: expected a criterion folder name"),
    ({"head_lr": -1.0}, r"head_lr=-1.0"),
    ({"head_basis": "vocab"}, r"basis must be one of .* got 'vocab'"),
    ({"head_optimizer": "sgd"}, r"optimizer must be one of .* got 'sgd'"),
    ({"head_basis": "span", "head_optimizer": "adam"}, r"basis='span' needs optimizer="),
    ({"baselines": "no"}, r"baselines='no': expected True or False"),
])
def test_api_arguments_are_checked_at_the_boundary(tiny_vlm, synth, kwargs, match,
                                                   monkeypatch):
    ds = load_dataset(synth)
    monkeypatch.setattr(pipeline, "capture", None)  # nothing may run before the check
    monkeypatch.setattr(pipeline, "choose_keywords", None)
    params = {**FAST, **kwargs}
    with pytest.raises(ConfigError, match=match):
        run_esmc(tiny_vlm, ds, PROMPT, **params)


def test_api_images_and_model_types(tiny_vlm, synth, tmp_path):
    with pytest.raises(ConfigError, match=r"is a single path, not a list of images: pass "
                                          r"load_dataset\("):
        run_esmc(tiny_vlm, str(synth), PROMPT, **FAST)
    with pytest.raises(ConfigError, match=r"vlm='offline' is a model name, not a loaded "
                                          r"model: pass load_model\('offline'\)"):
        run_esmc("offline", load_dataset(synth), PROMPT, **FAST)
    with pytest.raises(ConfigError, match=r"vlm is a dict: expected a loaded model"):
        run_esmc({}, load_dataset(synth), PROMPT, **FAST)
    with pytest.raises(ConfigError, match=r"images is a one-shot generator .*pass a list"):
        run_esmc(tiny_vlm, (Image.new("RGB", (8, 8)) for _ in range(4)), PROMPT, n_clusters=2,
                 keywords=KEYWORDS, progress=False)
    with pytest.raises(DataError, match=r"1 image path\(s\) are not files: .*nope.png: check"):
        run_esmc(tiny_vlm, [tmp_path / "nope.png", *write_images(tmp_path / "i", 2)], PROMPT,
                 n_clusters=2, keywords=KEYWORDS, progress=False)
    with pytest.raises(ConfigError, match=r"image 1 is a int"):
        capture(tiny_vlm, [Image.new("RGB", (8, 8)), 7], PROMPT, progress=False)
    floats = np.zeros((32, 32, 3), np.float32)
    with pytest.raises(ConfigError, match=r"dtype float32: images as arrays must be uint8"):
        capture(tiny_vlm, [floats], PROMPT, progress=False)
    with pytest.raises(ConfigError, match=r"shape \(32, 32, 5\): expected"):
        capture(tiny_vlm, [np.zeros((32, 32, 5), np.uint8)], PROMPT, progress=False)


def test_numpy_arrays_are_images(tiny_vlm, tmp_path):
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 255, (3, 32, 32, 3), dtype=np.uint8)
    pil = [Image.fromarray(a) for a in arrays]
    ref = capture(tiny_vlm, pil, PROMPT, batch_size=3, progress=False)
    assert_same_cache(ref, capture(tiny_vlm, list(arrays), PROMPT, batch_size=3,
                                   progress=False))
    assert_same_cache(ref, capture(tiny_vlm, arrays, PROMPT, batch_size=3, progress=False))
    one = capture(tiny_vlm, arrays[0], PROMPT, progress=False)  # (H, W, 3): one image
    assert len(one) == 1
    cached = cached_capture(tiny_vlm, arrays, PROMPT, tmp_path / "c", batch_size=3,
                            progress=False)
    assert_same_cache(ref, cached)


# -- folders as people have them --------------------------------------------------------------


def _png(path: Path, rgb) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), rgb).save(path)
    return path


def test_same_name_different_images_under_two_criteria(tmp_path, capsys):
    root = tmp_path / "d"
    _png(root / "color/red/a.png", (250, 0, 0))
    _png(root / "color/blue/b.png", (0, 0, 250))
    _png(root / "shape/round/a.png", (250, 0, 0))  # the same bytes: one image
    _png(root / "shape/square/b.png", (0, 250, 0))  # same name, other pixels
    with pytest.raises(DataError, match=r"two different images are named 'b.png' under two "
                                        r"criteria: .*color/blue/b.png and .*shape/square/"
                                        r"b.png; .*rename one"):
        load_dataset(root)
    rc, err = cli(capsys, *run_args(root, tmp_path / "out"))
    assert rc == 2 and "color/blue/b.png" in err and "shape/square/b.png" in err
    _png(root / "shape/square/b.png", (0, 0, 250))  # now the same image
    ds = load_dataset(root)
    assert ds.names == ["a.png", "b.png"] and ds.labels.loc["b.png", "shape"] == "square"


def test_same_name_different_images_in_one_class(tmp_path):
    root = tmp_path / "d"
    _png(root / "color/red/2012/001.jpg.png", (250, 0, 0))
    _png(root / "color/red/2013/001.jpg.png", (240, 0, 0))
    _png(root / "color/blue/x.png", (0, 0, 250))
    with pytest.raises(DataError, match=r"two different images are named '001.jpg.png' in "
                                        r"class color/red"):
        load_dataset(root)


def test_unicode_names_join_across_nfc_and_nfd(tmp_path):
    root = tmp_path / "d"
    nfc, nfd = unicodedata.normalize("NFC", "café.png"), unicodedata.normalize("NFD",
                                                                               "café.png")
    assert nfc != nfd
    _png(root / "color/red" / nfc, (250, 0, 0))
    _png(root / "color/blue/b.png", (0, 0, 250))
    _png(root / "shape/round" / nfd, (250, 0, 0))  # copied from a Mac
    _png(root / "shape/square/b.png", (0, 0, 250))
    ds = load_dataset(root)
    assert ds.names == ["b.png", nfc]
    assert ds.labels.loc[nfc, "shape"] == "round"


def test_exif_orientation_is_applied(tmp_path, tiny_vlm):
    # 40 x 20 stored pixels, left half red; tag 6: "rotate 90 clockwise to display"
    stored = Image.new("RGB", (40, 20), (0, 0, 250))
    stored.paste((250, 0, 0), (0, 0, 20, 20))
    exif = Image.Exif()
    exif[0x0112] = 6
    path = tmp_path / "d" / "color" / "red" / "phone.jpg"
    path.parent.mkdir(parents=True)
    stored.save(path, exif=exif, quality=95)
    _png(tmp_path / "d" / "color" / "blue" / "b.png", (0, 0, 250))
    with Image.open(path) as raw:
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_270)
    got = open_rgb(path)
    assert got.size == (20, 40)
    assert np.array_equal(np.asarray(got), np.asarray(expected))
    assert got.getpixel((10, 5))[0] > 200  # red on top, as a phone shows it
    ds = load_dataset(tmp_path / "d")
    assert ds.open("phone.jpg").size == (20, 40)
    # A PIL image as opened is turned upright too; one already transposed (which keeps the
    # stale tag in .info) is not rotated a second time.
    assert expected.getexif().get(0x0112) == 6
    with Image.open(path) as raw:
        assert_same_cache(capture(tiny_vlm, [raw], PROMPT, progress=False),
                          capture(tiny_vlm, [expected], PROMPT, progress=False))


def test_symlinks_are_followed_everywhere_loops_are_not(tmp_path):
    root = tmp_path / "d"
    _png(root / "color/red/a.png", (250, 0, 0))
    _png(root / "color/blue/b.png", (0, 0, 250))
    _png(tmp_path / "elsewhere/more/c.png", (240, 0, 0))
    _png(tmp_path / "elsewhere/green/g.png", (0, 250, 0))
    (root / "color/red/linked").symlink_to(tmp_path / "elsewhere/more")  # folder in a class
    (root / "color/green").symlink_to(tmp_path / "elsewhere/green")  # a class folder
    (root / "color/blue/loop").symlink_to(root / "color")  # contains the class: a loop
    (root / "color/blue/self").symlink_to(root / "color/blue")
    (root / "color/blue/gone.png").symlink_to(tmp_path / "deleted.png")  # broken
    (root / "color/blue/b2.png").symlink_to(tmp_path / "elsewhere/more/c.png")  # a file
    ds = load_dataset(root)
    assert ds.names == ["a.png", "b.png", "b2.png", "c.png", "g.png"]
    assert list(ds.labels["color"]) == ["red", "blue", "blue", "red", "green"]
    reasons = dict(zip(ds.skipped["path"], ds.skipped["reason"], strict=True))
    assert reasons[str(root / "color/blue/loop")].startswith("symbolic link loop")
    assert reasons[str(root / "color/blue/self")].startswith("symbolic link loop")
    assert reasons[str(root / "color/blue/gone.png")].startswith("broken symbolic link")


def test_system_metadata_folders_are_not_data(tmp_path):
    root = tmp_path / "d"
    _png(root / "color/red/a.png", (250, 0, 0))
    _png(root / "color/blue/b.png", (0, 0, 250))
    _png(root / "__MACOSX/color/red/a.png", (1, 1, 1))  # a zip made on a Mac
    _png(root / "color/red/@eaDir/a.png/SYNOPHOTO_THUMB_M.jpg", (9, 9, 9))  # Synology
    ds = load_dataset(root)
    assert ds.criteria == ["color"] and ds.names == ["a.png", "b.png"]
    assert set(ds.skipped["reason"]) == {"system metadata folder (not data)"}


def test_an_image_changed_after_loading_is_refused(tmp_path, tiny_vlm):
    root = tmp_path / "d"
    _png(root / "color/red/a.png", (250, 0, 0))
    _png(root / "color/blue/b.png", (0, 0, 250))
    ds = load_dataset(root)
    Image.new("RGB", (24, 24), (0, 250, 0)).save(root / "color/red/a.png")
    with pytest.raises(ImageError, match=r"a.png changed on disk since the dataset was "
                                         r"loaded.*reload it"):
        ds.open("a.png")
    with pytest.raises(ImageError, match="changed on disk"):
        capture(tiny_vlm, ds, PROMPT, progress=False)
    assert load_dataset(root).open("a.png").size == (24, 24)


# -- the model cache ------------------------------------------------------------------------------


def test_read_only_empty_model_cache(readonly_dir, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("ESMC_LENS_CACHE", str(readonly_dir))
    with pytest.raises(WeightsError, match=rf"cache {readonly_dir} cannot be written .*"
                                           r"set ESMC_LENS_CACHE to a folder you can write"):
        load_model("offline")
    img = _png(tmp_path / "a.png", (250, 0, 0))
    rc, err = cli(capsys, "lens", "--model", "offline", "--image", img, "--prompt", PROMPT)
    assert rc == 2 and "ESMC_LENS_CACHE" in err
    assert list(readonly_dir.iterdir()) == []


def test_model_cache_full_while_building(tmp_path, monkeypatch):
    from esmc_lens.models import weights

    monkeypatch.setenv("ESMC_LENS_CACHE", str(tmp_path / "cache"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(weights, "_extract", full)
    with pytest.raises(WeightsError, match=r"writing to the esmc_lens cache .* failed \(No "
                                           r"space left on device\): set ESMC_LENS_CACHE"):
        weights.fetch(weights.SMOLLM2)


def test_saved_run_folder_has_exactly_the_run_files(tiny_vlm, synth, tmp_path):
    res = run_esmc(tiny_vlm, load_dataset(synth), PROMPT, **FAST)
    out = res.save(tmp_path / "out", tables={"skipped.csv": pd.DataFrame({"path": ["x"],
                                                                          "reason": ["y"]})})
    assert EsmcResult.load(out).target == res.target
    assert pd.read_csv(out / "skipped.csv").to_dict("list") == {"path": ["x"], "reason": ["y"]}
    with pytest.raises(ConfigError, match=r"table name 'notes\.txt'"):
        res.save(tmp_path / "o2", tables={"notes.txt": pd.DataFrame()})
    assert not (tmp_path / "o2").exists()
    assert all(p.stat().st_size > 0 for p in out.iterdir())
    assert os.listdir(tmp_path) == ["out"]


def test_a_multi_criteria_run_folder_is_written_whole_too(tiny_vlm, synth, tmp_path, capsys):
    ds = load_dataset(synth)
    prompts = {"color": PROMPT, "shape": "The shape of the object is"}
    fast = {k: v for k, v in FAST.items() if k not in ("criterion", "keywords")}
    res = run_esmc(tiny_vlm, ds, prompts, keywords={"color": KEYWORDS, "shape": KEYWORDS},
                   **fast)
    out = res.save(tmp_path / "multi", tables={"skipped.csv": ds.skipped})
    assert sorted(p.name for p in out.iterdir()) == ["color", "cross_criterion.csv",
                                                     "results.json", "shape", "skipped.csv"]
    before = {str(p): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(OutputError, match="already holds a saved run"):
        res.save(out)
    (out / "color" / "per_seed_Output.csv").write_text("a stale file of an older run")
    with pytest.warns(EsmcWarning, match="replaced the previous run"):
        res.save(out, overwrite=True)
    after = {str(p) for p in out.rglob("*") if p.is_file()}
    assert after == set(before) - {str(out / "skipped.csv")}  # this save had no tables
    assert not (out / "color" / "per_seed_Output.csv").exists()
    rc, err = cli(capsys, "diagnose", out, "--data", synth)
    assert rc == 2 and "it is a multi-criteria run: pass one of its criterion folders" in err
    assert rc == 2 and str(out / "color") in err
    (out / "results.json").write_text('{"criteria": ["color", "sh')
    rc, err = cli(capsys, "table", out)
    assert rc == 2 and "is truncated or damaged" in err
