"""The prediction-trajectory view: each cell's top-1 lens token and statistics, checked
against the full lens computed independently."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from conftest import SOLID_COLOURS, solid

from esmc_lens.lens.keyword_rule import keyword_token_ids
from esmc_lens.lens.unembed import Unembed, lens_logits
from esmc_lens.localization.grid import keyword_grid
from esmc_lens.report.plotting import token_label
from esmc_lens.report.trajectory import LensTrajectory
from esmc_lens.residual.capture import capture


@pytest.fixture(scope="module")
def cache(tiny_vlm):
    imgs = [solid(SOLID_COLOURS[c], (64, 64)) for c in ("red", "blue")]
    return capture(tiny_vlm, imgs, "The color of the object is", keywords=["red"],
                   store_dtype=torch.float32, progress=False, image_ids=["a", "b"])


def test_trajectory_cells_hold_the_lens_top_token_entropy_and_keyword_rank(tiny_vlm, cache):
    unembed = Unembed.from_model(tiny_vlm)
    tok = tiny_vlm.tokenizer
    traj = LensTrajectory.from_cache(cache, 1, unembed, tok, k=3, keyword="red")
    S, P = len(cache.stream), cache.n_positions
    assert traj.top_tokens.shape == (S, P, 3) and traj.entropy.shape == (S, P)
    logits = lens_logits(cache.states[1].float(), unembed)  # [S, P, V], independently
    logp = torch.log_softmax(logits, -1)
    ids = logp.argmax(-1)
    want_tokens = np.asarray(tok.convert_ids_to_tokens(ids.reshape(-1).tolist()),
                             dtype=object).reshape(S, P)
    assert (traj.top_tokens[..., 0] == want_tokens).all()
    np.testing.assert_allclose(traj.top_probs[..., 0], logp.max(-1).values.exp().numpy(),
                               rtol=1e-5)
    np.testing.assert_allclose(traj.entropy, -(logp.exp() * logp).sum(-1).numpy(),
                               rtol=1e-4, atol=1e-5)
    group = keyword_token_ids(tok, ["red"]).groups[0]
    best = logits[..., group].max(-1).values
    np.testing.assert_array_equal(traj.keyword_rank,
                                  ((logits > best[..., None]).sum(-1) + 1).numpy())
    np.testing.assert_allclose(traj.keyword_probs,
                               keyword_grid(cache, 1, "red").to_numpy(), rtol=1e-4,
                               atol=1e-7)
    labels = traj.top1_labels()
    assert labels[0, 0] == token_label(want_tokens[0, 0], 7)
    frame = traj.to_frame()
    assert len(frame) == S * P and set(frame["layer"]) == set(cache.stream)
    assert frame.iloc[-1]["rank(red)"] == int(traj.keyword_rank[-1, -1])


def test_trajectory_plot_writes_the_top_token_in_every_cell(tiny_vlm, cache):
    traj = LensTrajectory.from_cache(cache, 0, Unembed.from_model(tiny_vlm),
                                     tiny_vlm.tokenizer, keyword="red")
    for stat in ("probability", "entropy", "keyword", "rank"):
        fig = traj.plot(stat, model="tiny", quick=True)
        ax = fig.axes[0]
        texts = [t.get_text() for t in ax.texts]
        assert len(texts) == traj.entropy.size
        assert texts[0] == traj.top1_labels()[0, 0]
        assert fig._suptitle.get_text().startswith("QUICK")
        plt.close(fig)
    with pytest.raises(ValueError, match="needs a keyword"):
        LensTrajectory.from_cache(cache, 0, Unembed.from_model(tiny_vlm),
                                  tiny_vlm.tokenizer).statistic("rank")
