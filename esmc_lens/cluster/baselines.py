"""What a results table compares ESMC against, scored over seeds (paper Tables 1-3).

Every function returns a :class:`pandas.DataFrame` with one row per seed (index ``seed``)
and the columns of :func:`esmc_lens.cluster.metrics.clustering_scores` (``nmi``, ``ri``, ``ari``,
``acc``, ``vi``); :func:`summarize` reduces it to a mean and a std per metric and
:func:`score_table` / :func:`format_mean_std` build the table.

* :func:`kmeans_scores`: k-means on any features ("ESMC, w/o MLP" in Table 3 when the
  features are the target embeddings). "For methods involving k-means, the average result
  of 10 times is reported": seeds ``0..9`` by default, ``KMeans(n_init=10,
  random_state=seed)``.
* :func:`head_scores`: the full ESMC clustering head
  (:class:`~esmc_lens.cluster.head.PseudoLabelHead`, ``random_state=seed``).
* :func:`output_baseline`: the generated answers embedded by a text encoder, then k-means
  ("Output" in Table 3; the paper used CLIP's text encoder, the offline default is
  all-MiniLM-L6-v2).
* :func:`vision_baseline`: k-means on vision-side features ("vision-only");
  :func:`vision_baselines` scores both variants a capture supports, named by their inputs
  (:func:`vision_features`): ``"Vision only (all vision-side features)"``, everything the
  model's vision side hands its language model (the offline model: EfficientNet-Lite0's
  pooled feature, the colour reader's 49 patch colour posteriors and its foreground colour
  distribution, each block scaled to unit RMS norm), the fair comparison with ESMC, which
  reads the same inputs through the LM; and ``"Vision only (<pooled block>)"``, the vision
  tower's pooled feature alone (``"EfficientNet pooled"`` for the offline model). A real
  LLaVA's language model sees its vision tower's output only, so its captures hold one
  block, the tower's pooled feature, and give one row, ``"Vision only (vision tower
  pooled)"``.

Samples whose true label is missing (``y_true == -1``) are clustered with the others (they
are part of the data) but dropped from every score, as :mod:`esmc_lens.cluster.metrics` does.
Results are deterministic given the seeds (same machine, same library versions); the
optional ``seconds`` column (``timing=True``) is the only exception.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike

from ..errors import ConfigError
from ..models.text_encoder import load_text_encoder
from .head import BASES, PseudoLabelHead, SpanBasis
from .metrics import clustering_scores

__all__ = [
    "METRICS",
    "embed_answers",
    "format_mean_std",
    "head_scores",
    "kmeans_scores",
    "output_baseline",
    "preprocess_features",
    "score_table",
    "summarize",
    "vision_baseline",
    "vision_baselines",
    "vision_features",
]

METRICS = ("nmi", "ri", "ari", "acc", "vi")
TABLE_METRICS = ("nmi", "ri", "ari", "acc")
_PREPROCESS = (None, "none", "standardize", "l2")


# --------------------------------------------------------------------------- inputs


def _as_features(X: ArrayLike) -> np.ndarray:
    """2-D float32/float64 numpy array from a numpy array, list or torch tensor."""
    if hasattr(X, "detach"):  # torch.Tensor, any device or dtype (fp16/bf16 included)
        X = X.detach().cpu().float().numpy()
    X = np.asarray(X)
    if X.ndim != 2:
        raise ConfigError(f"features must be a 2-D array [n_samples, n_features], got {X.shape}")
    if X.dtype not in (np.float32, np.float64):
        X = X.astype(np.float64 if X.dtype.kind in "iub" else np.float32)
    if not np.all(np.isfinite(X)):
        raise ConfigError("features contain NaN or inf; drop or repair those samples first")
    return X


def _as_labels(y_true: ArrayLike, n: int) -> np.ndarray:
    y = np.asarray(y_true)
    if y.ndim != 1 or y.shape[0] != n:
        raise ConfigError(f"y_true must be a 1-D vector of length {n}, got shape {y.shape}")
    return y


def _as_seeds(seeds: Iterable[int] | int) -> list[int]:
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        seeds = [seeds]
    out = [int(s) for s in seeds]
    if not out:
        raise ConfigError("seeds is empty; pass e.g. seeds=range(10)")
    if len(set(out)) != len(out):
        raise ConfigError(f"seeds must be distinct, got {out}")
    return out


def _check_k(n_clusters: int, n: int) -> int:
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)) \
            or not 2 <= n_clusters <= n:
        raise ConfigError(f"n_clusters must be an int in [2, n_samples={n}], got {n_clusters!r}")
    return int(n_clusters)


def preprocess_features(X: ArrayLike, preprocess: str | None = None) -> np.ndarray:
    """Optional feature scaling before k-means.

    Parameters
    ----------
    X : array-like or torch.Tensor, shape (n_samples, n_features)
    preprocess : None / "none" (default, as the paper: raw features), "standardize"
        (z-score every feature over the samples; constant features only centred) or "l2"
        (scale every row to unit L2 norm; all-zero rows stay zero).

    Returns
    -------
    numpy.ndarray, shape (n_samples, n_features), float32 or float64 like the input
    """
    X = _as_features(X)
    if preprocess not in _PREPROCESS:
        raise ConfigError(f"preprocess must be one of {_PREPROCESS}, got {preprocess!r}")
    if preprocess in (None, "none"):
        return X
    if preprocess == "standardize":
        mean = X.mean(axis=0)
        scale = X.std(axis=0)
        return ((X - mean) / np.where(scale > 0, scale, 1.0)).astype(X.dtype, copy=False)
    norms = np.linalg.norm(X, axis=1, keepdims=True)
    return (X / np.where(norms > 0, norms, 1.0)).astype(X.dtype, copy=False)


def _over_seeds(seeds: list[int], progress: bool | str):
    """``seeds``, behind a progress bar when ``progress`` (a string names the bar)."""
    if not progress or len(seeds) < 2:
        return seeds
    from tqdm.auto import tqdm

    return tqdm(seeds, desc=progress if isinstance(progress, str) else "seeds", unit="seed")


def kmeans_space(X: np.ndarray, basis: str = "auto") -> np.ndarray:
    """Where k-means runs: ``X``, or (``basis="span"``, or "auto" with more features than
    samples) its coordinates in an orthonormal basis of its rows' span (same distances, so
    the same partitions to fp rounding; n instead of n_features columns)."""
    if basis not in BASES:
        raise ConfigError(f"basis={basis!r}: use one of {BASES}")
    if basis == "span" or (basis == "auto" and X.shape[1] > X.shape[0]):
        return SpanBasis(X).coords
    return X


def _frame(rows: list[dict], seeds: list[int]) -> pd.DataFrame:
    df = pd.DataFrame(rows, index=pd.Index(seeds, name="seed"))
    return df


def _result(rows, seeds, labels, return_labels):
    df = _frame(rows, seeds)
    if return_labels:
        return df, np.stack(labels).astype(np.int64)
    return df


# --------------------------------------------------------------------------- methods


def kmeans_scores(
    X: ArrayLike,
    y_true: ArrayLike,
    n_clusters: int,
    seeds: Iterable[int] | int = range(10),
    n_init: int = 10,
    preprocess: str | None = None,
    return_labels: bool = False,
    timing: bool = False,
    basis: str = "auto",
    progress: bool | str = False,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """k-means once per seed, scored against ``y_true``.

    Parameters
    ----------
    X : array-like or torch.Tensor, shape (n_samples, n_features)
        Features. All samples are clustered, labelled or not.
    y_true : array-like, shape (n_samples,)
        Ground truth; ``-1`` = missing (not scored).
    n_clusters : int
        K (usually the number of classes of the criterion).
    seeds : iterable of int or int, default range(10)
        ``KMeans(random_state=seed)``; the paper averages 10 runs.
    n_init : int, default 10
        k-means restarts within one run (best inertia kept).
    preprocess : None, "standardize" or "l2", default None
        See :func:`preprocess_features`; None (raw features) is what the paper does.
    return_labels : bool, default False
        Also return the predicted labels.
    timing : bool, default False
        Add a ``seconds`` column (wall time of each fit; not deterministic).
    basis : "auto", "span" or "features", default "auto"
        See :func:`kmeans_space` (after ``preprocess``).
    progress : bool or str, default False
        A progress bar over the seeds (a string is its label).

    Returns
    -------
    scores : pandas.DataFrame, index ``seed``
        Columns ``nmi``, ``ri``, ``ari``, ``acc``, ``vi``, ``inertia`` (+ ``seconds``).
    labels : numpy.ndarray of int64, shape (n_seeds, n_samples)
        Only if ``return_labels``; row ``i`` belongs to ``scores.index[i]``.
    """
    from sklearn.cluster import KMeans

    X = preprocess_features(X, preprocess)
    y = _as_labels(y_true, X.shape[0])
    k = _check_k(n_clusters, X.shape[0])
    seeds = _as_seeds(seeds)
    X = kmeans_space(X, basis)
    rows, labels = [], []
    for seed in _over_seeds(seeds, progress):
        t0 = time.perf_counter()
        km = KMeans(n_clusters=k, n_init=n_init, random_state=seed)
        pred = km.fit_predict(X)
        elapsed = time.perf_counter() - t0
        row = clustering_scores(y, pred)
        row["inertia"] = float(km.inertia_)
        if timing:
            row["seconds"] = elapsed
        rows.append(row)
        labels.append(pred)
    return _result(rows, seeds, labels, return_labels)


def head_scores(
    X: ArrayLike,
    y_true: ArrayLike,
    n_clusters: int,
    alpha: float,
    seeds: Iterable[int] | int = range(10),
    return_labels: bool = False,
    timing: bool = False,
    progress: bool | str = False,
    **head_kwargs,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """ESMC's clustering head (k-means + pseudo-label MLP) once per seed.

    Parameters
    ----------
    X, y_true, n_clusters, seeds, return_labels, timing
        As in :func:`kmeans_scores`.
    alpha : float in (0, 1]
        Pseudo-label fraction (paper: 0.1 CMU_face/Card, 0.2 Fruit360/CIFAR10,
        0.3 Stanford_Cars/Flowers, 0.4 Fruit).
    progress : bool or str, default False
        A progress bar over the seeds (a string is its label).
    **head_kwargs
        Further :class:`~esmc_lens.cluster.head.PseudoLabelHead` arguments (``hidden_dim``,
        ``epochs``, ``lr``, ``standardize``, ``n_init``, ``device``, ``basis``, ...);
        ``random_state`` is set to each seed. With ``basis="span"`` the basis is built
        once and shared by every seed (it depends on ``X`` only).

    Returns
    -------
    scores : pandas.DataFrame, index ``seed``
        Columns ``nmi``, ``ri``, ``ari``, ``acc``, ``vi`` of the head's predictions,
        ``kmeans_nmi`` / ``kmeans_ri`` of its own k-means step (before the MLP),
        ``final_loss`` (+ ``seconds``: fit time, Table 4).
    labels : numpy.ndarray of int64, shape (n_seeds, n_samples)
        Only if ``return_labels``.
    """
    if "random_state" in head_kwargs:
        raise ConfigError("head_scores sets random_state from seeds; pass seeds=... instead")
    X = _as_features(X)
    y = _as_labels(y_true, X.shape[0])
    k = _check_k(n_clusters, X.shape[0])
    seeds = _as_seeds(seeds)
    rows, labels = [], []
    span = None
    for seed in _over_seeds(seeds, "ESMC head (seeds)" if progress is True else progress):
        t0 = time.perf_counter()
        head = PseudoLabelHead(n_clusters=k, alpha=alpha, random_state=seed, **head_kwargs)
        pred = head.fit(X, span=span).labels_
        span = getattr(head, "span_", None)
        elapsed = time.perf_counter() - t0
        row = clustering_scores(y, pred)
        km = clustering_scores(y, head.kmeans_labels_)
        row["kmeans_nmi"] = km["nmi"]
        row["kmeans_ri"] = km["ri"]
        row["final_loss"] = float(head.loss_curve_[-1])
        if timing:
            row["seconds"] = elapsed
        rows.append(row)
        labels.append(pred)
    return _result(rows, seeds, labels, return_labels)


def embed_answers(answers: Sequence[str], encoder="minilm", batch_size: int = 64) -> np.ndarray:
    """Text-encoder embeddings of generated answers, one row per answer.

    Answers are stripped of surrounding whitespace; each distinct answer is encoded once.
    ``encoder`` is a :class:`~esmc_lens.models.text_encoder.TextEncoder` or a name for
    :func:`~esmc_lens.models.text_encoder.load_text_encoder` (``"minilm"``, ``"clip"``, ...).
    """
    if isinstance(answers, str):
        raise ConfigError("answers must be a list of strings, one per image, not one string")
    texts = ["" if a is None else str(a).strip() for a in answers]
    enc = load_text_encoder(encoder)
    unique = sorted(set(texts))
    emb = enc.encode(unique, batch_size=batch_size)
    where = {t: i for i, t in enumerate(unique)}
    return emb[[where[t] for t in texts]]


def output_baseline(
    answers: Sequence[str],
    y_true: ArrayLike,
    n_clusters: int,
    encoder="minilm",
    seeds: Iterable[int] | int = range(10),
    n_init: int = 10,
    batch_size: int = 64,
    return_labels: bool = False,
    progress: bool | str = False,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """The "Output" baseline of Table 3: embed the generated answers, then k-means.

    Parameters
    ----------
    answers : list of str, one per image
        The model's generated answers (e.g. ``VLM.generate(images, prompt)``).
    y_true, n_clusters, seeds, n_init, return_labels, progress
        As in :func:`kmeans_scores` (raw embeddings, which are unit-norm).
    encoder : TextEncoder or str, default "minilm"
        The paper used CLIP's text encoder (``"clip"``, needs hub access); the offline
        default is all-MiniLM-L6-v2. Load it once and pass the object when calling
        repeatedly.
    batch_size : int, default 64
        Texts per encoder forward pass.

    Returns
    -------
    As :func:`kmeans_scores`.
    """
    X = embed_answers(answers, encoder, batch_size=batch_size)
    return kmeans_scores(X, y_true, n_clusters, seeds=seeds, n_init=n_init,
                         return_labels=return_labels, progress=progress)


VISION_INPUTS = ("all", "pooled")
_NO_VISION = ("no vision features: the cache was captured without them; "
              "capture(..., vision=True)")
ALL_VISION_NAME = "Vision only (all vision-side features)"


def vision_baseline(
    vision_features: ArrayLike,
    y_true: ArrayLike,
    n_clusters: int,
    seeds: Iterable[int] | int = range(10),
    n_init: int = 10,
    preprocess: str | None = None,
    return_labels: bool = False,
    inputs: str = "all",
    progress: bool | str = False,
) -> pd.DataFrame | tuple[pd.DataFrame, np.ndarray]:
    """k-means on vision features ("vision-only" baseline).

    Parameters
    ----------
    vision_features : array-like or torch.Tensor, shape (n_samples, d_vision), or a
        :class:`~esmc_lens.residual.cache.ResidualCache` captured with ``vision=True``,
        whose :func:`vision_features` with ``inputs`` are clustered.
    inputs : "all" (default) or "pooled", for a cache (see :func:`vision_features`).
    Others : as :func:`kmeans_scores`.
    """
    if hasattr(vision_features, "vision_blocks"):
        feats, _ = _cache_vision(vision_features, inputs)
    else:
        feats = getattr(vision_features, "vision", vision_features)
        if feats is None:
            raise ConfigError(_NO_VISION)
    return kmeans_scores(feats, y_true, n_clusters, seeds=seeds, n_init=n_init,
                         preprocess=preprocess, return_labels=return_labels,
                         progress=progress)


def vision_features(cache, inputs: str = "all") -> tuple[np.ndarray, str]:
    """The vision-only baseline's features of a capture, and its method name.

    Parameters
    ----------
    cache : :class:`~esmc_lens.residual.cache.ResidualCache` captured with ``vision=True``
        (anything with ``vision`` [n, d] and ``vision_blocks()``).
    inputs : "all" (default) or "pooled"
        "all": every block the vision side gives the language model
        (:meth:`~esmc_lens.models.vlm.VLM.vision_side`), side by side, each divided by the
        root mean square of its rows' L2 norms over the images, so each block weighs the
        same in k-means' squared distances whatever its width or units (label-free: only
        the features are read). A single block is returned unscaled. "pooled": the first
        block (the vision tower's pooled feature), unscaled.

    Returns
    -------
    features : numpy.ndarray, shape (n_images, d), float32 or float64
    name : str
        ``"Vision only (all vision-side features)"`` for several blocks, else
        ``"Vision only (<block name>)"``, e.g. ``"Vision only (EfficientNet pooled)"``.
    """
    return _cache_vision(cache, inputs)


def _cache_vision(cache, inputs: str) -> tuple[np.ndarray, str]:
    if inputs not in VISION_INPUTS:
        raise ConfigError(f"inputs={inputs!r}: use one of {VISION_INPUTS}")
    if getattr(cache, "vision", None) is None:
        raise ConfigError(_NO_VISION)
    X = _as_features(cache.vision)
    blocks = cache.vision_blocks()
    first = next(iter(blocks))
    if inputs == "pooled" or len(blocks) == 1:
        return X[:, blocks[first]], f"Vision only ({first})"
    parts = []
    for cols in blocks.values():
        B = X[:, cols]
        rms = float(np.sqrt(np.mean(np.sum(B.astype(np.float64) ** 2, axis=1))))
        parts.append(B / rms if rms > 0 else B)
    return np.concatenate(parts, axis=1).astype(X.dtype, copy=False), ALL_VISION_NAME


def vision_baselines(
    cache,
    y_true: ArrayLike,
    n_clusters: int,
    seeds: Iterable[int] | int = range(10),
    n_init: int = 10,
    progress: bool | str = False,
) -> dict[str, pd.DataFrame]:
    """Method name -> per-seed scores of each vision-only variant the capture supports.

    The fair variant first (``inputs="all"``, :func:`vision_features`), then the pooled
    feature alone when the vision side has more than that (the offline model); a capture
    with one block (LLaVA) gives one entry. k-means as in :func:`kmeans_scores`.
    """
    variants = VISION_INPUTS if len(cache.vision_blocks()) > 1 else ("pooled",)
    out = {}
    for inputs in variants:
        X, name = vision_features(cache, inputs)
        out[name] = kmeans_scores(X, y_true, n_clusters, seeds=seeds, n_init=n_init,
                                  progress=progress)
    return out


# --------------------------------------------------------------------------- tables


def _mean_std(values: np.ndarray, ddof: int) -> tuple[float, float]:
    """Mean and std, computed around the first value with an exactly rounded sum.

    Identical values give exactly that value and exactly 0.
    """
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if v.size == 0:
        return math.nan, math.nan
    x0 = float(v[0])
    mean = x0 + math.fsum(float(d) for d in v - x0) / v.size
    if v.size - ddof <= 0:
        return mean, math.nan
    dev = v - mean
    std = math.sqrt(math.fsum(float(d) * float(d) for d in dev) / (v.size - ddof))
    return mean, std


def summarize(df: pd.DataFrame, metrics: Sequence[str] | None = None,
              ddof: int = 0) -> pd.DataFrame:
    """Mean and standard deviation of each metric over the seeds (rows) of ``df``.

    Parameters
    ----------
    df : pandas.DataFrame
        Per-seed scores (as returned by :func:`kmeans_scores` and friends).
    metrics : sequence of str, optional
        Columns to summarise; default every numeric column.
    ddof : int, default 0
        Std degrees of freedom: 0 = population std (``numpy.std``), 1 = sample std.

    Returns
    -------
    pandas.DataFrame
        Index = metric, columns ``mean``, ``std``, ``n`` (number of seeds). NaNs are
        ignored. Equal values give exactly their value as mean and 0.0 as std.
    """
    if metrics is None:
        metrics = [c for c in df.columns if pd.api.types.is_numeric_dtype(df[c])]
    missing = [m for m in metrics if m not in df.columns]
    if missing:
        raise ConfigError(f"no column {missing} in the scores; columns: {list(df.columns)}")
    out = {}
    for m in metrics:
        mean, std = _mean_std(df[m].to_numpy(dtype=np.float64), ddof)
        out[m] = {"mean": mean, "std": std, "n": int(df[m].notna().sum())}
    res = pd.DataFrame.from_dict(out, orient="index", columns=["mean", "std", "n"])
    res.index.name = "metric"
    return res


def score_table(rows: Mapping[str, pd.DataFrame], metrics: Sequence[str] = TABLE_METRICS,
                ddof: int = 0) -> pd.DataFrame:
    """Combine per-seed scores of several methods into one table.

    Parameters
    ----------
    rows : mapping method name -> per-seed scores DataFrame
        Insertion order is kept. A metric a method lacks is NaN.
    metrics : sequence of str, default ("nmi", "ri", "ari", "acc")
    ddof : int, default 0
        As in :func:`summarize`.

    Returns
    -------
    pandas.DataFrame
        Index ``method``; columns ``<metric>_mean`` and ``<metric>_std`` for every metric
        in order, then ``n_seeds``.
    """
    if not rows:
        raise ConfigError("score_table needs at least one method")
    records = {}
    for method, df in rows.items():
        rec: dict[str, float] = {}
        for m in metrics:
            if m in df.columns:
                mean, std = _mean_std(df[m].to_numpy(dtype=np.float64), ddof)
            else:
                mean, std = math.nan, math.nan
            rec[f"{m}_mean"] = mean
            rec[f"{m}_std"] = std
        rec["n_seeds"] = len(df)
        records[str(method)] = rec
    table = pd.DataFrame.from_dict(records, orient="index")
    table.index.name = "method"
    return table


def format_mean_std(table: pd.DataFrame, metrics: Sequence[str] = ("nmi", "ri"),
                    digits: int = 4) -> pd.DataFrame:
    """``"mean ± std"`` strings of a :func:`score_table`, e.g. ``"0.7283 ± 0.0123"``.

    Parameters
    ----------
    table : pandas.DataFrame
        Output of :func:`score_table`.
    metrics : sequence of str, default ("nmi", "ri")
    digits : int, default 4
        Decimals of both numbers. A NaN mean gives ``"n/a"``; a NaN std (one seed with
        ``ddof=1``) gives the mean alone.

    Returns
    -------
    pandas.DataFrame of str, index = methods, columns = metrics
    """
    def fmt(mean: float, std: float) -> str:
        if math.isnan(mean):
            return "n/a"
        if math.isnan(std):
            return f"{mean:.{digits}f}"
        return f"{mean:.{digits}f} ± {std:.{digits}f}"

    out = {}
    for m in metrics:
        if f"{m}_mean" not in table.columns:
            raise ConfigError(f"table has no {m}_mean column; metrics there: "
                              f"{[c[:-5] for c in table.columns if c.endswith('_mean')]}")
        out[m] = [fmt(float(a), float(b)) for a, b in zip(table[f"{m}_mean"],
                                                          table[f"{m}_std"], strict=True)]
    return pd.DataFrame(out, index=table.index)
