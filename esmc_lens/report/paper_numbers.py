"""The paper's own numbers (Wang et al., ESMC), as data, always labelled as the paper's.

Every value here was typed from ../shared/paper/esmc-paper.txt (Tables 1-7); none was
produced by esmc_lens. All of them come from LLaVA-1.5-7B (``PAPER_MODEL``). Notebooks print
them *beside* esmc_lens' numbers, never in their place: every frame returned here carries
``model = PAPER_MODEL`` and ``source = "paper"``.

The paper contradicts itself in two places; both values are kept as printed, table by table:

* Flowers / Color, ESMC RI: 0.8992 in Table 2, 0.8982 in Table 3.
* CIFAR-10 / Type, ESMC RI: 0.9589 in Table 2 (the same row as Stanford_Cars / Type, likely
  a copy error), 0.9520 in Table 3 and in the text of section 4.2. Table 2's CIFAR-10 Type
  row of baselines also repeats Stanford_Cars / Type's.

>>> paper_table("table1").loc[("Flowers", "Color"), "ESMC"]
0.7283
"""

from __future__ import annotations

import pandas as pd

__all__ = [
    "DATASET_ALIASES",
    "PAPER_ALPHA",
    "PAPER_MODEL",
    "PAPER_PROMPT_VARIANTS",
    "PAPER_SOURCE",
    "beside_paper",
    "paper_row",
    "paper_scores",
    "paper_table",
]

PAPER_MODEL = "LLaVA-1.5-7B"
PAPER_SOURCE = "paper"

_METHODS = ["MCV", "ENRC", "iMClusts", "AugDMC", "DDMC", "Multi-Map", "Multi-Sub", "ESMC"]

_TABLE1 = """
Stanford_Cars Color 0.2103 0.2465 0.2336 0.2736 0.6899 0.7360 0.7533 0.8138
Stanford_Cars Type 0.1650 0.2063 0.1963 0.2364 0.6045 0.6355 0.6616 0.8817
Flowers Color 0.2938 0.3329 0.3169 0.3556 0.6327 0.6426 0.6940 0.7283
Flowers Species 0.1326 0.1561 0.1894 0.1887 0.1996 0.6148 0.7580 0.8923
CIFAR-10 Type 0.1618 0.1826 0.2040 0.2855 0.3991 0.4967 0.5271 0.8293
CIFAR-10 Environment 0.1379 0.1892 0.1920 0.2927 0.3782 0.4598 0.4828 0.6075
CMU_face Emotion 0.1433 0.1592 0.0422 0.0161 0.1726 0.1786 0.2053 0.2237
CMU_face Glass 0.1201 0.1493 0.1299 0.1039 0.2261 0.3402 0.4870 0.7665
CMU_face Pose 0.3254 0.2290 0.4437 0.1320 0.4526 0.4693 0.5923 0.6271
Card Order 0.0792 0.1225 0.1144 0.1440 0.1563 0.3633 0.3921 0.4736
Card Suits 0.0430 0.0676 0.0716 0.0873 0.0933 0.2734 0.3104 0.3586
Fruit360 Color 0.3777 0.4264 0.4097 0.4594 0.4981 0.6239 0.6654 0.6952
Fruit360 Species 0.2985 0.4142 0.3861 0.5139 0.5292 0.5284 0.6123 0.5036
Fruit Color 0.6266 0.7103 0.7351 0.8517 0.8973 0.8619 0.9693 0.9308
Fruit Species 0.2733 0.3187 0.3029 0.3546 0.3764 1.0000 1.0000 1.0000
"""

_TABLE2 = """
Stanford_Cars Color 0.5802 0.6779 0.6552 0.7525 0.8765 0.9193 0.9387 0.9235
Stanford_Cars Type 0.5634 0.6217 0.5643 0.7356 0.7957 0.8399 0.8792 0.9589
Flowers Color 0.5860 0.6214 0.6127 0.6931 0.7887 0.7984 0.8843 0.8992
Flowers Species 0.5273 0.6065 0.6195 0.6077 0.6227 0.8321 0.8980 0.9726
CIFAR-10 Type 0.5634 0.6217 0.5643 0.7356 0.7957 0.8399 0.7394 0.9589
CIFAR-10 Environment 0.3344 0.3599 0.3664 0.4689 0.5547 0.6737 0.7096 0.8282
CMU_face Emotion 0.5268 0.6630 0.5932 0.5367 0.7593 0.7105 0.8527 0.6697
CMU_face Glass 0.4955 0.6209 0.5627 0.5361 0.7663 0.7068 0.8324 0.9259
CMU_face Pose 0.6028 0.5029 0.6114 0.5517 0.7904 0.6624 0.8736 0.8253
Card Order 0.7128 0.7313 0.7658 0.8267 0.8326 0.8587 0.8842 0.8805
Card Suits 0.3638 0.3801 0.3715 0.4228 0.6469 0.7039 0.8504 0.7285
Fruit360 Color 0.6791 0.6868 0.6841 0.7392 0.7472 0.8439 0.8821 0.8493
Fruit360 Species 0.6176 0.6984 0.6732 0.7430 0.7703 0.7582 0.8504 0.7285
Fruit Color 0.7685 0.8511 0.8632 0.9108 0.9383 0.9556 0.9964 0.9732
Fruit Species 0.6597 0.6536 0.6743 0.7399 0.7621 1.0000 1.0000 1.0000
"""

# Table 3: NMI (Output, ESMC w/o MLP, ESMC) then RI (same three).
_TABLE3 = """
Stanford_Cars Color 0.7871 0.7934 0.8138 0.9107 0.9129 0.9235
Stanford_Cars Type 0.6462 0.8694 0.8817 0.8474 0.9517 0.9589
Flower Color 0.6698 0.6835 0.7283 0.8736 0.8810 0.8982
Flower Species 0.8133 0.8462 0.8923 0.9329 0.9347 0.9726
CIFAR-10 Type 0.7505 0.7149 0.8293 0.8953 0.9137 0.9520
CIFAR-10 Environment 0.0443 0.5484 0.6075 0.4941 0.7860 0.8282
CMU_face Emotion 0.1498 0.1902 0.2237 0.5876 0.6346 0.6697
CMU_face Glass 0.6780 0.6445 0.7665 0.8279 0.7955 0.9259
CMU_face Pose 0.0913 0.5498 0.6271 0.5631 0.8140 0.8253
Card Order 0.4387 0.3895 0.4736 0.8348 0.8712 0.8805
Card Suits 0.2423 0.3334 0.3586 0.4258 0.6982 0.7258
Fruit360 Color 0.6071 0.6523 0.6952 0.7972 0.7584 0.8493
Fruit360 Species 0.2199 0.3806 0.5036 0.5080 0.6824 0.7285
Fruit Color 0.9308 0.9308 0.9308 0.9732 0.9732 0.9732
Fruit Species 0.8441 1.0000 1.0000 0.9337 1.0000 1.0000
"""

# Table 4: head training time (100 epochs), seconds.
_TABLE4 = {"Stanford_cars": 0.3675, "Flower": 0.4472, "CIFAR-10": 15.03, "CMU_face": 0.5016,
           "Card": 4.636, "Fruit360": 2.874, "Fruit": 0.3968}

#: The paper's prompt variants (Table 5, Stanford_Cars), per criterion.
PAPER_PROMPT_VARIANTS: dict[str, list[tuple[str, str]]] = {
    "Color": [("Original", "The color of the car is"), ("Variant 1", "Color of the car:"),
              ("Variant 2", "Identify the color of this vehicle."),
              ("Variant 3", "Provide the exact car color.")],
    "Brand": [("Original", "The brand of the car is"), ("Variant 1", "Brand of the car:"),
              ("Variant 2", "Tell me the make of the car."),
              ("Variant 3", "What's the brand of the car?")],
}
_TABLE5 = {"Color": [(0.8138, 0.9235), (0.8016, 0.9194), (0.8143, 0.9257), (0.8113, 0.9268)],
           "Brand": [(0.8817, 0.9589), (0.8784, 0.9524), (0.8911, 0.9657), (0.8957, 0.9669)]}

# Table 6: the same target and NMI for every sample size.
_TABLE6 = [(n, crit, "E_27(263)", nmi) for n in (3, 5, 10, 20)
           for crit, nmi in (("Color", 0.8138), ("Brand", 0.8817))]

_TABLE7 = [
    ("GPT-4", "Color", "Black, White, Silver, Gray, Red, Blue, Green, Gold, Brown, Beige",
     "E_27(263)", 0.8138),
    ("GPT-4", "Brand", "Toyota, Ford, Chevrolet, Honda, Nissan, Volkswagen, Hyundai, "
     "Mercedes-Benz, BMW, Audi", "E_27(263)", 0.8817),
    ("DeepSeek-R1", "Color", "White Black Gray Silver Red Blue Green Yellow Orange Brown Gold "
     "Beige Bronze Purple Pink", "E_27(263)", 0.8138),
    ("DeepSeek-R1", "Brand", "Toyota Honda Ford Chevrolet Volkswagen BMW Mercedes Audi Nissan "
     "Hyundai Kia Tesla", "E_27(263)", 0.8817),
    ("Gemini-2.5", "Color", "White Black Grey Silver Blue Red Green Yellow Brown Beige Purple "
     "Gold", "E_27(263)", 0.8138),
    ("Gemini-2.5", "Brand", "Toyota Volkswagen Hyundai Kia Ford Honda Nissan Chevrolet BMW "
     "Mercedes", "E_27(263)", 0.8817),
]

#: The paper's pseudo-label ratio per dataset (section 4.1).
PAPER_ALPHA = {"CMU_face": 0.1, "Card": 0.1, "Fruit360": 0.2, "CIFAR-10": 0.2,
               "Stanford_Cars": 0.3, "Flowers": 0.3, "Fruit": 0.4}

#: esmc_lens dataset folder name -> the paper's dataset name (Tables 1, 2, 3).
DATASET_ALIASES = {"flower": "Flowers", "flowers": "Flowers", "stanford_cars": "Stanford_Cars",
                   "cars": "Stanford_Cars", "cifar10": "CIFAR-10", "cifar-10": "CIFAR-10",
                   "cmu_face": "CMU_face", "card": "Card", "fruit360": "Fruit360",
                   "fruit": "Fruit"}


def _rows(text: str) -> list[list[str]]:
    return [line.split() for line in text.strip().splitlines()]


def _label(df: pd.DataFrame) -> pd.DataFrame:
    df.insert(0, "model", PAPER_MODEL)
    df.insert(1, "source", PAPER_SOURCE)
    return df


def paper_table(name: str) -> pd.DataFrame:
    """One of the paper's tables as a DataFrame labelled ``model=LLaVA-1.5-7B, source=paper``.

    ``name``: ``"table1"`` (NMI) and ``"table2"`` (RI): index (dataset, criterion), one
    column per method; ``"table3"``: index (dataset, criterion), columns
    ``{nmi,ri}_{Output,ESMC w/o head,ESMC}``; ``"table4"``: head training time per dataset;
    ``"table5"``: prompt variants; ``"table6"``: sample sizes; ``"table7"``: keyword LLMs.
    """
    name = name.lower().replace(" ", "")
    if name in ("table1", "table2"):
        rows = _rows(_TABLE1 if name == "table1" else _TABLE2)
        df = pd.DataFrame([[float(v) for v in r[2:]] for r in rows], columns=_METHODS,
                          index=pd.MultiIndex.from_tuples([(r[0], r[1]) for r in rows],
                                                          names=["dataset", "criterion"]))
        df.attrs["metric"] = "nmi" if name == "table1" else "ri"
        return _label(df)
    if name == "table3":
        cols = [f"{m}_{meth}" for m in ("nmi", "ri")
                for meth in ("Output", "ESMC w/o head", "ESMC")]
        rows = _rows(_TABLE3)
        df = pd.DataFrame([[float(v) for v in r[2:]] for r in rows], columns=cols,
                          index=pd.MultiIndex.from_tuples([(r[0], r[1]) for r in rows],
                                                          names=["dataset", "criterion"]))
        return _label(df)
    if name == "table4":
        df = pd.DataFrame({"head_train_s": _TABLE4}).rename_axis("dataset")
        df.attrs["note"] = "100 epochs, one RTX3090"
        return _label(df)
    if name == "table5":
        recs = []
        for crit, variants in PAPER_PROMPT_VARIANTS.items():
            for (variant, prompt), (nmi, ri) in zip(variants, _TABLE5[crit], strict=True):
                recs.append({"dataset": "Stanford_Cars", "criterion": crit, "variant": variant,
                             "prompt": prompt, "nmi": nmi, "ri": ri})
        return _label(pd.DataFrame(recs))
    if name == "table6":
        return _label(pd.DataFrame(_TABLE6, columns=["n_samples", "criterion", "target",
                                                     "nmi"]).assign(dataset="Stanford_Cars"))
    if name == "table7":
        return _label(pd.DataFrame(_TABLE7, columns=["keyword_source", "criterion", "keywords",
                                                     "target", "nmi"])
                      .assign(dataset="Stanford_Cars"))
    raise KeyError(f"no paper table {name!r}: use table1 .. table7")


def paper_row(dataset: str, criterion: str, table: str = "table3") -> dict | None:
    """The paper's numbers for one of *our* (dataset, criterion), or None if it has none.

    Dataset names are matched through :data:`DATASET_ALIASES` and case-insensitively; the
    result carries ``model`` and ``source``.
    """
    df = paper_table(table)
    want_ds = DATASET_ALIASES.get(dataset.lower(), dataset).lower()
    for (ds, crit), row in df.iterrows():
        ds_l = DATASET_ALIASES.get(ds.lower(), ds).lower()
        if ds_l == want_ds and crit.lower() == criterion.lower():
            return {"dataset": ds, "criterion": crit, **row.to_dict()}
    return None


def paper_scores(dataset: str, criterion: str) -> pd.DataFrame | None:
    """The paper's Table 3 NMI and RI for one of *our* (dataset, criterion), or None.

    Index: method (``Output``, ``ESMC w/o head``, ``ESMC``); columns ``nmi``, ``ri``;
    ``attrs`` carry ``model`` and ``source``. Table 3's values are used (Flowers / Color RI
    0.8982, where Table 2 prints 0.8992).
    """
    row = paper_row(dataset, criterion, "table3")
    if row is None:
        return None
    methods = ["Output", "ESMC w/o head", "ESMC"]
    df = pd.DataFrame({m: [row[f"{m}_{meth}"] for meth in methods] for m in ("nmi", "ri")},
                      index=pd.Index(methods, name="method"))
    df.attrs.update(model=PAPER_MODEL, source=PAPER_SOURCE)
    return df


def _same_dataset(a: str, b: str) -> bool:
    norm = lambda d: DATASET_ALIASES.get(d.lower(), d).lower().rstrip("s")  # noqa: E731
    return norm(a) == norm(b)


def _paper_match(r: pd.Series, table: str, dataset: str, metrics) -> tuple[str, dict]:
    """(the paper's dataset, {metric: value}) of the paper's row matching our row ``r``."""
    crit = str(r.get("criterion", "")).lower()
    if table == "table4":
        p = paper_table(table).reset_index()
        p = p[[_same_dataset(d, dataset) for d in p["dataset"]]]
        return (p.iloc[0]["dataset"], {"head_train_s": p.iloc[0]["head_train_s"]}) \
            if len(p) else ("", {})
    if table in ("table1", "table2", "table3"):
        method = r.get("method", "ESMC")
        for (ds, c), row in paper_table(table).iterrows():
            if c.lower() == crit and _same_dataset(ds, dataset):
                vals = ({m: row.get(f"{m}_{method}") for m in metrics} if table == "table3"
                        else {"nmi" if table == "table1" else "ri": row.get(method)})
                vals = {m: v for m, v in vals.items() if v is not None and not pd.isna(v)}
                return (ds, vals) if vals else ("", {})
        return "", {}
    p = paper_table(table)
    p = p[p["criterion"].str.lower() == crit]
    if table == "table5" and "variant" in r:
        p = p[p["variant"] == r["variant"]]
    elif table == "table6" and "n_samples" in r:
        p = p[p["n_samples"] == int(r["n_samples"])]
    if not len(p):
        return "", {}
    return p.iloc[0]["dataset"], {m: p.iloc[0][m] for m in metrics if m in p}


def beside_paper(ours: pd.DataFrame, table: str, dataset: str,
                 metrics: tuple[str, ...] = ("nmi",)) -> pd.DataFrame:
    """``ours`` with the paper's numbers of ``table`` as columns beside them.

    Rows are matched on what both tables have: ``criterion`` (case-insensitive) always,
    and ``method`` (tables 1-3), ``variant`` (table 5) or ``n_samples`` (table 6); table 7's
    three LLM keyword sources share one NMI per criterion in the paper, so every source of
    ours gets it. Added columns: ``paper_<metric> (LLaVA-1.5-7B)`` per metric, and
    ``paper_dataset``: the paper's dataset of that number, with ``(other dataset)`` when it
    is not ``dataset`` (the paper's Tables 5-7 are on Stanford_Cars only). NaN where the
    paper has no such row.
    """
    table = table.lower()
    df = ours.copy()
    found = [_paper_match(r, table, dataset, metrics) for _, r in df.iterrows()]
    cols = {"table1": ["nmi"], "table2": ["ri"], "table4": ["head_train_s"]}.get(
        table, list(metrics))
    for m in cols:
        vals = [v.get(m) for _, v in found]
        df[f"paper_{m} ({PAPER_MODEL})"] = pd.array(
            [float(x) if x is not None and not pd.isna(x) else float("nan") for x in vals],
            dtype="float64")
    df["paper_dataset"] = [
        "" if not ds else (ds if _same_dataset(ds, dataset) else f"{ds} (other dataset)")
        for ds, _ in found]
    return df
