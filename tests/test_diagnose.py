"""esmc_lens.report.diagnose: the lens's own reading of the target, scored against the labels."""

from __future__ import annotations

import numpy as np
import pytest

from esmc_lens.cluster.metrics import nmi
from esmc_lens.report.diagnose import lens_readout

WORDS = ["red", "pink", "white", "a", "the"]


class WordTokenizer:
    """One token per word (any case, with or without a leading space)."""

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        word = text.strip().lower()
        return [WORDS.index(word)] if word in WORDS else [3, 4]  # unknown: "a" + "the"

    def decode(self, ids) -> str:
        return " " + WORDS[int(ids[0])]


def probs(rows: list[list[float]]) -> np.ndarray:
    x = np.asarray(rows, dtype=np.float64)
    return x / x.sum(axis=1, keepdims=True)


def test_readout_counts_and_scores_by_hand():
    # Four pink flowers the lens reads as red (two) or pink (two); two red read as red; one
    # white read as white; one unlabelled image (-1) is read but not scored.
    X = probs([[6, 3, 1, 0, 0], [5, 4, 1, 0, 0], [1, 7, 2, 0, 0], [2, 6, 2, 0, 0],
               [8, 1, 1, 0, 0], [7, 2, 1, 0, 0], [1, 1, 8, 0, 0], [1, 8, 1, 0, 0]])
    y = np.array([1, 1, 1, 1, 0, 0, 2, -1])
    r = lens_readout(X, WordTokenizer(), ["red", "pink", "white"], y)
    np.testing.assert_array_equal(r.read, [0, 0, 1, 1, 0, 0, 2, 1])
    assert r.crosstab.loc["pink"].tolist() == [2, 2, 0]
    assert r.crosstab.loc["red"].tolist() == [2, 0, 0]
    assert r.crosstab.loc["white"].tolist() == [0, 0, 1]
    assert r.acc == pytest.approx(5 / 7)
    assert r.nmi == pytest.approx(nmi(y[:7], r.read[:7]))
    assert r.class_mass == pytest.approx(1.0)
    assert r.top_tokens["token"].tolist()[:2] == [" red", " pink"]
    assert r.top_tokens["images"].tolist()[:2] == [4, 3]


def test_a_class_the_lens_cannot_score_is_never_read_and_said_so():
    from esmc_lens.errors import ConfigError, EsmcWarning

    X = probs([[6, 3, 1, 0, 0], [1, 7, 2, 0, 0], [1, 1, 8, 0, 0], [2, 1, 7, 0, 0]])
    y = np.array([0, 1, 2, 3])  # the last image is a hyacinth
    with pytest.warns(EsmcWarning, match=r"\['hyacinth'\] cannot be scored"):
        r = lens_readout(X, WordTokenizer(), ["red", "pink", "white", "hyacinth"], y)
    assert r.words == ["red", "pink", "white"] and r.unread == ["hyacinth"]
    np.testing.assert_array_equal(r.read, [0, 1, 2, 2])  # codes into the class names
    assert list(r.crosstab.columns) == ["red", "pink", "white"]
    assert r.crosstab.loc["hyacinth"].tolist() == [0, 0, 1]
    assert r.acc == pytest.approx(3 / 4)
    with pytest.raises(ConfigError, match="nothing to read"):
        lens_readout(X, WordTokenizer(), ["hyacinth", "peony"], y)


def test_readout_from_logits_equals_readout_from_probs():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(12, len(WORDS))) * 3
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    y = rng.integers(0, 3, 12)
    a = lens_readout(logits, WordTokenizer(), ["red", "pink", "white"], y)
    b = lens_readout(p, WordTokenizer(), ["red", "pink", "white"], y)
    np.testing.assert_array_equal(a.read, b.read)
    assert a.class_mass == pytest.approx(b.class_mass)
    # the criterion's words carry only part of the mass when "a"/"the" win
    assert 0 < a.class_mass < 1


def test_readout_for_run_reads_the_runs_capture_cache(tiny_vlm, tmp_path, monkeypatch):
    import functools

    import esmc_lens.residual.store as store_module
    from esmc_lens.data.dataset import load_dataset
    from esmc_lens.data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
    from esmc_lens.pipeline import run_esmc
    from esmc_lens.report.diagnose import readout_for_run

    ds = load_dataset(make_synthetic_dataset(tmp_path / "d", n_images=8, seed=3))
    cache_dir = tmp_path / "captures"
    res = run_esmc(tiny_vlm, ds, SYNTHETIC_PROMPTS["color"], criterion="color",
                   keywords=["red", "green", "blue", "yellow"], keyword_source="user",
                   n_seeds=1, n_samples=4, progress=False, cache_dir=cache_dir)
    fresh = readout_for_run(tiny_vlm, ds, res, progress=False)

    @functools.wraps(store_module.capture)  # the store keys captures by its signature
    def no_forward(*args, **kwargs):
        raise AssertionError("the run's target cells were captured again")

    # every batch of the target capture must come from the run's store
    monkeypatch.setattr(store_module, "capture", no_forward)
    cached = readout_for_run(tiny_vlm, ds, res, cache_dir=cache_dir, progress=False)
    np.testing.assert_array_equal(cached.read, fresh.read)
    assert cached.class_mass == fresh.class_mass
    assert cached.crosstab.equals(fresh.crosstab) and cached.nmi == fresh.nmi
