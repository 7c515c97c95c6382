"""Disk-cached, resumable capture: a killed run starts again from its completed batches.

>>> cache = cached_capture(vlm, dataset, "The color of the flower is",
...                        cache_dir="~/.cache/esmc_lens/captures", batch_size=8,
...                        keywords=["red", "white"])                      # doctest: +SKIP
>>> cache.meta["capture_cache"]  # {"dir": ..., "loaded": 37, "computed": 3}  # doctest: +SKIP

``cached_capture`` returns exactly what :func:`~esmc_lens.residual.capture.capture` returns for the
same arguments (same tensors, bit for bit), but every batch is written to disk as soon as
it is captured, and batches already on disk are read instead of captured again.

Layout under ``cache_dir``::

    <model>-<settings key>/           one folder per model + prompt + options + versions
        settings.json                 what the key was computed from (readable)
        manifest.json                 the latest run: its batches, in order, and their shards
        shards/<shard key>/           one batch: ResidualCache.save output
            tensors.safetensors       (sha256 of it in cache.json)
            cache.json

Keys
----
The *settings key* hashes the model (name, class, config, a fingerprint of its weights,
dtype, device type, prompt style), the chat template, the image processor's settings, the
tokenizer, the prompt(s) and their formatted model input, the capture options (positions,
layers, store dtype, keywords, top-k, vision), the batch size (batch composition changes
padding and kernel shapes, hence the last bits of the states) and the versions of
esmc_lens, torch, transformers, nnsight and Pillow. A *shard key* hashes the settings key,
the content (SHA-256 of the file bytes, or of a PIL image's pixels) and the prompt of each
image of its batch. Renaming image files keeps every shard valid (ids are not hashed);
appending images to a dataset keeps the complete batches before them.

Safety
------
* A shard is written to a temporary folder and renamed into place: a shard folder either
  is complete or does not exist, whatever moment the process is killed at.
* Everything read back is verified: the SHA-256 of a shard's tensors and of its metadata
  (``cache.json``), the tensors' shapes against the metadata, and the metadata against the
  capture asked for (images, layers, keywords). A shard that fails any check is named in
  an ``EsmcWarning`` (folder, batch, images), moved to ``<entry>/damaged/`` and recomputed.
* Each image's file is hashed for its shard key and hashed again, from the bytes that are
  decoded, when its batch is captured: a file rewritten during the run raises
  ``ImageError`` instead of storing new pixels under the old content's key.
* A cache folder that is read-only or full raises ``CaptureError`` naming the folder and
  the fix (``--cache-dir`` / ``ESMC_LENS_CACHE``, or no cache), before any capture work.
* Concurrent runs on the same key take turns (``fcntl.flock`` on the key folder); where
  the file system has no locks, a shard two runs write at once is renamed into place by
  the first and the second's identical copy is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from ..data.dataset import ImageDataset
from ..data.images import open_rgb
from ..data.source import image_items
from ..errors import CaptureError, ConfigError, EsmcWarning, ImageError, write_failure
from ..lens.keyword_rule import keyword_token_ids
from ..models.vlm import VLM, library_versions
from ..models.weights import cache_dir
from ..validate import check_writable_dir, temp_name, writer_gone
from .cache import ResidualCache, file_sha256
from .capture import auto_batch_size, capture, capture_inputs
from .options import CaptureOptions

__all__ = ["CACHE_DIR_FIX", "STORE_VERSION", "cache_key", "cache_write_error",
           "cached_capture", "default_capture_dir", "image_fingerprints", "model_fingerprint",
           "open_entry", "save_shard", "shard_keys"]

# 2: shards carry a metadata checksum (ResidualCache format 2); EXIF orientation applied.
STORE_VERSION = 2
CACHE_DIR_FIX = ("set --cache-dir (CLI) or cache_dir= (API) or ESMC_LENS_CACHE to a writable "
                 "folder with free space, or run without the capture cache")


def default_capture_dir() -> Path:
    """``$ESMC_LENS_CACHE/captures`` (see :func:`esmc_lens.models.weights.cache_dir`)."""
    return cache_dir() / "captures"


# -- fingerprints ------------------------------------------------------------------------


def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def _json(doc) -> str:
    return json.dumps(doc, sort_keys=True, default=str, separators=(",", ":"))


def _file_sha256(path: Path) -> str:
    """:func:`~esmc_lens.residual.cache.file_sha256` of an image, errors named as the image's."""
    try:
        return file_sha256(path)
    except FileNotFoundError:
        raise ImageError(f"image {path} does not exist: check the path, or reload the "
                         "dataset if files were moved") from None
    except OSError as exc:
        raise ImageError(f"cannot read image {path} ({exc.strerror or exc})") from None


def image_fingerprints(images) -> list[str]:
    """SHA-256 of every image's content: file bytes for paths and datasets, mode + size +
    pixels for PIL images."""
    if isinstance(images, ImageDataset):
        return [_file_sha256(p) for p in images.paths]
    out = []
    for im in images:
        if isinstance(im, str | os.PathLike):
            out.append(_file_sha256(Path(im)))
        elif isinstance(im, np.ndarray):
            h = hashlib.sha256(f"ndarray:{im.dtype.str}:{im.shape}:".encode())
            h.update(np.ascontiguousarray(im).tobytes())
            out.append(h.hexdigest())
        elif hasattr(im, "tobytes") and hasattr(im, "mode"):
            h = hashlib.sha256(f"{im.mode}:{im.size}:".encode())
            h.update(im.tobytes())
            out.append(h.hexdigest())
        else:
            raise ConfigError(f"cannot fingerprint an image of type {type(im).__name__}: pass "
                              "PIL images, paths or an ImageDataset")
    return out


@torch.no_grad()
def model_fingerprint(vlm: VLM) -> str:
    """Hash of every parameter's name, shape, dtype, sum and a strided sample of values.

    Tells apart checkpoints that share a name and config (fine-tunes, tiny models built
    with other seeds, weights edited in place) at the cost of one pass over the weights.
    """
    h = hashlib.sha256()
    for name, p in vlm.model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 64)
        sample = flat[::step][:64].float().cpu()
        total = float(flat.double().sum()) if flat.numel() else 0.0
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}|{total:.6e}|".encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()


def _tokenizer_sha(tok) -> str:
    """Hash of the tokenizer's model, normaliser and special tokens; its padding and
    truncation state (which calling it with ``padding=True`` changes) left out."""
    try:
        spec = json.loads(tok.backend_tokenizer.to_str())
        spec.pop("padding", None)
        spec.pop("truncation", None)
        return _sha(_json(spec))
    except Exception:  # a slow tokenizer: fall back to its vocabulary
        return _sha(_json(sorted(tok.get_vocab().items())))


# Config fields that record how a model was last loaded or saved, not what it computes
# (``save_pretrained`` fills in ``dtype``); the dtype the capture runs in is keyed apart.
_VOLATILE_CONFIG = ("dtype", "torch_dtype", "transformers_version", "_name_or_path")


def _config_sha(config) -> str:
    """sha256 of a model config's JSON without :data:`_VOLATILE_CONFIG` at any depth."""
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items()
                if k not in _VOLATILE_CONFIG}

    return _sha(_json(strip(json.loads(config.to_json_string(use_diff=False)))))


def cache_key(vlm: VLM, prompts: Sequence[str], batch_size: int,
              options: CaptureOptions | None = None, *, remote: bool | str = False,
              **option_fields) -> tuple[str, dict]:
    """(settings key, the document it hashes) for a capture of ``vlm`` with ``prompts`` and
    the :class:`~esmc_lens.residual.options.CaptureOptions` ``options`` (or its fields)."""
    import PIL

    opts = CaptureOptions.of(options, **option_fields)

    processor = vlm.processor
    image_processor = getattr(processor, "image_processor", None)
    unique = sorted(set(prompts))
    doc = {
        "store_version": STORE_VERSION,
        "model": vlm.name,
        "model_class": type(vlm.model).__name__,
        "config_sha256": _config_sha(vlm.model.config),
        "weights": model_fingerprint(vlm),
        "dtype": str(vlm.dtype).replace("torch.", ""),
        "device_type": vlm.device.type,
        "prompt_style": vlm.prompt_style,
        "chat_template_sha256": _sha(getattr(processor, "chat_template", None) or ""),
        "image_processor": (json.loads(_json(image_processor.to_dict()))
                            if image_processor is not None else None),
        "tokenizer_sha256": _tokenizer_sha(vlm.tokenizer),
        "prompts": unique if len(unique) <= 8 else _sha(_json(unique)),
        "formatted_prompts": ([vlm.format_prompt(p) for p in unique] if len(unique) <= 8
                              else _sha(_json([vlm.format_prompt(p) for p in unique]))),
        "capture": opts.key_doc() | {"remote": remote},
        # the token ids the keyword rule scores: a change of the rule is a new capture
        "keyword_token_ids": (keyword_token_ids(vlm.tokenizer, opts.keywords).groups
                              if opts.keywords else None),
        "batch_size": int(batch_size),
        "versions": {**library_versions(), "pillow": PIL.__version__,
                     "python": ".".join(map(str, sys.version_info[:2]))},
    }
    return _sha(_json(doc)), doc


# -- files -------------------------------------------------------------------------------


def _write_json(path: Path, doc) -> None:
    tmp = temp_name(path)
    try:
        tmp.write_text(json.dumps(doc, indent=1, default=str))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # no half-written file behind a full disk
        raise


@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """Exclusive lock on ``folder`` (no-op where ``fcntl`` does not exist)."""
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    with open(folder / ".lock", "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            warnings.warn(f"another process is capturing into {folder}; waiting for it",
                          EsmcWarning, stacklevel=4)
            fcntl.flock(f, fcntl.LOCK_EX)
        except OSError:  # a file system without locks (some network mounts): go on
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name or name)[:40] or "model"


def _load_shard(path: Path, n: int, what: str, expect: dict) -> ResidualCache | None:
    """The shard at ``path``, or None if absent or damaged.

    Everything is verified before use: the tensors' and the metadata's SHA-256, the shapes
    against the metadata, and the metadata against this capture (``n`` images, ``expect``:
    the layers and keywords asked for, and the shard key, which :func:`save_shard` records
    in its ``meta``, so a shard copied or renamed into another batch's folder is caught). A
    damaged shard is moved to ``<entry>/damaged/`` (kept for inspection, out of the way of
    every later run) with a warning naming it and ``what`` images it held; the caller
    recomputes it.
    """
    if not path.exists():
        return None
    try:
        part = ResidualCache.load(path, verify=True)
        problems = [f"holds {len(part)} images, expected {n}"] if len(part) != n else []
        problems += [f"its {k} are {getattr(part, k)!r}, expected {v!r}"
                     for k, v in expect.items() if getattr(part, k) != v]
        if part.meta.get("shard_key") != path.name:  # copied from another batch's folder
            problems.append(f"it holds the batch {part.meta.get('shard_key')!r}, not "
                            f"{path.name!r}")
        if problems:
            raise CaptureError("; ".join(problems))
        return part
    except Exception as exc:  # checksum, truncated file, bad JSON, wrong content: recompute
        reason = " ".join(str(exc).split())
        aside = path.parent.parent / "damaged" / path.name
        try:
            aside.parent.mkdir(exist_ok=True)
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
            kept = f"moved to {aside}"
        except OSError:
            shutil.rmtree(path, ignore_errors=True)
            kept = "removed"
        warnings.warn(f"capture cache shard {path} ({what}) is damaged ({reason}); {kept}, "
                      "recomputing it", EsmcWarning, stacklevel=3)
        return None


def save_shard(part: ResidualCache, path: Path, root: Path) -> None:
    """Write ``part`` to a temporary folder and rename it to ``path`` (atomic).

    If another process completed the same shard meanwhile (two runs sharing a cache on a
    file system without locks), its copy is kept: both hold the same capture.
    """
    tmp = temp_name(path)
    part.meta = {**part.meta, "shard_key": path.name}  # its folder, checked when read
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        part.save(tmp)
        os.replace(tmp, path)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(exc, OSError) and (path / "cache.json").exists():
            return  # renaming onto a shard another process finished
        cause = exc.__cause__ if isinstance(exc, CaptureError) else exc
        if cause is None or write_failure(cause) is None:
            raise
        raise cache_write_error(root, cause, " while saving a batch", "; batches saved so "
                                "far are kept and a rerun resumes from them") from None


def cache_write_error(root: Path, exc: BaseException, doing: str = "",
                      after: str = "") -> CaptureError:
    """The ``CaptureError`` for a failed write under the cache folder ``root``: says
    whether the disk is full, and the fix."""
    reason, full = write_failure(exc) or (str(exc), False)
    what = "is full" if full else "cannot be written"
    return CaptureError(f"capture cache directory {root} {what} ({reason}){doing}: "
                        f"{CACHE_DIR_FIX}{after}")


def open_entry(vlm: VLM, prompts: Sequence[str], batch_size: int,
               cache_dir: str | os.PathLike | None = None,
               options: CaptureOptions | None = None, **key_kwargs
               ) -> tuple[Path, Path, str]:
    """``(root, entry folder, settings key)`` of a capture, its folder created and its
    ``settings.json`` written; ``CaptureError`` (with the fix) if it cannot be written."""
    root = check_writable_dir(default_capture_dir() if cache_dir is None else cache_dir,
                              "capture cache directory", CACHE_DIR_FIX)
    key, doc = cache_key(vlm, prompts, batch_size, options, **key_kwargs)
    entry = root / f"{_slug(vlm.name)}-{key[:16]}"
    try:
        (entry / "shards").mkdir(parents=True, exist_ok=True)
        if not (entry / "settings.json").exists():
            _write_json(entry / "settings.json", doc)
    except OSError as exc:
        raise cache_write_error(root, exc) from None
    return root, entry, key


def shard_keys(key: str, prints: Sequence[str], prompts: Sequence[str],
               batches: Sequence[Sequence[int]]) -> list[str]:
    """The shard key of each batch: the settings key, and each image's content and prompt."""
    return [_sha(_json([key, [[prints[i], prompts[i]] for i in b]])) for b in batches]


# -- capture -----------------------------------------------------------------------------


def cached_capture(
    vlm: VLM,
    images,
    prompt: str | Sequence[str],
    cache_dir: str | os.PathLike | None = None,
    options: CaptureOptions | None = None,
    *,
    batch_size: int | str = 8,
    image_ids: Sequence[str] | None = None,
    progress: bool = True,
    engine: str = "auto",
    remote: bool | str = False,
    prefetch: bool | None = None,
    **option_fields,
) -> ResidualCache:
    """:func:`~esmc_lens.residual.capture.capture`, one disk shard per batch, resumable.

    Parameters
    ----------
    vlm, images, prompt, batch_size, image_ids, progress
        As for :func:`~esmc_lens.residual.capture.capture`.
    cache_dir : folder of the cache (created if needed); default
        :func:`default_capture_dir` (``$ESMC_LENS_CACHE/captures``).
    options, **option_fields
        What to keep (:class:`~esmc_lens.residual.options.CaptureOptions` and/or its fields):
        passed to ``capture`` and part of the cache key (so is ``remote``; ``engine`` and
        ``prefetch`` change no value and are not).

    Returns
    -------
    ResidualCache
        Equal to ``capture(vlm, images, prompt, batch_size=batch_size, ...)``;
        ``meta["capture_cache"]`` says where it was stored and how many batches were
        loaded and computed.

    Raises
    ------
    CaptureError
        The cache folder is read-only or full (nothing is lost: saved batches stay).
    """
    if not isinstance(images, ImageDataset):
        images = image_items(images)
    opts = CaptureOptions.of(options, **option_fields)
    source, prompts = capture_inputs(images, prompt, image_ids)
    if batch_size == "auto":
        batch_size = auto_batch_size(vlm, source.load(0), prompts[0], positions=opts.positions,
                                     layers=opts.layers)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1 or 'auto'")
    for p in set(prompts):
        vlm.format_prompt(p)  # a bad prompt fails here, before any hashing or writing
    root, entry, key = open_entry(vlm, prompts, batch_size, cache_dir, opts, remote=remote)
    shards = entry / "shards"
    batches = [list(range(s, min(s + batch_size, source.n)))
               for s in range(0, source.n, batch_size)]
    prints = image_fingerprints(images)
    skeys = shard_keys(key, prints, prompts, batches)
    manifest = {"settings_key": key, "n_images": source.n, "batch_size": batch_size,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                "shards": [{"key": k[:32], "start": b[0], "stop": b[-1] + 1,
                            "image_ids": [source.ids[i] for i in b]}
                           for k, b in zip(skeys, batches, strict=True)]}
    expect = {"stream": (list(opts.layers) if opts.layers is not None
                         else list(range(vlm.n_layers + 1))),
              "keywords": list(opts.keywords) if opts.keywords else None}
    load = _verified_loader(images, source, prints)

    parts: list[ResidualCache] = []
    loaded = computed = 0
    with _locked(entry):
        for stale in shards.glob(".*.part"):  # left by a killed run; we hold the lock
            if writer_gone(stale):
                shutil.rmtree(stale, ignore_errors=True)
        try:
            _write_json(entry / "manifest.json", manifest)
        except OSError as exc:
            raise cache_write_error(root, exc) from None
        bar = _progress(progress, len(batches))
        for j, (b, skey) in enumerate(zip(batches, skeys, strict=True)):
            path = shards / skey[:32]
            what = (f"batch {j + 1} of {len(batches)}: images {source.ids[b[0]]}"
                    + (f" .. {source.ids[b[-1]]}" if len(b) > 1 else ""))
            part = _load_shard(path, len(b), what, expect)
            if part is None:
                part = capture(vlm, [load(i) for i in b], [prompts[i] for i in b], opts,
                               batch_size=len(b), image_ids=[source.ids[i] for i in b],
                               progress=False, engine=engine, remote=remote,
                               prefetch=prefetch)
                save_shard(part, path, root)
                computed += 1
            else:
                loaded += 1
            parts.append(part)
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()

    cache = ResidualCache.concat(parts)
    cache.image_ids = list(source.ids)  # ids are not hashed: the caller's names win
    cache.prompts = list(prompts)
    # One JSON form of the metadata whether the first shard was computed or read back.
    cache.meta = json.loads(json.dumps(parts[0].meta, default=str))
    cache.meta.pop("shard_key", None)  # of the first batch only: not the cache's
    cache.meta.update({
        "prompt": prompts[0] if len(set(prompts)) == 1 else None,
        "formatted_prompt": vlm.format_prompt(prompts[0]),
        "capture_cache": {"dir": str(entry), "settings_key": key, "batches": len(batches),
                          "loaded": loaded, "computed": computed},
    })
    return cache


def _verified_loader(images, source, prints: Sequence[str]):
    """``load(i)``: image ``i``, whose file content is checked against the fingerprint the
    shard keys were computed from (read once, hashed, decoded from the same bytes), so a
    file rewritten during the run can never be stored under its old content's key."""
    if isinstance(images, ImageDataset):  # also checks the file is as it was at load
        return lambda i: images.open(i, expect_sha256=prints[i])
    paths = [p if isinstance(p, str | os.PathLike) else None for p in images]

    def load(i: int):
        if paths[i] is None:
            return source.load(i)
        return open_rgb(paths[i], expect_sha256=prints[i])

    return load


def _progress(enabled: bool, total: int):
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc="capture (cached)")
