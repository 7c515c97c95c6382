"""A capture killed with SIGKILL mid-run resumes from its completed batches and ends with
the same tensors as an uninterrupted run (issue 6, "Nothing lost")."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from conftest import shard_dirs, shard_stats, write_images

from esmc_lens.residual.capture import capture
from esmc_lens.residual.store import cached_capture

PROMPT = "The color of the object is"
OPTIONS = {"keywords": ["red", "blue"], "top_k": 3, "vision": True,
           "store_dtype": torch.float32}  # the child below uses the same


pytestmark = pytest.mark.usefixtures("one_torch_thread")


CHILD = textwrap.dedent("""
    import sys, time
    import torch
    torch.set_num_threads(int(sys.argv[3]))
    import safetensors.torch
    import esmc_lens.residual.store as store
    from esmc_lens.models.vlm import load_model

    real = safetensors.torch.save_file
    def slow_save(*args, **kwargs):  # each batch's write takes a while: the kill lands in it
        real(*args, **kwargs)
        time.sleep(0.5)
    safetensors.torch.save_file = slow_save
    paths = sorted(p for p in __import__("pathlib").Path(sys.argv[1]).glob("*.png"))
    store.cached_capture(load_model("tiny"), paths, "The color of the object is",
                         sys.argv[2], batch_size=1, progress=False, keywords=["red", "blue"],
                         top_k=3, vision=True, store_dtype=torch.float32)
    print("finished")
""")


def test_sigkill_mid_run_then_resume_gives_identical_result(tiny_vlm, tmp_path):
    paths = write_images(tmp_path / "img", 8, seed=3)
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONHASHSEED": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path / "img"), str(cache_dir),
         str(torch.get_num_threads())],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    deadline = time.monotonic() + 180
    def half_written() -> list:
        return list(cache_dir.glob("*/shards/.*.part/tensors.safetensors.part"))

    try:  # kill once 2 batches are complete and the next one is half written
        while len(shard_dirs(cache_dir)) < 2 or not half_written():
            assert child.poll() is None, child.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the child wrote no shards in time"
            time.sleep(0.02)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL
    done = shard_dirs(cache_dir)
    assert 2 <= len(done) < 8, "the kill must land mid-run"
    partial = half_written()
    assert partial and not (partial[0].parent / "cache.json").exists()
    before = shard_stats(done)

    resumed = cached_capture(tiny_vlm, paths, PROMPT, cache_dir, batch_size=1,
                             progress=False, **OPTIONS)
    info = resumed.meta["capture_cache"]
    assert (info["loaded"], info["computed"]) == (len(done), 8 - len(done))
    after = shard_stats(shard_dirs(cache_dir))
    assert {k: after[k] for k in before} == before  # completed shards were not recomputed
    assert len(after) == 8 and not list(cache_dir.rglob("*.part"))
    uninterrupted = capture(tiny_vlm, paths, PROMPT, batch_size=1, progress=False, **OPTIONS)
    for name in ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
                 "top_probs"):
        a, b = getattr(uninterrupted, name), getattr(resumed, name)
        assert a.dtype == b.dtype and torch.equal(a, b), name
    assert uninterrupted.tokens == resumed.tokens
    assert uninterrupted.image_ids == resumed.image_ids == [p.name for p in paths]
