"""Streaming to disk and sharded capture over torch.distributed equal a single-process capture."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_same_cache
from PIL import Image

from esmc_lens.errors import ConfigError
from esmc_lens.residual.cache import ResidualCache
from esmc_lens.residual.capture import capture
from esmc_lens.residual.distributed import (
    capture_sharded,
    capture_to_disk,
    dist_env,
    list_images,
    merge_capture,
    shard_batches,
)
from esmc_lens.residual.store import cached_capture

PROMPT = "The color of the object is"
OPTIONS = {"keywords": ["red", "blue"], "top_k": 3, "vision": True,
           "store_dtype": torch.float32}

# The torchrun children compute with one thread (OMP_NUM_THREADS=1): so does this process,
# since a product's rounding may depend on how the threads split it.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    (folder / "sub").mkdir(parents=True, exist_ok=True)
    for i in range(n):  # two folders: listing is recursive and sorted by path
        where = folder / "sub" if i % 3 == 0 else folder
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(
            where / f"img_{i:02d}.png")
    return list_images(folder)


@pytest.mark.parametrize(("n", "bs", "world"), [(7, 2, 2), (16, 4, 3), (3, 8, 4), (10, 1, 10)])
def test_shard_batches_cover_every_batch_once_in_order(n, bs, world):
    blocks = [shard_batches(n, bs, r, world) for r in range(world)]
    flat = [b for blk in blocks for b in blk]
    assert flat == list(range(-(-n // bs)))
    sizes = [len(b) for b in blocks]
    assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError, match="outside"):
        shard_batches(n, bs, world, world)


def test_list_images(tmp_path):
    paths = write_images(tmp_path / "imgs", 4)
    (tmp_path / "imgs" / "notes.txt").write_text("not an image")
    (tmp_path / "imgs" / ".hidden.png").write_bytes(b"")
    assert [p.name for p in paths] == ["img_01.png", "img_02.png", "img_00.png", "img_03.png"]
    assert list_images(tmp_path / "imgs") == paths
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no image files"):
        list_images(tmp_path / "empty")
    with pytest.raises(ConfigError, match="not a folder"):
        list_images(tmp_path / "missing")


def test_streamed_halves_merge_to_the_single_process_capture(tiny_vlm, tmp_path):
    paths = write_images(tmp_path / "imgs", 7)
    ref = capture(tiny_vlm, paths, PROMPT, batch_size=2, progress=False, **OPTIONS)
    store = tmp_path / "store"
    # two "ranks", one after the other, each writing its block of batches
    for rank in range(2):
        done = capture_to_disk(tiny_vlm, paths, PROMPT, store, batch_size=2,
                               batches=shard_batches(len(paths), 2, rank, 2), progress=False,
                               **OPTIONS)
        assert done["computed"] == done["batches"] == 2 and done["skipped"] == 0
    assert done["images"] == 3 and done["n_images"] == 7
    # rerun: everything is on disk already (resume)
    again = capture_to_disk(tiny_vlm, paths, PROMPT, store, batch_size=2, progress=False,
                            **OPTIONS)
    assert again["computed"] == 0 and again["skipped"] == 4
    merged = merge_capture(tiny_vlm, paths, PROMPT, store, batch_size=2, **OPTIONS)
    assert merged.meta["capture_cache"]["loaded"] == 4
    assert merged.meta["capture_cache"]["computed"] == 0
    assert_same_cache(merged, ref)
    # the store's own reader, called with the non-default options only, finds the shards
    direct = cached_capture(tiny_vlm, paths, PROMPT, store, batch_size=2, progress=False,
                            **OPTIONS)
    assert direct.meta["capture_cache"]["computed"] == 0
    assert_same_cache(direct, ref)


def test_streaming_keeps_only_one_batch(tiny_vlm, tmp_path, monkeypatch):
    """capture_to_disk never holds more than one batch's cache (memory flat in N)."""
    import esmc_lens.residual.store as store

    paths = write_images(tmp_path / "imgs", 6)
    saved, alive = [], []
    real_save = store.save_shard

    def spy(part, path, root):
        import weakref

        alive.append(weakref.ref(part))
        saved.append(sum(r() is not None for r in alive))
        real_save(part, path, root)

    monkeypatch.setattr(store, "save_shard", spy)
    capture_to_disk(tiny_vlm, paths, PROMPT, tmp_path / "s", batch_size=2, progress=False,
                    prefetch=False)
    assert len(saved) == 3 and max(saved) == 1  # earlier batches were freed


def test_capture_sharded_single_process_and_bad_merge(tiny_vlm, tmp_path):
    paths = write_images(tmp_path / "imgs", 5)
    env = dist_env()
    assert env.world_size == 1 and env.backend is None and env.is_main
    summary, cache = capture_sharded(tiny_vlm, paths, PROMPT, tmp_path / "s", batch_size=2,
                                     env=env, **OPTIONS)
    assert summary["world_size"] == 1 and summary["ranks"][0]["computed"] == 3
    assert_same_cache(cache, capture(tiny_vlm, paths, PROMPT, batch_size=2, progress=False,
                               **OPTIONS))
    from esmc_lens.residual.distributed import DistEnv

    fake = DistEnv(rank=1, world_size=2, local_rank=1, backend=None,
                   device=torch.device("cpu"))
    with pytest.raises(ConfigError, match="process group"):
        capture_sharded(tiny_vlm, paths, PROMPT, tmp_path / "s", batch_size=2, env=fake)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_torchrun_two_cpu_processes_equal_single_process(tiny_vlm, tmp_path):
    """`torchrun --nproc-per-node 2 -m esmc_lens capture-shard` (gloo) == capture()."""
    folder = tmp_path / "imgs"
    paths = write_images(folder, 7)
    out = tmp_path / "merged"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
           "-m", "esmc_lens", "capture-shard", "--model", "tiny", "--images", str(folder),
           "--prompt", PROMPT, "--cache-dir", str(tmp_path / "store"), "--out", str(out),
           "--batch-size", "2", "--keywords", "red,blue", "--top-k", "3", "--vision",
           "--store-dtype", "float32", "--json", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("{")))
    assert summary["world_size"] == 2 and summary["backend"] == "gloo"
    by_rank = {r["rank"]: r for r in summary["ranks"]}
    assert by_rank[0]["images"] == 4 and by_rank[1]["images"] == 3  # 4 batches: 2 + 2
    assert all(r["computed"] == 2 for r in by_rank.values())
    assert summary["merged"]["computed"] == 0 and summary["merged"]["loaded"] == 4
    ids = [str(p.relative_to(folder)) for p in paths]
    ref = capture(tiny_vlm, paths, PROMPT, batch_size=2, progress=False, image_ids=ids,
                  **OPTIONS)
    assert_same_cache(ResidualCache.load(out), ref)


def test_remote_local_dry_run_equals_local_capture(tiny_vlm):
    """remote="local": nnsight serialises the trace as for NDIF and runs it here."""
    images = [Image.new("RGB", (30, 30), c) for c in ((200, 30, 30), (30, 30, 200))]
    local = capture(tiny_vlm, images, PROMPT, progress=False, **OPTIONS)
    remote = capture(tiny_vlm, images, PROMPT, progress=False, remote="local", **OPTIONS)
    assert_same_cache(remote, local)
    with pytest.raises(ConfigError, match="nnsight"):
        capture(tiny_vlm, images, PROMPT, progress=False, remote="local", engine="hooks")


def test_dist_env_reads_torchrun_variables(monkeypatch):
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    env = dist_env(init=False, device="cpu")
    assert (env.rank, env.world_size, env.local_rank, env.backend) == (3, 4, 1, None)
    assert not env.is_main and env.device == torch.device("cpu")
    assert list(shard_batches(100, 8, env.rank, env.world_size)) == [9, 10, 11, 12]
