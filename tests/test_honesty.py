"""Honest by default: the labels (class-folder names) reach localization only when asked for,
and then every output says "supervised localization"; answers and evidence are recorded."""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import Stop, stop_at

import esmc_lens.localization.keywords as keywords_module
from esmc_lens import run_esmc
from esmc_lens.apps.cli import main, results_table
from esmc_lens.data.dataset import load_dataset
from esmc_lens.data.synthetic import make_synthetic_dataset
from esmc_lens.errors import ConfigError
from esmc_lens.localization.keywords import Keywords

PROMPT = "The color of the object is"
FAST = {"baselines": False, "n_seeds": 1, "epochs": 2, "n_samples": 4, "progress": False}


@pytest.fixture(scope="module")
def ds(tmp_path_factory):
    return load_dataset(make_synthetic_dataset(tmp_path_factory.mktemp("h") / "syn",
                                               n_images=8, image_size=32))


def fake_lm(words):
    """A language model that answers with ``words`` (the tiny model's answers are noise)."""
    def answer(vlm, question, **_):
        raw = ", ".join(words)
        return Keywords(list(words), ["lm"] * len(words), raw=raw, question=question)
    return answer


def test_default_keywords_are_the_lms_never_the_class_names(tiny_vlm, ds, monkeypatch):
    monkeypatch.setattr(keywords_module, "lm_keywords", fake_lm(["purple", "orange", "red"]))
    res = run_esmc(tiny_vlm, ds, PROMPT, criterion="color", **FAST)
    assert res.keywords.words == ["purple", "orange", "red"]
    assert res.keywords.sources == ["lm", "lm", "lm"]
    assert not set(res.keywords.words) >= set(ds.classes["color"])
    assert not res.supervised and res.keyword_source == "lm"
    doc = res.to_json()
    assert doc["supervised_localization"] is False and doc["keyword_source"] == "lm"
    assert doc["keyword_answer"]["question"] == (
        "What are common colors of objects? Answer with single words.")


def test_a_failed_lm_answer_stops_with_both_ways_out(tiny_vlm, ds, monkeypatch):
    # One usable word (the tiny vocabulary cannot score "mauve"): before, the run fell back
    # to the class names without a word.
    monkeypatch.setattr(keywords_module, "lm_keywords", fake_lm(["mauve", "red"]))
    with pytest.raises(ConfigError) as err:
        run_esmc(tiny_vlm, ds, PROMPT, criterion="color", **FAST)
    assert "--keywords red,white,pink" in str(err.value)
    assert "--keywords class-names" in str(err.value) and "supervised" in str(err.value)
    with pytest.raises(ConfigError, match="no '<criterion> of the <object>' phrase"):
        run_esmc(tiny_vlm, ds, "Describe it:", criterion="color", **FAST)


def test_class_names_only_when_asked_and_then_marked_everywhere(tiny_vlm, ds, tmp_path,
                                                                 capsys):
    res = run_esmc(tiny_vlm, ds, PROMPT, criterion="color", keywords="class-names", **FAST)
    assert res.keywords.words == list(ds.classes["color"])
    assert set(res.keywords.sources) == {"class_names"} and res.supervised
    assert "SUPERVISED LOCALIZATION" in res.note
    out = res.save(tmp_path / "run")
    doc = json.loads((out / "results.json").read_text())
    assert doc["supervised_localization"] is True and "SUPERVISED LOCALIZATION" in doc["note"]
    table = results_table([str(out)])
    # every row says where its keywords came from
    rows = [ln for ln in table.splitlines() if ln.startswith("| color |")]
    assert rows and all(ln.endswith("| class names: SUPERVISED LOCALIZATION |") for ln in rows)
    # the CLI spelling, and its printed summary
    rc = main(["run", "--model", "tiny", "--data", str(ds.root), "--criterion", "color",
               "--prompt", PROMPT, "--keywords", "class-names", "--no-baselines",
               "--n-seeds", "1", "--n-samples", "4", "--quiet", "--out",
               str(tmp_path / "cli")])
    assert rc == 0
    assert "SUPERVISED LOCALIZATION" in capsys.readouterr().out


def test_evidence_and_target_positions_are_recorded(tiny_vlm, ds):
    res = run_esmc(tiny_vlm, ds, PROMPT, criterion="color", keywords=["red", "blue"],
                   tau=0.99, **FAST)  # the random tiny model puts no keyword above 0.99
    loc = res.to_json()["localization"]
    assert loc["found"] is False and loc["max_votes"] == 0
    assert 0 < loc["max_prob"] <= 0.99 and loc["evidence"].startswith("no votes")
    # the target is given as (layer, sequence position from the end), the same token as
    # its label's position from the start in the sampled images' sequence
    (s, pos), = res.target_positions
    assert res.target_labels == [f"E_{s}({res.localization.votes.columns[res.target[0][1]]})"]
    n_tokens = int(res.localization.votes.columns[-1].split(":")[0]) + 1  # prompt runs to the end
    assert pos < 0 and res.target_labels[0].startswith(f"E_{s}({n_tokens + pos}:")


def test_output_baseline_answers_end_with_their_sentence_and_are_saved(tiny_vlm, ds,
                                                                       tmp_path):
    res = run_esmc(tiny_vlm, ds, PROMPT, criterion="color", keywords=["red", "blue"],
                   **{**FAST, "baselines": True})
    assert len(res.answers) == len(ds)
    for a in res.answers:  # cut at the first full stop or newline (or at the cap)
        assert "\n" not in a and ("." not in a or a.endswith("."))
    saved = res.save(tmp_path / "r")
    doc = json.loads((saved / "results.json").read_text())
    assert doc["answers"] == res.answers
    import pandas as pd

    assert pd.read_csv(saved / "assignments.csv", keep_default_na=False)["answer"].tolist() \
        == res.answers


def test_first_sentence():
    from esmc_lens.models.vlm import first_sentence

    assert first_sentence(" pink. It is a rose") == "pink."
    assert first_sentence("\n red\nand more") == "red"
    assert first_sentence(" pink and") == "pink and"


def test_several_criteria_in_one_call(tiny_vlm, ds, monkeypatch, tmp_path):
    monkeypatch.setattr(keywords_module, "lm_keywords", fake_lm(["red", "blue", "green"]))
    res = run_esmc(tiny_vlm, ds, {"color": PROMPT, "shape": "The shape of the object is"},
                   **FAST)
    assert res.criteria == ["color", "shape"]
    assert res["color"].prompt == PROMPT and res["shape"].criterion == "shape"
    # the same localization sample for every criterion
    assert (res["color"].settings["localization_sample"]
            == res["shape"].settings["localization_sample"])
    cross = res.cross_criterion()
    assert list(cross.index) == ["color clusters", "shape clusters"]
    assert cross.loc["color clusters", "color clusters"] == pytest.approx(1.0)
    assert {"color labels", "shape labels"} <= set(cross.columns)
    out = res.save(tmp_path / "multi")
    assert (out / "color" / "results.json").exists() and (out / "shape" / "results.json").exists()
    table = results_table([str(out)])
    assert "| color | ESMC |" in table and "| shape | ESMC |" in table
    assert all(ln.endswith("| lm |") for ln in table.splitlines()
               if ln.startswith(("| color |", "| shape |")))
    # a single criterion through the mapping form equals the single-prompt form
    one = run_esmc(tiny_vlm, ds, PROMPT, criterion="color", **FAST)
    assert np.array_equal(one.labels, res["color"].labels)
    assert one.target == res["color"].target


def test_demo_localizes_with_the_lms_keywords(tmp_path, monkeypatch):
    import esmc_lens.apps.demo as demo

    seen = stop_at(monkeypatch, demo, "run_esmc")
    with pytest.raises(Stop):
        demo.run_demo(model="tiny", out=tmp_path / "demo", figures=tmp_path / "fig",
                      n_images=8)
    # one call for every criterion, no keywords: the language model's (label-free)
    assert sorted(seen["prompt"]) == ["background", "color", "shape"]
    assert "keywords" not in seen and seen.get("keyword_source", "auto") == "auto"
