"""esmc_lens.localization.targets: each space equals its definition on captured states."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import SOLID_COLOURS, solid

from esmc_lens.errors import ConfigError
from esmc_lens.lens.unembed import Unembed, lens_logits
from esmc_lens.localization.targets import SPACES, target_embeddings, target_labels
from esmc_lens.localization.votes import localize
from esmc_lens.residual.capture import capture

PROMPT = "The color of the image is"


@pytest.fixture(scope="module")
def tiny_cache(tiny_vlm):
    images = [solid(c, (30, 30)) for c in SOLID_COLOURS.values()]
    return capture(tiny_vlm, images, PROMPT, store_dtype=torch.float32,
                   keywords=list(SOLID_COLOURS), progress=False)


@pytest.fixture(scope="module")
def unembed(tiny_vlm):
    return Unembed.from_model(tiny_vlm)


def test_spaces() -> None:
    assert SPACES == ("logits", "probs", "hidden")


def test_hidden_is_the_stored_state(tiny_cache) -> None:
    x = target_embeddings(tiny_cache, [(3, 2)], space="hidden")
    assert x.dtype == np.float32 and x.shape == (6, tiny_cache.d_model)
    np.testing.assert_array_equal(x, tiny_cache.states[:, 3, 2].numpy())
    # a single cell may be given bare; negative slots count from the end
    np.testing.assert_array_equal(target_embeddings(tiny_cache, (3, -1), space="hidden"),
                                  tiny_cache.states[:, 3, -1].numpy())


def test_logits_are_the_lens_of_the_cell(tiny_cache, unembed, tiny_vlm) -> None:
    x = target_embeddings(tiny_cache, [(4, 5)], space="logits", unembed=unembed)
    assert x.shape == (6, tiny_vlm.vocab_size)
    ref = lens_logits(tiny_cache.states[:, 4, 5], unembed).numpy()
    np.testing.assert_array_equal(x, ref)
    # independent check: final norm then lm_head
    with torch.no_grad():
        direct = tiny_vlm.lm_head(tiny_vlm.final_norm(tiny_cache.states[:, 4, 5])).numpy()
    np.testing.assert_allclose(x, direct, rtol=1e-5, atol=1e-5)


def test_last_layer_last_position_logits_are_the_models(tiny_cache, unembed, tiny_vlm) -> None:
    images = [solid(c, (30, 30)) for c in SOLID_COLOURS.values()]
    enc = tiny_vlm.encode(images, PROMPT)
    with torch.no_grad():
        logits = tiny_vlm.model(**enc).logits[:, -1]
    x = target_embeddings(tiny_cache, [(tiny_vlm.n_layers, -1)], space="logits", unembed=unembed)
    np.testing.assert_allclose(x, logits.numpy(), rtol=1e-4, atol=1e-4)


def test_probs_are_softmax_rows(tiny_cache, unembed) -> None:
    p = target_embeddings(tiny_cache, [(2, 1)], space="probs", unembed=unembed)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    assert (p >= 0).all()
    logits = target_embeddings(tiny_cache, [(2, 1)], space="logits", unembed=unembed)
    np.testing.assert_allclose(p, torch.softmax(torch.from_numpy(logits), -1).numpy(),
                               rtol=1e-6, atol=1e-7)


def test_targets_concatenate_in_order(tiny_cache, unembed, tiny_vlm) -> None:
    cells = [(4, 5), (1, 0), (4, 2)]
    x = target_embeddings(tiny_cache, cells, space="hidden")
    d = tiny_cache.d_model
    assert x.shape == (6, 3 * d)
    for j, (s, p) in enumerate(cells):
        np.testing.assert_array_equal(x[:, j * d:(j + 1) * d], tiny_cache.states[:, s, p].numpy())
    y = target_embeddings(tiny_cache, cells[::-1], space="logits", unembed=unembed)
    V = tiny_vlm.vocab_size
    np.testing.assert_array_equal(
        y[:, :V], lens_logits(tiny_cache.states[:, 4, 2], unembed).numpy())
    np.testing.assert_array_equal(
        y[:, 2 * V:], lens_logits(tiny_cache.states[:, 4, 5], unembed).numpy())


def test_accepts_a_localization(tiny_cache, unembed) -> None:
    loc = localize(tiny_cache, tau=0.01)
    x = target_embeddings(tiny_cache, loc, space="hidden")
    ref = np.concatenate([tiny_cache.states[:, s, p].numpy() for s, p in loc.targets], 1)
    np.testing.assert_array_equal(x, ref)
    assert len(target_labels(tiny_cache, loc)) == len(loc.targets)


def test_stream_index_of_a_layer_subset(tiny_vlm, unembed) -> None:
    cache = capture(tiny_vlm, [solid((255, 0, 0), (30, 30))], PROMPT, layers=[0, 2, 4],
                    store_dtype=torch.float32, progress=False)
    x = target_embeddings(cache, [(4, 0)], space="hidden")
    np.testing.assert_array_equal(x, cache.states[:, 2, 0].numpy())  # axis 1 index 2
    assert target_labels(cache, [(4, 0)])[0].startswith("E_4(")
    with pytest.raises(ConfigError, match="layer 3 was not captured"):
        target_embeddings(cache, [(3, 0)], space="hidden")


def test_errors(tiny_cache) -> None:
    with pytest.raises(ConfigError, match=r"unembed=Unembed\.from_model"):
        target_embeddings(tiny_cache, [(1, 1)], space="logits")
    with pytest.raises(ConfigError, match="space="):
        target_embeddings(tiny_cache, [(1, 1)], space="softmax")
    with pytest.raises(ConfigError, match="empty"):
        target_embeddings(tiny_cache, [], space="hidden")
    with pytest.raises(ConfigError, match="out of range"):
        target_embeddings(tiny_cache, [(1, 99)], space="hidden")


def test_warns_on_empty_slots(tiny_vlm) -> None:
    im = solid((255, 0, 0), (30, 30))
    cache = capture(tiny_vlm, [im, im], ["The color is", "The color of the image is"],
                    store_dtype=torch.float32, progress=False)
    last = cache.n_positions - 1
    assert cache.positions[0, last] == -1
    with pytest.warns(UserWarning, match="empty for 1 image"):
        target_embeddings(cache, [(1, last)], space="hidden")
