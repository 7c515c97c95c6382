"""ESMC end to end on the synthetic dataset: the planted structure is recovered."""

from __future__ import annotations

import numpy as np
import pytest

from esmc_lens.cluster.metrics import nmi
from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.synthetic import SYNTHETIC_PROMPTS, make_synthetic_dataset
from esmc_lens.localization.keywords import question_for_prompt
from esmc_lens.pipeline import run_esmc
from esmc_lens.report.result import EsmcResult


def chance_nmi(y: np.ndarray, k: int, n_draws: int = 200, q: float = 0.99) -> float:
    """The q-quantile of NMI of balanced random labellings: 'clearly better than chance'."""
    rng = np.random.default_rng(0)
    base = np.arange(len(y)) % k
    return float(np.quantile([nmi(y, rng.permutation(base)) for _ in range(n_draws)], q))


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return load_dataset(make_synthetic_dataset(tmp_path_factory.mktemp("s") / "d",
                                               n_images=32, seed=0))


def test_question_for_prompt():
    assert question_for_prompt("The color of the flower is") == (
        "What are common colors of flowers? Answer with single words.")
    assert question_for_prompt("Describe it.") is None


@pytest.mark.slow
@pytest.mark.parametrize("criterion", [
    "color", "shape",
    # Known failure, kept visible: the offline model's foreground-colour token makes "The
    # color of the background is" read the object (NMI 0.24 vs chance 0.27 on 32 images).
    pytest.param("background", marks=pytest.mark.xfail(
        reason="offline model does not separate background colours (see README)",
        strict=False)),
])
def test_offline_recovers_planted_structure(offline_vlm, synth, criterion, tmp_path):
    prompt = SYNTHETIC_PROMPTS[criterion]
    # the default, label-free keywords: the offline model's own language model's answer
    res = run_esmc(offline_vlm, synth, prompt, criterion=criterion,
                   n_seeds=1, n_samples=8, baselines=False, progress=False)
    assert set(res.keywords.sources) == {"lm"}
    y = synth.y(criterion)
    threshold = chance_nmi(y, 4)
    esmc = res.scores.loc["ESMC", "nmi_mean"]
    print(criterion, res.target_labels, res.scores.round(3).to_string())
    assert esmc > threshold, (criterion, esmc, threshold)
    assert nmi(y, res.labels) > threshold
    # the target sits on the criterion sentence's own tokens, not the instruction or template
    prompt_words = {w.lower() for w in prompt.split()}
    for label in res.target_labels:
        token = label.split(":", 1)[1].rstrip(")").strip().lower()
        assert token in prompt_words, (label, prompt)
    # results survive a save/load round trip
    saved = EsmcResult.load_json(res.save(tmp_path / criterion))
    assert saved["scores"]["nmi"] == pytest.approx(esmc)
    assert saved["n_images"] == len(y) and saved["space"] == "probs"
    back = EsmcResult.load(tmp_path / criterion)
    assert np.array_equal(back.labels, res.labels) and back.target == res.target
    assert back.scores.equals(res.scores) and back.clusters.equals(res.clusters)
