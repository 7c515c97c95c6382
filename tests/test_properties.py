"""Property-based tests (hypothesis) of the metrics and the pseudo-label head.

tests/test_metrics.py already checks symmetry, bounds, invariance to renaming labels and
"VI = 0 iff same partition"; here: invariance to the order of the samples, to unlabelled
samples, the triangle inequality of VI, exact values on refinements, and accuracy against
a brute-force search over all cluster-to-class mappings. For the head: labels in range,
``predict == labels_``, the pseudo-label rule (nearest ceil(alpha n_k) per cluster) on
arbitrary inputs, and invariance of k-means + pseudo-label selection to the row order of
well-separated data (up to the permutation). The trained MLP's labels are *not* claimed
order-invariant: minibatch order and initialisation follow the row order.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from esmc_lens.cluster.head import PseudoLabelHead, select_pseudo_labels
from esmc_lens.cluster.metrics import (
    accuracy,
    ari,
    clustering_scores,
    contingency,
    nmi,
    rand_index,
    variation_of_information,
)

FEW = settings(max_examples=25, deadline=None)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny MLPs on a shared 2-core machine: avoid OpenMP barriers
    yield
    torch.set_num_threads(before)


@st.composite
def labellings(draw, max_n: int = 25, max_k: int = 4):
    n = draw(st.integers(1, max_n))
    lab = st.lists(st.integers(0, max_k - 1), min_size=n, max_size=n)
    return np.array(draw(lab)), np.array(draw(lab))


def _entropy(y: np.ndarray) -> float:
    _, c = np.unique(y, return_counts=True)
    p = c / c.sum()
    return float(-(p * np.log(p)).sum())


# -- metrics -----------------------------------------------------------------------------


@FEW
@given(labellings(), st.randoms(use_true_random=False))
def test_scores_do_not_depend_on_sample_order(pair, rnd):
    t, p = pair
    order = list(range(len(t)))
    rnd.shuffle(order)
    assert clustering_scores(t[order], p[order]) == clustering_scores(t, p)  # exactly


@FEW
@given(labellings(), st.lists(st.tuples(st.integers(0, 40), st.integers(0, 9)), max_size=8))
def test_unlabelled_samples_change_nothing(pair, extra):
    t, p = pair
    t2, p2 = list(t), list(p)
    for pos, pred in extra:  # y_true = -1 anywhere, with any prediction
        i = pos % (len(t2) + 1)
        t2.insert(i, -1)
        p2.insert(i, pred)
    assert clustering_scores(t2, p2) == clustering_scores(t, p)
    table = contingency(t2, p2)
    assert table.sum() == len(t)
    assert sorted(table.sum(axis=1)) == sorted(np.unique(t, return_counts=True)[1])


@FEW
@given(st.integers(1, 20).flatmap(lambda n: st.tuples(
    *[st.lists(st.integers(0, 3), min_size=n, max_size=n) for _ in range(3)])))
def test_variation_of_information_is_a_metric(triple):
    a, b, c = (np.array(x) for x in triple)
    vi = variation_of_information
    assert vi(a, c) <= vi(a, b) + vi(b, c) + 1e-12
    assert vi(a, a) == 0.0


@FEW
@given(labellings(), st.integers(2, 3))
def test_refinement_exact_values(pair, split):
    t, noise = pair
    p = t * split + noise % split  # every cluster of p lies inside one class of t
    h_t, h_p = _entropy(t), _entropy(p)
    assert variation_of_information(t, p) == pytest.approx(h_p - h_t, abs=1e-12)
    if h_t + h_p > 0:
        assert nmi(t, p) == pytest.approx(2 * h_t / (h_t + h_p), abs=1e-12)
    assert ari(t, p) >= -1e-12  # a refinement never agrees less than chance
    # pairs together in p are together in t: RI = 1 - (pairs split by p) / all pairs
    n = len(t)
    if n > 1:
        pairs = lambda y: sum(c * (c - 1) // 2 for c in np.unique(y, return_counts=True)[1])  # noqa: E731
        assert rand_index(t, p) == pytest.approx(1 - (pairs(t) - pairs(p)) / (n * (n - 1) / 2))


@FEW
@given(labellings(max_n=20, max_k=4))
def test_accuracy_is_the_best_one_to_one_mapping(pair):
    t, p = pair
    classes, clusters = np.unique(t), np.unique(p)
    best = 0
    # every injective map from the smaller label set into the larger one
    small, large, small_is_pred = ((clusters, classes, True) if len(clusters) <= len(classes)
                                   else (classes, clusters, False))
    for image in itertools.permutations(large, len(small)):
        m = dict(zip(small, image, strict=True))
        hits = sum((m[pi] == ti) if small_is_pred else (m[ti] == pi)
                   for ti, pi in zip(t, p, strict=True))
        best = max(best, hits)
    assert accuracy(t, p) == best / len(t)
    assert best >= contingency(t, p).max()


# -- the head ----------------------------------------------------------------------------


@st.composite
def small_problem(draw):
    n = draw(st.integers(4, 24))
    d = draw(st.integers(1, 5))
    k = draw(st.integers(2, min(4, n)))
    seed = draw(st.integers(0, 2**16))
    X = np.random.default_rng(seed).normal(size=(n, d)) * draw(st.sampled_from([1e-3, 1, 50]))
    alpha = draw(st.floats(0.05, 1.0))
    return X, k, alpha, seed


@FEW
@given(small_problem())
def test_head_labels_in_range_and_predict_equals_labels(problem):
    X, k, alpha, seed = problem
    head = PseudoLabelHead(n_clusters=k, alpha=alpha, hidden_dim=8, epochs=3, n_init=2,
                           random_state=seed).fit(X)
    n = len(X)
    assert head.labels_.shape == (n,) and head.labels_.dtype == np.int64
    assert head.labels_.min() >= 0 and head.labels_.max() < k
    assert head.kmeans_labels_.min() >= 0 and head.kmeans_labels_.max() < k
    np.testing.assert_array_equal(head.predict(X), head.labels_)
    proba = head.predict_proba(X)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(proba.argmax(axis=1), head.labels_)
    # pseudo-labels are each sample's own k-means cluster, a subset without repeats
    assert len(set(head.pseudo_indices_.tolist())) == len(head.pseudo_indices_)
    np.testing.assert_array_equal(head.kmeans_labels_[head.pseudo_indices_],
                                  head.pseudo_labels_)


@st.composite
def selection_problem(draw):
    n = draw(st.integers(1, 30))
    k = draw(st.integers(1, 5))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 2))
    assignment = rng.integers(0, k, n)
    centers = rng.normal(size=(k, 2))
    return X, assignment, centers, draw(st.floats(0.01, 1.0)), draw(st.randoms())


def _dist(X, centers, assignment, i):
    return float(((X[i] - centers[assignment[i]]) ** 2).sum())


@FEW
@given(selection_problem())
def test_pseudo_label_rule_and_row_order_equivariance(problem):
    X, assignment, centers, alpha, rnd = problem
    idx, lab = select_pseudo_labels(X, assignment, centers, alpha)
    np.testing.assert_array_equal(assignment[idx], lab)
    for c in np.unique(assignment):
        members = np.flatnonzero(assignment == c)
        chosen = idx[lab == c]
        assert len(chosen) == max(1, math.ceil(round(alpha * len(members), 9)))
        rest = np.setdiff1d(members, chosen)
        if len(rest):  # every chosen member is at least as near as every other one
            assert max(_dist(X, centers, assignment, i) for i in chosen) <= min(
                _dist(X, centers, assignment, i) for i in rest)
    # shuffle the rows: the same samples are chosen (continuous data: no distance ties)
    order = list(range(len(X)))
    rnd.shuffle(order)
    order = np.array(order)
    idx2, lab2 = select_pseudo_labels(X[order], assignment[order], centers, alpha)
    assert sorted(zip(order[idx2].tolist(), lab2.tolist(), strict=True)) == sorted(
        zip(idx.tolist(), lab.tolist(), strict=True))


@st.composite
def separated_blobs(draw):
    k = draw(st.integers(2, 4))
    sizes = draw(st.lists(st.integers(2, 7), min_size=k, max_size=k))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    centers = 100.0 * rng.normal(size=(k, 3))
    assume(min(np.linalg.norm(a - b) for a, b in itertools.combinations(centers, 2)) > 40)
    X = np.concatenate([c + rng.normal(size=(m, 3)) for c, m in zip(centers, sizes,
                                                                     strict=True)])
    perm = rng.permutation(len(X))
    return X, k, perm, draw(st.floats(0.05, 1.0)), seed


def _no_boundary_tie(X, assignment, centers, alpha) -> bool:
    for c in np.unique(assignment):
        members = np.flatnonzero(assignment == c)
        keep = max(1, math.ceil(round(alpha * len(members), 9)))
        if keep < len(members):
            d = np.sort(((X[members] - centers[c]) ** 2).sum(axis=1))
            if d[keep] - d[keep - 1] <= 1e-9 * max(1.0, d[keep]):
                return False
    return True


def _canonical(labels: np.ndarray) -> list[int]:
    seen: dict[int, int] = {}
    return [seen.setdefault(int(v), len(seen)) for v in labels]


@FEW
@given(separated_blobs())
def test_kmeans_pseudo_labels_follow_the_rows_when_shuffled(problem):
    X, k, perm, alpha, seed = problem
    kw = {"n_clusters": k, "alpha": alpha, "hidden_dim": 4, "epochs": 1, "n_init": 4,
          "random_state": seed}
    a = PseudoLabelHead(**kw).fit(X)
    # where it should hold: no two members tie for the last pseudo-label slot of a cluster
    # (a 2-member cluster always ties: both are equally far from their mean)
    assume(_no_boundary_tie(X * a.input_scale_, a.kmeans_labels_, a.cluster_centers_, alpha))
    b = PseudoLabelHead(**kw).fit(X[perm])
    # the same partition, up to renaming the clusters
    assert _canonical(b.kmeans_labels_) == _canonical(a.kmeans_labels_[perm])
    rename = {int(b.kmeans_labels_[j]): int(a.kmeans_labels_[perm[j]]) for j in range(len(X))}
    # the same samples, with the same (renamed) pseudo-labels
    assert sorted((int(perm[i]), rename[int(c)]) for i, c in
                  zip(b.pseudo_indices_, b.pseudo_labels_, strict=True)) == sorted(
        zip(a.pseudo_indices_.tolist(), a.pseudo_labels_.tolist(), strict=True))
