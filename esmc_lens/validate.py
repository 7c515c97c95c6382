"""Input checks: every bad input is named, with its fix, before hours of compute are spent.

The functions here raise :class:`~esmc_lens.errors.ConfigError` (an argument out of range),
:class:`~esmc_lens.errors.DataError` (a dataset that cannot be used as asked) or
:class:`~esmc_lens.errors.CaptureError` (a cache folder that cannot be written), or return
human-readable notes for things that are reported rather than refused (unlabelled images,
keywords the vocabulary splits). ``docs/errors.md`` lists every kind of bad input and
where it is caught.

>>> check_settings(n_images=16, n_clusters=4, alpha=0.3, tau=0.2)   # fine: returns None
>>> check_settings(n_images=16, n_clusters=1)                         # doctest: +SKIP
ConfigError: n_clusters=1 (--k 1): need 2 <= k <= 16, the number of images; ...
"""

from __future__ import annotations

import numbers
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .errors import CaptureError, ConfigError, DataError

__all__ = [
    "check_criterion",
    "check_device",
    "check_dtype",
    "check_finite",
    "check_output_dir",
    "check_prompt",
    "check_run",
    "check_settings",
    "check_writable_dir",
    "dataset_notes",
    "keyword_notes",
]

_DTYPES = ("float16", "bfloat16", "float32")


# -- arguments --------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_settings(*, n_images: int | None = None, n_clusters: int | None = None,
                   alpha: float | None = None, tau: float | None = None,
                   n_samples: int | None = None, batch_size: int | str | None = None,
                   n_seeds: int | None = None, epochs: int | None = None) -> None:
    """Check run settings (``None`` = not given, not checked); raise ``ConfigError``.

    ``n_clusters`` needs ``n_images``: k must be in ``[2, n_images]``; ``alpha`` in (0, 1];
    ``tau`` in [0, 1); ``n_samples``, ``batch_size`` (or "auto"), ``n_seeds``,
    ``epochs`` >= 1.
    """
    if n_clusters is not None:
        if not _is_int(n_clusters) or n_clusters < 2:
            raise ConfigError(f"n_clusters={n_clusters!r} (--k): ESMC needs at least 2 "
                              "clusters; give k >= 2")
        if n_images is not None and n_clusters > n_images:
            raise ConfigError(f"n_clusters={n_clusters} (--k) is more than the {n_images} "
                              f"images: give 2 <= k <= {n_images}, or add images")
    if alpha is not None and (not _is_real(alpha) or not 0 < float(alpha) <= 1):
        raise ConfigError(f"alpha={alpha!r} (--alpha): the pseudo-label ratio must be in "
                          "(0, 1]; the paper uses 0.1-0.4")
    if tau is not None and (not _is_real(tau) or not 0 <= float(tau) < 1):
        raise ConfigError(f"tau={tau!r} (--tau): the vote threshold is a probability in "
                          "[0, 1); the paper uses 0.2")
    if batch_size == "auto":  # capture() picks the largest batch that fits
        batch_size = None
    for name, flag, value in (("n_samples", "--n-samples", n_samples),
                              ("batch_size", "--batch-size", batch_size),
                              ("n_seeds", "--n-seeds", n_seeds), ("epochs", "epochs", epochs)):
        if value is not None and (not _is_int(value) or value < 1):
            raise ConfigError(f"{name}={value!r} ({flag}) must be a whole number >= 1")


def check_prompt(prompt: object, image_token: str | None = "<image>") -> str:
    """The prompt, stripped; ``ConfigError`` if it is empty, not text, or holds the image
    placeholder (the chat template inserts the image itself)."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise ConfigError(f"prompt={prompt!r} is empty: give the criterion as words, e.g. "
                          "'The color of the flower is'")
    if image_token and image_token in prompt:
        raise ConfigError(f"prompt {prompt!r} contains the image placeholder "
                          f"{image_token!r}; the chat template adds the image itself: "
                          "remove it from the prompt")
    return prompt.strip()


def check_device(device):
    """``torch.device`` of ``device``; ``ConfigError`` if it is unknown or not present."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"device {device!r} (--device) is not a device name ({exc}); use "
                          "cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ConfigError(f"device {device!r} (--device): no CUDA GPU is visible to torch "
                              "here; use --device cpu (or leave --device out)")
        if dev.index is not None and dev.index >= n:
            raise ConfigError(f"device {device!r} (--device): only {n} CUDA device(s) are "
                              f"visible; use cuda:0..cuda:{n - 1}")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {device!r} (--device): MPS is not available; use cpu")
    return dev


def check_dtype(dtype):
    """``torch.dtype`` of ``dtype`` (a dtype or its name); ``ConfigError`` otherwise."""
    import torch

    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    name = str(dtype).replace("torch.", "")
    aliases = {"fp16": "float16", "half": "float16", "bf16": "bfloat16", "fp32": "float32",
               "float": "float32"}
    name = aliases.get(name, name)
    if name not in _DTYPES:
        raise ConfigError(f"dtype {dtype!r} (--dtype): use one of {', '.join(_DTYPES)}")
    return getattr(torch, name)


# -- folders ------------------------------------------------------------------------------


def check_writable_dir(path: str | os.PathLike, what: str, fix: str,
                       error: type[Exception] = CaptureError) -> Path:
    """Create ``path`` if needed and write (then delete) a probe file in it.

    Raises ``error`` naming ``what`` (e.g. "capture cache directory"), the folder, the
    operating system's reason and ``fix``. Checks by writing, not ``os.access``, so a
    read-only mount, a full disk and a path that is a file are all caught, also for root.
    """
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise error(f"{what} {path} is a file, not a folder: {fix}")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".esmc-probe-") as f:
            f.write(b"esmc_lens write probe")
            f.flush()
            os.fsync(f.fileno())
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise error(f"{what} {path} is not writable ({reason}): {fix}") from None
    return path


def check_output_dir(path: str | os.PathLike) -> Path:
    """``--out`` can be created and written (checked before the run, not after it)."""
    return check_writable_dir(path, "output folder", "pass --out a folder you can write to "
                              "with free space", error=ConfigError)


# -- datasets -------------------------------------------------------------------------------


def check_criterion(dataset, criterion: str) -> None:
    """``criterion`` is a folder of ``dataset`` with at least two classes (``DataError``)."""
    if criterion not in dataset.criteria:
        raise DataError(f"criterion {criterion!r} is not a folder of {dataset.root}; its "
                        f"criteria are {dataset.criteria}")
    classes = dataset.classes[criterion]
    if len(classes) < 2:
        found = f"only the class {classes[0]!r}" if classes else "no class"
        raise DataError(f"criterion folder {Path(dataset.root) / criterion} has {found} with "
                        "readable images; a criterion needs at least two class folders "
                        f"(<criterion>/<class>/<image>): add classes or choose another "
                        "criterion")


def dataset_notes(dataset, criterion: str | None = None,
                  skipped_csv: str | None = None) -> list[str]:
    """What a run will not use or not score, one line each (empty when nothing to say)."""
    notes = []
    skipped = getattr(dataset, "skipped", None)
    if skipped is not None and len(skipped):
        reasons = skipped["reason"].astype(str).str.replace(r" \(.*", "", regex=True)
        counts = reasons.str.split(":").str[0].value_counts()
        top = "; ".join(f"{n} {r}" for r, n in counts.head(4).items())
        notes.append(f"skipped {len(skipped)} files or folders of {dataset.root} ({top}); "
                     f"listed in {skipped_csv or 'ImageDataset.skipped'}")
    if criterion is not None and criterion in getattr(dataset, "criteria", ()):
        missing = int((dataset.y(criterion) < 0).sum())
        if missing:
            notes.append(f"{missing} of {len(dataset)} images have no {criterion!r} label "
                         "(they sit under other criteria only): they are clustered but "
                         "left out of the scores")
    return notes


def check_run(vlm, images, prompt: str, *, criterion: str | None = None,
              n_images: int | None = None, **settings) -> None:
    """Everything :func:`~esmc_lens.pipeline.run_esmc` can check before touching the model:
    the prompt, the criterion of a dataset (exists, >= 2 classes) and ``settings`` (see
    :func:`check_settings`)."""
    from .data.dataset import ImageDataset

    token = getattr(getattr(vlm, "processor", None), "image_token", None) or "<image>"
    check_prompt(prompt, token)
    if isinstance(images, ImageDataset) and criterion is not None:
        check_criterion(images, criterion)
    check_settings(n_images=n_images, **settings)

# -- keywords and features ------------------------------------------------------------


def keyword_notes(tokenizer, keywords: Sequence[str]) -> list[str]:
    """What the keyword rule (:mod:`esmc_lens.lens.keyword_rule`) had to compromise on for
    ``keywords``, one line per kind: keywords it cannot score (dropped by the pipeline),
    keywords scored by first pieces (no surface form is one token), and keywords sharing a
    token (equal scores for it)."""
    from .lens.keyword_rule import keyword_token_ids, split_scorable

    ok, bad = split_scorable(tokenizer, [str(k).strip() for k in keywords if str(k).strip()])
    notes = []
    if bad:
        notes.append(f"keywords {bad} cannot be scored by the lens: no surface form is one "
                     "token of the vocabulary and no first piece is a >= 3-letter word that "
                     "is not a common one (or they encode to the unknown token); use other "
                     "single words")
    kt = keyword_token_ids(tokenizer, ok)
    if kt.multi_token:
        shown = "; ".join(f"{w!r} -> {kt.pieces[w]}" for w in kt.multi_token[:5])
        notes.append(f"{len(kt.multi_token)} keyword(s) are not single tokens of the "
                     f"vocabulary and are scored by the first pieces of their split forms: "
                     f"{shown}; prefer single common words")
    for ws in dict.fromkeys(tuple(dict.fromkeys(o)) for o in kt.clashes.values()):
        notes.append(f"keywords {list(ws)} share a scoring token and get the same lens score "
                     "for it: keep one of them")
    return notes


def check_finite(X, image_ids: Sequence[str] | None = None, what: str = "features") -> None:
    """``ConfigError`` naming the images whose rows of ``X`` hold NaN or inf."""
    X = np.asarray(X)
    if X.size == 0 or np.isfinite(X).all():
        return
    rows = np.flatnonzero(~np.isfinite(X.reshape(X.shape[0], -1)).all(axis=1))
    names = [str(image_ids[i]) if image_ids is not None else str(i) for i in rows[:5]]
    more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
    share = f"{len(rows)} of {X.shape[0]}"
    raise ConfigError(
        f"{what} of {share} images are NaN or infinite ({', '.join(names)}{more}): the model "
        "overflowed; run in float32 (--dtype float32), or remove those images if only a few "
        "are affected")

