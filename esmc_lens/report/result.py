"""What one ESMC run produced, and how it is saved and read back."""

from __future__ import annotations

import errno
import glob
import json
import math
import os
import re
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..cluster.metrics import clustering_scores
from ..errors import ConfigError, EsmcWarning, OutputError, write_failure
from ..localization.keywords import Keywords
from ..localization.votes import Localization
from ..validate import (
    check_output_dir,
    is_run_file,
    run_folder_state,
    temp_name,
    writer_gone,
)
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

    def save(self, outdir: str | Path, *, overwrite: bool = False,
             tables: dict[str, pd.DataFrame] | None = None) -> Path:
        """Write the run's folder as a whole: ``results.json``, ``assignments.csv``,
        ``scores.csv``, ``votes.csv``, per-seed scores, ``result.pkl`` (the whole object,
        for :meth:`load`) and ``tables`` (``{"skipped.csv": frame}``: more CSVs).

        Everything goes to a temporary folder beside ``outdir``, which is renamed into
        place once complete: a run's folder is whole or absent, never half-written or
        mixed with another run's files. An existing run folder is refused unless
        ``overwrite`` (then it is replaced completely, with an ``EsmcWarning``); a folder
        holding files no run wrote is always refused. Raises ``OutputError`` naming the
        folder, with the fix (also for a full disk: nothing partial is left).
        """
        return write_run_folder(outdir, lambda tmp: self.write_files(tmp, tables),
                                overwrite=overwrite)

    def write_files(self, folder: Path, tables: dict[str, pd.DataFrame] | None = None) -> None:
        """The run's files into ``folder`` (which exists); :meth:`save` makes it whole."""
        import pickle

        files: dict[str, bytes | pd.DataFrame] = {
            "result.pkl": pickle.dumps(self), "results.json": _json_bytes(self.to_json()),
            "assignments.csv": self.assignments(), "scores.csv": self.scores,
            "votes.csv": self.localization.votes}
        for method, df in self.per_seed.items():
            files[f"per_seed_{re.sub(r'[^A-Za-z0-9]+', '_', method)}.csv"] = df
        _write_files(folder, files, tables)

    @classmethod
    def load(cls, outdir: str | Path) -> EsmcResult:
        """The result saved by :meth:`save` (a pickle: load only folders you trust).

        ``OutputError`` (with the fix) when there is no saved run, or its ``result.pkl`` is
        truncated or was written by another version of esmc_lens.
        """
        import pickle

        path = _run_file(outdir, "result.pkl")
        try:
            obj = pickle.loads(path.read_bytes())
        except OSError as exc:
            raise OutputError(f"cannot read {path} ({exc.strerror or exc})") from None
        except Exception as exc:  # truncated, or classes of another version
            raise OutputError(f"{path} is damaged or from another version of esmc_lens "
                              f"({type(exc).__name__}: {' '.join(str(exc).split())[:120]}): "
                              "run `esmc-lens run` again to rewrite it") from None
        if not isinstance(obj, cls):
            raise OutputError(f"{path} does not hold an EsmcResult: pass the --out folder "
                              "of `esmc-lens run`")
        return obj

    @staticmethod
    def load_json(outdir: str | Path) -> dict:
        """The saved ``results.json`` of a run (plain data); ``OutputError`` (with the fix)
        when it is missing, truncated or lacks the fields a run writes."""
        doc = read_run_json(outdir)
        missing = [k for k in _JSON_KEYS if k not in doc]
        if missing:
            raise OutputError(f"{Path(outdir) / 'results.json'} is incomplete (no "
                              f"{', '.join(missing)}): it was not written by a complete "
                              "`esmc-lens run`; run it again")
        return doc


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

    def save(self, outdir: str | Path, *, overwrite: bool = False,
             tables: dict[str, pd.DataFrame] | None = None) -> Path:
        """Each criterion in ``<outdir>/<criterion>/`` (see :meth:`EsmcResult.save`), and
        ``cross_criterion.csv``, ``results.json`` (the criteria and their cross view) and
        ``tables`` at the top; written whole, with :meth:`EsmcResult.save`'s rules."""
        def fill(tmp: Path) -> None:
            for c, r in self.results.items():
                (tmp / c).mkdir()
                r.write_files(tmp / c)
            _write_files(tmp, {"cross_criterion.csv": self.cross_criterion(),
                               "results.json": _json_bytes(self.to_json())}, tables)

        return write_run_folder(outdir, fill, overwrite=overwrite)


def write_run_folder(outdir: str | Path, fill, *, overwrite: bool = False) -> Path:
    """Make ``outdir`` hold exactly what ``fill(tmp)`` writes into an empty folder, or
    nothing new: the files go to a temporary folder beside it, renamed into place when
    complete. See :meth:`EsmcResult.save` for the rules; raises ``OutputError``."""
    out = Path(outdir).expanduser()
    previous = run_folder_state(out)  # before the check: a run that appears later
    check_output_dir(out, overwrite=overwrite)  # makes the rename fail, never mixes
    tmp, old = temp_name(out, "part"), temp_name(out, "old")
    for stale in out.parent.glob(f".{glob.escape(out.name)}.*.*.*"):
        if stale.suffix in (".part", ".old") and writer_gone(stale):
            shutil.rmtree(stale, ignore_errors=True)
    try:
        tmp.mkdir()
        fill(tmp)
        if previous in ("empty", "run"):  # overwrite=True for a run: checked above
            os.replace(out, old)
        os.replace(tmp, out)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not out.exists():
            os.replace(old, out)  # the previous run stays as it was
        failure = write_failure(exc)
        if failure is None:
            raise
        if isinstance(exc, OSError) and exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise OutputError(f"output folder {out} was written by another run while this "
                              "one ran: pass --out a new folder") from None
        reason, full = failure
        fix = ("free space on that disk, or pass --out a folder on another disk" if full
               else "pass --out a folder you can write to")
        raise OutputError(f"cannot write the results to {out} ({reason}): {fix}; nothing "
                          "was left half-written") from None
    shutil.rmtree(old, ignore_errors=True)
    if previous == "run":
        warnings.warn(f"replaced the previous run in {out} completely (overwrite)",
                      EsmcWarning, stacklevel=3)
    return out


def read_run_json(outdir: str | Path) -> dict:
    """A saved run's ``results.json`` (one criterion's or a multi-criteria run's), parsed;
    ``OutputError`` with the fix when it is missing, truncated or not a JSON object."""
    path = _run_file(outdir, "results.json")
    try:
        doc = json.loads(path.read_text())
    except OSError as exc:
        raise OutputError(f"cannot read {path} ({exc.strerror or exc})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise OutputError(f"{path} is truncated or damaged ({exc}): run `esmc-lens run` "
                          "again to rewrite it") from None
    if not isinstance(doc, dict):
        raise OutputError(f"{path} is not a run's results (not a JSON object): run "
                          "`esmc-lens run` again to rewrite it")
    return doc


_JSON_KEYS = ("model", "criterion", "prompt", "n_images", "target_labels", "scores",
              "baselines")


def _run_file(outdir: str | Path, name: str) -> Path:
    d = Path(outdir).expanduser()
    if not d.is_dir():
        what = "is a file" if d.exists() else "does not exist"
        raise OutputError(f"run folder {d} {what}: pass the --out folder of `esmc-lens run`")
    if not (d / name).is_file():
        subs = sorted(p.name for p in d.iterdir() if (p / name).is_file())
        hint = (f"; it is a multi-criteria run: pass one of its criterion folders "
                f"({', '.join(str(d / c) for c in subs)})" if subs else "")
        raise OutputError(f"{d} holds no saved run (no {name}): pass the --out folder of a "
                          f"completed `esmc-lens run`{hint}")
    return d / name


# row-per-image tables, written without their (positional) index
_NO_INDEX = ("assignments.csv", "skipped.csv")


def _write_files(folder: Path, files: dict[str, bytes | pd.DataFrame],
                 tables: dict[str, pd.DataFrame] | None) -> None:
    """``files`` and the caller's extra ``tables`` into ``folder``, each fsynced."""
    for name in tables or {}:
        if not is_run_file(name) or name in files:
            raise ConfigError(f"table name {name!r}: use a run file name the run does not "
                              "write itself (e.g. 'skipped.csv')")
    for name, body in {**files, **(tables or {})}.items():
        _write_file(folder / name, body, index=name not in _NO_INDEX)


def _json_bytes(doc: dict) -> bytes:
    """Strict JSON (NaN and infinities as null), indented, as written to ``results.json``."""
    return json.dumps(_plain(doc), indent=1, allow_nan=False).encode()


def _plain(obj):
    """JSON-safe: NaN and infinities become null (strict JSON readers reject them)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.generic):
        return _plain(obj.item())
    return obj


def _write_file(path: Path, body: bytes | pd.DataFrame, index: bool) -> None:
    """Write and fsync one file (a crash after the rename must not expose empty files)."""
    with open(path, "wb") as f:
        if isinstance(body, bytes):
            f.write(body)
        else:
            f.write(body.to_csv(index=index).encode())
        f.flush()
        os.fsync(f.fileno())
