"""run_esmc's one pass over the images for every criterion (pipeline.shared_pass) against
the per-criterion path (a localization capture and a target capture per criterion, and
``generate`` for the Output baseline): the same targets, embeddings within the shared-prefix
tolerance, the same answers, the same clusterings."""

from __future__ import annotations

import numpy as np
import pytest

from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
from esmc_lens.pipeline import (
    as_criteria,
    embed_criteria,
    generate_answers,
    localization_sample,
    localize_criteria,
    run_esmc,
    select_keywords,
    shared_pass,
)
from esmc_lens.residual.shared_prefix import SHARED_PREFIX_RTOL

CRITERIA = {c: SYNTHETIC_PROMPTS[c] for c in ("color", "shape", "background")}
KEYWORDS = {"color": ["red", "green", "blue"], "shape": ["circle", "square"],
            "background": ["white", "black"]}


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return load_dataset(make_synthetic_dataset(tmp_path_factory.mktemp("s") / "d",
                                               n_images=12, seed=0, image_size=30))


def test_shared_pass_equals_per_criterion_stages(tiny_vlm, synth, one_torch_thread):
    criteria = as_criteria(CRITERIA)
    kws = select_keywords(tiny_vlm, criteria, KEYWORDS, synth, "user")
    sample = localization_sample(len(synth), 5, seed=0)
    localized, embedded, answers = shared_pass(tiny_vlm, synth, criteria, kws, sample,
                                               batch_size=4, progress=False)
    ref_loc = localize_criteria(tiny_vlm, synth, criteria, kws, sample, batch_size=4,
                                progress=False)
    ref_emb = embed_criteria(tiny_vlm, synth, criteria, ref_loc, batch_size=4,
                             progress=False)
    for c in criteria:
        (cache, loc), (ref_cache, ref) = localized[c.name], ref_loc[c.name]
        assert loc.votes.equals(ref.votes) and loc.targets == ref.targets, c.name
        np.testing.assert_allclose(cache.keyword_probs.numpy(), ref_cache.keyword_probs.numpy(),
                                   rtol=0, atol=1e-5)
        got, want = embedded[c.name], ref_emb[c.name]
        assert got.cells == want.cells and got.labels == want.labels, c.name
        assert got.cache.image_ids == want.cache.image_ids  # back in the dataset's order
        assert np.array_equal(got.cache.vision.numpy(), want.cache.vision.numpy())
        # the one pass keeps every criterion's target streams: compare this one's
        streams = [got.cache.stream_index(s) for s in want.cache.stream]
        states, ref_states = got.cache.states[:, streams].numpy(), want.cache.states.numpy()
        scale = np.abs(ref_states).max(axis=(0, 2, 3), keepdims=True)
        assert np.abs(states - ref_states).max() <= SHARED_PREFIX_RTOL * scale.max(), c.name
        np.testing.assert_allclose(got.X, want.X, rtol=1e-4, atol=1e-7)
        assert answers[c.name] == generate_answers(tiny_vlm, synth, c.prompt, 4,
                                                   progress=False), c.name


def test_run_esmc_one_pass_equals_per_criterion_path(tiny_vlm, synth, tmp_path,
                                                     one_torch_thread):
    fast = dict(keywords=KEYWORDS, n_seeds=2, n_samples=5, batch_size=4, epochs=20,
                progress=False)
    one = run_esmc(tiny_vlm, synth, CRITERIA, **fast)
    per = run_esmc(tiny_vlm, synth, CRITERIA, cache_dir=tmp_path / "cache", **fast)
    for name in CRITERIA:
        a, b = one[name], per[name]
        assert a.settings["one_pass"] and not b.settings["one_pass"]
        assert b.settings["one_pass_why_not"] == "cache_dir is set"
        assert a.target == b.target and a.answers == b.answers
        # k-means sees the same embeddings to 1e-6: the same partitions
        for method in ("ESMC w/o head", "Output", "Vision only (vision tower pooled)"):
            assert a.per_seed[method]["nmi"].tolist() == pytest.approx(
                b.per_seed[method]["nmi"].tolist(), abs=1e-12), (name, method)
        assert a.per_seed["ESMC"]["kmeans_nmi"].tolist() == pytest.approx(
            b.per_seed["ESMC"]["kmeans_nmi"].tolist(), abs=1e-12), name
        # the MLP's argmax may flip for an image on a decision boundary (the tiny model's
        # random embeddings have many): at most one of the 12
        assert (a.labels == b.labels).sum() >= 11, (name, a.labels, b.labels)
    cross = one.cross_criterion()
    assert list(cross.index) == [f"{c} clusters" for c in CRITERIA]
