"""External clustering metrics: NMI, Rand index, ARI, Hungarian accuracy, VI.

All functions take ``(y_true, y_pred)`` label vectors of equal length. Entries with
``y_true == -1`` (missing ground-truth label, as produced by ``ImageDataset.y``) are
dropped before anything is computed, by every metric alike. Labels may be any
hashable values; only the partition they induce matters.

Information quantities are all in nats. (The published ESMC code mixed log2 entropies with
a nats mutual information in its variation of information; here both use ``log``.)
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import linear_sum_assignment

__all__ = [
    "accuracy",
    "ari",
    "clustering_scores",
    "contingency",
    "nmi",
    "rand_index",
    "variation_of_information",
]

MISSING = -1


def _labelled(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Validate both label vectors and drop the entries whose true label is missing."""
    t = np.asarray(y_true)
    p = np.asarray(y_pred)
    if t.ndim != 1 or p.ndim != 1:
        raise ValueError(
            f"y_true and y_pred must be 1-D label vectors, got shapes {t.shape} and {p.shape}"
        )
    if t.shape[0] != p.shape[0]:
        raise ValueError(
            f"y_true and y_pred must have the same length, got {t.shape[0]} and {p.shape[0]}"
        )
    keep = ~_is_missing(t)
    t, p = t[keep], p[keep]
    if t.size == 0:
        raise ValueError(
            "no labelled samples: every y_true entry is missing (-1) or the input is empty"
        )
    return t, p


def _is_missing(t: np.ndarray) -> np.ndarray:
    if t.dtype.kind in "iuf":
        return t == MISSING
    # Object/string labels: compare element-wise; numpy would warn on mixed types.
    return np.array([isinstance(v, (int, np.integer)) and v == MISSING for v in t], dtype=bool)


def contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Contingency table of two labellings (missing true labels dropped).

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    numpy.ndarray of int64, shape (n_classes, n_clusters)
        ``C[i, j]`` = number of samples in class ``i`` and cluster ``j`` (sorted labels).
    """
    t, p = _labelled(y_true, y_pred)
    return _table(t, p)


def _table(t: np.ndarray, p: np.ndarray) -> np.ndarray:
    _, ti = np.unique(t, return_inverse=True)
    _, pi = np.unique(p, return_inverse=True)
    table = np.zeros((ti.max() + 1, pi.max() + 1), dtype=np.int64)
    np.add.at(table, (ti.ravel(), pi.ravel()), 1)
    return table


def _entropy(counts: np.ndarray, n: int) -> float:
    c = counts[counts > 0].astype(np.float64)
    return float(-np.sum(c / n * np.log(c / n)))


def _mutual_info(table: np.ndarray, n: int) -> float:
    rows = table.sum(axis=1).astype(np.float64)
    cols = table.sum(axis=0).astype(np.float64)
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    # I = sum_ij p_ij log(p_ij / (p_i p_j)) = sum_ij (n_ij/n) log(n n_ij / (n_i n_j))
    mi = float(np.sum(nij / n * np.log(n * nij / (rows[i] * cols[j]))))
    return max(mi, 0.0)  # tiny negative values are round-off


def _conditional_entropy(table: np.ndarray, n: int) -> float:
    """H(rows | cols) in nats, from the table directly (exactly 0 for nested partitions)."""
    cols = table.sum(axis=0).astype(np.float64)
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    return float(np.sum(nij / n * np.log(cols[j] / nij)))


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, arithmetic-mean normalisation.

    ``NMI = I(T; P) / ((H(T) + H(P)) / 2)``, as sklearn's default
    (``average_method="arithmetic"``). Two single-cluster labellings give 1.0.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    t, p = _labelled(y_true, y_pred)
    table = _table(t, p)
    n = t.size
    if table.shape == (1, 1):
        return 1.0  # both labellings are one cluster: identical partitions
    h_t = _entropy(table.sum(axis=1), n)
    h_p = _entropy(table.sum(axis=0), n)
    denom = (h_t + h_p) / 2.0
    if denom == 0.0:
        return 1.0
    # Clip round-off only; MI <= min(H_T, H_P) <= mean holds mathematically.
    return float(min(max(_mutual_info(table, n) / denom, 0.0), 1.0))


def _pair_counts(table: np.ndarray) -> tuple[int, int, int, int]:
    """Pair counts (same-same, same class only, same cluster only, all pairs), exact ints."""

    def pairs(x: np.ndarray) -> int:
        return sum(int(v) * (int(v) - 1) // 2 for v in x.ravel())

    n = int(table.sum())
    same_both = pairs(table)
    same_true = pairs(table.sum(axis=1))
    same_pred = pairs(table.sum(axis=0))
    return same_both, same_true, same_pred, n * (n - 1) // 2


def rand_index(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Rand index: fraction of sample pairs on which both labellings agree.

    A pair agrees when it is together in both or apart in both. One sample gives 1.0.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    t, p = _labelled(y_true, y_pred)
    same_both, same_true, same_pred, total = _pair_counts(_table(t, p))
    if total == 0:
        return 1.0
    # apart in both = total - same_true - same_pred + same_both
    agree = total + 2 * same_both - same_true - same_pred
    return agree / total


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (Hubert and Arabie, 1985).

    ``ARI = (index - expected) / (max - expected)`` with ``index = sum_ij C(n_ij, 2)``,
    ``expected = sum_i C(a_i, 2) sum_j C(b_j, 2) / C(n, 2)``,
    ``max = (sum_i C(a_i, 2) + sum_j C(b_j, 2)) / 2``. When ``max == expected`` (both
    labellings trivial in the same way) the labellings agree perfectly and 1.0 is returned,
    as sklearn does.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [-0.5, 1]
    """
    t, p = _labelled(y_true, y_pred)
    same_both, same_true, same_pred, total = _pair_counts(_table(t, p))
    if total == 0:
        return 1.0
    # Multiply through by 2 * C(n, 2) to stay in exact integers until the final division.
    num = 2 * (same_both * total - same_true * same_pred)
    den = (same_true + same_pred) * total - 2 * same_true * same_pred
    if den == 0:
        return 1.0
    return num / den


def accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Clustering accuracy under the best one-to-one cluster-to-class mapping.

    The mapping maximises the number of matched samples (Hungarian algorithm,
    ``scipy.optimize.linear_sum_assignment``). With more clusters than classes the
    unmatched clusters count as wrong; with fewer, the unmatched classes do.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    t, p = _labelled(y_true, y_pred)
    table = _table(t, p)
    rows, cols = linear_sum_assignment(table, maximize=True)
    return int(table[rows, cols].sum()) / t.size


def variation_of_information(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Variation of information (Meila, 2007) in nats.

    ``VI = H(T) + H(P) - 2 I(T; P) = H(T | P) + H(P | T)``, computed as the sum of the
    two conditional entropies so identical partitions give exactly 0.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float >= 0, at most ``log(n_samples)``
    """
    t, p = _labelled(y_true, y_pred)
    table = _table(t, p)
    n = t.size
    return _conditional_entropy(table, n) + _conditional_entropy(table.T, n)


def clustering_scores(y_true: ArrayLike, y_pred: ArrayLike) -> dict[str, float]:
    """All metrics at once.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    dict
        Keys ``nmi``, ``ri``, ``ari``, ``acc``, ``vi`` (floats).
    """
    t, p = _labelled(y_true, y_pred)
    return {
        "nmi": nmi(t, p),
        "ri": rand_index(t, p),
        "ari": ari(t, p),
        "acc": accuracy(t, p),
        "vi": variation_of_information(t, p),
    }
