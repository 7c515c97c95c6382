"""The notebooks' library logic (esmc_lens.apps.workbench, paper_numbers, notebook figures)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from esmc_lens.apps import workbench as E
from esmc_lens.cluster.baselines import kmeans_scores
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
    assert list(ds.names) == [n for n in bench.dataset.names if n in set(ds.names)]
    assert bench.model.startswith("tiny")
    # a missing data folder is said, not hidden
    _ds2, name, note = E.resolve_dataset(tmp_path, "flower", tmp_path / "o", 8)
    assert name == "synthetic" and "does not exist" in note


def test_the_users_keywords_are_written_in_the_code_not_read_from_the_folders(bench):
    kw = bench.keywords("color")
    assert kw.sources == ["user"] * len(kw.words)
    assert tuple(kw.words) == E.BASIC_COLOURS  # the basic colour terms, whatever the data
    assert bench.keywords("color", "class_names").words == \
        bench.class_names("color")
    assert "not read from the folders" in bench.keyword_note("color")
    assert "supervised" in bench.keyword_note("color", "class_names")
    assert "keywords (label-free)" in bench.describe()


def _cli_run(data, out, cache, keywords, n_seeds=2):
    from esmc_lens.apps.cli import main

    rc = main(["run", "--model", "tiny", "--data", str(data), "--criterion", "color",
               "--prompt", "The color of the object is", "--keywords", ",".join(keywords),
               "--keyword-source", "user", "--n-samples", "4", "--n-seeds", str(n_seeds),
               "--cache-dir", str(cache), "--out", str(out), "--quiet"])
    assert rc == 0


def test_a_notebook_result_is_the_cli_result_for_the_same_settings(tiny_vlm, tmp_path):
    """The workbench (what the notebooks call) and ``esmc-lens run`` with the same settings,
    each capturing into its own cache: the same targets, labels, names and per-seed scores,
    exactly (the same code path and kernels on the same inputs)."""
    from esmc_lens.report.result import EsmcResult

    settings = E.Settings(per_class=None, n_seeds=2, epochs=100, n_samples=4, alpha=0.3)
    bench = E.Workbench.open(tiny_vlm, data=None, quick=False, outputs=tmp_path / "nb",
                             figures=tmp_path / "fig", n_synthetic=8, settings=settings,
                             verbose=False)
    res = bench.run("color")
    data = bench.dataset.root
    _cli_run(data, tmp_path / "cli", tmp_path / "cli-cache", bench.keywords("color").words)
    cli = EsmcResult.load(tmp_path / "cli")
    assert res.target == cli.target and res.target_labels == cli.target_labels
    assert res.keywords.words == cli.keywords.words
    np.testing.assert_array_equal(res.labels, cli.labels)
    assert list(res.clusters["name"]) == list(cli.clusters["name"])
    assert set(res.per_seed) == set(cli.per_seed) >= {"ESMC", "ESMC w/o head", "Output",
                                                       "Vision only (vision tower pooled)"}
    for method in res.per_seed:
        for metric in ("nmi", "ri", "ari", "acc"):
            np.testing.assert_array_equal(res.per_seed[method][metric].to_numpy(),
                                          cli.per_seed[method][metric].to_numpy(),
                                          err_msg=f"{method} {metric}")
    # the notebook's figures read the run's own embeddings (fp32 target capture): k-means on
    # them gives the run's "ESMC w/o head" scores exactly
    X = bench.embeddings(res)
    km = kmeans_scores(X, bench.y("color"), bench.n_clusters("color"), seeds=bench.seeds)
    np.testing.assert_array_equal(km["nmi"].to_numpy(),
                                  res.per_seed["ESMC w/o head"]["nmi"].to_numpy())


def test_runs_are_memoised_and_captures_are_read_back_from_the_disk_cache(bench, tiny_vlm):
    res = bench.run("color")
    assert bench.run("color") is res
    assert not res.supervised and res.keyword_source == "user"  # no class names by default
    assert bench.run("color", "class_names", baselines=False).supervised
    assert bench.run("color", alpha=0.6) is not res
    again = E.Workbench.open(tiny_vlm, data=None, quick=True, outputs=bench.outputs,
                             figures=bench.figures, n_synthetic=8, verbose=False)
    res2 = again.run("color")
    assert res2.meta["capture_cache"]["computed"] == 0  # every batch read from disk
    assert res2.target == res.target
    np.testing.assert_array_equal(res2.labels, res.labels)


def test_tables_are_read_off_runs(bench):
    res = bench.run("color")
    t, named = E.main_results(bench, ["color"])
    esmc = t.set_index("method").loc["ESMC"]
    assert esmc["nmi_mean"] == res.per_seed["ESMC"]["nmi"].mean()
    assert (t["model"] == bench.model).all() and (t["mode"] == "QUICK").all()
    paper_cols = [c for c in t.columns if c.startswith("paper_") and PAPER_MODEL in c]
    assert len(paper_cols) == 2 and t[paper_cols].isna().all().all()  # no synthetic row
    assert named["color"]["size"].sum() == len(bench.images("color"))
    t3 = E.method_ablation(bench).set_index("method")
    assert list(t3.index) == ["Output", "ESMC w/o head", "ESMC"]
    assert t3.loc["Output", "ri_mean"] == res.per_seed["Output"]["ri"].mean()
    # the alpha sweep at the run's alpha is the run's own head, seed by seed
    sweep, base = E.alpha_sweep(bench, "color", [res.settings["alpha"], 0.6])
    assert sweep.iloc[0]["nmi_mean"] == res.per_seed["ESMC"]["nmi"].mean()
    assert base.iloc[0]["nmi_mean"] == res.per_seed["ESMC w/o head"]["nmi"].mean()
    # Algorithm 1 alone is the run's localization
    loc = bench.localize("color")
    assert loc.targets == res.target
    pd.testing.assert_frame_equal(loc.votes, res.localization.votes)
    t6 = E.sample_size_ablation(bench, "color", sizes=(3, 50))
    assert list(t6["n_sampled"]) == [3, len(bench.images("color"))]
    assert t6["target"].str.startswith("E_").all()
    # the paper's Table 6 (Stanford_Cars only) has a color row for 3 samples, none for 50
    assert list(t6["paper_dataset"]) == ["Stanford_Cars (other dataset)", ""]
    run3 = bench.run("color", n_samples=3, baselines=False)
    assert t6.iloc[0]["nmi_mean"] == run3.per_seed["ESMC"]["nmi"].mean()
    t7 = E.keyword_source_ablation(bench, "color", ("user", "class_names"))
    row = t7.set_index("keyword_source").loc["class_names"]
    assert row["keywords"] == ", ".join(bench.class_names("color"))
    assert row["localization"] == "supervised localization"
    assert t7.set_index("keyword_source").loc["user", "localization"] == "label-free"


def test_failure_cases_name_the_matched_class(bench):
    res = bench.run("color")
    fails = E.failure_cases(bench, "color", n=50)
    assert not fails["correct"].any() and len(fails) == fails.attrs["n_wrong"]
    assert list(fails["confidence"]) == sorted(fails["confidence"], reverse=True)
    assert (fails["true"] != fails["matched_class"]).all()
    assert set(fails["answer"]) <= set(res.answers)
    caps = E.failure_captions(fails)
    for cap, r in zip(caps, fails.itertuples(), strict=True):
        assert f"assigned: {r.matched_class}" in cap and f"true: {r.true}" in cap


def test_prompt_robustness_runs_each_variant(bench):
    t5, locs = E.prompt_robustness(bench, ["color"], variants=["Original", "Variant 2"])
    assert list(t5["variant"]) == ["Original", "Variant 2"]
    assert len(set(t5["prompt"])) == 2 and set(locs) == {("color", v) for v in t5["variant"]}
    assert (t5["model"] == bench.model).all()
    orig = bench.run("color", baselines=False)
    assert t5.iloc[0]["nmi_mean"] == orig.per_seed["ESMC"]["nmi"].mean()
    with pytest.raises(Exception, match="Variant 9"):
        E.prompt_robustness(bench, ["color"], variants=["Variant 9"])


def test_cost_table_measures_every_stage(bench):
    cost = E.cost_table(bench, ["color"], epochs=5)
    row = cost.iloc[0]
    for c in ("localization_s", "target_capture_s", "head_train_s (5 epochs)", "total_s"):
        assert row[c] > 0
    assert row["total_s"] >= row["localization_s"] + row["target_capture_s"]
    assert row["model"] == bench.model and row["n_images"] == len(bench.images("color"))


def test_notebook_figures_are_saved_as_pdf_and_png(bench, tmp_path):
    examples = E.lens_examples(bench, n_images=1)
    assert {p["criterion"] for p in examples[0]["panels"]} == set(bench.criteria)
    assert sum(p["true"] for p in examples[0]["panels"]) == len(bench.criteria)
    peaks = E.lens_peak_table(bench, examples)
    assert (peaks["model"] == bench.model).all()
    fig = P.lens_example_figure(examples[0], **bench.fig)
    paths = P.save_figure(fig, "fig3_test", tmp_path)
    assert [p.suffix for p in paths] == [".pdf", ".png"] and all(p.stat().st_size for p in paths)
    assert bench.model in fig._suptitle.get_text() and "QUICK" in fig._suptitle.get_text()
    sweep, base = E.alpha_sweep(bench, "color", [0.2, 0.6])
    fig = P.sweep_figure({"color": sweep}, {"color": base.iloc[0]}, **bench.fig)
    assert len(fig.axes[0].lines) >= 2  # ESMC curves and the k-means lines
    P.save_figure(fig, "fig6_test", tmp_path)
    res, _ = E.main_results(bench, ["color"])
    P.save_figure(P.method_bars_figure(res, **bench.fig), "bars_test", tmp_path)
    assert len(list(tmp_path.glob("*.pdf"))) == 3 and len(list(tmp_path.glob("*.png"))) == 3


def test_shown_tables_say_quick_and_name_the_model(bench):
    html = bench.show(E.method_ablation(bench), "Table 3").to_html()
    assert "QUICK · Table 3" in html and bench.model in html


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
