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
    target: list[tuple[int, int]]  # (stream index, slot)
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

    @property
    def n_images(self) -> int:
        return len(self.image_ids)

    def assignments(self) -> pd.DataFrame:
        """image, cluster, cluster name and (when known) true label, one row per image."""
        names = dict(zip(self.clusters["cluster"], self.clusters["name"], strict=True))
        df = pd.DataFrame({"image": self.image_ids, "cluster": self.labels,
                           "cluster_name": [names.get(c, "") for c in self.labels]})
        if self.y_true is not None and self.class_names is not None:
            df["true_label"] = [self.class_names[y] if y >= 0 else "" for y in self.y_true]
        return df

    def to_json(self) -> dict:
        def block(method: str) -> dict:
            row = self.scores.loc[method]
            return {m: float(row[f"{m}_mean"]) for m in ("nmi", "ri", "ari", "acc")} | {
                f"{m}_std": float(row[f"{m}_std"]) for m in ("nmi", "ri", "ari", "acc")}

        has = not self.scores.empty
        return {
            "model": self.model, "criterion": self.criterion, "prompt": self.prompt,
            "n_images": self.n_images, "target": [list(t) for t in self.target],
            "target_labels": self.target_labels, "space": self.space,
            "scores": block("ESMC") if has else None,
            "baselines": {m: block(m) for m in self.scores.index if m != "ESMC"} if has else {},
            "clusters": json.loads(self.clusters.to_json(orient="records")),
            "naming_accuracy": (naming_accuracy(self.clusters)
                                if "majority_label" in self.clusters else None),
            "keywords": self.keywords.to_frame().to_dict(orient="records"),
            "localization": {"max_votes": int(self.localization.max_votes),
                             "n_pairs": int(self.localization.n_pairs),
                             "tau": self.localization.tau,
                             "sample": list(self.image_ids[i] for i in self.settings.get(
                                 "localization_sample", [])),
                             "message": self.localization.message},
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
