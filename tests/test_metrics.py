"""Tests of esmc_lens.cluster.metrics against hand-worked values, sklearn, and properties."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn import metrics as skm

from esmc_lens.cluster.metrics import (
    accuracy,
    ari,
    clustering_scores,
    contingency,
    nmi,
    rand_index,
    variation_of_information,
)

LN2, LN3 = math.log(2), math.log(3)


# --- hand-worked examples -----------------------------------------------------------------
# A: y_true = [0,0,1,1], y_pred = [0,0,1,2]; n = 4
#    contingency [[2,0,0],[0,1,1]]; class sizes (2,2), cluster sizes (2,1,1)
#    H(T) = ln2; H(P) = -(1/2 ln1/2 + 2 * 1/4 ln1/4) = 1/2 ln2 + ln2 = 3/2 ln2
#    I = 2/4 ln(4*2/(2*2)) + 1/4 ln(4*1/(2*1)) + 1/4 ln(4*1/(2*1)) = ln2  (P refines T)
#    NMI = ln2 / ((ln2 + 3/2 ln2) / 2) = 1 / 1.25 = 0.8
#    pairs: C(4,2) = 6; together in both: {0,1} -> 1; together in T: 2; together in P: 1
#    RI = (6 + 2*1 - 2 - 1) / 6 = 5/6   ({2,3} is the only disagreeing pair)
#    ARI: index 1, expected 2*1/6 = 1/3, max (2+1)/2 = 3/2 -> (2/3) / (7/6) = 4/7
#    ACC: class0 -> cluster0 (2), class1 -> cluster1 (1): 3/4
#    VI = H(T|P) + H(P|T) = 0 + (3/2 ln2 - ln2) = 1/2 ln2
A_TRUE, A_PRED = [0, 0, 1, 1], [0, 0, 1, 2]

# B: y_true = [0,0,0,1,1,1], y_pred = [0,0,1,1,2,2]; n = 6
#    contingency [[2,1,0],[0,1,2]]; class sizes (3,3); cluster sizes (2,2,2)
#    H(T) = ln2, H(P) = ln3
#    I = 2/6 ln(6*2/(3*2)) * 2 cells + 1/6 ln(6*1/(3*2)) * 2 cells = 2/3 ln2 + 0
#    NMI = (2/3 ln2) / ((ln2 + ln3)/2) = 4 ln2 / (3 ln6)
#    pairs: C(6,2) = 15; both: 1 + 1 = 2; T: 3 + 3 = 6; P: 1 + 1 + 1 = 3
#    RI = (15 + 4 - 6 - 3) / 15 = 10/15 = 2/3
#    ARI: index 2, expected 6*3/15 = 6/5, max 9/2 -> (4/5) / (33/10) = 8/33
#    ACC: class0 -> cluster0 (2), class1 -> cluster2 (2): 4/6 = 2/3
#    VI = ln2 + ln3 - 2 * 2/3 ln2 = ln3 - 1/3 ln2
B_TRUE, B_PRED = [0, 0, 0, 1, 1, 1], [0, 0, 1, 1, 2, 2]

# C: y_true = [0,1,2,2], y_pred = [0,0,0,0] (one cluster, fewer than the 3 classes)
#    H(P) = 0 -> I = 0 -> NMI = 0 (denominator H(T)/2 > 0)
#    pairs: 6; both: C(2,2) = 1 (the two 2s); T: 1; P: 6 -> RI = (6 + 2 - 1 - 6)/6 = 1/6
#    ARI numerator 2*(1*6 - 1*6) = 0 -> ARI = 0
#    ACC: the cluster matches class 2 (2 samples): 2/4
#    VI = H(T|P) + H(P|T) = H(T) + 0 = -(2 * 1/4 ln1/4 + 1/2 ln1/2) = 3/2 ln2
C_TRUE, C_PRED = [0, 1, 2, 2], [0, 0, 0, 0]


def test_example_a() -> None:
    assert nmi(A_TRUE, A_PRED) == pytest.approx(0.8, abs=1e-12)
    assert rand_index(A_TRUE, A_PRED) == 5 / 6
    assert ari(A_TRUE, A_PRED) == 4 / 7
    assert accuracy(A_TRUE, A_PRED) == 0.75
    assert variation_of_information(A_TRUE, A_PRED) == pytest.approx(LN2 / 2, abs=1e-12)
    np.testing.assert_array_equal(contingency(A_TRUE, A_PRED), [[2, 0, 0], [0, 1, 1]])


def test_example_b() -> None:
    assert nmi(B_TRUE, B_PRED) == pytest.approx(4 * LN2 / (3 * math.log(6)), abs=1e-12)
    assert rand_index(B_TRUE, B_PRED) == 2 / 3
    assert ari(B_TRUE, B_PRED) == 8 / 33
    assert accuracy(B_TRUE, B_PRED) == 2 / 3
    assert variation_of_information(B_TRUE, B_PRED) == pytest.approx(LN3 - LN2 / 3, abs=1e-12)


def test_example_c_fewer_clusters_than_classes() -> None:
    assert nmi(C_TRUE, C_PRED) == 0.0
    assert rand_index(C_TRUE, C_PRED) == 1 / 6
    assert ari(C_TRUE, C_PRED) == 0.0
    assert accuracy(C_TRUE, C_PRED) == 0.5
    assert variation_of_information(C_TRUE, C_PRED) == pytest.approx(1.5 * LN2, abs=1e-12)


def test_accuracy_more_clusters_than_classes() -> None:
    # y_true = [0,0,0,1,1,1]; y_pred = [0,1,2,3,3,4]: best matching class0 -> any of the
    # three singleton clusters (1), class1 -> cluster3 (2): (1 + 2) / 6 = 1/2
    assert accuracy([0, 0, 0, 1, 1, 1], [0, 1, 2, 3, 3, 4]) == 0.5


def test_vi_is_in_nats_not_bits() -> None:
    # Two independent fair binary partitions of 4 points: H(T)=H(P)=ln2, I = 0 -> VI = 2 ln2.
    # The published code's log2 entropies with a nats MI would give 1 + 1 - 0 = 2 instead.
    assert variation_of_information([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(2 * LN2)


def test_missing_labels_are_ignored_consistently() -> None:
    t = [0, -1, 0, 1, -1, 1]
    p = [0, 7, 0, 1, 3, 2]  # without the -1 rows: example A
    expected = clustering_scores(A_TRUE, A_PRED)
    assert clustering_scores(t, p) == expected
    assert nmi(np.array(t), np.array(p)) == expected["nmi"]
    with pytest.raises(ValueError, match="no labelled samples"):
        nmi([-1, -1], [0, 1])


def test_identity_and_relabelling_are_perfect() -> None:
    t = [2, 2, 0, 1, 1, 0, 3]
    p = [9, 9, 4, 5, 5, 4, 0]  # same partition, other names
    for y_pred in (t, p):
        s = clustering_scores(t, y_pred)
        assert s == {"nmi": 1.0, "ri": 1.0, "ari": 1.0, "acc": 1.0, "vi": 0.0}
    # string labels work too
    assert clustering_scores(["a", "a", "b"], ["x", "x", "y"])["acc"] == 1.0


def test_degenerate_single_cluster_and_single_sample() -> None:
    assert clustering_scores([1, 1, 1], [0, 0, 0]) == {
        "nmi": 1.0,
        "ri": 1.0,
        "ari": 1.0,
        "acc": 1.0,
        "vi": 0.0,
    }
    assert clustering_scores([3], [5]) == {"nmi": 1.0, "ri": 1.0, "ari": 1.0, "acc": 1.0, "vi": 0.0}
    # all singletons in both: perfect agreement
    assert ari([0, 1, 2], [2, 0, 1]) == 1.0


def test_input_validation() -> None:
    with pytest.raises(ValueError, match="same length"):
        nmi([0, 1], [0])
    with pytest.raises(ValueError, match="1-D"):
        ari([[0, 1]], [[0, 1]])


def test_matches_sklearn_on_random_labellings() -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        n = int(rng.integers(2, 200))
        t = rng.integers(0, int(rng.integers(1, 6)), n)
        p = rng.integers(0, int(rng.integers(1, 8)), n)
        assert nmi(t, p) == pytest.approx(skm.normalized_mutual_info_score(t, p), abs=1e-10)
        assert rand_index(t, p) == pytest.approx(skm.rand_score(t, p), abs=1e-12)
        assert ari(t, p) == pytest.approx(skm.adjusted_rand_score(t, p), abs=1e-10)
        h_t = skm.mutual_info_score(t, t)
        h_p = skm.mutual_info_score(p, p)
        vi = h_t + h_p - 2 * skm.mutual_info_score(t, p)  # sklearn MI is in nats
        assert variation_of_information(t, p) == pytest.approx(vi, abs=1e-10)


# --- properties -------------------------------------------------------------------------


@st.composite
def labellings(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    n = draw(st.integers(1, 30))
    lab = st.lists(st.integers(0, 4), min_size=n, max_size=n)
    return draw(lab), draw(lab)


def _canonical(y: list[int]) -> list[int]:
    """Relabel by first occurrence: equal iff the partitions are equal."""
    seen: dict[int, int] = {}
    return [seen.setdefault(v, len(seen)) for v in y]


SYMMETRIC = [nmi, rand_index, ari, accuracy, variation_of_information]


@settings(max_examples=150, deadline=None)
@given(labellings())
def test_symmetry(pair: tuple[list[int], list[int]]) -> None:
    t, p = pair
    for f in SYMMETRIC:
        assert f(t, p) == pytest.approx(f(p, t), abs=1e-12), f.__name__


@settings(max_examples=150, deadline=None)
@given(labellings())
def test_bounds(pair: tuple[list[int], list[int]]) -> None:
    t, p = pair
    s = clustering_scores(t, p)
    assert 0.0 <= s["nmi"] <= 1.0
    assert 0.0 <= s["ri"] <= 1.0
    assert 0.0 < s["acc"] <= 1.0
    assert -0.5 <= s["ari"] <= 1.0
    assert 0.0 <= s["vi"] <= math.log(len(t)) + 1e-12


@settings(max_examples=150, deadline=None)
@given(labellings())
def test_vi_zero_iff_same_partition(pair: tuple[list[int], list[int]]) -> None:
    t, p = pair
    same = _canonical(t) == _canonical(p)
    vi = variation_of_information(t, p)
    assert (vi == 0.0) == same
    if not same:
        assert vi > 1e-6
        assert ari(t, p) < 1.0 and rand_index(t, p) < 1.0
    else:
        assert nmi(t, p) == pytest.approx(1.0) and accuracy(t, p) == 1.0


@settings(max_examples=150, deadline=None)
@given(labellings(), st.permutations(range(5)), st.permutations(range(5)))
def test_invariant_to_label_permutation(
    pair: tuple[list[int], list[int]], perm_t: list[int], perm_p: list[int]
) -> None:
    t, p = pair
    t2 = [perm_t[v] for v in t]
    p2 = [perm_p[v] for v in p]
    a, b = clustering_scores(t, p), clustering_scores(t2, p2)
    assert a == pytest.approx(b, abs=1e-12)
