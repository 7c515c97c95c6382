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
from sklearn.metrics import adjusted_rand_score, normalized_mutual_info_score, rand_score
from sklearn.metrics.cluster import contingency_matrix

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
    return contingency_matrix(t, p).astype(np.int64)


def _conditional_entropy(table: np.ndarray, n: int) -> float:
    """H(rows | cols) in nats, from the table directly (exactly 0 for nested partitions)."""
    cols = table.sum(axis=0).astype(np.float64)
    i, j = np.nonzero(table)
    nij = table[i, j].astype(np.float64)
    return float(np.sum(nij / n * np.log(cols[j] / nij)))


def nmi(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Normalised mutual information, arithmetic-mean normalisation (scikit-learn's
    ``normalized_mutual_info_score``): ``I(T; P) / ((H(T) + H(P)) / 2)``. Two single-cluster
    labellings give 1.0.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    t, p = _labelled(y_true, y_pred)
    return float(normalized_mutual_info_score(t, p))


def rand_index(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Rand index (scikit-learn's ``rand_score``): fraction of sample pairs on which both
    labellings agree (together in both, or apart in both). One sample gives 1.0.

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [0, 1]
    """
    t, p = _labelled(y_true, y_pred)
    return float(rand_score(t, p))


def ari(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Adjusted Rand index (Hubert and Arabie, 1985; scikit-learn's ``adjusted_rand_score``).

    Parameters
    ----------
    y_true, y_pred : array-like, shape (n_samples,)

    Returns
    -------
    float in [-0.5, 1]
    """
    t, p = _labelled(y_true, y_pred)
    return float(adjusted_rand_score(t, p))


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
