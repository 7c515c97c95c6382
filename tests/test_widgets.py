"""The explorers' logic: set widget values, check what they show (values, not just that it ran)."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("ipywidgets")

from conftest import SOLID_COLOURS, solid

from esmc_lens.apps.widgets import ClusterBrowser, LensExplorer, VoteMapExplorer
from esmc_lens.lens.keyword_rule import keyword_token_ids
from esmc_lens.lens.readout import keyword_probs, top_k
from esmc_lens.lens.unembed import Unembed
from esmc_lens.localization.votes import localize, vote_table
from esmc_lens.residual.cache import ResidualCache
from esmc_lens.residual.capture import capture

PROMPT = "The color of the object is"


@pytest.fixture(scope="module")
def images():
    return [solid(SOLID_COLOURS[c], (64, 64)) for c in ("red", "green", "blue", "yellow")]


@pytest.fixture(scope="module")
def cache(tiny_vlm, images):
    return capture(tiny_vlm, images, PROMPT, keywords=["red", "green"], top_k=5,
                   store_dtype=torch.float32, progress=False, image_ids=list("abcd"))


def _png_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# ---------------------------------------------------------------------- LensExplorer


def test_lens_explorer_heatmap_is_the_keyword_probability_of_the_selected_image(
        tiny_vlm, cache, images):
    ex = LensExplorer(cache, tiny_vlm, images=images, keyword="blue")
    unembed = Unembed.from_model(tiny_vlm)
    groups = keyword_token_ids(tiny_vlm.tokenizer, ["blue"]).groups
    for i in (0, 2):
        ex.image.value = i
        want = keyword_probs(cache.states[i].float(), unembed, groups)[..., 0].numpy()
        assert ex.heatmap.shape == (len(cache.stream), cache.n_positions)
        assert list(ex.heatmap.index) == cache.stream
        np.testing.assert_allclose(ex.heatmap.to_numpy(), want, rtol=1e-5, atol=1e-7)
    # the status line reports the selected cell's value
    s, p = ex.layer.value, ex.position.value
    assert f"{ex.heatmap.loc[s].iloc[p]:.4f}" in ex.status.value
    assert ex.message == ""
    assert ex.keyword_tokens  # the tokens that score "blue"


def test_lens_explorer_matches_the_probabilities_captured_on_the_fly(tiny_vlm, cache):
    ex = LensExplorer(cache, tiny_vlm, keyword="green")
    for i in range(len(cache)):
        ex.image.value = i
        np.testing.assert_allclose(ex.heatmap.to_numpy(),
                                   cache.keyword_probs[i, :, :, 1].numpy(), rtol=1e-4,
                                   atol=1e-6)


def test_lens_explorer_top_tokens_follow_layer_and_position(tiny_vlm, cache):
    ex = LensExplorer(cache, tiny_vlm, keyword="red", k=4)
    unembed = Unembed.from_model(tiny_vlm)
    for layer, pos in ((cache.stream[-1], cache.n_positions - 1), (cache.stream[1], 2)):
        ex.layer.value = layer
        ex.position.value = pos
        probs, ids = top_k(cache.states[0, cache.stream_index(layer), pos][None].float(),
                           unembed, k=4)
        assert list(ex.top_tokens["token"]) == [tiny_vlm.tokenizer.decode([int(t)])
                                                for t in ids[0]]
        np.testing.assert_allclose(ex.top_tokens["prob"].to_numpy(), probs[0].numpy(),
                                   rtol=1e-5)
        assert ex.cell_label == f"E_{layer}({ex.position.label})"
        assert ex.cell_label in ex.top_view.value
    # the position dropdown is labelled by tokens
    labels = [lab for lab, _ in ex.position.options]
    assert any(lab.endswith(":color") for lab in labels)


def test_lens_explorer_shows_the_selected_image_and_a_heatmap(tiny_vlm, cache, images):
    ex = LensExplorer(cache, tiny_vlm, images=images, keyword="red", image_size=32)
    shown = Image.open(io.BytesIO(ex.image_view.value)).convert("RGB")
    assert shown.getpixel((5, 5)) == SOLID_COLOURS["red"]
    ex.image.value = 2
    shown = Image.open(io.BytesIO(ex.image_view.value)).convert("RGB")
    assert shown.getpixel((5, 5)) == SOLID_COLOURS["blue"]
    w, h = _png_size(ex.heatmap_view.value)
    assert w > 100 and h > 100


def test_lens_explorer_reports_an_empty_keyword(tiny_vlm, cache):
    ex = LensExplorer(cache, tiny_vlm, keyword="red", draw=False)
    ex.keyword.value = "  "
    assert ex.heatmap.empty
    assert "type a keyword" in ex.message
    assert "type a keyword" in ex.status.value
    ex.keyword.value = "red"
    assert ex.message == "" and not ex.heatmap.empty


# ------------------------------------------------------------------- VoteMapExplorer


def _toy_cache(probs: np.ndarray, keywords: list[str], empty_slot: int | None = None):
    """A cache with hand-set keyword probabilities [n, S, P, K] (no model needed)."""
    n, S, P, _K = probs.shape
    pos = torch.arange(P).repeat(n, 1) + 10
    if empty_slot is not None:
        pos[0, empty_slot] = -1
    return ResidualCache(
        states=torch.zeros(n, S, P, 4), positions=pos,
        tokens=[[f"t{p}" for p in range(P)] for _ in range(n)],
        image_span=torch.zeros(n, 2, dtype=torch.long), stream=list(range(S)),
        image_ids=[str(i) for i in range(n)], prompts=["p"] * n, keywords=keywords,
        keyword_probs=torch.tensor(probs, dtype=torch.float32))


def test_vote_map_counts_pairs_above_tau_and_finds_the_targets():
    rng = np.random.default_rng(0)
    probs = rng.uniform(0, 0.15, size=(5, 4, 3, 2))
    probs[:, 2, 1, 0] = 0.5  # every image votes for (2, 1) with keyword 0
    probs[:3, 3, 2, 1] = 0.3  # three images vote for (3, 2) with keyword 1
    ex = VoteMapExplorer(_toy_cache(probs, ["red", "white"]), draw=False)
    assert ex.keywords == ["red", "white"] and ex.n_pairs == 10
    assert ex.votes.loc[2].iloc[1] == 5 and ex.votes.loc[3].iloc[2] == 3
    assert int(ex.votes.to_numpy().sum()) == 8
    assert ex.targets == [(2, 1)] and ex.max_votes == 5
    assert ex.target_labels == ["E_2(11:t1)"]
    expected = np.zeros((4, 3), dtype=np.int64)  # the noise (< 0.15) never votes
    expected[2, 1], expected[3, 2] = 5, 3
    np.testing.assert_array_equal(ex.votes.to_numpy(), expected)
    # the same as Algorithm 1 with every image sampled
    loc = localize(_toy_cache(probs, ["red", "white"]), n_samples=5)
    pd.testing.assert_frame_equal(ex.votes, loc.votes)

    ex.tau.value = 0.4  # only the 0.5 pairs remain
    assert int(ex.votes.to_numpy().sum()) == 5 and ex.targets == [(2, 1)]
    ex.tau.value = 0.6
    assert ex.max_votes == 0 and ex.targets == []
    assert "no (image, keyword) pair is above tau" in ex.summary
    ex.tau.value = 0.0  # every cell, every pair
    assert (ex.votes.to_numpy() == 10).all()


def test_vote_map_keywords_box_changes_the_table():
    probs = np.zeros((4, 2, 3, 2))
    probs[:, 1, 0, 0] = 0.9
    probs[:, 0, 2, 1] = 0.9
    ex = VoteMapExplorer(_toy_cache(probs, ["red", "white"]), keywords=["white"], draw=False)
    assert ex.keywords == ["white"] and ex.targets == [(0, 2)] and ex.n_pairs == 4
    ex.keywords_box.value = "red"
    assert ex.targets == [(1, 0)]
    ex.keywords_box.value = "red, white, mauve"  # "mauve" was not scored, no model given
    assert ex.keywords == ["red", "white"] and ex.missing == ["mauve"]
    assert ex.n_pairs == 8 and ex.max_votes == 4 and ex.targets == [(0, 2), (1, 0)]
    assert "not scored: mauve" in ex.summary


def test_vote_map_never_counts_empty_slots():
    probs = np.full((2, 2, 3, 1), 0.9)
    ex = VoteMapExplorer(_toy_cache(probs, ["red"], empty_slot=1), draw=False)
    assert ex.votes.iloc[:, 1].tolist() == [1, 1]
    assert ex.votes.iloc[:, 0].tolist() == [2, 2]


def test_vote_map_scores_new_keywords_with_the_model(tiny_vlm, cache):
    ex = VoteMapExplorer(cache, tiny_vlm, keywords="red", tau=0.0)
    ex.keywords_box.value = "red, blue"
    assert ex.keywords == ["red", "blue"] and ex.missing == []
    unembed = Unembed.from_model(tiny_vlm)
    blue = keyword_probs(cache.states.float(), unembed,
                         keyword_token_ids(tiny_vlm.tokenizer, ["blue"]).groups)
    probs = torch.stack([cache.keyword_probs[..., 0], blue[..., 0]], dim=-1)
    ex.tau.value = float(np.quantile(probs.numpy(), 0.9))
    np.testing.assert_array_equal(ex.votes.to_numpy(),
                                  vote_table(probs, ex.tau.value))
    w, h = _png_size(ex.map_view.value)
    assert w > 100 and h > 100


# -------------------------------------------------------------------- ClusterBrowser


def _clusters():
    return pd.DataFrame({"cluster": [0, 1], "size": [3, 2], "name": ["red", "blue"],
                         "top_tokens": [["red", "crimson"], ["blue", "navy"]],
                         "majority_label": ["red", "blue"], "purity": [1.0, 0.5]})


def test_cluster_browser_shows_each_cluster_with_name_tokens_and_members(images):
    imgs = [*images, solid((200, 0, 0), (64, 64))]
    labels = np.array([0, 1, 1, 0, 0])
    cb = ClusterBrowser(imgs, labels, _clusters(), image_ids=list("abcde"),
                        true_labels=["red", "green", "blue", "yellow", "red"], thumb=24)
    assert [r["cluster"] for r in cb.rows] == [0, 1]
    assert cb.rows[0]["images"] == [0, 3, 4] and cb.rows[1]["images"] == [1, 2]
    assert cb.rows[0]["name"] == "red" and cb.rows[1]["tokens"] == ["blue", "navy"]
    assert "cluster 1: blue" in cb.rows[1]["header"] and "navy" in cb.rows[1]["header"]
    assert "majority: blue (50%)" in cb.rows[1]["header"]
    assert len(cb.body.children) == 2
    # thumbnails are the member images, captioned with id and true label
    tiles = cb.body.children[1].children[1].children
    thumb = Image.open(io.BytesIO(tiles[0].children[0].value)).convert("RGB")
    assert thumb.getpixel((3, 3)) == SOLID_COLOURS["green"]
    assert "b [green]" in tiles[0].children[1].value

    cb.choice.value = 1
    assert [r["cluster"] for r in cb.rows] == [1] and len(cb.body.children) == 1
    cb.choice.value = -1
    cb.per_cluster.value = 1
    assert [r["images"] for r in cb.rows] == [[0], [1]]


def test_cluster_browser_from_result():
    from types import SimpleNamespace

    res = SimpleNamespace(labels=np.array([1, 0, 1]), clusters=_clusters(),
                          image_ids=["x", "y", "z"], y_true=np.array([0, 1, -1]),
                          class_names=["blue", "red"])
    cb = ClusterBrowser.from_result(res, lambda i: solid((0, 0, 0), (8, 8)))
    assert cb.true_labels == ["blue", "red", ""]
    assert cb.rows[0]["images"] == [1] and cb.rows[1]["images"] == [0, 2]


# ----------------------------------------------------------- static views and linking


def test_static_lens_view_carries_the_explorers_numbers(tiny_vlm, cache, images):
    from esmc_lens.localization.grid import keyword_grid
    from esmc_lens.report.plotting import token_label

    ex = LensExplorer(cache, tiny_vlm, images=images, keyword="blue", k=3)
    ex.layer.value = cache.stream[2]
    view = ex.static(["blue", "red"], model="tiny", quick=True)
    d = view.data
    assert set(d["grids"]) == {"blue", "red"} and len(d["images"]) == len(cache)
    for i in range(len(cache)):
        for w in ("blue", "red"):
            want = keyword_grid(cache, i, w, ex.unembed, tiny_vlm.tokenizer).to_numpy()
            got = np.array(d["grids"][w][i], dtype=float)
            np.testing.assert_allclose(got, want, rtol=1e-3)
    top = ex.cell_top_tokens(1, cache.stream[2], 3)
    cell = d["top"][1][2][3]
    assert [t for t, _ in cell] == list(top["label"])
    raw = tiny_vlm.tokenizer.convert_ids_to_tokens(
        top_k(cache.states[1, 2, 3][None].float(), ex.unembed, k=3)[1][0].tolist())
    assert list(top["label"]) == [token_label(t) for t in raw]
    np.testing.assert_allclose([p for _, p in cell], top["prob"], rtol=1e-3)
    assert d["start"] == {"image": 0, "row": 2, "pos": cache.n_positions - 1,
                          "keyword": "blue"}
    assert "QUICK" in view.html and "model: tiny" in view.html
    assert "<script" in view.html and "src='http" not in view.html  # self-contained
    assert d["images"][0]["thumb"].startswith("data:image/png;base64,")


def test_static_vote_map_counts_what_vote_table_counts():
    rng = np.random.default_rng(1)
    probs = rng.uniform(0, 0.4, size=(5, 4, 3, 2))
    ex = VoteMapExplorer(_toy_cache(probs, ["red", "white"], empty_slot=1), tau=0.25,
                         draw=False)
    view = ex.static(link="lens-1")
    d = view.data
    assert d["tau"] == 0.25 and d["link"] == "lens-1" and d["start"] == ["red", "white"]
    # the page's count, in Python: pairs above tau per cell, None (empty slot) never counts
    arr = np.array([[[[np.nan if x is None else x for x in row] for row in im]
                     for im in d["probs"][w]] for w in ("red", "white")], dtype=float)
    counts = (np.nan_to_num(arr, nan=-1) > d["tau"]).sum(axis=(0, 1))
    np.testing.assert_array_equal(counts, ex.votes.to_numpy())


def test_vote_map_opens_cells_in_a_linked_lens_explorer(tiny_vlm, cache):
    lens = LensExplorer(cache, tiny_vlm, keyword="red", draw=False)
    votes = VoteMapExplorer(cache, tiny_vlm, keywords="red", tau=0.0, draw=False)
    assert votes.open_button.disabled
    votes.link(lens)
    assert not votes.open_button.disabled
    cells = [c for _, c in votes.cell_choice.options]
    assert cells and cells[0] in votes.targets  # the winners come first
    layer, slot = cells[-1]
    votes.cell_choice.value = cells[-1]
    votes.open_button.click()
    assert (lens.layer.value, lens.position.value) == (layer, slot)
    assert lens.cell_label == f"E_{layer}({lens.position.label})"


def test_cluster_browser_thumbnails_open_in_a_linked_lens_explorer(tiny_vlm, cache, images):
    lens = LensExplorer(cache, tiny_vlm, keyword="red", draw=False)
    cb = ClusterBrowser(images, np.array([0, 1, 1, 0]), _clusters(),
                        image_ids=["c", "b", "zz", "a"]).link(lens)
    tiles = cb.body.children[1].children[1].children  # cluster 1: images 1 ("b"), 2 ("zz")
    tiles[0].children[-1].click()
    assert lens.image.value == list(cache.image_ids).index("b")
    assert cb.open_in_lens(2) is False  # "zz" is not in the lens explorer's capture
    cb.body.children[0].children[1].children[0].children[-1].click()  # image 0, id "c"
    assert lens.image.value == list(cache.image_ids).index("c")


def test_keyword_grid_reads_the_capture_or_computes_from_the_states(tiny_vlm, cache):
    from esmc_lens.localization.grid import keyword_grid

    g = keyword_grid(cache, 1, "RED")
    assert g.attrs["source"] == "capture" and list(g.index) == cache.stream
    np.testing.assert_array_equal(g.to_numpy(), cache.keyword_probs[1, :, :, 0].numpy())
    unembed = Unembed.from_model(tiny_vlm)
    g2 = keyword_grid(cache, 1, "blue", unembed, tiny_vlm.tokenizer)
    want = keyword_probs(cache.states[1].float(), unembed,
                         keyword_token_ids(tiny_vlm.tokenizer, ["blue"]).groups)[..., 0]
    np.testing.assert_array_equal(g2.to_numpy(), want.numpy())
    assert g2.attrs["source"] == "states" and g2.attrs["tokens"]
    with pytest.raises(Exception, match="not scored"):
        keyword_grid(cache, 1, "blue")
