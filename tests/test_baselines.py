"""Tests of esmc_lens.cluster.baselines (k-means / head / Output / vision baselines and tables)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.datasets import make_blobs

from esmc_lens.cluster.baselines import (
    embed_answers,
    format_mean_std,
    head_scores,
    kmeans_scores,
    output_baseline,
    preprocess_features,
    score_table,
    summarize,
    vision_baseline,
)
from esmc_lens.cluster.metrics import clustering_scores
from esmc_lens.errors import ConfigError


@pytest.fixture(scope="module")
def blobs():
    X, y = make_blobs(n_samples=90, centers=3, n_features=8, cluster_std=0.3,
                      center_box=(-20, 20), random_state=0)
    return X, y


@pytest.fixture(scope="module")
def minilm():
    from esmc_lens.models.text_encoder import MiniLMEncoder

    return MiniLMEncoder()


def test_kmeans_well_separated_is_perfect_every_seed(blobs):
    X, y = blobs
    df, labels = kmeans_scores(X, y, 3, seeds=range(10), n_init=2, return_labels=True)
    assert list(df.index) == list(range(10)) and df.index.name == "seed"
    assert {"nmi", "ri", "ari", "acc", "vi", "inertia"} <= set(df.columns)
    assert (df["nmi"] == 1.0).all() and (df["ri"] == 1.0).all()
    assert (df["ari"] == 1.0).all() and (df["acc"] == 1.0).all() and (df["vi"] == 0.0).all()
    assert labels.shape == (10, 90) and labels.dtype == np.int64
    for row, seed in zip(labels, df.index, strict=True):
        assert clustering_scores(y, row)["nmi"] == df.loc[seed, "nmi"]


def test_summary_of_identical_runs_is_exact():
    # Imperfect but seed-independent: every run finds the same two groups; y splits one.
    X = np.array([[0.0], [0.1], [0.2], [10.0], [10.1], [10.2]])
    y = np.array([0, 0, 1, 1, 1, 1])
    df = kmeans_scores(X, y, 2, seeds=range(10), n_init=1)
    s = summarize(df)
    for m in ("nmi", "ri", "ari", "acc", "vi"):
        assert df[m].nunique() == 1
        assert s.loc[m, "mean"] == df[m].iloc[0]  # exact, no round-off
        assert s.loc[m, "std"] == 0.0
        assert s.loc[m, "n"] == 10
    assert 0 < s.loc["nmi", "mean"] < 1


def test_summarize_values():
    df = pd.DataFrame({"nmi": [0.1, 0.2, 0.3, 0.4], "ri": [1.0, 1.0, 0.5, 0.5]})
    s = summarize(df)
    assert s.loc["nmi", "mean"] == pytest.approx(0.25, abs=1e-15)
    assert s.loc["nmi", "std"] == pytest.approx(np.std([0.1, 0.2, 0.3, 0.4]), abs=1e-15)
    assert s.loc["ri", "std"] == pytest.approx(0.25)
    assert summarize(df, ddof=1).loc["ri", "std"] == pytest.approx(np.std([1, 1, .5, .5],
                                                                          ddof=1))
    assert list(summarize(df, metrics=["ri"]).index) == ["ri"]
    with pytest.raises(ConfigError):
        summarize(df, metrics=["acc"])


def test_kmeans_deterministic_and_missing_labels(blobs):
    X, y = blobs
    a = kmeans_scores(X, y, 3, seeds=[3, 7], n_init=1)
    b = kmeans_scores(X, y, 3, seeds=[3, 7], n_init=1)
    pd.testing.assert_frame_equal(a, b)
    y_missing = y.copy()
    y_missing[:10] = -1
    _, lab = kmeans_scores(X, y_missing, 3, seeds=[3], n_init=1, return_labels=True)
    assert lab.shape == (1, 90)  # every sample clustered, unlabelled ones not scored
    c = kmeans_scores(X, y_missing, 3, seeds=[3], n_init=1)
    assert c.loc[3, "nmi"] == clustering_scores(y[10:], lab[0, 10:])["nmi"]


def test_kmeans_inputs(blobs):
    X, y = blobs
    t = kmeans_scores(torch.tensor(X, dtype=torch.float16), y, 3, seeds=0, n_init=1)
    assert t.loc[0, "nmi"] == 1.0
    assert kmeans_scores(X, y, 3, seeds=[0], n_init=1, timing=True)["seconds"].iloc[0] > 0
    with pytest.raises(ConfigError, match="n_clusters"):
        kmeans_scores(X, y, 1)
    with pytest.raises(ConfigError, match="length"):
        kmeans_scores(X, y[:-1], 3)
    with pytest.raises(ConfigError, match="seeds"):
        kmeans_scores(X, y, 3, seeds=[])
    with pytest.raises(ConfigError, match="preprocess"):
        kmeans_scores(X, y, 3, preprocess="pca")


def test_preprocess_features():
    X = np.array([[3.0, 4.0], [0.0, 4.0], [0.0, 4.0]])
    l2 = preprocess_features(X, "l2")
    np.testing.assert_allclose(l2, [[0.6, 0.8], [0.0, 1.0], [0.0, 1.0]])
    z = preprocess_features(X, "standardize")
    np.testing.assert_allclose(z.mean(axis=0), 0.0, atol=1e-12)
    np.testing.assert_allclose(z[:, 1], 0.0)  # constant feature: centred, not scaled
    assert preprocess_features(X) is not None and np.array_equal(preprocess_features(X), X)


def test_head_scores_deterministic_per_seed(blobs):
    X, y = blobs
    kw = dict(hidden_dim=16, epochs=5, n_init=1)
    a, la = head_scores(X, y, 3, alpha=0.3, seeds=[0, 1, 2], return_labels=True, **kw)
    b, lb = head_scores(X, y, 3, alpha=0.3, seeds=[0, 1, 2], return_labels=True, **kw)
    pd.testing.assert_frame_equal(a, b)
    np.testing.assert_array_equal(la, lb)
    one = head_scores(X, y, 3, alpha=0.3, seeds=[1], **kw)  # a seed's row does not depend
    pd.testing.assert_frame_equal(one, a.loc[[1]])            # on the other seeds
    assert {"nmi", "ri", "kmeans_nmi", "kmeans_ri", "final_loss"} <= set(a.columns)
    assert (a["kmeans_nmi"] == 1.0).all()
    with pytest.raises(ConfigError, match="random_state"):
        head_scores(X, y, 3, alpha=0.3, random_state=0)


def test_output_baseline_separates_answers(minilm):
    answers = ["red", "red flower", "crimson red", "white", "white flower", "snow white"]
    y = [0, 0, 0, 1, 1, 1]
    df = output_baseline(answers, y, 2, encoder=minilm, seeds=range(3), n_init=10)
    assert (df["nmi"] == 1.0).all()
    # The paper's point (section 4.3, Fig. 4): the answers' *form* can outweigh their
    # content. With "a ... flower" sentences beside bare words, MiniLM groups by form.
    mixed = ["red", "a red flower", "crimson", "white", "a white flower", "snow white"]
    df_mixed = output_baseline(mixed, y, 2, encoder=minilm, seeds=range(3), n_init=10)
    assert (df_mixed["nmi"] < 0.5).all()
    emb = embed_answers(["  red", "red ", "white"], minilm)
    np.testing.assert_array_equal(emb[0], emb[1])  # stripped, encoded once
    np.testing.assert_allclose(emb[2], minilm.encode(["white"])[0], atol=1e-6)
    with pytest.raises(ConfigError):
        embed_answers("red", minilm)


def test_vision_baseline(blobs):
    X, y = blobs

    class FakeCache:
        vision = torch.tensor(X, dtype=torch.float32)

    a = vision_baseline(FakeCache(), y, 3, seeds=[0, 1], n_init=1)
    b = vision_baseline(X.astype(np.float32), y, 3, seeds=[0, 1], n_init=1)
    pd.testing.assert_frame_equal(a, b)
    assert (a["nmi"] == 1.0).all()

    class NoVision:
        vision = None

    with pytest.raises(ConfigError, match="vision=True"):
        vision_baseline(NoVision(), y, 3)


def test_score_table_and_format():
    esmc = pd.DataFrame({"nmi": [0.7, 0.8], "ri": [0.9, 0.9], "ari": [0.5, 0.5],
                         "acc": [0.6, 0.8]})
    output = pd.DataFrame({"nmi": [0.5], "ri": [0.75], "ari": [0.25], "acc": [0.5]})
    table = score_table({"ESMC": esmc, "Output": output})
    assert list(table.index) == ["ESMC", "Output"] and table.index.name == "method"
    assert list(table.columns) == ["nmi_mean", "nmi_std", "ri_mean", "ri_std", "ari_mean",
                                   "ari_std", "acc_mean", "acc_std", "n_seeds"]
    assert table.loc["ESMC", "nmi_mean"] == pytest.approx(0.75)
    assert table.loc["ESMC", "nmi_std"] == pytest.approx(0.05)
    assert table.loc["Output", "nmi_std"] == 0.0 and table.loc["Output", "n_seeds"] == 1
    f = format_mean_std(table)
    assert list(f.columns) == ["nmi", "ri"]
    assert f.loc["ESMC", "nmi"] == "0.7500 ± 0.0500"
    assert f.loc["ESMC", "ri"] == "0.9000 ± 0.0000"
    assert f.loc["Output", "ri"] == "0.7500 ± 0.0000"
    assert format_mean_std(table, metrics=("acc",), digits=2).loc["ESMC", "acc"] == \
        "0.70 ± 0.10"


def test_format_exact_paper_like_strings():
    table = pd.DataFrame({"nmi_mean": [0.7283, float("nan")], "nmi_std": [0.0123, 0.0],
                          "ri_mean": [0.8982, 0.5], "ri_std": [0.0, float("nan")]},
                         index=pd.Index(["ESMC", "x"], name="method"))
    f = format_mean_std(table)
    assert f.loc["ESMC", "nmi"] == "0.7283 ± 0.0123"
    assert f.loc["ESMC", "ri"] == "0.8982 ± 0.0000"
    assert f.loc["x", "nmi"] == "n/a" and f.loc["x", "ri"] == "0.5000"
    with pytest.raises(ConfigError, match="acc_mean"):
        format_mean_std(table, metrics=("acc",))
    missing = score_table({"a": pd.DataFrame({"nmi": [1.0]})})
    assert np.isnan(missing.loc["a", "ri_mean"])
    with pytest.raises(ConfigError):
        score_table({})


def _cache_with_blocks(blocks: dict[str, np.ndarray]):
    """A ResidualCache of len(first block) images whose vision side is ``blocks``."""
    from esmc_lens.residual.cache import ResidualCache

    n = len(next(iter(blocks.values())))
    return ResidualCache(
        states=torch.zeros(n, 1, 1, 2), positions=torch.zeros(n, 1, dtype=torch.long),
        tokens=[["a"]] * n, image_span=torch.zeros(n, 2, dtype=torch.long), stream=[0],
        image_ids=[str(i) for i in range(n)], prompts=["p"] * n,
        meta={"vision_blocks": {k: v.shape[1] for k, v in blocks.items()}},
        vision=torch.tensor(np.concatenate(list(blocks.values()), axis=1)))


def test_vision_features_weigh_every_vision_side_block_alike():
    """Each block is divided by the RMS of its rows' norms: a 2-d block of norm-5 rows and a
    3-d block of norm-2 rows both end with RMS row norm 1; "pooled" is the first block raw."""
    from esmc_lens.cluster.baselines import vision_features

    pooled = np.array([[3.0, 4.0], [4.0, 3.0], [0.0, 5.0], [5.0, 0.0]])
    colours = np.array([[2.0, 0, 0], [0, 2.0, 0], [0, 0, 2.0], [0, 2.0, 0]])
    cache = _cache_with_blocks({"EfficientNet pooled": pooled, "colours": colours})
    X, name = vision_features(cache)
    assert name == "Vision only (all vision-side features)" and X.shape == (4, 5)
    np.testing.assert_allclose(X[:, :2], pooled / 5, rtol=1e-7)
    np.testing.assert_allclose(X[:, 2:], colours / 2, rtol=1e-7)
    P, pname = vision_features(cache, "pooled")
    assert pname == "Vision only (EfficientNet pooled)"
    np.testing.assert_array_equal(P, pooled.astype(np.float32))
    with pytest.raises(ConfigError, match="inputs="):
        vision_features(cache, "colours")
    # a cache saved before the block record: the tower's pooled feature alone, unscaled
    cache.meta = {}
    X1, name1 = vision_features(cache)
    assert name1 == "Vision only (vision tower pooled)" and X1.shape == (4, 5)
    np.testing.assert_array_equal(X1, cache.vision.numpy())
    cache.meta = {"vision_blocks": {"a": 2, "b": 2}}
    with pytest.raises(ConfigError, match="does not add up"):
        vision_features(cache)


def test_vision_baselines_fair_variant_sees_what_pooled_misses():
    """Two blocks: the first (a large "pooled" feature) splits the images by a nuisance, the
    second (small "colour" features) by the labels. Raw pooled k-means follows the nuisance
    (NMI 0); the fair variant, each block weighted alike, finds the labels (NMI 1)."""
    from esmc_lens.cluster.baselines import vision_baselines

    y = np.array([0, 0, 1, 1] * 6)
    nuisance = np.array([0, 1] * 12)
    rng = np.random.default_rng(0)
    pooled = 100.0 * nuisance[:, None] + rng.normal(0, 1, (24, 16))
    pooled[:, 0] += 30.0 * y  # the label is in pooled too, below the nuisance
    colour = np.eye(2)[y] + rng.normal(0, 0.01, (24, 2))
    cache = _cache_with_blocks({"EfficientNet pooled": pooled, "colour": colour})
    res = vision_baselines(cache, y, 2, seeds=range(3), n_init=10)
    assert list(res) == ["Vision only (all vision-side features)",
                         "Vision only (EfficientNet pooled)"]
    assert (res["Vision only (all vision-side features)"]["nmi"] == 1.0).all()
    assert (res["Vision only (EfficientNet pooled)"]["nmi"] < 1e-9).all()
    one = vision_baselines(_cache_with_blocks({"vision tower pooled": pooled}), y, 2,
                           seeds=[0])
    assert list(one) == ["Vision only (vision tower pooled)"]
