"""Tests of esmc_lens.cluster.head.PseudoLabelHead (ESMC Algorithm 2, without label leakage)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.utils.estimator_checks import parametrize_with_checks

from esmc_lens.cluster import head as head_module
from esmc_lens.cluster.head import (
    PseudoLabelHead,
    SpanBasis,
    select_pseudo_labels,
)

# sklearn's generic checks force n_clusters=1 in these four; a one-cluster head is
# meaningless (constant argmax) and PseudoLabelHead rejects n_clusters < 2 by design.
_N_CLUSTERS_1 = "sklearn sets n_clusters=1; PseudoLabelHead requires n_clusters >= 2 by design"
EXPECTED_FAILED_CHECKS = {
    "check_dont_overwrite_parameters": _N_CLUSTERS_1,
    "check_fit2d_1feature": _N_CLUSTERS_1,
    "check_fit2d_predict1d": _N_CLUSTERS_1,
    "check_methods_subset_invariance": _N_CLUSTERS_1,
}


@parametrize_with_checks(
    [PseudoLabelHead(epochs=60, hidden_dim=16, n_init=2, random_state=0, lr=1e-2),
     PseudoLabelHead(epochs=60, hidden_dim=16, n_init=2, random_state=0, optimizer="adam"),
     PseudoLabelHead(epochs=60, hidden_dim=16, n_init=2, random_state=0, basis="span")],
    expected_failed_checks=lambda est: EXPECTED_FAILED_CHECKS,
    xfail_strict=True,  # each listed check must really fail, for the stated reason
)
def test_sklearn_compatible(estimator, check) -> None:  # type: ignore[no-untyped-def]
    check(estimator)


@pytest.fixture(autouse=True)
def _one_torch_thread() -> object:
    # On a small shared CI machine, OpenMP barriers of a multi-threaded torch slow these
    # tiny MLPs down by 10-50x when another process competes for the cores.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def small(**kw: object) -> PseudoLabelHead:
    params: dict[str, object] = {"hidden_dim": 32, "epochs": 30, "n_init": 3, "random_state": 0}
    params.update(kw)
    return PseudoLabelHead(**params)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def blobs() -> tuple[np.ndarray, np.ndarray]:
    X, y = make_blobs(n_samples=300, centers=4, n_features=6, cluster_std=0.6, random_state=0)
    return X, y


def test_defaults_match_paper() -> None:
    est = PseudoLabelHead()
    assert (est.n_clusters, est.alpha, est.hidden_dim, est.epochs, est.lr) == (
        8,
        0.3,
        512,
        100,
        1e-3,
    )
    assert est.batch_size is None and est.n_init == 10 and est.device == "cpu"


def test_fit_returns_self_and_attributes(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    est = small(n_clusters=4, epochs=12)
    assert est.fit(X) is est
    n = X.shape[0]
    assert est.labels_.shape == (n,) and est.labels_.dtype == np.int64
    assert est.kmeans_labels_.shape == (n,)
    assert est.cluster_centers_.shape == (4, 6)
    assert est.pseudo_indices_.shape == est.pseudo_labels_.shape
    assert len(est.loss_curve_) == 12 and est.n_features_in_ == 6
    layers = list(est.head_)
    assert [type(m) for m in layers] == [torch.nn.Linear, torch.nn.ReLU, torch.nn.Linear]
    assert (layers[0].in_features, layers[0].out_features, layers[2].out_features) == (6, 32, 4)
    assert all(p.dtype == torch.float32 for p in est.head_.parameters())
    np.testing.assert_array_equal(est.predict(X), est.labels_)
    proba = est.predict_proba(X)
    assert proba.shape == (n, 4)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-12)
    np.testing.assert_array_equal(proba.argmax(axis=1), est.labels_)


def test_well_separated_blobs_reach_ari_1(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = blobs
    est = small(n_clusters=4, epochs=100, lr=1e-2)
    labels = est.fit_predict(X)
    assert adjusted_rand_score(y, labels) == 1.0
    assert est.loss_curve_[-1] < est.loss_curve_[0]


def test_deterministic_and_leaves_global_rng_alone(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    torch_state = torch.get_rng_state()
    np_state = np.random.get_state()[1].copy()
    a = small(n_clusters=4, batch_size=32).fit(X)
    b = small(n_clusters=4, batch_size=32).fit(X)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.pseudo_indices_, b.pseudo_indices_)
    assert a.loss_curve_ == b.loss_curve_
    for pa, pb in zip(a.head_.parameters(), b.head_.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert torch.equal(torch.get_rng_state(), torch_state)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)
    c = small(n_clusters=4, batch_size=32, random_state=1).fit(X)
    assert not all(
        torch.equal(pa, pc)
        for pa, pc in zip(a.head_.parameters(), c.head_.parameters(), strict=True)
    )


def _expected_pseudo(
    X: np.ndarray, assignment: np.ndarray, centers: np.ndarray, alpha: str
) -> dict[int, set[int]]:
    """Independent computation: per k-means cluster, the ceil(alpha * n_k) nearest members."""
    out = {}
    for k in range(centers.shape[0]):
        members = [i for i in range(len(X)) if assignment[i] == k]
        n_keep = max(1, math.ceil(Fraction(alpha) * len(members)))  # exact: 0.3 * 10 = 3
        dist = {i: float(np.sum((X[i] - centers[k]) ** 2)) for i in members}
        out[k] = set(sorted(members, key=lambda i: (dist[i], i))[:n_keep])
    return out


@pytest.mark.parametrize("alpha", ["0.3", "0.1", "0.55", "1"])
def test_pseudo_labels_are_nearest_to_own_kmeans_centroid(alpha: str) -> None:
    # Clusters of 10, 20 and 7 points (0.3 * 10 must give 3, not 4 from float round-off).
    rng = np.random.default_rng(1)
    X = np.concatenate(
        [rng.normal(c, 1.0, size=(m, 3)) for c, m in ((0.0, 10), (20.0, 20), (-20.0, 7))]
    )
    # y disagrees with the clusters entirely: it must not influence the selection.
    y = rng.integers(0, 3, len(X))
    est = small(n_clusters=3, alpha=float(alpha), epochs=2).fit(X, y)
    assert sorted(np.bincount(est.kmeans_labels_)) == [7, 10, 20]
    Z = X * est.input_scale_  # k-means runs on the rescaled features (same partition)
    expected = _expected_pseudo(Z, est.kmeans_labels_, est.cluster_centers_, alpha)
    for k, members in expected.items():
        chosen = set(est.pseudo_indices_[est.pseudo_labels_ == k].tolist())
        assert chosen == members
    # each pseudo-label is the sample's own k-means cluster
    np.testing.assert_array_equal(est.kmeans_labels_[est.pseudo_indices_], est.pseudo_labels_)
    # centroids really are the k-means centroids (mean of each cluster's members)
    for k in range(3):
        np.testing.assert_allclose(
            est.cluster_centers_[k], Z[est.kmeans_labels_ == k].mean(axis=0), atol=1e-10
        )


def test_select_pseudo_labels_unit() -> None:
    X = np.array([[0.0], [1.0], [3.0], [10.0], [11.0]])
    assignment = np.array([0, 0, 0, 2, 2])  # cluster 1 is empty: skipped
    centers = np.array([[0.9], [5.0], [10.0]])
    idx, lab = select_pseudo_labels(X, assignment, centers, alpha=0.01)  # >= 1 per cluster
    np.testing.assert_array_equal(idx, [1, 3])
    np.testing.assert_array_equal(lab, [0, 2])
    idx, lab = select_pseudo_labels(X, assignment, centers, alpha=0.5)
    # cluster 0: ceil(1.5) = 2 nearest to 0.9 -> 1.0 (0.01), 0.0 (0.81); cluster 2: 1 -> 10.0
    np.testing.assert_array_equal(idx, [1, 0, 3])
    np.testing.assert_array_equal(lab, [0, 0, 2])


def test_y_is_ignored(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = blobs
    a = small(n_clusters=4, epochs=10).fit(X)
    b = small(n_clusters=4, epochs=10).fit(X, y)
    c = small(n_clusters=4, epochs=10).fit(X, np.random.default_rng(0).permutation(y))
    for other in (b, c):
        np.testing.assert_array_equal(a.labels_, other.labels_)
        np.testing.assert_array_equal(a.pseudo_indices_, other.pseudo_indices_)
        assert a.loss_curve_ == other.loss_curve_


@pytest.mark.parametrize(("optimizer", "lr", "epochs"), [("adam", 1.0, 8),
                                                      ("neuron-adam", 2.0, 6)])
def test_last_epoch_is_kept(blobs: tuple[np.ndarray, np.ndarray], monkeypatch,
                            optimizer: str, lr: float, epochs: int) -> None:
    # No model selection: with a learning rate that makes the loss jump about, the best
    # epoch is not the last one, and the head kept is the one after the final update.
    X, _ = blobs
    after_step: list[list[torch.Tensor]] = []
    base = torch.optim.Adam if optimizer == "adam" else head_module.NeuronAdam

    class Recording(base):  # type: ignore[misc,valid-type]
        def step(self, closure=None):  # type: ignore[no-untyped-def]
            out = super().step(closure)
            after_step.append({id(p): p.detach().clone() for g in self.param_groups
                               for p in g["params"]})
            return out

    if optimizer == "adam":
        monkeypatch.setattr(torch.optim, "Adam", Recording)
    else:
        monkeypatch.setattr(head_module, "NeuronAdam", Recording)
    est = small(n_clusters=4, epochs=epochs, lr=lr, optimizer=optimizer).fit(X)  # full batch
    assert len(after_step) == epochs  # one step per epoch
    curve = est.loss_curve_
    best = int(np.argmin(curve))
    assert best < epochs - 1 and curve[best] < curve[-1] / 2, curve  # the best epoch is another one
    kept = list(est.head_.parameters())
    assert {id(p) for p in kept} == set(after_step[-1])  # every parameter was stepped
    assert all(torch.equal(p.detach(), after_step[-1][id(p)]) for p in kept)
    for epoch, params in enumerate(after_step[:-1]):  # and it is no earlier epoch's head
        assert not all(torch.equal(p.detach(), params[id(p)]) for p in kept), epoch
    Z = torch.as_tensor(X * est.input_scale_, dtype=torch.float32)
    with torch.no_grad():
        np.testing.assert_array_equal(est.head_(Z).argmax(1).numpy(), est.labels_)


def test_standardize(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = blobs
    X = np.column_stack([X, np.full(len(X), 5.0)])  # a constant feature must not give NaN
    est = small(n_clusters=4, standardize=True, epochs=60, lr=1e-2).fit(X)
    assert est.scale_[-1] == 1.0 and np.all(np.isfinite(est.predict_proba(X)))
    assert adjusted_rand_score(y, est.labels_) == 1.0


def test_rescale_trains_on_tiny_features(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    # Vocabulary probabilities are ~1e-5 per entry: without the global rescale the MLP
    # barely moves (its init assumes unit-scale inputs); with it, it fits its pseudo-labels.
    X, _ = blobs
    tiny = (X - X.min()) * 1e-5
    stuck = small(n_clusters=4, rescale=False, epochs=100, lr=1e-2).fit(tiny)
    fitted = small(n_clusters=4, epochs=100, lr=1e-2).fit(tiny)
    assert stuck.input_scale_ == 1.0 and stuck.loss_curve_[-1] > 1.0
    assert fitted.loss_curve_[-1] < 0.1
    assert adjusted_rand_score(fitted.kmeans_labels_, fitted.labels_) == 1.0
    rms = math.sqrt(float(np.mean(np.square(tiny))))
    assert fitted.input_scale_ == 2.0 ** round(-math.log2(rms))  # exact: a power of two
    assert 0.5 < rms * fitted.input_scale_ < 2.0


def test_rescale_makes_the_head_scale_invariant(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    a, b = small(n_clusters=4).fit(X), small(n_clusters=4).fit(X * 2.0**-13)
    plain = small(n_clusters=4, rescale=False).fit(X)  # k-means is untouched by the scale
    np.testing.assert_array_equal(a.kmeans_labels_, plain.kmeans_labels_)
    np.testing.assert_array_equal(a.pseudo_indices_, plain.pseudo_indices_)
    np.testing.assert_array_equal(a.kmeans_labels_, b.kmeans_labels_)
    np.testing.assert_array_equal(a.pseudo_indices_, b.pseudo_indices_)
    np.testing.assert_array_equal(a.labels_, b.labels_)
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X * 2.0**-13))


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"alpha": 0.0}, r"alpha must be a number in \(0, 1\]"),
        ({"alpha": 1.5}, r"alpha=1.5"),
        ({"alpha": -0.1}, r"alpha"),
        ({"n_clusters": 1}, r"n_clusters must be an int >= 2"),
        ({"n_clusters": 50}, r"n_clusters=50 must be <= n_samples=20"),
        ({"epochs": 0}, r"epochs"),
        ({"batch_size": 0}, r"batch_size"),
    ],
)
def test_parameter_validation(params: dict[str, object], match: str) -> None:
    X = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match=match):
        small(**params).fit(X)


@pytest.mark.parametrize(("bad", "match"), [(np.nan, "NaN"), (np.inf, "infinity")])
def test_rejects_non_finite(bad: float, match: str) -> None:
    X = np.random.default_rng(0).normal(size=(20, 3))
    X[4, 1] = bad
    with pytest.raises(ValueError, match=match):
        small(n_clusters=2).fit(X)


def test_alpha_one_uses_every_sample(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, _ = blobs
    est = small(n_clusters=4, alpha=1.0, epochs=2).fit(X)
    assert sorted(est.pseudo_indices_.tolist()) == list(range(len(X)))


def test_float32_input_and_predict_new_data(blobs: tuple[np.ndarray, np.ndarray]) -> None:
    X, y = blobs
    est = small(n_clusters=4, epochs=20).fit(X.astype(np.float32))
    # float64 rows, all of them: the same 300-row products as in fit (exact)
    np.testing.assert_array_equal(est.predict(X), est.labels_)
    # new points, each blob's centre: its blob's cluster (a few rows: other products, so
    # the claim is one with a margin, not bit identity)
    centres = np.stack([X[y == c].mean(0) for c in range(4)])
    majority = [np.bincount(est.labels_[y == c]).argmax() for c in range(4)]
    np.testing.assert_array_equal(est.predict(centres), majority)
    with pytest.raises(ValueError, match="features"):
        est.predict(X[:, :3])


@pytest.fixture(scope="module")
def wide() -> tuple[np.ndarray, np.ndarray]:
    """60 nonnegative 3,000-dim rows in 3 groups (vocabulary-like: more features than rows)."""
    rng = np.random.default_rng(0)
    centers = rng.gamma(0.3, size=(3, 3000))
    y = np.repeat(np.arange(3), 20)
    X = centers[y] * rng.gamma(4.0, 0.25, size=(60, 3000))
    return (X / X.sum(1, keepdims=True)).astype(np.float32), y


def test_span_basis_keeps_distances_and_projects_rows() -> None:
    rng = np.random.default_rng(1)
    Z = rng.normal(size=(12, 500)).astype(np.float32)
    Z[11] = Z[0] + Z[1]  # rank 11
    b = SpanBasis(Z)
    assert b.rank == 11 and b.projection.shape == (500, 11)
    d_full = ((Z[:, None].astype(np.float64) - Z[None]) ** 2).sum(-1)
    d_span = ((b.coords[:, None] - b.coords[None]) ** 2).sum(-1)
    np.testing.assert_allclose(d_span, d_full, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(b.transform(Z), b.coords, rtol=0, atol=1e-4)
    np.testing.assert_allclose(b.projection.T @ b.projection, np.eye(11), atol=1e-5)
    assert b.matches(Z) and not b.matches(Z[:, ::-1].copy()) and not b.matches(Z[:5])
    # Directions of eigenvalue 1e-12 of the largest (the flower embeddings have such): the
    # projection onto them must still reproduce the coordinates.
    U, _ = np.linalg.qr(rng.normal(size=(40, 40)))
    V, _ = np.linalg.qr(rng.normal(size=(2000, 40)))
    W = ((U * np.logspace(0, -6, 40)) @ V.T).astype(np.float32)
    wide = SpanBasis(W)
    assert wide.rank == 40 and wide.matches(W)
    err = np.abs(wide.transform(W) - wide.coords).max()
    assert err <= 1e-5 * np.sqrt(wide.sq_norms.max()), err


def test_span_head_runs_kmeans_and_pseudo_labels_of_the_features(wide) -> None:
    """k-means sees the same distances in the span basis: same partition, same pseudo-labels
    and centroids (back in feature space) as the paper's head on the raw axes."""
    X, _ = wide
    a = small(n_clusters=3, basis="features").fit(X)
    b = small(n_clusters=3, basis="span").fit(X)
    assert b.span_.rank == 60 and b.head_[0].in_features == 60
    assert np.array_equal(a.kmeans_labels_, b.kmeans_labels_)
    assert np.array_equal(a.pseudo_indices_, b.pseudo_indices_)
    np.testing.assert_allclose(b.cluster_centers_, a.cluster_centers_, rtol=1e-4,
                               atol=1e-4 * np.abs(a.cluster_centers_).max())
    # At init the first layer computes what a 3,000-input nn.Linear would: pre-activations
    # W z with W ~ U(+-1/sqrt(3000)) have variance |z|^2 / 9000 over the hidden units
    # (lr 1e-12: one step leaves the init as it was).
    init = PseudoLabelHead(n_clusters=3, hidden_dim=512, epochs=1, lr=1e-12, n_init=3,
                           random_state=0).fit(X)
    Z = X * init.input_scale_
    pre = (init._head_input(X) @ init.head_[0].weight.detach().numpy().T
           - init.head_[0].bias.detach().numpy())
    ratio = pre.var(axis=1) / ((Z.astype(np.float64) ** 2).sum(1) / (3 * 3000))
    assert 0.75 < float(np.median(ratio)) < 1.25, np.median(ratio)
    assert np.array_equal(b.predict(X), b.labels_)
    assert "span_" not in a.__dict__


def test_span_is_auto_for_wide_features_and_reusable(wide, blobs) -> None:
    X, _ = wide
    auto = small(n_clusters=3).fit(X)
    again = small(n_clusters=3, random_state=5).fit(X, span=auto.span_)
    assert again.span_ is auto.span_
    fresh = small(n_clusters=3, random_state=5).fit(X)
    assert np.array_equal(again.labels_, fresh.labels_)
    assert "span_" not in small(n_clusters=4).fit(blobs[0]).__dict__  # 6 features < 300 rows
    with pytest.raises(ValueError, match="span= was built from other features"):
        small(n_clusters=3).fit(X[:, ::-1].copy(), span=auto.span_)
    with pytest.raises(ValueError, match="basis must be one of"):
        small(basis="vocab").fit(X)


@pytest.mark.parametrize("kw", [{}, {"batch_size": 7}, {"weight_decay": 0.05}])
def test_span_head_is_the_features_head_from_the_same_init(wide, monkeypatch, kw) -> None:
    """Started from P_0 = W_0 Q (the span head's weights drawn as the projection of the
    features head's own W_0), NeuronAdam walks one path in both bases: the same pseudo-labels,
    loss curve and outputs, to fp rounding (full batch, minibatches, decoupled decay)."""
    X, _ = wide

    def projected(hidden_dim, n_features, projection, generator):
        w0 = torch.empty(hidden_dim, n_features)
        torch.nn.init.kaiming_uniform_(w0, a=math.sqrt(5), generator=generator)
        return w0 @ torch.from_numpy(projection)

    feat = small(n_clusters=3, basis="features", lr=1e-2, epochs=40, **kw).fit(X)
    monkeypatch.setattr(head_module, "_span_init", projected)
    span = small(n_clusters=3, basis="span", lr=1e-2, epochs=40, **kw).fit(X)
    assert np.array_equal(span.pseudo_indices_, feat.pseudo_indices_)
    assert feat.loss_curve_[-1] < feat.loss_curve_[0] / 4  # it trained
    np.testing.assert_allclose(span.loss_curve_, feat.loss_curve_, rtol=2e-4, atol=1e-6)
    logits_f = feat._logits(feat._head_input(X))
    logits_s = span._logits(span._head_input(X))
    np.testing.assert_allclose(logits_s, logits_f, rtol=0, atol=2e-3 * np.abs(logits_f).max())
    assert np.array_equal(span.labels_, feat.labels_)
    # Per-weight Adam from the same start does not stay on that path: why it has no span form.
    adam = small(n_clusters=3, basis="features", lr=1e-2, epochs=40, optimizer="adam",
                 **kw).fit(X)
    assert np.abs(np.array(adam.loss_curve_) - feat.loss_curve_).max() > 1e-3


def test_per_weight_adam_runs_on_the_features_only(wide) -> None:
    X, _ = wide
    assert "span_" not in small(n_clusters=3, optimizer="adam").fit(X).__dict__
    with pytest.raises(ValueError, match="basis='span' needs optimizer='neuron-adam'"):
        small(n_clusters=3, basis="span", optimizer="adam").fit(X)
    with pytest.raises(ValueError, match="optimizer must be one of"):
        small(optimizer="sgd").fit(X)
