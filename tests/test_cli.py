"""The command line: lens JSON, run outputs, table, and clean errors."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from conftest import Stop, solid, stop_at

from esmc_lens.apps.cli import main
from esmc_lens.cluster.metrics import accuracy, nmi
from esmc_lens.data.synthetic import make_synthetic_dataset


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "d", n_images=16, seed=1)


def test_lens_json(tmp_path, capsys, tiny_vlm):
    img = tmp_path / "red.png"
    solid((220, 20, 30), (40, 40)).save(img)
    assert main(["lens", "--model", "tiny", "--image", str(img), "--prompt",
                 "The color of the flower is", "--top-k", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["model"] == "tiny" and out["prompt"] == "The color of the flower is"
    tokens = [p["token"] for p in out["positions"]]
    assert tokens[1:5] == ["The", "Ġcolor", "Ġof", "Ġthe"]
    assert [lay["layer"] for lay in out["layers"]] == list(range(tiny_vlm.n_layers + 1))
    for lay in out["layers"]:
        assert len(lay["positions"]) == len(tokens)
        for pos in lay["positions"]:
            probs = [t["prob"] for t in pos["top"]]
            assert len(probs) == 3 and probs == sorted(probs, reverse=True)
            assert 0 < sum(probs) <= 1 + 1e-6


def test_run_writes_results_and_assignments(tmp_path, synth, capsys, tiny_vlm):
    out = tmp_path / "run"
    rc = main(["run", "--model", "tiny", "--data", str(synth), "--criterion", "color",
               "--prompt", "The color of the object is", "--keywords", "red,green,blue,yellow",
               "--n-seeds", "2", "--n-samples", "4", "--no-baselines", "--quiet",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    for key in ("model", "criterion", "n_images", "target", "space", "scores", "baselines",
                "clusters"):
        assert key in res
    assert res["model"] == "tiny" and res["criterion"] == "color" and res["n_images"] == 16
    assert res["space"] == "probs"
    assert set(res["scores"]) >= {"nmi", "ri", "ari", "acc"}
    assert sum(c["size"] for c in res["clusters"]) == 16
    assert [k["word"] for k in res["keywords"]] == ["red", "green", "blue", "yellow"]
    df = pd.read_csv(out / "assignments.csv")
    assert list(df.columns) == ["image", "cluster", "cluster_name", "true_label"]
    assert len(df) == 16 and set(df["true_label"]) == {"red", "green", "blue", "yellow"}
    names = {c["cluster"]: c["name"] for c in res["clusters"]}
    assert all(names[c] == n for c, n in zip(df["cluster"], df["cluster_name"], strict=True))
    # the scores are those of the written labels: seed 0's labels are the assignments, the
    # reported NMI/RI are the mean of the per-seed rows
    per_seed = pd.read_csv(out / "per_seed_ESMC.csv", index_col=0)
    assert list(per_seed.index) == [0, 1]
    y_true = df["true_label"].to_numpy()
    assert per_seed.loc[0, "nmi"] == pytest.approx(nmi(y_true, df["cluster"]), abs=1e-12)
    assert per_seed.loc[0, "acc"] == pytest.approx(accuracy(y_true, df["cluster"]), abs=1e-12)
    for m in ("nmi", "ri", "ari", "acc"):
        assert res["scores"][m] == pytest.approx(per_seed[m].mean(), abs=1e-12), m
    # each cluster's size, majority label and purity are those of its assigned images
    for c in res["clusters"]:
        members = df.loc[df["cluster"] == c["cluster"], "true_label"]
        counts = members.value_counts()
        assert c["size"] == len(members) and c["majority_label"] in counts.index[
            counts == counts.max()]
        # (results.json keeps 10 digits of a cluster table: pandas to_json)
        assert c["purity"] == pytest.approx(counts.max() / len(members), abs=1e-9)
    assert main(["table", str(out), "--dataset", "flower"]) == 0
    table = capsys.readouterr().out
    assert "| color | ESMC |" in table and "0.7283" in table  # paper's number, labelled
    assert f"{res['scores']['nmi']:.4f}" in table  # and this run's, beside it
    # diagnose: the lens's class-word reading at the run's target, scored against the labels
    assert main(["diagnose", str(out), "--data", str(synth), "--json", "--quiet"]) == 0
    diag = json.loads(capsys.readouterr().out)
    assert diag["model"] == "tiny" and diag["target"] == res["target_labels"]
    table = pd.DataFrame(diag["crosstab"])  # true (rows) x read (columns)
    assert int(table.to_numpy().sum()) == 16
    assert table.sum(axis=1).to_dict() == df["true_label"].value_counts().to_dict()
    true = np.repeat(np.arange(len(table)), table.sum(axis=1))
    read = np.concatenate([np.repeat(np.arange(table.shape[1]), row) for row in table.to_numpy()])
    assert diag["readout_nmi"] == pytest.approx(nmi(true, read), abs=1e-12)
    assert diag["readout_acc"] == pytest.approx(accuracy(true, read), abs=1e-12)
    # the class-word mass of this run's target on its images (same capture, same shapes)
    from esmc_lens.data.dataset import load_dataset
    from esmc_lens.report.diagnose import readout_for_run
    from esmc_lens.report.result import EsmcResult

    direct = readout_for_run(tiny_vlm, load_dataset(synth), EsmcResult.load(out),
                             progress=False)
    assert diag["class_mass"] == pytest.approx(direct.class_mass, rel=1e-12)
    assert 0 < direct.class_mass < 1


def test_bad_criterion_exits_2_without_traceback(synth, capsys, tmp_path):
    rc = main(["run", "--model", "tiny", "--data", str(synth), "--criterion", "texture",
               "--prompt", "The texture is", "--out", str(tmp_path / "x")])
    err = capsys.readouterr().err
    assert rc == 2 and "texture" in err and "Traceback" not in err


def test_keywords_once_per_criterion(tmp_path, synth, monkeypatch):
    """``--keywords`` once per ``--criterion``, in order; ``auto`` leaves one to the LM."""
    import esmc_lens.pipeline as pipeline

    seen = stop_at(monkeypatch, pipeline, "run_esmc")
    base = ["run", "--model", "tiny", "--data", str(synth), "--criterion", "color",
            "--prompt", "The color of the object is", "--criterion", "shape",
            "--prompt", "The shape of the object is", "--quiet", "--out", str(tmp_path / "r")]
    with pytest.raises(Stop):
        main([*base, "--keywords", "red, green", "--keywords", "auto"])
    assert seen["keywords"] == {"color": ["red", " green"], "shape": None}
    with pytest.raises(Stop):
        main([*base, "--keywords", "red,blue"])
    assert seen["keywords"] == ["red", "blue"]  # one list for both
    seen.clear()
    assert main([*base, "--keywords", "a", "--keywords", "b", "--keywords", "c"]) == 2
    assert seen == {}  # refused before the model loads


def test_head_choices_are_the_heads_bases_and_optimizers():
    from esmc_lens.apps.cli import build_parser
    from esmc_lens.cluster.head import BASES, OPTIMIZERS, PseudoLabelHead

    run = build_parser()._subparsers._group_actions[0].choices["run"]
    action = {a.dest: a for a in run._actions}
    assert tuple(action["head_basis"].choices) == BASES
    assert tuple(action["head_optimizer"].choices) == OPTIMIZERS
    head = PseudoLabelHead()
    assert action["head_basis"].default == head.basis == "auto"
    assert action["head_optimizer"].default == head.optimizer == "neuron-adam"


@pytest.mark.parametrize(("flags", "basis", "optimizer", "span"), [
    ([], "auto", "neuron-adam", True),
    (["--head-basis", "features", "--head-optimizer", "adam"], "features", "adam", False),
])
def test_head_options_reach_the_head_and_results(tmp_path, synth, tiny_vlm, monkeypatch,
                                                 flags, basis, optimizer, span):
    from esmc_lens.cluster import head as head_module

    fitted = []
    real_fit = head_module.PseudoLabelHead.fit

    def fit(self, X, y=None, span=None):
        out = real_fit(self, X, y, span=span)
        fitted.append((self.basis, self.optimizer, hasattr(self, "span_")))
        return out

    monkeypatch.setattr(head_module.PseudoLabelHead, "fit", fit)
    out = tmp_path / "run"
    assert main(["run", "--model", "tiny", "--data", str(synth), "--criterion", "color",
                 "--prompt", "The color of the object is", "--keywords", "red,green,blue",
                 "--n-seeds", "2", "--n-samples", "4", "--no-baselines", "--quiet",
                 *flags, "--out", str(out)]) == 0
    assert fitted == [(basis, optimizer, span)] * 2  # one fit per seed
    settings = json.loads((out / "results.json").read_text())["settings"]
    assert (settings["head_basis"], settings["head_optimizer"]) == (basis, optimizer)
