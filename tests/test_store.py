"""The disk-cached capture: identical to capture(), resumable after SIGKILL, self-healing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_cache, shard_dirs, shard_stats, write_images
from PIL import Image

from esmc_lens.data.dataset import load_dataset
from esmc_lens.errors import ConfigError, EsmcWarning
from esmc_lens.models.vlm import load_model
from esmc_lens.residual.capture import capture
from esmc_lens.residual.store import cache_key, cached_capture

PROMPT = "The color of the object is"
OPTIONS = {"keywords": ["red", "blue"], "top_k": 3, "vision": True,
           "store_dtype": torch.float32}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    return write_images(tmp_path_factory.mktemp("img"), 5)


def test_equal_to_capture_and_second_run_reads_everything(tiny_vlm, images, tmp_path):
    ref = capture(tiny_vlm, images, PROMPT, batch_size=2, progress=False, **OPTIONS)
    first = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=2, progress=False,
                           **OPTIONS)
    assert first.meta["capture_cache"] | {"dir": None, "settings_key": None} == {
        "dir": None, "settings_key": None, "batches": 3, "loaded": 0, "computed": 3}
    before = shard_stats(shard_dirs(tmp_path))
    second = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=2, progress=False,
                            **OPTIONS)
    assert second.meta["capture_cache"]["loaded"] == 3
    assert second.meta["capture_cache"]["computed"] == 0
    assert shard_stats(shard_dirs(tmp_path)) == before  # nothing rewritten
    assert_same_cache(ref, first)
    assert_same_cache(ref, second)
    drop = lambda m: {k: v for k, v in m.items() if k != "capture_cache"}  # noqa: E731
    assert drop(first.meta) == drop(second.meta)
    assert first.meta["formatted_prompt"] == ref.meta["formatted_prompt"]
    entry = Path(first.meta["capture_cache"]["dir"])
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["n_images"] == 5 and manifest["batch_size"] == 2
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 2), (2, 4), (4, 5)]
    settings = json.loads((entry / "settings.json").read_text())
    assert settings["prompts"] == [PROMPT] and settings["batch_size"] == 2
    assert settings["capture"]["keywords"] == ["red", "blue"]
    assert set(settings["versions"]) >= {"torch", "transformers", "nnsight", "esmc_lens"}


def test_key_covers_model_prompt_template_options_and_content(tiny_vlm, images, tmp_path):
    key = cache_key(tiny_vlm, [PROMPT], 3, **OPTIONS)[0]
    assert cache_key(tiny_vlm, [PROMPT], 3, **OPTIONS)[0] == key  # stable
    # defaults given or left out: same key (engine and prefetch, bit-identical by design,
    # are how a capture runs, not CaptureOptions: cache_key does not take them)
    assert cache_key(tiny_vlm, [PROMPT], 3, **OPTIONS, positions="prompt", layers=None)[0] == key
    with pytest.raises(ConfigError, match=r"unknown capture options \['engine'\]"):
        cache_key(tiny_vlm, [PROMPT], 3, engine="nnsight")
    assert cache_key(tiny_vlm, [PROMPT], 3, layers=[2, 0])[0] == cache_key(
        tiny_vlm, [PROMPT], 3, layers=(0, 2, 2))[0]
    assert cache_key(tiny_vlm, ["The shape of the object is"], 3, **OPTIONS)[0] != key
    assert cache_key(tiny_vlm, [PROMPT], 4, **OPTIONS)[0] != key
    assert cache_key(tiny_vlm, [PROMPT], 3, **{**OPTIONS, "top_k": 2})[0] != key
    assert cache_key(tiny_vlm, [PROMPT], 3, **{**OPTIONS, "layers": [0, 2]})[0] != key
    other = load_model("tiny")
    assert cache_key(other, [PROMPT], 3, **OPTIONS)[0] == key  # same weights, same key
    template = other.processor.chat_template
    assert "'ASSISTANT:'" in template
    other.processor.chat_template = template.replace("'ASSISTANT:'", "'Assistant:'")
    assert cache_key(other, [PROMPT], 3, **OPTIONS)[0] != key
    edited = load_model("tiny")
    edited.lm_head.weight.data[3, 5] += 1.0  # a weight edited in place
    assert cache_key(edited, [PROMPT], 3, **OPTIONS)[0] != key
    saved = load_model("tiny")
    saved.model.save_pretrained(tmp_path / "tiny")  # sets config.dtype: how, not what
    assert saved.model.config.dtype is not None
    assert cache_key(saved, [PROMPT], 3, **OPTIONS)[0] == key
    saved.model.config.text_config.rms_norm_eps *= 2  # a change of what it computes
    assert cache_key(saved, [PROMPT], 3, **OPTIONS)[0] != key
    assert cache_key(load_model("tiny", seed=1), [PROMPT], 3, **OPTIONS)[0] != key
    assert cache_key(tiny_vlm.__class__(tiny_vlm.model, tiny_vlm.processor, "tiny",
                                        prompt_style="completion"),
                     [PROMPT], 3, **OPTIONS)[0] != key

    # content, not names: renamed files reuse every shard, an edited image only its own
    cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=3, progress=False)
    renamed = [tmp_path / "renamed" / f"x{i}.png" for i in range(len(images))]
    renamed[0].parent.mkdir()
    for src, dst in zip(images, renamed, strict=True):
        dst.write_bytes(src.read_bytes())
    again = cached_capture(tiny_vlm, renamed, PROMPT, tmp_path, batch_size=3, progress=False)
    assert again.meta["capture_cache"]["loaded"] == 2
    assert again.image_ids == [p.name for p in renamed]
    Image.new("RGB", (30, 30), (9, 9, 9)).save(renamed[4])
    edited_run = cached_capture(tiny_vlm, renamed, PROMPT, tmp_path, batch_size=3,
                                progress=False)
    assert edited_run.meta["capture_cache"]["computed"] == 1  # batch 3..5 only
    appended = [*renamed, *write_images(tmp_path / "more", 2, seed=5)]
    grown = cached_capture(tiny_vlm, appended, PROMPT, tmp_path, batch_size=3, progress=False)
    assert grown.meta["capture_cache"] | {"dir": None, "settings_key": None} == {
        "dir": None, "settings_key": None, "batches": 3, "loaded": 1, "computed": 2}


def test_pil_images_and_datasets_are_cached_too(tiny_vlm, images, tmp_path):
    pil = [Image.open(p).convert("RGB") for p in images[:4]]
    a = cached_capture(tiny_vlm, pil, PROMPT, tmp_path, batch_size=2, progress=False)
    b = cached_capture(tiny_vlm, [im.copy() for im in pil], PROMPT, tmp_path, batch_size=2,
                       progress=False)
    assert b.meta["capture_cache"]["loaded"] == 2 and a.image_ids == ["0", "1", "2", "3"]
    pil[1].putpixel((0, 0), (0, 0, 0))
    c = cached_capture(tiny_vlm, pil, PROMPT, tmp_path, batch_size=2, progress=False)
    assert c.meta["capture_cache"]["computed"] == 1
    root = tmp_path / "ds"
    for i, p in enumerate(images[:4]):
        (root / "crit" / f"c{i % 2}").mkdir(parents=True, exist_ok=True)
        (root / "crit" / f"c{i % 2}" / p.name).write_bytes(p.read_bytes())
    ds = load_dataset(root)
    d1 = cached_capture(tiny_vlm, ds, PROMPT, tmp_path, batch_size=2, progress=False)
    d2 = cached_capture(tiny_vlm, ds, PROMPT, tmp_path, batch_size=2, progress=False)
    assert d2.meta["capture_cache"]["loaded"] == 2 and d1.image_ids == ds.names
    assert_same_cache(d1, capture(tiny_vlm, ds, PROMPT, batch_size=2, progress=False))


def test_damaged_shards_are_recomputed_with_a_warning(tiny_vlm, images, tmp_path):
    ref = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=1, progress=False,
                         **OPTIONS)
    shards = shard_dirs(tmp_path)
    assert len(shards) == 5
    flipped = shards[0] / "tensors.safetensors"
    data = bytearray(flipped.read_bytes())
    data[-3] ^= 0xFF  # one bit pattern in the tensor data: same size, wrong checksum
    flipped.write_bytes(bytes(data))
    truncated = shards[1] / "tensors.safetensors"
    truncated.write_bytes(truncated.read_bytes()[:100])
    (shards[2] / "cache.json").write_text("{ not json")
    with pytest.warns(EsmcWarning, match=r"shard .* is damaged .*recomputing it") as record:
        healed = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=1,
                                progress=False, **OPTIONS)
    messages = [str(w.message) for w in record if issubclass(w.category, EsmcWarning)]
    assert len(messages) == 3
    assert any("checksum mismatch" in m for m in messages)
    assert healed.meta["capture_cache"]["computed"] == 3
    assert healed.meta["capture_cache"]["loaded"] == 2
    assert_same_cache(ref, healed)
    clean = cached_capture(tiny_vlm, images, PROMPT, tmp_path, batch_size=1, progress=False,
                           **OPTIONS)
    assert clean.meta["capture_cache"]["loaded"] == 5


def test_run_esmc_with_cache_dir_resumes_and_changes_nothing(tiny_vlm, tmp_path):
    from esmc_lens.data.synthetic import make_synthetic_dataset
    from esmc_lens.pipeline import run_esmc

    ds = load_dataset(make_synthetic_dataset(tmp_path / "syn", n_images=8, image_size=32))
    kw = {"criterion": "color", "keywords": ["red", "green", "blue", "yellow"],
          "baselines": False, "n_seeds": 1, "epochs": 2, "n_samples": 4, "progress": False,
          "batch_size": 4}
    # like with like: the per-criterion path a cache_dir takes, without the cache (the one
    # pass agrees with it to rounding only: tests/test_one_pass.py)
    plain = run_esmc(tiny_vlm, ds, PROMPT, one_pass=False, **kw)
    assert plain.settings["one_pass_why_not"] == "one_pass=False"
    first = run_esmc(tiny_vlm, ds, PROMPT, cache_dir=tmp_path / "cache", **kw)
    second = run_esmc(tiny_vlm, ds, PROMPT, cache_dir=tmp_path / "cache", **kw)
    assert first.meta["capture_cache"]["computed"] == 2  # the 8 images at the target cells
    assert second.meta["capture_cache"]["loaded"] == 2
    assert second.meta["capture_cache"]["computed"] == 0
    # both captures (localization sample, every image) live in the cache
    assert len(list((tmp_path / "cache").glob("tiny-*/settings.json"))) == 2
    for res in (first, second):
        np.testing.assert_array_equal(res.labels, plain.labels)
        assert res.clusters.equals(plain.clusters)
        assert res.scores.equals(plain.scores)
        assert res.target == plain.target
