"""The notebooks' library logic (esmc_lens.apps.workbench, paper_numbers, notebook figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esmc_lens.apps import workbench as E
from esmc_lens.cluster.baselines import kmeans_scores
from esmc_lens.lens.keyword_rule import keyword_token_ids
from esmc_lens.lens.readout import keyword_probs
from esmc_lens.lens.unembed import Unembed
from esmc_lens.report import plotting as P
from esmc_lens.report.paper_numbers import (
    PAPER_MODEL,
    PAPER_PROMPT_VARIANTS,
    paper_row,
    paper_scores,
    paper_table,
)

# ----------------------------------------------------------------------- paper numbers


@pytest.mark.parametrize("name", [f"table{i}" for i in range(1, 8)])
def test_every_paper_table_is_labelled_as_the_papers(name):
    df = paper_table(name)
    assert (df["model"] == PAPER_MODEL).all() and (df["source"] == "paper").all()
    assert PAPER_MODEL == "LLaVA-1.5-7B"


def test_paper_tables_hold_the_printed_numbers():
    t1, t2, t3 = paper_table("table1"), paper_table("table2"), paper_table("table3")
    assert t1.shape == (15, 10) and t2.shape == (15, 10) and t3.shape == (15, 8)
    assert t1.loc[("Flowers", "Color"), "ESMC"] == 0.7283
    assert t1.loc[("Flowers", "Species"), "Multi-Sub"] == 0.7580
    assert t2.loc[("Flowers", "Species"), "ESMC"] == 0.9726
    assert t3.loc[("Flower", "Color"), "ri_ESMC"] == 0.8982  # Table 2 prints 0.8992
    assert t2.loc[("Flowers", "Color"), "ESMC"] == 0.8992
    assert t3.loc[("CIFAR-10", "Environment"), "nmi_Output"] == 0.0443
    # Table 3's ESMC NMI equals Table 1's everywhere
    for (ds, crit), row in t3.iterrows():
        key = ("Flowers" if ds == "Flower" else ds, crit)
        assert row["nmi_ESMC"] == t1.loc[key, "ESMC"]
    assert paper_table("table4").loc["Flower", "head_train_s"] == 0.4472
    t5 = paper_table("table5")
    assert len(t5) == 8 and t5.iloc[0]["nmi"] == 0.8138 and t5.iloc[7]["ri"] == 0.9669
    assert set(paper_table("table6")["n_samples"]) == {3, 5, 10, 20}
    assert set(paper_table("table7")["keyword_source"]) == {"GPT-4", "DeepSeek-R1",
                                                            "Gemini-2.5"}


def test_paper_row_matches_our_dataset_names():
    r = paper_row("flower", "color", "table3")
    assert r["nmi_ESMC"] == 0.7283 and r["model"] == PAPER_MODEL
    assert paper_row("flower", "species", "table1")["ESMC"] == 0.8923
    assert paper_row("synthetic", "color", "table1") is None
    with pytest.raises(KeyError):
        paper_table("table9")


def test_paper_scores_give_table3_per_method():
    df = paper_scores("flower", "Color")
    assert list(df.index) == ["Output", "ESMC w/o head", "ESMC"]
    assert df.loc["ESMC", "nmi"] == 0.7283 and df.loc["ESMC", "ri"] == 0.8982
    assert df.loc["Output", "nmi"] == 0.6698
    assert df.attrs == {"model": PAPER_MODEL, "source": "paper"}
    assert paper_scores("Stanford_Cars", "type").loc["ESMC w/o head", "ri"] == 0.9517
    assert paper_scores("synthetic", "color") is None


def test_prompt_variants_reproduce_the_papers_color_forms():
    spec = E.CriterionSpec("color", "The color of the car is", "color", "car", ())
    ours = [p for _, p in E.prompt_variants(spec)]
    paper = [p for _, p in PAPER_PROMPT_VARIANTS["Color"]]
    assert ours[:2] == paper[:2] and ours[3] == paper[3]
    assert ours[2] == "Identify the color of this car."  # the paper says "vehicle"
    flower = E.KNOWN_CRITERIA["flower"]["species"]
    assert [v for v, _ in E.prompt_variants(flower)] == ["Original", "Variant 1",
                                                         "Variant 2", "Variant 3"]


# --------------------------------------------------------------------------- workbench


@pytest.fixture(scope="module")
def bench(tiny_vlm, tmp_path_factory):
    out = tmp_path_factory.mktemp("nb")
    return E.Workbench.open(tiny_vlm, data=None, quick=True, outputs=out / "outputs",
                            figures=out / "figures", n_synthetic=8, verbose=False)


def test_workbench_falls_back_to_the_synthetic_dataset_and_keeps_few_images(bench, tmp_path):
    assert bench.name == "synthetic" and "ESMC_DATA is not set" in bench.source_note
    assert next(iter(bench.criteria)) == "color" and bench.focus == ["color"]
    ds = bench.images("color")
    counts = np.bincount(ds.y("color"), minlength=4)
    assert (counts <= bench.settings.per_class).all() and counts.sum() == len(ds)
    assert bench.model.startswith("tiny")
    # a missing data folder is said, not hidden
    _ds2, name, note = E.resolve_dataset(tmp_path, "flower", tmp_path / "o", 8)
    assert name == "synthetic" and "does not exist" in note


def test_workbench_cache_is_computed_once_and_read_back_from_disk(bench, tiny_vlm):
    c1 = bench.cache("color")
    assert bench.cache("color") is c1
    assert c1.keywords and c1.keyword_probs is not None and c1.vision is not None
    assert c1.stream == list(range(tiny_vlm.n_layers + 1))
    again = E.Workbench.open(tiny_vlm, data=None, quick=True, outputs=bench.outputs,
                             figures=bench.figures, n_synthetic=8, verbose=False)
    c2 = again.cache("color")
    timing = next(iter(again.timings.values()))
    assert timing["how"] == "disk"
    assert np.array_equal(c1.states.numpy(), c2.states.numpy())
    assert c1.keywords == c2.keywords


def test_scores_and_the_named_fit_are_read_back_by_another_workbench(bench, tiny_vlm,
                                                                     monkeypatch):
    loc = bench.localize("color")
    ev = bench.evaluate("color", loc)
    named = E.name_result(bench, "color", loc)
    labels, proba = E.cluster_labels(bench, "color", loc)
    again = E.Workbench.open(tiny_vlm, data=None, quick=True, outputs=bench.outputs,
                             figures=bench.figures, n_synthetic=8, verbose=False)

    def recomputed(*args, **kwargs):
        raise AssertionError("a cached result was recomputed")

    for name in ("head_scores", "kmeans_scores", "head_labels"):
        monkeypatch.setattr(E, name, recomputed)
    loc2 = again.localize("color")
    assert loc2.targets == loc.targets
    ev2 = again.evaluate("color", loc2)
    for method in ("ESMC", "ESMC w/o head"):
        pd.testing.assert_frame_equal(ev2[method], ev[method])
    assert ev2["ESMC"].index.name == "seed" and list(ev2["ESMC"].index) == bench.seeds
    pd.testing.assert_frame_equal(E.name_result(again, "color", loc2), named)
    labels2, proba2 = E.cluster_labels(again, "color", loc2)
    assert np.array_equal(labels2, labels) and proba2.dtype == proba.dtype
    assert np.array_equal(proba2, proba)
    # other settings are other results: a new alpha is computed
    with pytest.raises(AssertionError, match="recomputed"):
        again.evaluate("color", loc2, alpha=0.55)
    # so is the same target after a change to the code that scores it
    monkeypatch.setattr(E, "_code_digest", lambda: "changed")
    third = E.Workbench.open(tiny_vlm, data=None, quick=True, outputs=bench.outputs,
                             figures=bench.figures, n_synthetic=8, verbose=False)
    with pytest.raises(AssertionError, match="recomputed"):
        third.evaluate("color", third.localize("color"))


def test_keyword_view_selects_keyword_columns(bench):
    cache = bench.cache("color")
    words = cache.keywords[1:3][::-1]
    view = E.keyword_view(cache, [w.upper() for w in words] + ["not-scored"])
    assert view.keywords == words
    j = [cache.keywords.index(w) for w in words]
    assert np.array_equal(view.keyword_probs.numpy(), cache.keyword_probs[..., j].numpy())
    assert view.states is cache.states


def test_lens_grid_reads_or_computes_the_keyword_probability(bench, tiny_vlm):
    cache = bench.cache("color")
    g = E.lens_grid(cache, 1, "red")
    assert g.shape == (len(cache.stream), cache.n_positions)
    j = [w.lower() for w in cache.keywords].index("red")
    np.testing.assert_allclose(g.to_numpy(), cache.keyword_probs[1, :, :, j].numpy())
    unembed = Unembed.from_model(tiny_vlm)
    g2 = E.lens_grid(cache, 1, "mauve", unembed, tiny_vlm.tokenizer)
    want = keyword_probs(cache.states[1].float(), unembed,
                         keyword_token_ids(tiny_vlm.tokenizer, ["mauve"]).groups)[..., 0]
    np.testing.assert_allclose(g2.to_numpy(), want.numpy(), rtol=1e-5)
    with pytest.raises(Exception, match="not scored"):
        E.lens_grid(cache, 1, "mauve")


def test_ablation_tables_name_the_model_and_cap_the_sample(bench):
    n = len(bench.images("color"))
    t6 = E.sample_size_ablation(bench, "color", sizes=(3, 50))
    assert list(t6["n_sampled"]) == [3, n]
    assert (t6["model"] == bench.model).all() and (t6["dataset"] == "synthetic").all()
    assert t6["target"].str.startswith("E_").all()
    assert ((t6["nmi_mean"] >= 0) & (t6["nmi_mean"] <= 1)).all()
    t7 = E.keyword_source_ablation(bench, "color")
    assert list(t7["keyword_source"]) == ["user", "lm", "class_names"]
    assert (t7["model"] == bench.model).all()
    cls = t7.set_index("keyword_source").loc["class_names", "keywords"]
    assert cls == ", ".join(bench.class_names("color"))


def test_alpha_sweep_and_its_kmeans_baseline(bench):
    sweep, base = E.alpha_sweep(bench, "color", [0.2, 0.6])
    assert list(sweep["alpha"]) == [0.2, 0.6] and (sweep["model"] == bench.model).all()
    loc = bench.localize("color")
    X = bench.features("color", loc)
    km = kmeans_scores(X, bench.y("color"), bench.n_clusters("color"), seeds=bench.seeds)
    assert base.iloc[0]["nmi_mean"] == pytest.approx(km["nmi"].mean())
    # the head's scores are memoised: the same alpha twice is the same frame
    a = bench.evaluate("color", loc, alpha=0.2, kmeans=False)
    assert bench.evaluate("color", loc, alpha=0.2, kmeans=False) is a


def test_main_results_and_failure_cases(bench):
    res, named = E.main_results(bench, ["color"])
    assert set(res["method"]) == {"ESMC", "ESMC w/o head", "Vision only"}
    assert (res["model"] == bench.model).all()
    paper_cols = [c for c in res.columns if c.startswith("paper_")]
    assert paper_cols and all(PAPER_MODEL in c for c in paper_cols)
    assert res[paper_cols].isna().all().all()  # the paper has no synthetic dataset
    df = named["color"]
    assert df["size"].sum() == len(bench.images("color"))
    fails = E.failure_cases(bench, "color", n=50)
    assert not fails["correct"].any()
    assert len(fails) == fails.attrs["n_wrong"]
    assert list(fails["confidence"]) == sorted(fails["confidence"], reverse=True)
    assert (fails["true"] != fails["matched_class"]).all()


def test_prompt_robustness_captures_each_variant(bench):
    t5, locs = E.prompt_robustness(bench, ["color"])
    assert list(t5["variant"]) == ["Original", "Variant 1", "Variant 2", "Variant 3"]
    assert len(set(t5["prompt"])) == 4 and set(locs) == {("color", v) for v in t5["variant"]}
    assert (t5["model"] == bench.model).all()
    some, _ = E.prompt_robustness(bench, ["color"], variants=["Original", "Variant 2"])
    assert list(some["variant"]) == ["Original", "Variant 2"]
    pd.testing.assert_frame_equal(some.reset_index(drop=True),
                                  t5[t5["variant"].isin(["Original", "Variant 2"])]
                                  .reset_index(drop=True))
    with pytest.raises(Exception, match="Variant 9"):
        E.prompt_robustness(bench, ["color"], variants=["Variant 9"])


def test_cost_table_measures_every_step(bench):
    cost = E.cost_table(bench, ["color"], epochs=5)
    row = cost.iloc[0]
    for c in ("localization_capture_s", "vote_s", "target_capture_s",
              "head_train_s (5 epochs)"):
        assert row[c] > 0
    assert row["model"] == bench.model and row["n_images"] == len(bench.images("color"))
    paper = E.paper_cost("flower")
    assert paper.loc[paper["this_dataset"], "dataset"].tolist() == ["Flower"]


def test_notebook_figures_are_saved_as_pdf_and_png(bench, tmp_path):
    examples = E.lens_examples(bench, n_images=1)
    assert {p["criterion"] for p in examples[0]["panels"]} == set(bench.criteria)
    assert sum(p["true"] for p in examples[0]["panels"]) == len(bench.criteria)
    peaks = E.lens_peak_table(bench, examples)
    assert (peaks["model"] == bench.model).all()
    fig = P.lens_example_figure(examples[0], bench.model)
    paths = P.save_figure(fig, "fig3_test", tmp_path)
    assert [p.suffix for p in paths] == [".pdf", ".png"] and all(p.stat().st_size for p in paths)
    assert bench.model in fig._suptitle.get_text()
    sweep, base = E.alpha_sweep(bench, "color", [0.2, 0.6])
    fig = P.sweep_figure({"color": sweep}, {"color": base.iloc[0]}, bench.model)
    assert len(fig.axes[0].lines) >= 2  # ESMC curves and the k-means lines
    P.save_figure(fig, "fig6_test", tmp_path)
    res, _ = E.main_results(bench, ["color"])
    P.save_figure(P.method_bars_figure(res, bench.model), "bars_test", tmp_path)
    assert len(list(tmp_path.glob("*.pdf"))) == 3 and len(list(tmp_path.glob("*.png"))) == 3


def test_format_table_rounds_and_drops_helpers():
    df = pd.DataFrame({"nmi": ["0.1 ± 0.0"], "nmi_mean": [0.123456], "ri_mean": [0.5],
                       "x": [0.123456]})
    out = E.format_table(df)
    assert list(out.columns) == ["nmi", "ri_mean", "x"] and out["x"].iloc[0] == 0.1235


def test_the_papers_numbers_stand_beside_ours_and_other_datasets_are_flagged():
    from esmc_lens.report.paper_numbers import beside_paper

    ours = pd.DataFrame({"criterion": ["color", "color", "species", "color"],
                         "method": ["ESMC", "Output", "ESMC", "Vision only"]})
    t3 = beside_paper(ours, "table3", "flower", ("nmi", "ri"))
    assert list(t3[f"paper_nmi ({PAPER_MODEL})"])[:3] == [0.7283, 0.6698, 0.8923]
    assert t3[f"paper_ri ({PAPER_MODEL})"].iloc[0] == 0.8982
    assert list(t3["paper_dataset"]) == ["Flower", "Flower", "Flower", ""]
    assert np.isnan(t3[f"paper_nmi ({PAPER_MODEL})"].iloc[3])  # no vision-only row
    t6 = beside_paper(pd.DataFrame({"criterion": ["color"], "n_samples": [5]}), "table6",
                      "flower")
    assert t6[f"paper_nmi ({PAPER_MODEL})"].iloc[0] == 0.8138
    assert t6["paper_dataset"].iloc[0] == "Stanford_Cars (other dataset)"
    t5 = beside_paper(pd.DataFrame({"criterion": ["color"], "variant": ["Variant 2"]}),
                      "table5", "flower", ("nmi", "ri"))
    assert t5[f"paper_ri ({PAPER_MODEL})"].iloc[0] == 0.9257
    t4 = beside_paper(pd.DataFrame({"criterion": ["color"]}), "table4", "flower")
    assert t4[f"paper_head_train_s ({PAPER_MODEL})"].iloc[0] == 0.4472
    none = beside_paper(ours.head(1), "table1", "synthetic")
    assert np.isnan(none[f"paper_nmi ({PAPER_MODEL})"].iloc[0])
    assert none["paper_dataset"].iloc[0] == ""
