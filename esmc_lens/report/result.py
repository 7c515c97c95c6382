"""What one ESMC run produced, and how it is saved and read back."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..localization.keywords import Keywords
from ..localization.votes import Localization
from .naming import naming_accuracy


@dataclass
class EsmcResult:
    """Everything one ESMC run produced (see :func:`run_esmc`)."""

    model: str
    criterion: str | None
    prompt: str
    image_ids: list[str]
    labels: np.ndarray  # [n_images] cluster of each image (seed ``seed``)
    clusters: pd.DataFrame  # one row per cluster: name, size, top tokens, purity
    scores: pd.DataFrame  # method x metric mean/std (empty without labels)
    per_seed: dict[str, pd.DataFrame]  # method -> per-seed scores
    target: list[tuple[int, int]]  # (stream index, slot of the localization cache)
    target_labels: list[str]
    space: str
    keywords: Keywords
    localization: Localization
    y_true: np.ndarray | None = None
    class_names: list[str] | None = None
    answers: list[str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    settings: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    # (stream index, sequence position counted from the end: -1 = the last token) of each
    # target: what ``target`` refers to in the model's input, the same prompt token in
    # every image even where image-token counts differ (``target``'s slot indexes the
    # localization cache)
    target_positions: list[tuple[int, int]] = field(default_factory=list)

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    @property
    def supervised(self) -> bool:
        """True when localization used the dataset's class names (the labels) as keywords."""
        return self.keywords.supervised

    @property
    def keyword_source(self) -> str:
        """Where the keywords came from: ``"user"``, ``"lm"``, ``"class_names"`` or a mix
        joined with ``+``."""
        return "+".join(dict.fromkeys(self.keywords.sources))

    @property
    def note(self) -> str:
        """What every table of this run must say: the model, the keyword source, and
        "supervised localization" when the labels reached Algorithm 1."""
        sup = "; SUPERVISED LOCALIZATION (class names as keywords)" if self.supervised else ""
        return f"model {self.model}; keywords: {self.keyword_source}{sup}"

    def assignments(self) -> pd.DataFrame:
        """image, cluster, cluster name and (when known) true label, one row per image."""
        names = dict(zip(self.clusters["cluster"], self.clusters["name"], strict=True))
        df = pd.DataFrame({"image": self.image_ids, "cluster": self.labels,
                           "cluster_name": [names.get(c, "") for c in self.labels]})
        if self.y_true is not None and self.class_names is not None:
            df["true_label"] = [self.class_names[y] if y >= 0 else "" for y in self.y_true]
        if self.answers is not None:
            df["answer"] = list(self.answers)
        return df

    def to_json(self) -> dict:
        def block(method: str) -> dict:
            row = self.scores.loc[method]
            return {m: float(row[f"{m}_mean"]) for m in ("nmi", "ri", "ari", "acc")} | {
                f"{m}_std": float(row[f"{m}_std"]) for m in ("nmi", "ri", "ari", "acc")}

        has = not self.scores.empty
        return {
            "model": self.model, "criterion": self.criterion, "prompt": self.prompt,
            "supervised_localization": self.supervised, "keyword_source": self.keyword_source,
            "note": self.note,
            "n_images": self.n_images, "target": [list(t) for t in self.target],
            "target_positions": [list(t) for t in self.target_positions],
            "target_labels": self.target_labels, "space": self.space,
            "scores": block("ESMC") if has else None,
            "baselines": {m: block(m) for m in self.scores.index if m != "ESMC"} if has else {},
            "clusters": json.loads(self.clusters.to_json(orient="records")),
            "naming_accuracy": (naming_accuracy(self.clusters)
                                if "majority_label" in self.clusters else None),
            "keywords": self.keywords.to_frame().to_dict(orient="records"),
            "keyword_answer": {"question": self.keywords.question, "raw": self.keywords.raw,
                               "truncated": self.keywords.truncated},
            "localization": {"found": bool(self.localization.found),
                             "max_votes": int(self.localization.max_votes),
                             "n_pairs": int(self.localization.n_pairs),
                             "max_prob": float(self.localization.max_prob),
                             "tau": self.localization.tau,
                             "evidence": self.localization.evidence,
                             "n_tied": int(self.localization.n_tied),
                             "sample": list(self.image_ids[i] for i in self.settings.get(
                                 "localization_sample", [])),
                             "message": self.localization.message},
            "answers": self.answers,
            "timings_s": self.timings, "settings": self.settings, "meta": self.meta,
        }

    def save(self, outdir: str | Path) -> Path:
        """``results.json``, ``assignments.csv``, ``scores.csv``, ``votes.csv``, per-seed
        scores, and ``result.pkl`` (the whole object, for :meth:`load`)."""
        import os
        import pickle

        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / "result.pkl.part"
        tmp.write_bytes(pickle.dumps(self))
        os.replace(tmp, out / "result.pkl")
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=1, default=str))
        self.assignments().to_csv(out / "assignments.csv", index=False)
        self.scores.to_csv(out / "scores.csv")
        self.localization.votes.to_csv(out / "votes.csv")
        for method, df in self.per_seed.items():
            df.to_csv(out / f"per_seed_{re.sub(r'[^A-Za-z0-9]+', '_', method)}.csv")
        return out

    @classmethod
    def load(cls, outdir: str | Path) -> EsmcResult:
        """The result saved by :meth:`save` (a pickle: load only folders you trust)."""
        import pickle

        obj = pickle.loads((Path(outdir) / "result.pkl").read_bytes())
        if not isinstance(obj, cls):
            raise ConfigError(f"{outdir}/result.pkl does not hold an EsmcResult")
        return obj

    @staticmethod
    def load_json(outdir: str | Path) -> dict:
        """The saved ``results.json`` of a run (plain data)."""
        return json.loads((Path(outdir) / "results.json").read_text())


@dataclass
class MultiResult:
    """ESMC for several criteria on the same images: one :class:`EsmcResult` per criterion,
    and how their partitions relate (:meth:`cross_criterion`).

    ``res["color"]`` is one criterion's result; iterating gives the criterion names.
    """

    results: dict[str, EsmcResult]

    def __getitem__(self, name: str) -> EsmcResult:
        if name not in self.results:
            raise ConfigError(f"no criterion {name!r}; the criteria are {list(self.results)}")
        return self.results[name]

    def __iter__(self):
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    @property
    def criteria(self) -> list[str]:
        return list(self.results)

    @property
    def scores(self) -> pd.DataFrame:
        """Every criterion's score table, indexed by (criterion, method)."""
        frames = {c: r.scores for c, r in self.results.items() if not r.scores.empty}
        if not frames:
            return pd.DataFrame()
        return pd.concat(frames, names=["criterion", "method"])

    def cross_criterion(self) -> pd.DataFrame:
        """NMI between the criteria's ESMC labelings, and of each labeling against each
        criterion's ground truth where known (rows: labelings; columns: ``"<c> clusters"``
        and ``"<c> labels"``). Distinct criteria should give distinct partitions: high NMI
        on the diagonal of the labels block, low elsewhere."""
        from ..cluster.metrics import clustering_scores

        rows = {}
        for a, ra in self.results.items():
            row = {}
            for b, rb in self.results.items():
                row[f"{b} clusters"] = clustering_scores(rb.labels, ra.labels)["nmi"]
            for b, rb in self.results.items():
                if rb.y_true is not None:
                    row[f"{b} labels"] = clustering_scores(rb.y_true, ra.labels)["nmi"]
            rows[f"{a} clusters"] = row
        df = pd.DataFrame.from_dict(rows, orient="index")
        df.index.name = "labeling"
        return df

    @property
    def note(self) -> str:
        return "; ".join(f"{c}: {r.note}" for c, r in self.results.items())

    def to_json(self) -> dict:
        return {"criteria": self.criteria, "note": self.note,
                "cross_criterion_nmi": json.loads(self.cross_criterion().to_json()),
                "results": {c: f"{c}/results.json" for c in self.results}}

    def save(self, outdir: str | Path) -> Path:
        """Each criterion in ``<outdir>/<criterion>/`` (see :meth:`EsmcResult.save`), and
        ``cross_criterion.csv`` and ``results.json`` (the criteria and their cross view)."""
        out = Path(outdir)
        out.mkdir(parents=True, exist_ok=True)
        for c, r in self.results.items():
            r.save(out / c)
        self.cross_criterion().to_csv(out / "cross_criterion.csv")
        (out / "results.json").write_text(json.dumps(self.to_json(), indent=1, default=str))
        return out
