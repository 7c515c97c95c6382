"""Capture at scale: streamed to disk batch by batch, sharded over ``torch.distributed`` ranks.

Both write the shard format of :mod:`esmc_lens.residual.store` (one
:meth:`~esmc_lens.residual.cache.ResidualCache.save` folder per batch under
``<cache_dir>/<model>-<settings key>/shards/<shard key>/``), so there is one on-disk
format and one reader:

* :func:`capture_to_disk` captures ``images`` (or some of their batches) and writes every
  batch as soon as it is done, holding one batch in memory: peak memory does not grow
  with the number of images. Complete shards already on disk are skipped (a killed run
  resumes).
* :func:`capture_sharded` runs under ``torchrun`` (or any initialised process group): rank
  ``r`` of ``P`` captures a contiguous block of whole batches, writes its shards, waits for
  the others (``barrier``), and rank 0 merges.
* :func:`merge_capture` reads the shards back into one
  :class:`~esmc_lens.residual.cache.ResidualCache` through
  :func:`esmc_lens.residual.store.cached_capture`
  (checksums verified, a missing or damaged shard recomputed). Because ranks split the
  image list at batch boundaries, every image sits in the same batch as in a
  single-process run, and the merged cache equals ``capture(vlm, images, prompt,
  batch_size=B, ...)`` tensor for tensor.

Command line (see ``docs/scaling.md``)::

    torchrun --nproc-per-node 4 -m esmc_lens capture-shard --model llava-hf/llava-1.5-7b-hf \\
        --images photos/ --prompt "The color of the flower is" --cache-dir /scratch/esmc \\
        --out runs/flowers-capture

gloo is the process-group backend on the CPU, nccl on CUDA (each rank uses
``cuda:$LOCAL_RANK``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import IMAGE_EXTENSIONS, ImageDataset, walk_files
from ..data.source import ImageSource
from ..errors import ConfigError
from ..models.vlm import VLM
from . import store
from .cache import ResidualCache
from .capture import capture_inputs, iter_capture
from .options import CaptureOptions
from .store import cached_capture

__all__ = ["DistEnv", "capture_sharded", "capture_to_disk", "dist_env",
           "list_images", "merge_capture", "shard_batches"]

# capture()'s defaults: options equal to them are left out of the store's settings key, so
# ``cached_capture(vlm, images, prompt, cache_dir=..., keywords=[...])`` finds the shards
# this module wrote with the same non-default options.
def list_images(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder`` (recursively, sorted by path), by the dataset loader's
    rules (:func:`~esmc_lens.data.dataset.walk_files`: hidden entries skipped, links
    followed without loops; extensions in ``IMAGE_EXTENSIONS``)."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"--images {folder}: not a folder of images")
    found = [p for p in walk_files(folder, []) if p.suffix.lower() in IMAGE_EXTENSIONS]
    if not found:
        raise ConfigError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under "
                          f"{folder}")
    return sorted(found)


# -- streaming ---------------------------------------------------------------------------


def _image_list(images) -> list:
    return list(images.paths) if isinstance(images, ImageDataset) else list(images)


def capture_to_disk(
    vlm: VLM,
    images,
    prompt: str | Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    batches: Sequence[int] | None = None,
    image_ids: Sequence[str] | None = None,
    progress: bool = True,
    engine: str = "auto",
    prefetch: bool | None = None,
    options: CaptureOptions | None = None,
    **option_fields,
) -> dict:
    """Capture ``images`` and write one shard per batch; return a summary, not the states.

    Parameters
    ----------
    vlm, images, prompt, batch_size, image_ids, engine, prefetch
        As for :func:`~esmc_lens.residual.capture.capture` (``batch_size`` must be an int: shards
        are batches).
    cache_dir : the store's folder (default ``$ESMC_LENS_CACHE/captures``).
    batches : batch numbers to capture (batch ``b`` = images ``b*B .. b*B + B - 1``),
        default all.
    options, **option_fields : what to keep
        (:class:`~esmc_lens.residual.options.CaptureOptions` and/or its fields; part of the
        store's key: read back with the same options).

    Returns
    -------
    dict
        ``dir`` (the key folder), ``settings_key``, ``n_images``, ``batches`` (how many
        this call covered), ``computed``, ``skipped`` (already on disk), ``images``
        (how many images this call covered).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
    opts = CaptureOptions.of(options, **option_fields)
    items = _image_list(images)
    source, prompts = capture_inputs(images, prompt, image_ids)
    n_batches = -(-source.n // batch_size)
    todo = list(range(n_batches)) if batches is None else [int(b) for b in batches]
    if any(not 0 <= b < n_batches for b in todo):
        raise ConfigError(f"batches out of range: {source.n} images make {n_batches} "
                          f"batches of {batch_size}")
    root, entry, key = store.open_entry(vlm, prompts, batch_size, cache_dir, opts)
    shards = entry / "shards"
    paths: dict[int, Path] = {}
    for b in todo:
        idx = list(range(b * batch_size, min((b + 1) * batch_size, source.n)))
        prints = dict(zip(idx, store.image_fingerprints([items[i] for i in idx]), strict=True))
        paths[b] = shards / store.shard_keys(key, prints, prompts, [idx])[0][:32]
    missing = [b for b in todo if not (paths[b] / "cache.json").exists()]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(missing), desc="capture to disk")
    for b, (_, part) in zip(missing, iter_capture(
            vlm, source, prompts, opts, batch_size=batch_size, batches=missing, engine=engine,
            prefetch=prefetch), strict=True):
        store.save_shard(part, paths[b], root)
        del part
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    return {"dir": str(entry), "settings_key": key, "n_images": source.n,
            "batches": len(todo), "computed": len(missing),
            "skipped": len(todo) - len(missing),
            "images": sum(min(batch_size, source.n - b * batch_size) for b in todo)}


def merge_capture(vlm: VLM, images, prompt: str | Sequence[str],
                  cache_dir: str | os.PathLike | None = None, *, batch_size: int = 8,
                  image_ids: Sequence[str] | None = None, progress: bool = False,
                  options: CaptureOptions | None = None, **option_fields) -> ResidualCache:
    """All shards of ``images`` read back as one cache (missing ones are captured)."""

    return cached_capture(vlm, images, prompt, cache_dir, CaptureOptions.of(options,
                                                                          **option_fields),
                          batch_size=batch_size, image_ids=image_ids, progress=progress)


# -- torch.distributed -------------------------------------------------------------------


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job."""

    rank: int
    world_size: int
    local_rank: int
    backend: str | None  # None: a single process, no process group
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_env(init: bool = True, backend: str | None = None,
             device: str | torch.device | None = None) -> DistEnv:
    """This process's rank, world size and device, joining the process group if needed.

    Reads an initialised ``torch.distributed`` group, else the ``RANK`` / ``WORLD_SIZE``
    / ``LOCAL_RANK`` variables ``torchrun`` sets (and initialises the group from them
    when ``init``; backend ``nccl`` with CUDA, ``gloo`` without), else a single process.
    The device is ``cuda:$LOCAL_RANK`` when CUDA is there (also for ``device="cuda"``),
    else the CPU, unless given with an index.
    """
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
    if device is None:
        device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:  # "cuda": this rank's own GPU
        device = torch.device("cuda", local_rank)
    if dist.is_available() and dist.is_initialized():
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank,
                       dist.get_backend(), device)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and init:
        if not dist.is_available():
            raise ConfigError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
        return DistEnv(dist.get_rank(), dist.get_world_size(), local_rank, backend, device)
    if world > 1:  # init=False: ranks known, no process group to synchronise through
        return DistEnv(int(os.environ.get("RANK", "0")), world, local_rank, None, device)
    return DistEnv(0, 1, local_rank, None, device)


def shard_batches(n_images: int, batch_size: int, rank: int, world_size: int) -> range:
    """The contiguous block of batch numbers rank ``rank`` of ``world_size`` captures.

    Blocks differ in size by at most one batch and, in rank order, cover every batch once.
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} outside a world of {world_size}")
    n_batches = -(-n_images // batch_size)
    return range(rank * n_batches // world_size, (rank + 1) * n_batches // world_size)


def capture_sharded(
    vlm: VLM,
    images,
    prompt: str | Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    *,
    batch_size: int = 8,
    image_ids: Sequence[str] | None = None,
    merge: bool = True,
    env: DistEnv | None = None,
    progress: bool = False,
    engine: str = "auto",
    prefetch: bool | None = None,
    options: CaptureOptions | None = None,
    **option_fields,
) -> tuple[dict, ResidualCache | None]:
    """This rank's share of a sharded capture; rank 0 also merges.

    Every rank must call it with the same images, prompt, batch size and options. Returns
    ``(summary, cache)``: ``summary`` lists every rank's :func:`capture_to_disk` summary
    (gathered over the process group) and ``cache`` is the merged
    :class:`~esmc_lens.residual.cache.ResidualCache` on rank 0 when ``merge`` (None elsewhere).
    """
    env = env or dist_env()
    if env.world_size > 1 and env.backend is None and merge:
        raise ConfigError("merging a sharded capture needs the process group (to wait for "
                          "every rank): initialise torch.distributed, or pass merge=False "
                          "and merge afterwards with merge_capture")
    opts = CaptureOptions.of(options, **option_fields)
    n = ImageSource.of(images, image_ids).n
    mine = shard_batches(n, batch_size, env.rank, env.world_size)
    done = capture_to_disk(vlm, images, prompt, cache_dir, batch_size=batch_size,
                           batches=mine, image_ids=image_ids, progress=progress,
                           engine=engine, prefetch=prefetch, options=opts)
    done.update({"rank": env.rank, "first_batch": mine.start, "stop_batch": mine.stop})
    ranks = [done]
    if env.world_size > 1 and env.backend is not None:
        import torch.distributed as dist

        ranks = [None] * env.world_size
        dist.all_gather_object(ranks, done)  # also a barrier: every shard is on disk
    summary = {"world_size": env.world_size, "backend": env.backend, "n_images": n,
               "batch_size": batch_size, "dir": done["dir"], "ranks": ranks}
    cache = None
    if merge and env.is_main:
        cache = merge_capture(vlm, images, prompt, cache_dir, batch_size=batch_size,
                              image_ids=image_ids, options=opts)
        summary["merged"] = cache.meta.get("capture_cache")
    return summary, cache
