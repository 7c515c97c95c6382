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
import re
import socket
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .data.dataset import ImageDataset
from .data.source import image_items
from .errors import CaptureError, ConfigError, DataError, OutputError
from .lens.keyword_rule import keyword_token_ids, split_scorable

__all__ = [
    "HOST",
    "KEYWORD_SOURCES",
    "SPACES",
    "check_api_inputs",
    "check_criterion",
    "check_device",
    "check_dtype",
    "check_finite",
    "check_keywords",
    "check_output_dir",
    "check_prompt",
    "check_run",
    "check_settings",
    "check_writable_dir",
    "dataset_notes",
    "is_run_file",
    "keyword_notes",
    "run_folder_state",
    "temp_name",
    "writer_gone",
]

#: where localization keywords come from (:func:`esmc_lens.localization.keywords.choose_keywords`)
KEYWORD_SOURCES = ("auto", "user", "lm", "class_names")
#: target embedding spaces (:func:`esmc_lens.localization.targets.target_embeddings`)
SPACES = ("probs", "logits", "hidden")
# This machine in temporary names (``.<name>.<host>.<pid>.part``): a process on another host
# of a shared file system is never taken for a dead one of this host.
HOST = re.sub(r"[^A-Za-z0-9-]+", "-", socket.gethostname()) or "host"
# numpy's generators take seeds in [0, 2**32) (legacy) / any int >= 0; keep both happy.
_MAX_SEED = 2**32 - 1

_DTYPES = ("float16", "bfloat16", "float32")


# -- arguments --------------------------------------------------------------------------


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _is_real(v: object) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def check_settings(*, n_images: int | None = None, n_clusters: int | None = None,
                   alpha: float | None = None, tau: float | None = None,
                   n_samples: int | None = None, batch_size: int | str | None = None,
                   n_seeds: int | None = None, epochs: int | None = None,
                   seed: int | None = None, head_lr: float | None = None) -> None:
    """Check run settings (``None`` = not given, not checked); raise ``ConfigError``.

    ``n_clusters`` needs ``n_images``: k must be a whole number in ``[2, n_images]``;
    ``alpha`` in (0, 1]; ``tau`` in [0, 1); ``n_samples``, ``batch_size`` (or "auto"),
    ``n_seeds``, ``epochs`` >= 1; ``seed`` a whole number with ``seed + n_seeds - 1`` in
    [0, 2**32 - 1] (the seeds the scores average over); ``head_lr`` > 0 and finite.
    """
    if n_clusters is not None:
        if not _is_int(n_clusters):
            raise ConfigError(f"n_clusters={n_clusters!r} (--k) must be a whole number "
                              f"(an int) of clusters, e.g. {_as_int_hint(n_clusters)}")
        if n_clusters < 2:
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
    if seed is not None:
        span = int(n_seeds) - 1 if _is_int(n_seeds) else 0
        if not _is_int(seed) or seed < 0 or seed + span > _MAX_SEED:
            raise ConfigError(f"seed={seed!r} (--seed) must be a whole number >= 0 (with "
                              f"seed + n_seeds - 1 <= {_MAX_SEED}), e.g. 0")
    if head_lr is not None and (not _is_real(head_lr) or not 0 < float(head_lr) < float("inf")):
        raise ConfigError(f"head_lr={head_lr!r}: the head's learning rate must be a positive "
                          "number, e.g. 1e-3")


def _as_int_hint(v: object) -> str:
    try:
        return str(max(2, round(float(v))))
    except (TypeError, ValueError, OverflowError):
        return "4"


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


def is_run_file(name: str) -> bool:
    """A file name :meth:`EsmcResult.save <esmc_lens.report.result.EsmcResult.save>` (or
    ``esmc-lens run``) writes into a run folder."""
    return name in _RUN_FILES or (name.startswith("per_seed_") and name.endswith(".csv"))


_RUN_FILES = frozenset({"results.json", "result.pkl", "assignments.csv", "scores.csv",
                        "votes.csv", "skipped.csv", "cross_criterion.csv"})


def run_folder_state(path: str | os.PathLike, _depth: int = 0) -> str:
    """``"absent"``, ``"empty"``, ``"run"`` (only files a run writes: a multi-criteria run
    also holds one such folder per criterion) or ``"other"``."""
    path = Path(path).expanduser()
    if not path.exists():
        return "absent"
    if not path.is_dir():
        return "other"
    entries = list(path.iterdir())
    if not entries:
        return "empty"
    for p in entries:
        if p.is_dir() and not p.is_symlink():
            if _depth > 0 or run_folder_state(p, _depth + 1) != "run":
                return "other"
        elif not is_run_file(p.name):
            return "other"
    return "run"


def temp_name(path: Path, suffix: str = "part") -> Path:
    """``.<name>.<host>.<pid>.<suffix>`` beside ``path``: a temporary file or folder of this
    process that :func:`writer_gone` can later tell apart from a live writer's."""
    return path.with_name(f".{path.name}.{HOST}.{os.getpid()}.{suffix}")


def writer_gone(temp: Path, max_age_s: float = 86400) -> bool:
    """Whether the process that made ``temp`` (a :func:`temp_name`) is gone: on this host,
    the process is dead (or is this one); another host's, or an unknown name, once older
    than ``max_age_s`` (a shared file system: its pid means nothing here)."""
    import time

    m = re.match(r"\..*\.(?P<host>[^.]+)\.(?P<pid>\d+)\.[a-z]+$", temp.name)
    if m and m["host"] == HOST:
        pid = int(m["pid"])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except OSError:  # alive, another user's
            return False
        return pid == os.getpid()
    try:
        return time.time() - temp.stat().st_mtime > max_age_s
    except OSError:
        return False


def check_output_dir(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """``--out`` can take this run's results, checked before the run.

    A run's folder is written whole: to a temporary folder beside it, renamed into place,
    so the folder that must be writable is its parent. An existing run folder is refused
    unless ``overwrite`` (then replaced completely, never mixed); a folder holding anything
    else is refused always (nothing of the user's is deleted). Raises ``OutputError``.
    """
    path = Path(path).expanduser()
    state = run_folder_state(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"output folder {path} is a file, not a folder: pass --out a "
                          "folder you can write to with free space")
    if state == "other":
        raise OutputError(
            f"output folder {path} already holds files that no esmc-lens run wrote: pass "
            "--out a new or empty folder (nothing there is deleted or overwritten)")
    if state == "run" and not overwrite:
        raise OutputError(
            f"output folder {path} already holds a saved run: pass --out a new folder, or "
            "--overwrite (API: save(..., overwrite=True)) to replace that run completely")
    check_writable_dir(path.parent, "output folder's parent",
                       "pass --out a folder you can write to with free space",
                       error=OutputError)
    return path


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
    token = getattr(getattr(vlm, "processor", None), "image_token", None) or "<image>"
    check_prompt(prompt, token)
    if isinstance(images, ImageDataset) and criterion is not None:
        check_criterion(images, criterion)
    check_settings(n_images=n_images, **settings)

def check_keywords(keywords, source: str = "auto") -> None:
    """``keywords`` (None, one comma-separated string, or words) and their ``source`` can be
    used; ``ConfigError`` saying what was expected otherwise."""
    if not isinstance(source, str) or source not in KEYWORD_SOURCES:
        raise ConfigError(f"keyword_source={source!r} (--keyword-source): use one of "
                          f"{', '.join(KEYWORD_SOURCES)}")
    if keywords is None:
        if source == "user":
            raise ConfigError("keyword_source='user' needs keywords: pass keywords=[...] "
                              "(--keywords red,white,pink)")
        return
    if hasattr(keywords, "words") and hasattr(keywords, "sources"):  # a Keywords object
        words = list(keywords.words)
    elif isinstance(keywords, str):
        words = [w for w in keywords.replace(";", ",").replace("\n", ",").split(",")]
    else:
        try:
            words = list(keywords)
        except TypeError:
            raise ConfigError(f"keywords={keywords!r}: expected a list of words, e.g. "
                              "['red', 'white', 'pink']") from None
    bad = [w for w in words if not isinstance(w, str)]
    if bad:
        raise ConfigError(f"keywords must be words (str); got {bad[:3]!r}: e.g. ['red', "
                          "'white', 'pink']")
    if not any(w.strip() for w in words):
        raise ConfigError(f"no keywords in {keywords!r}: give words such as 'red, white, "
                          "pink'")


def _looks_like_vlm(vlm) -> bool:
    return all(hasattr(vlm, a) for a in ("model", "processor", "tokenizer", "format_prompt"))


def check_api_inputs(vlm, images, prompt, *, criterion=None, y_true=None, class_names=None,
                     keywords=None, keyword_source: str = "auto", space: str = "probs",
                     cache_dir=None, baselines=True, progress=True, **settings) -> int:
    """The types and values of :func:`~esmc_lens.pipeline.run_esmc`'s arguments, checked
    before any work; returns the number of images.

    Every message says what was expected: a loaded model (not its name), a dataset or a
    list of images (not one path; NumPy arrays must be uint8 pixels), whole numbers for
    counts and ``n_clusters``, a known ``keyword_source`` and ``space``, labels that match
    the images. ``prompt``, ``n_clusters`` and ``keywords`` may be mappings criterion name ->
    value (a multi-criteria run): each value is checked. ``settings``: any of
    :func:`check_settings`'s (others are ignored, so the orchestrator may pass arguments
    this function does not know).
    """
    if isinstance(vlm, str | os.PathLike):
        raise ConfigError(f"vlm={str(vlm)!r} is a model name, not a loaded model: pass "
                          f"load_model({str(vlm)!r}) (e.g. vlm = load_model('offline'))")
    if not _looks_like_vlm(vlm):
        raise ConfigError(f"vlm is a {type(vlm).__name__}: expected a loaded model, "
                          "load_model('offline') or load_model('<hub id or folder>')")
    token = getattr(getattr(vlm, "processor", None), "image_token", None) or "<image>"
    multi = isinstance(prompt, Mapping)  # several criteria: name -> prompt
    for p in (prompt.values() if multi else [prompt]):
        check_prompt(p, token)
    items = None if isinstance(images, ImageDataset) else image_items(images)
    n = len(images) if items is None else len(items)
    if n == 0:
        raise ConfigError("no images given: pass an ImageDataset or a list of images")
    missing = [str(p) for p in items or () if isinstance(p, str | os.PathLike)
               and not Path(p).expanduser().is_file()]
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise DataError(f"{len(missing)} image path(s) are not files: {', '.join(missing[:3])}"
                        f"{more}: check the paths")
    if criterion is not None and not isinstance(criterion, str):
        raise ConfigError(f"criterion={criterion!r}: expected a criterion folder name (str), "
                          "e.g. 'color'")
    if isinstance(images, ImageDataset) and criterion is not None:
        check_criterion(images, criterion)
    if y_true is not None:
        y = np.asarray(y_true)
        if y.ndim != 1 or len(y) != n or not np.issubdtype(y.dtype, np.integer):
            raise ConfigError(f"y_true must be {n} integer labels (one per image, -1 for "
                              f"unknown); got shape {y.shape} of {y.dtype}")
        if class_names is not None and len(y) and y.max() >= len(class_names):
            raise ConfigError(f"y_true holds label {int(y.max())} but class_names has "
                              f"{len(class_names)} names: give a name per label")
    if class_names is not None and (isinstance(class_names, str) or any(
            not isinstance(c, str) for c in class_names)):
        raise ConfigError(f"class_names={class_names!r}: expected a list of names (str)")
    for kw in (keywords.values() if isinstance(keywords, Mapping) else [keywords]):
        check_keywords(kw, keyword_source)
    if keyword_source == "class_names" and not (isinstance(images, ImageDataset)
                                                and (criterion is not None or multi)):
        raise ConfigError("keyword_source='class_names' takes the class folder names of a "
                          "dataset criterion: pass an ImageDataset and criterion=...")
    if space not in SPACES:
        raise ConfigError(f"space={space!r} (--space): use one of {', '.join(SPACES)}")
    if cache_dir is not None and not isinstance(cache_dir, str | os.PathLike):
        raise ConfigError(f"cache_dir={cache_dir!r}: expected a folder path (str or Path)")
    for name, value in (("baselines", baselines), ("progress", progress)):
        if not isinstance(value, bool | np.bool_):
            raise ConfigError(f"{name}={value!r}: expected True or False")
    known = {k: v for k, v in settings.items() if k in _SETTINGS}
    ks = known.pop("n_clusters", None)
    for k in (ks.values() if isinstance(ks, Mapping) else [ks]):  # one per criterion
        check_settings(n_images=n, n_clusters=k, **known)
    return n


_SETTINGS = frozenset({"n_clusters", "alpha", "tau", "n_samples", "batch_size", "n_seeds",
                       "epochs", "seed", "head_lr"})

# -- keywords and features ------------------------------------------------------------


def keyword_notes(tokenizer, keywords: Sequence[str]) -> list[str]:
    """What the keyword rule (:mod:`esmc_lens.lens.keyword_rule`) had to compromise on for
    ``keywords``, one line per kind: keywords it cannot score (dropped by the pipeline),
    keywords scored by first pieces (no surface form is one token), and keywords sharing a
    token (equal scores for it)."""
    ok, bad = split_scorable(tokenizer, [str(k).strip() for k in keywords if str(k).strip()])
    notes = []
    if bad:
        notes.append(f"keywords {bad} cannot be scored by the lens: no surface form is one "
                     "token of the vocabulary and no first piece of >= 3 letters covers half "
                     "of the keyword without being a common word (or they encode to the "
                     "unknown token); use other single words")
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

