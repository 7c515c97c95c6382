"""esmc_lens.localization.votes (Algorithm 1): exact vote counts, ties, empty slots, fallback."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from esmc_lens.errors import ConfigError
from esmc_lens.localization.votes import localize, vote_table
from esmc_lens.residual.cache import ResidualCache


def fake_cache(keyword_probs: torch.Tensor, positions: torch.Tensor | None = None,
               stream: list[int] | None = None, keywords: list[str] | None = None,
               tokens: list[str] | None = None) -> ResidualCache:
    """A ResidualCache around a hand-made keyword_probs [n, S, P, K] (states are zeros)."""
    n, S, P, K = keyword_probs.shape
    if positions is None:
        positions = torch.arange(10, 10 + P).repeat(n, 1)
    tokens = tokens or [f"t{p}" for p in range(P)]
    toks = [[tokens[p] if positions[i, p] >= 0 else "" for p in range(P)] for i in range(n)]
    return ResidualCache(
        states=torch.zeros(n, S, P, 4), positions=positions, tokens=toks,
        image_span=torch.zeros(n, 2, dtype=torch.long), stream=stream or list(range(S)),
        image_ids=[str(i) for i in range(n)], prompts=["p"] * n,
        keywords=keywords or [f"k{j}" for j in range(K)], keyword_probs=keyword_probs)


def test_vote_table_exact_counts_and_strict_tau() -> None:
    kp = torch.zeros(2, 2, 3, 2)
    kp[0, 1, 2, 0] = 0.9
    kp[1, 1, 2, 0] = 0.3
    kp[1, 1, 2, 1] = 0.2  # exactly tau: no vote (strict >)
    kp[0, 0, 1, 1] = 0.2000001
    kp[1, 0, 0, :] = float("nan")  # NaN never votes
    expected = np.array([[0, 1, 0],
                         [0, 0, 2]])
    np.testing.assert_array_equal(vote_table(kp, 0.2), expected)
    np.testing.assert_array_equal(vote_table(kp.numpy(), 0.2), expected)
    # a lower tau counts the tau-equal pair too
    np.testing.assert_array_equal(vote_table(kp, 0.1), [[0, 1, 0], [0, 0, 3]])
    # empty slot of image 0 at position 2 removes its vote there
    valid = np.array([[True, True, False], [True, True, True]])
    np.testing.assert_array_equal(vote_table(kp, 0.2, valid), [[0, 1, 0], [0, 0, 1]])
    with pytest.raises(ConfigError, match="images, stream, positions, keywords"):
        vote_table(kp[0], 0.2)


def test_localize_single_winner_values() -> None:
    kp = torch.full((3, 3, 4, 2), 0.05)
    kp[:, 2, 3, :] = 0.6  # all 6 pairs at (stream 2, slot 3)
    kp[0, 2, 2, 0] = 0.25
    kp[:2, 1, 3, 1] = 0.5
    loc = localize(kp_cache := fake_cache(kp), tau=0.2)
    assert loc.targets == [(2, 3)]
    assert loc.primary == (2, 3)
    assert loc.max_votes == 6 and loc.n_pairs == 6 and loc.found and loc.message == ""
    np.testing.assert_array_equal(loc.sample, [0, 1, 2])  # fewer images than n_samples
    assert isinstance(loc.votes, pd.DataFrame)
    assert loc.votes.index.name == "layer" and list(loc.votes.index) == [0, 1, 2]
    assert list(loc.votes.columns) == kp_cache.position_labels() == [
        "10:t0", "11:t1", "12:t2", "13:t3"]
    np.testing.assert_array_equal(loc.votes.to_numpy(), [[0, 0, 0, 0],
                                                         [0, 0, 0, 2],
                                                         [0, 0, 1, 6]])
    assert loc.probs_max.loc[2, "12:t2"] == pytest.approx(0.25)
    assert loc.probs_max.loc[0, "10:t0"] == pytest.approx(0.05)
    assert loc.keywords == ["k0", "k1"]
    pk = loc.per_keyword
    assert pk.loc["k0", "layer"] == 2 and pk.loc["k0", "slot"] == 3 and pk.loc["k0", "votes"] == 3
    assert pk.loc["k1", "votes"] == 3 and pk.loc["k1", "mean_prob"] == pytest.approx(0.6)
    assert "max votes 6/6" in loc.summary() and "E_2(13:t3)" in loc.summary()


def test_localize_ties_are_all_kept_and_primary_is_highest_mean() -> None:
    kp = torch.zeros(2, 3, 3, 1)
    kp[:, 2, 0, 0] = torch.tensor([0.3, 0.4])  # 2 votes, mean 0.35
    kp[:, 1, 2, 0] = torch.tensor([0.9, 0.5])  # 2 votes, mean 0.70
    kp[:, 2, 2, 0] = torch.tensor([0.3, 0.3])  # 2 votes, mean 0.30
    kp[0, 0, 0, 0] = 0.99  # 1 vote only
    loc = localize(fake_cache(kp), tau=0.2)
    assert loc.max_votes == 2
    assert loc.targets == [(1, 2), (2, 0), (2, 2)]  # by layer, then position
    assert loc.primary == (1, 2)
    assert "3 cell(s)" in loc.summary() and "primary" in loc.summary()


def test_localize_reports_stream_indices_of_a_layer_subset() -> None:
    kp = torch.zeros(1, 3, 2, 1)
    kp[0, 1, 0, 0] = 0.5
    loc = localize(fake_cache(kp, stream=[0, 12, 24]), tau=0.2)
    assert list(loc.votes.index) == [0, 12, 24]
    assert loc.targets == [(12, 0)]


def test_localize_ignores_empty_slots() -> None:
    kp = torch.zeros(3, 1, 3, 1)
    kp[:, 0, 1, 0] = 0.5  # 3 votes at slot 1
    kp[:, 0, 2, 0] = 0.9  # would be 3 votes at slot 2 ...
    positions = torch.tensor([[5, 6, 7], [5, 6, -1], [5, 6, -1]])  # ... but 2 are empty
    loc = localize(fake_cache(kp, positions=positions), tau=0.2)
    np.testing.assert_array_equal(loc.votes.to_numpy(), [[0, 3, 1]])
    assert loc.targets == [(0, 1)]
    assert loc.probs_mean.iat[0, 2] == pytest.approx(0.9)  # mean over the filled image only
    # slot 2 empty in every sampled image: no vote, NaN probabilities
    loc2 = localize(fake_cache(kp, positions=positions), tau=0.2, sample=[1, 2])
    np.testing.assert_array_equal(loc2.votes.to_numpy(), [[0, 2, 0]])
    assert np.isnan(loc2.probs_max.iat[0, 2])


def test_localize_no_vote_falls_back_with_message() -> None:
    kp = torch.full((2, 2, 3, 2), 0.01)
    kp[1, 1, 0, 1] = 0.15
    kp[0, 0, 2, 0] = 0.12
    kp[0, 1, 2, 1] = 0.08
    loc = localize(fake_cache(kp), tau=0.2)
    assert not loc.found and loc.max_votes == 0
    assert loc.targets == [(1, 0)]
    assert loc.primary == (1, 0)
    assert loc.max_prob == pytest.approx(0.15)
    msg = loc.message
    assert "no (image, keyword) pair" in msg and "tau=0.2" in msg
    # the fallback region is the later half of the layers (stream 1 of 0..1): stream 0's
    # 0.12 is not a candidate
    assert "E_1(10:t0) 0.150, E_1(12:t2) 0.080, E_1(11:t1) 0.010" in msg
    assert "E_0(" not in msg.split("Top cells there")[1]
    assert "Lower tau (below 0.150)" in msg
    assert msg in loc.summary()
    assert loc.evidence == "no votes: max keyword p 0.150 <= tau 0.2 (fallback target)"


def test_fallback_stays_on_the_criterion_tokens_in_later_layers() -> None:
    # A chat-template token in an early layer holds the highest probability; the fallback
    # must still pick the criterion sentence's token in the later layers.
    tokens = ["ĠThe", "Ġcolor", "Ġis", "ĠASS", "ISTANT", ":"]
    kp = torch.full((2, 4, 6, 1), 0.01)
    kp[:, 1, 4, 0] = 0.19  # layer 1, 'ISTANT': the global maximum, outside the region
    kp[0, 3, 3, 0] = 0.18  # layer 3, 'ASS': later layer, but not the criterion's token
    kp[1, 2, 1, 0] = 0.05  # layer 2, 'color': the best criterion cell in layers >= 2
    cache = fake_cache(kp, tokens=tokens)
    cache.prompts = ["The color is"] * 2
    loc = localize(cache, tau=0.2)
    assert loc.targets == [(2, 1)]
    assert loc.max_prob == pytest.approx(0.19)
    assert "layers >= 2" in loc.message
    from esmc_lens.localization.votes import criterion_slots

    assert criterion_slots(cache) == [0, 1, 2]
    cache.prompts = ["Something else"] * 2  # prompt not among the tokens: every slot
    assert localize(cache, tau=0.2).targets == [(3, 3)]


def test_ties_are_capped_to_the_strongest_cells() -> None:
    kp = torch.zeros(1, 3, 4, 1)
    kp[0, :, :, 0] = torch.tensor([[0.3, 0.9, 0.4, 0.0],
                                   [0.5, 0.0, 0.0, 0.6],
                                   [0.0, 0.0, 0.7, 0.0]])  # 6 cells tie with 1 vote
    loc = localize(fake_cache(kp), tau=0.2, max_targets=3)
    assert loc.n_tied == 6 and loc.max_votes == 1
    assert loc.targets == [(0, 1), (1, 3), (2, 2)]  # 0.9, 0.6, 0.7; by layer, then slot
    assert loc.message.startswith("6 cells tie with 1 votes; kept the 3")
    assert "dropped E_0(10:t0), E_0(12:t2), E_1(10:t0)" in loc.message
    uncapped = localize(fake_cache(kp), tau=0.2, max_targets=10)
    assert uncapped.targets == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 3), (2, 2)]
    assert uncapped.message == ""


def test_sampling_is_seeded_and_explicit_sample_overrides() -> None:
    kp = torch.rand(20, 2, 3, 2, generator=torch.Generator().manual_seed(0))
    cache = fake_cache(kp)
    a = localize(cache, n_samples=5, seed=3)
    b = localize(cache, n_samples=5, seed=3)
    c = localize(cache, n_samples=5, seed=4)
    expected = np.sort(np.random.default_rng(3).choice(20, size=5, replace=False))
    np.testing.assert_array_equal(a.sample, expected)
    np.testing.assert_array_equal(a.sample, b.sample)
    assert not np.array_equal(a.sample, c.sample)
    pd.testing.assert_frame_equal(a.votes, b.votes)
    # the votes are exactly those of the sampled images
    np.testing.assert_array_equal(a.votes.to_numpy(), vote_table(kp[expected], 0.2))
    assert len(localize(cache, n_samples=50).sample) == 20
    d = localize(cache, sample=[7, 2, -1])
    np.testing.assert_array_equal(d.sample, [2, 7, 19])
    np.testing.assert_array_equal(d.votes.to_numpy(), vote_table(kp[[2, 7, 19]], 0.2))
    for bad in ([], [20], [1, 1]):
        with pytest.raises(ConfigError):
            localize(cache, sample=bad)
    with pytest.raises(ConfigError, match="n_samples"):
        localize(cache, n_samples=0)
    with pytest.raises(ConfigError, match="tau"):
        localize(cache, tau=1.5)


def test_localize_needs_keyword_probs(tiny_vlm) -> None:
    from conftest import solid

    from esmc_lens.residual.capture import capture

    cache = capture(tiny_vlm, [solid((255, 0, 0), (30, 30))], "The color of the image is",
                    progress=False)
    with pytest.raises(ConfigError, match=r"capture with keywords=\["):
        localize(cache)


def test_localize_on_tiny_capture_is_consistent(tiny_vlm) -> None:
    from conftest import SOLID_COLOURS, solid

    from esmc_lens.residual.capture import capture

    images = [solid(c, (30, 30)) for c in SOLID_COLOURS.values()]
    cache = capture(tiny_vlm, images, "The color of the image is",
                    keywords=list(SOLID_COLOURS), progress=False)
    loc = localize(cache, tau=0.01, n_samples=4, seed=1)
    kp = cache.keyword_probs[loc.sample]
    np.testing.assert_array_equal(loc.votes.to_numpy(), vote_table(kp, 0.01))
    assert loc.votes.shape == (tiny_vlm.n_layers + 1, cache.n_positions)
    for s, p in loc.targets:
        assert loc.votes.loc[s].iloc[p] == loc.max_votes


@pytest.mark.slow
def test_offline_solid_colours_vote_at_the_prompt_end(offline_vlm) -> None:
    from conftest import SOLID_COLOURS, solid

    from esmc_lens.residual.capture import capture

    names = list(SOLID_COLOURS)
    images = [solid(SOLID_COLOURS[c]) for c in names]
    cache = capture(offline_vlm, images, "The color of the image is", keywords=names,
                    progress=False)
    loc = localize(cache, tau=0.2)
    print(loc.summary())
    print(loc.per_keyword)
    assert loc.found and loc.max_votes >= 1
    labels = cache.position_labels()
    last = cache.n_positions - 1
    # the prompt ends "... The color of the image is": the votes land on its last tokens
    assert all(p >= last - 2 for _, p in loc.targets), [labels[p] for _, p in loc.targets]
    assert labels[loc.primary[1]].endswith(":is")
    # own colour is each image's highest keyword at the winning cell
    s, p = loc.primary
    own = cache.keyword_probs[:, cache.stream_index(s), p].argmax(-1)
    assert (own == torch.arange(len(names))).float().mean() >= 5 / 6
