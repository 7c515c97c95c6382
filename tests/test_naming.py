"""Tests of esmc_lens.report.naming on vocabulary vectors whose right names are known."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esmc_lens.errors import ConfigError
from esmc_lens.lens.keyword_rule import keyword_token_ids
from esmc_lens.models.tiny import build_tokenizer
from esmc_lens.report.naming import as_probs, clean_token, name_clusters, naming_accuracy


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def _id(tok, text: str) -> int:
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return ids[0]


def _probs(tok, rows: list[str], mass: float = 0.5) -> np.ndarray:
    """Row i: ``mass`` on token rows[i], the rest spread uniformly over the vocabulary."""
    V = len(tok)
    p = np.full((len(rows), V), (1 - mass) / V)
    for i, t in enumerate(rows):
        p[i, _id(tok, t)] += mass
    return p


KW = ["red", "white", "blue"]


def test_names_and_enrichment_exact(tok) -> None:
    probs = _probs(tok, [" red"] * 3 + [" white"] * 3)
    labels = np.array([0, 0, 0, 1, 1, 1])
    df = name_clusters(probs, labels, tok, keywords=KW)
    assert df["cluster"].tolist() == [0, 1]
    assert df["size"].tolist() == [3, 3]
    assert df["name"].tolist() == ["red", "white"]
    # same uniform share inside and outside cancels: enrichment is exactly the mass
    assert df["name_enrichment"].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    ek = df.loc[0, "enriched_keywords"]
    assert [k for k, _ in ek] == ["red", "blue", "white"]
    assert ek[1][1] == pytest.approx(0.0, abs=1e-9) and ek[2][1] == pytest.approx(-0.5, abs=1e-6)
    assert df.loc[0, "top_tokens"][0] == "red" and df.loc[1, "top_tokens"][0] == "white"
    assert len(df.loc[0, "top_tokens"]) == 5
    V = len(tok)
    # " red" alone: mass + its uniform share (variants "re", "R" are other words)
    assert df.loc[0, "top_probs"][0] == pytest.approx(0.5 + 0.5 / V, abs=1e-6)


def test_logits_and_probs_give_the_same_table(tok) -> None:
    probs = _probs(tok, [" red", " red", " white", " blue"], mass=0.7)
    labels = np.array([5, 5, 9, 2])
    a = name_clusters(probs, labels, tok, keywords=KW)
    b = name_clusters(np.log(probs) + 3.0, labels, tok, keywords=KW)  # logits up to a shift
    assert a["name"].tolist() == b["name"].tolist() == ["blue", "red", "white"]
    assert a["cluster"].tolist() == [2, 5, 9]
    np.testing.assert_allclose(a["name_enrichment"], b["name_enrichment"], atol=1e-5)
    np.testing.assert_allclose(as_probs(np.log(probs)), probs, atol=1e-6)


def test_keyword_probable_everywhere_is_not_enriched(tok) -> None:
    # Cluster 0's most probable keyword is "white", but white is more probable still in
    # cluster 1; "red" is what sets cluster 0 apart. Enrichments: red +0.3, white -0.3.
    V = len(tok)
    p = np.full((4, V), 0.1 / V)
    r, w = _id(tok, " red"), _id(tok, " white")
    p[:2, w] += 0.6
    p[:2, r] += 0.3  # cluster 0: white is its most probable keyword ...
    p[2:, w] += 0.9  # ... but white is even more probable in cluster 1
    df = name_clusters(p, np.array([0, 0, 1, 1]), tok, keywords=["red", "white"])
    assert df["name"].tolist() == ["red", "white"]  # enrichment, not raw probability
    assert df.loc[0, "top_tokens"][0] == "white"


def test_without_keywords_name_is_the_top_word(tok) -> None:
    probs = _probs(tok, [" red", " red", " white"])
    df = name_clusters(probs, np.array([1, 1, 0]), tok)
    assert df["name"].tolist() == ["white", "red"]
    assert df["name_enrichment"].isna().all()
    assert df.loc[0, "enriched_keywords"] == []


def test_top_tokens_skip_punctuation_and_merge_variants(tok) -> None:
    V = len(tok)
    p = np.full((1, V), 0.1 / V)
    p[0, _id(tok, ".")] += 0.4  # punctuation and a bare space are skipped
    p[0, _id(tok, " ")] += 0.2
    p[0, _id(tok, " blue")] += 0.12
    p[0, _id(tok, " color")] += 0.07  # three variants of one word, summed: 0.15
    p[0, _id(tok, "Color")] += 0.05
    p[0, _id(tok, " Color")] += 0.03
    p /= p.sum()
    df = name_clusters(p, np.array([0]), tok, top=3)
    assert df.loc[0, "top_tokens"][:2] == ["color", "blue"]
    variants = [_id(tok, v) for v in (" color", "Color", " Color")]
    assert df.loc[0, "top_probs"][0] == pytest.approx(p[0, variants].sum())
    assert df.loc[0, "top_probs"][1] == pytest.approx(p[0, _id(tok, " blue")])
    assert clean_token(tok, _id(tok, ".")) == ""
    assert clean_token(tok, _id(tok, " ")) == ""
    assert clean_token(tok, _id(tok, " Color")) == "color"


def test_majority_purity_and_naming_accuracy(tok) -> None:
    # 3 clusters: 0 -> "red" (4 images, 3 red + 1 white), 1 -> "white" (2 white),
    # 2 -> "red" again (4 images, all blue): names match for clusters 0 and 1 only.
    rows = [" red"] * 4 + [" white"] * 2 + [" red"] * 4
    probs = _probs(tok, rows)
    labels = np.array([0, 0, 0, 0, 1, 1, 2, 2, 2, 2])
    classes = ["blue", "Red", "white"]
    y = np.array([1, 1, 1, 2, 2, 2, 0, 0, 0, -1])  # last image unlabelled
    df = name_clusters(probs, labels, tok, keywords=KW, y_true=y, class_names=classes)
    assert df["majority_label"].tolist() == ["Red", "white", "blue"]
    assert df["purity"].tolist() == pytest.approx([0.75, 1.0, 1.0])
    assert df["name"].tolist()[:2] == ["red", "white"]
    assert df["name_matches_majority"].tolist() == [True, True, False]  # case-insensitive
    assert naming_accuracy(df) == pytest.approx(6 / 10)
    # codes instead of names when class_names is not given
    df2 = name_clusters(probs, labels, tok, keywords=KW, y_true=y)
    assert df2["majority_label"].tolist() == [1, 2, 0]
    assert naming_accuracy(df2) == 0.0


def test_keyword_groups_argument_is_used(tok) -> None:
    probs = _probs(tok, [" red", " white"])
    kt = keyword_token_ids(tok, ["red", "white"])
    # swap the groups: the names follow the groups, proving they are used as given
    df = name_clusters(probs, np.array([0, 1]), tok, keywords=["red", "white"],
                       keyword_groups=[kt.groups[1], kt.groups[0]])
    assert df["name"].tolist() == ["white", "red"]
    df = name_clusters(probs, np.array([0, 1]), tok, keywords=["red", "white"],
                       keyword_groups=kt)
    assert df["name"].tolist() == ["red", "white"]


def test_errors(tok) -> None:
    probs = _probs(tok, [" red", " white"])
    with pytest.raises(ConfigError, match="one cluster label per image"):
        name_clusters(probs, np.array([0]), tok)
    with pytest.raises(ConfigError, match="keyword groups"):
        name_clusters(probs, np.array([0, 1]), tok, keywords=["red"], keyword_groups=[[1], [2]])
    with pytest.raises(ConfigError, match="y_true"):
        naming_accuracy(pd.DataFrame({"size": [1]}))
    with pytest.raises(ConfigError, match="space"):
        as_probs(probs, space="hidden")


@pytest.mark.slow
def test_offline_model_names_solid_colours(offline_vlm) -> None:
    """Real model: clusters = ground truth; names read from the voted cell's lens logits.

    Only the last three layers and prompt tokens are captured (the full grid is localized
    in test_localize, where the votes land on E_30('is')), to keep the lens cheap on a CPU.
    """
    from conftest import SOLID_COLOURS, solid

    from esmc_lens.lens.unembed import Unembed
    from esmc_lens.localization.targets import target_embeddings
    from esmc_lens.localization.votes import localize
    from esmc_lens.residual.capture import capture

    names = list(SOLID_COLOURS)
    images = [solid(SOLID_COLOURS[c]) for c in names]
    cache = capture(offline_vlm, images, "The color of the image is", keywords=names,
                    layers=[28, 29, 30], positions=[-3, -2, -1], progress=False)
    loc = localize(cache, tau=0.2)
    assert loc.found and cache.tokens[0][loc.primary[1]] == "Ġis"
    feats = target_embeddings(cache, [loc.primary], unembed=Unembed.from_model(offline_vlm))
    y = np.arange(6)
    df = name_clusters(feats, y, offline_vlm.tokenizer, keywords=names, y_true=y,
                       class_names=names)
    print(df[["cluster", "name", "name_enrichment", "top_tokens", "majority_label"]])
    assert naming_accuracy(df) == 1.0
