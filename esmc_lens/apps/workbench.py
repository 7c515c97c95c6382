"""The logic behind the notebooks: every table and figure of the paper, as library calls.

A notebook opens a :class:`Workbench` (model, dataset, quick or full mode), asks it for
captures (computed once, kept in memory and on disk, reused), and calls one function here per
table or figure. Every table returned here has a ``model`` column naming the model that
produced it; the paper's numbers come from :mod:`esmc_lens.report.paper_numbers` and are labelled as
the paper's.

>>> bench = Workbench.open("offline", data=None, quick=True)       # doctest: +SKIP
>>> cache = bench.cache("color")        # every layer x prompt position  # doctest: +SKIP
>>> loc = bench.localize("color")       # Algorithm 1 with the user's keywords      # doctest: +SKIP
>>> sample_size_ablation(bench, "color")                            # Table 6     # doctest: +SKIP

Quick mode (``quick=True``) keeps 2 images per class, 2 seeds, 10 epochs and a localization
sample of 4, so a notebook runs in well under a minute on the offline model on a CPU (most
of it importing torch and transformers); its numbers are a smoke run, not a result. Full mode
uses every labelled image, 10 seeds and the paper's 100 epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..cluster.baselines import embed_answers, head_scores, kmeans_scores, vision_baseline
from ..data.dataset import ImageDataset, load_dataset
from ..errors import ConfigError
from ..lens.keyword_rule import keyword_token_ids
from ..lens.unembed import Unembed
from ..localization.keywords import (
    Keywords,
    class_name_keywords,
    default_question,
    lm_keywords,
    merge,
    user_keywords,
)
from ..localization.targets import target_embeddings
from ..localization.votes import Localization, localize
from ..models.vlm import VLM, load_model
from ..pipeline import target_tail_positions
from ..report.naming import clean_token, name_clusters
from ..report.paper_numbers import PAPER_MODEL, paper_row, paper_table
from ..residual.cache import ResidualCache
from ..residual.capture import capture

__all__ = [
    "CriterionSpec",
    "Workbench",
    "alpha_sweep",
    "cluster_labels",
    "consistency_table",
    "cost_table",
    "criterion_specificity",
    "failure_cases",
    "format_table",
    "head_labels",
    "keyword_source_ablation",
    "keyword_view",
    "lens_examples",
    "lens_grid",
    "lens_peak_table",
    "main_results",
    "method_ablation",
    "model_label",
    "name_result",
    "paper_cost",
    "prompt_robustness",
    "prompt_variants",
    "resolve_dataset",
    "sample_size_ablation",
    "side_by_side",
]

CACHE_FORMAT = "nb-1"  # bump when what a notebook capture holds changes


# --------------------------------------------------------------------------------------
# Criteria of the datasets the notebooks know


@dataclass(frozen=True)
class CriterionSpec:
    """One clustering criterion: its folder, prompt, nouns and the user's keyword list.

    ``keywords`` is what a user would type (a superset of plausible values, not the
    dataset's class names); ``noun``/``object_noun`` build the keyword question for the
    local LM and the prompt variants.
    """

    name: str
    prompt: str
    noun: str
    object_noun: str
    keywords: tuple[str, ...]


KNOWN_CRITERIA: dict[str, dict[str, CriterionSpec]] = {
    "flower": {
        "color": CriterionSpec("color", "The color of the flower is", "color", "flower",
                               ("red", "white", "pink", "yellow", "purple", "orange", "blue",
                                "violet")),
        "species": CriterionSpec("species", "The species of the flower is", "species",
                                 "flower", ("rose", "tulip", "daisy", "lily", "sunflower",
                                            "orchid", "hyacinth", "iris", "daffodil")),
    },
    "synthetic": {
        "color": CriterionSpec("color", "The color of the object is", "color", "object",
                               ("red", "green", "blue", "yellow", "orange", "purple", "pink")),
        "shape": CriterionSpec("shape", "The shape of the object is", "shape", "object",
                               ("circle", "square", "triangle", "star", "rectangle", "oval")),
        "background": CriterionSpec("background", "The color of the background is", "color",
                                    "background", ("white", "black", "gray", "brown", "blue",
                                                   "green")),
    },
}
# The criterion a quick run studies first (the paper's Figure 3 shows color first).
PREFERRED_ORDER = ("color", "species", "shape", "type", "background")


def model_label(vlm: VLM) -> str:
    """The model's name as tables print it (the offline model says it is not LLaVA)."""
    if vlm.name == "offline":
        return "offline (SmolLM2-135M + EfficientNet-Lite0; not LLaVA)"
    if vlm.name == "tiny":
        return "tiny (random weights, tests only)"
    return vlm.name


def prompt_variants(spec: CriterionSpec) -> list[tuple[str, str]]:
    """The paper's four prompt forms (Table 5, color row) for any criterion.

    Original "The color of the car is", Variant 1 "Color of the car:", Variant 2 "Identify
    the color of this vehicle.", Variant 3 "Provide the exact car color." with the
    criterion and object nouns substituted.
    """
    n, o = spec.noun, spec.object_noun
    return [("Original", spec.prompt),
            ("Variant 1", f"{n[:1].upper() + n[1:]} of the {o}:"),
            ("Variant 2", f"Identify the {n} of this {o}."),
            ("Variant 3", f"Provide the exact {o} {n}.")]


def _guess_spec(criterion: str, object_noun: str = "object") -> CriterionSpec:
    return CriterionSpec(criterion, f"The {criterion} of the {object_noun} is", criterion,
                         object_noun, ())


# --------------------------------------------------------------------------------------
# The workbench: model + dataset + settings + memoised captures


def resolve_dataset(data: str | Path | None, dataset: str, outputs: Path,
                    n_synthetic: int) -> tuple[ImageDataset, str, str]:
    """(dataset, name, why) from ``data``/``dataset``, or the synthetic dataset as fallback."""
    why = ""
    if dataset != "synthetic":
        if data:
            root = Path(data).expanduser() / dataset
            if root.is_dir():
                return load_dataset(root), dataset, f"{root}"
            why = f"{root} does not exist"
        else:
            why = "ESMC_DATA is not set"
    root = outputs / f"synthetic-{n_synthetic}"
    from ..data.synthetic import make_synthetic_dataset

    make_synthetic_dataset(root, n_images=n_synthetic, seed=0)
    note = f"synthetic dataset ({n_synthetic} images) at {root}"
    return load_dataset(root), "synthetic", note + (f"; fallback because {why}" if why else "")


@dataclass
class Settings:
    """What quick and full mode change."""

    per_class: int | None  # images per class (None: every labelled image)
    n_seeds: int
    epochs: int
    n_samples: int  # localization sample (Algorithm 1)
    alpha: float
    batch_size: int = 8
    top_k: int = 5
    # Captured positions: "prompt" (every token after the image) or the last N tokens
    # (quick mode: the criterion prompt and the chat tokens around it; the lens readout
    # costs as much as the forward pass per position).
    last_tokens: int | None = None

    @property
    def positions(self):
        return "prompt" if self.last_tokens is None else slice(-self.last_tokens, None)

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(per_class=2, n_seeds=2, epochs=10, n_samples=4, alpha=0.3,
                       last_tokens=8)
        return cls(per_class=None, n_seeds=10, epochs=100, n_samples=10, alpha=0.3)


@dataclass
class Workbench:
    """Model, dataset and settings of a notebook, with captures computed once and reused.

    Captures are kept in memory and written under ``outputs/captures/<key>`` (key = hash of
    model, images, prompt, keywords and capture settings), so re-running a cell, a notebook,
    or another notebook on the same images and prompt reads them back. So are the per-seed
    scores of the head and of k-means and the named fit (keyed by the capture, the target
    cells and the settings): every notebook that evaluates the same target reuses them.
    """

    vlm: VLM
    dataset: ImageDataset
    name: str
    criteria: dict[str, CriterionSpec]
    quick: bool
    settings: Settings
    outputs: Path
    figures: Path
    source_note: str = ""
    seed: int = 0
    disk_cache: bool = True
    _mem: dict = field(default_factory=dict, repr=False)
    timings: dict = field(default_factory=dict, repr=False)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | VLM = "offline", data: str | Path | None = None,
             dataset: str = "flower", quick: bool = True, outputs: str | Path = "outputs",
             figures: str | Path = "figures", n_synthetic: int | None = None,
             disk_cache: bool = True, verbose: bool = True) -> Workbench:
        """Load ``model`` and the dataset ``data/dataset`` (synthetic when missing)."""
        outputs, figures = Path(outputs), Path(figures)
        n_syn = n_synthetic or (24 if quick else 120)
        ds, name, note = resolve_dataset(data, dataset, outputs, n_syn)
        vlm = model if isinstance(model, VLM) else load_model(model)
        known = KNOWN_CRITERIA.get(name, {})
        obj = "flower" if name == "flower" else "object"
        specs = {c: known.get(c, _guess_spec(c, obj)) for c in ds.criteria}
        order = sorted(specs, key=lambda c: (PREFERRED_ORDER.index(c)
                                             if c in PREFERRED_ORDER else 99, c))
        bench = cls(vlm=vlm, dataset=ds, name=name, criteria={c: specs[c] for c in order},
                    quick=quick, settings=Settings.for_mode(quick), outputs=outputs,
                    figures=figures, source_note=note, disk_cache=disk_cache)
        if verbose:
            print(bench.describe())
        return bench

    def describe(self) -> str:
        s = self.settings
        per = f"{s.per_class} images per class" if s.per_class else "every labelled image"
        pos = (f"last {s.last_tokens} tokens" if s.last_tokens else "every prompt token")
        return (f"model: {self.model}\ndata: {self.source_note}\n"
                f"mode: {'QUICK (smoke run, not a result)' if self.quick else 'full'}: {per}, "
                f"{s.n_seeds} seeds, {s.epochs} epochs, localization sample {s.n_samples}, "
                f"{pos} captured\n"
                f"criteria: {', '.join(f'{c} ({v.prompt!r})' for c, v in self.criteria.items())}")

    @property
    def model(self) -> str:
        return model_label(self.vlm)

    @property
    def focus(self) -> list[str]:
        """The criteria single-criterion notebooks study: the first in quick mode, all in full."""
        crits = list(self.criteria)
        return crits[:1] if self.quick else crits

    @property
    def unembed(self) -> Unembed:
        if "unembed" not in self._mem:
            self._mem["unembed"] = Unembed.from_model(self.vlm)
        return self._mem["unembed"]

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.settings.n_seeds))

    # -- images ------------------------------------------------------------------------
    def images(self, criterion: str) -> ImageDataset:
        """The labelled images of ``criterion`` (quick: ``per_class`` per class, fixed)."""
        if ("images", criterion) not in self._mem:
            self._choose_images()
        return self._mem[("images", criterion)]

    def _choose_images(self) -> None:
        """Per-criterion subsets, chosen in criterion order; a later criterion takes the
        images an earlier one chose first (so an image can be shown under every criterion)
        and fills each class at random (seeded)."""
        names = np.asarray(self.dataset.names)
        chosen: set[str] = set()
        for crit in self.criteria:
            y = self.dataset.y(crit)
            keep: list[str] = []
            rng = np.random.default_rng(self.seed)
            n = self.settings.per_class
            for c in range(len(self.dataset.classes[crit])):
                members = names[y == c]
                if n is not None and len(members) > n:
                    prefer = [m for m in members if m in chosen][:n]
                    rest = np.setdiff1d(members, prefer)
                    members = np.sort(np.concatenate([
                        np.asarray(prefer, dtype=members.dtype),
                        rng.choice(rest, n - len(prefer), replace=False)]))
                keep.extend(members.tolist())
            chosen.update(keep)
            self._mem[("images", crit)] = self.dataset.subset(sorted(keep))

    def y(self, criterion: str) -> np.ndarray:
        return self.images(criterion).y(criterion)

    def class_names(self, criterion: str) -> list[str]:
        return list(self.dataset.classes[criterion])

    def n_clusters(self, criterion: str) -> int:
        return len(self.class_names(criterion))

    def thumbnail(self, criterion: str, i: int, size: int = 96) -> Image.Image:
        im = self.images(criterion).open(i)
        im.thumbnail((size, size))
        return im

    # -- keywords ----------------------------------------------------------------------
    def keywords(self, criterion: str, source: str = "user") -> Keywords:
        """The criterion's keywords from ``source``: "user", "lm" or "class_names"."""
        key = ("kw", criterion, source)
        if key not in self._mem:
            spec = self.criteria[criterion]
            if source == "user":
                kw = user_keywords(list(spec.keywords) or self.class_names(criterion))
            elif source == "lm":
                question = default_question(spec.noun, spec.object_noun)
                kw = self._disk_json(("lm-keywords", self._model_key(), question),
                                     lambda: _kw_doc(lm_keywords(self.vlm, question)))
                kw = Keywords(kw["words"], ["lm"] * len(kw["words"]), raw=kw["raw"],
                              question=kw["question"])
            elif source == "class_names":
                kw = class_name_keywords(self.dataset, criterion)
            else:
                raise ConfigError(f"source={source!r}: use 'user', 'lm' or 'class_names'")
            self._mem[key] = kw
        return self._mem[key]

    def all_keywords(self, criterion: str) -> Keywords:
        """Every keyword any notebook scores for ``criterion`` (user, LM, class names)."""
        return merge(*(self.keywords(criterion, s) for s in ("user", "lm", "class_names")))

    # -- captures ----------------------------------------------------------------------
    def cache(self, criterion: str, prompt: str | None = None) -> ResidualCache:
        """Every layer at every prompt position of the criterion's images, with the lens
        probability of every keyword, the top-5 lens tokens and the vision features.

        Computed once per (criterion, prompt): in memory, then on disk.
        """
        spec = self._cache_spec(criterion, prompt)
        prompt, words, images = spec["prompt"], spec["keywords"], self.images(criterion)
        key = _hash(spec)
        if key in self._mem:
            return self._mem[key]
        path = self.outputs / "captures" / key
        t = time.perf_counter()
        cache = None
        if self.disk_cache and (path / "cache.json").is_file():
            try:
                cache = ResidualCache.load(path)
                how = "disk"
            except Exception:  # a damaged cache is recomputed
                cache = None
        if cache is None:
            cache = capture(self.vlm, images, prompt, keywords=words, top_k=self.settings.top_k,
                            positions=self.settings.positions, vision=True,
                            batch_size=self.settings.batch_size, progress=False)
            how = "computed"
            if self.disk_cache:
                cache.save(path)
        self.timings[("cache", criterion, prompt)] = {"seconds": time.perf_counter() - t,
                                                      "how": how, "n_images": len(cache)}
        self._mem[key] = cache
        return cache

    def _cache_spec(self, criterion: str, prompt: str | None = None) -> dict:
        """What :meth:`cache` captures for (criterion, prompt); its hash names the capture."""
        words = [w for w in self.all_keywords(criterion).words if _scorable(self.vlm, w)]
        return {"what": "cache", "format": CACHE_FORMAT, "model": self._model_key(),
                "images": [str(p) for p in self.images(criterion).paths],
                "prompt": prompt or self.criteria[criterion].prompt, "keywords": words,
                "top_k": self.settings.top_k, "positions": repr(self.settings.positions)}

    def _derived(self, what: str, criterion: str, cells, prompt: str | None, make, **spec):
        """A JSON-able result computed from the capture of (criterion, prompt) at ``cells``:
        in memory, then on disk beside the capture (keyed by the capture, ``spec`` and the
        code that computes it: a change to the head or the metrics recomputes it)."""
        return self._disk_json({"what": what, "capture": _hash(self._cache_spec(criterion,
                                                                                prompt)),
                                "cells": [[int(v) for v in c] for c in cells],
                                "code": _code_digest(), **spec}, make)

    def answers(self, criterion: str, prompt: str | None = None,
                max_new_tokens: int = 8) -> list[str]:
        """The model's greedy answer to the criterion prompt for each image (cached)."""
        prompt = prompt or self.criteria[criterion].prompt
        images = self.images(criterion)
        spec = ("answers", self._model_key(), [str(p) for p in images.paths], prompt,
                max_new_tokens)

        def make():
            out: list[str] = []
            bs = self.settings.batch_size
            for s in range(0, len(images), bs):
                batch = [images.open(i) for i in range(s, min(s + bs, len(images)))]
                out.extend(self.vlm.generate(batch, prompt, max_new_tokens=max_new_tokens))
            return out

        return self._disk_json(spec, make)

    def _model_key(self) -> dict:
        meta = self.vlm.metadata()
        return {"name": self.vlm.name, "offline": meta.get("offline_model"),
                "dtype": meta["dtype"], "style": self.vlm.prompt_style,
                "n_layers": meta["n_layers"], "vocab": meta["vocab_size"]}

    def _disk_json(self, spec, make):
        key = _hash(spec)
        if key in self._mem:
            return self._mem[key]
        path = self.outputs / "captures" / f"{key}.json"
        value = None
        if self.disk_cache and path.is_file():
            try:
                value = json.loads(path.read_text())
            except (OSError, ValueError):
                value = None
        if value is None:
            value = make()
            if self.disk_cache:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(".part")
                tmp.write_text(json.dumps(value))
                tmp.replace(path)
        self._mem[key] = value
        return value

    # -- steps -------------------------------------------------------------------------
    def localize(self, criterion: str, source: str = "user", prompt: str | None = None,
                 n_samples: int | None = None, tau: float = 0.2,
                 seed: int | None = None) -> Localization:
        """Algorithm 1 on the criterion's capture with the keywords of ``source``."""
        cache = keyword_view(self.cache(criterion, prompt), self.keywords(criterion, source))
        return localize(cache, tau=tau, n_samples=n_samples or self.settings.n_samples,
                        seed=self.seed if seed is None else seed)

    def features(self, criterion: str, targets, prompt: str | None = None,
                 space: str = "probs") -> np.ndarray:
        """Target embeddings of every image (paper: vocabulary space, softmax)."""
        cells = tuple(tuple(int(v) for v in c) for c in getattr(targets, "targets", targets))
        key = ("X", criterion, prompt, cells, space)
        if key not in self._mem:
            self._mem[key] = target_embeddings(self.cache(criterion, prompt), list(cells),
                                               space=space, unembed=self.unembed)
        return self._mem[key]

    def evaluate(self, criterion: str, targets, prompt: str | None = None,
                 alpha: float | None = None, kmeans: bool = True) -> dict[str, pd.DataFrame]:
        """Per-seed scores of ESMC (head) and, with ``kmeans``, ESMC w/o head (k-means)."""
        cells = tuple(tuple(int(v) for v in c) for c in getattr(targets, "targets", targets))
        alpha = self.settings.alpha if alpha is None else alpha
        key = ("eval", criterion, prompt, cells, alpha, kmeans, tuple(self.seeds),
               self.settings.epochs)
        if key not in self._mem:
            def make():
                X = self.features(criterion, cells, prompt)
                y, k = self.y(criterion), self.n_clusters(criterion)
                return _frame_doc(head_scores(X, y, k, alpha, seeds=self.seeds,
                                              epochs=self.settings.epochs))

            out = {"ESMC": _doc_frame(self._derived("head_scores", criterion, cells, prompt,
                                                    make, alpha=alpha, seeds=self.seeds,
                                                    epochs=self.settings.epochs))}
            if kmeans:
                out["ESMC w/o head"] = self._kmeans(criterion, cells, prompt)
            self._mem[key] = out
        return self._mem[key]

    def _kmeans(self, criterion, cells, prompt) -> pd.DataFrame:
        key = ("kmeans", criterion, prompt, cells, tuple(self.seeds))
        if key not in self._mem:
            def make():
                X = self.features(criterion, cells, prompt)
                return _frame_doc(kmeans_scores(X, self.y(criterion),
                                                self.n_clusters(criterion), seeds=self.seeds))

            self._mem[key] = _doc_frame(self._derived("kmeans_scores", criterion, cells,
                                                      prompt, make, seeds=self.seeds))
        return self._mem[key]

    def table(self, rows: list[dict]) -> pd.DataFrame:
        """A results table with this workbench's model and dataset in every row."""
        df = pd.DataFrame(rows)
        df.insert(0, "model", self.model)
        df.insert(1, "dataset", self.name)
        return df


def _scorable(vlm: VLM, word: str) -> bool:
    try:
        keyword_token_ids(vlm.tokenizer, [word])
    except ConfigError:
        return False
    return True


def _kw_doc(kw: Keywords) -> dict:
    return {"words": kw.words, "raw": kw.raw, "question": kw.question}


@functools.cache
def _code_digest() -> str:
    """Digest of the modules the cached scores come from (head, baselines, metrics, targets)."""
    from ..cluster import baselines, head, metrics
    from ..localization import targets

    h = hashlib.sha256()
    for module in (baselines, head, metrics, targets):
        h.update(Path(module.__file__).read_bytes())
    return h.hexdigest()[:16]


def _frame_doc(df: pd.DataFrame) -> dict:
    return df.to_dict(orient="tight")


def _doc_frame(doc: dict) -> pd.DataFrame:
    return pd.DataFrame.from_dict(doc, orient="tight")


def _hash(spec) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:20]


def keyword_view(cache: ResidualCache, words: Sequence[str] | Keywords) -> ResidualCache:
    """The cache with its keyword probabilities restricted to ``words`` (in that order).

    Words the cache did not score are dropped (their lens probability is not stored).
    """
    if cache.keywords is None or cache.keyword_probs is None:
        raise ConfigError("the cache holds no keyword probabilities: capture with keywords=")
    have = {w.lower(): j for j, w in enumerate(cache.keywords)}
    idx = [have[w.strip().lower()] for w in words if w.strip().lower() in have]
    if not idx:
        raise ConfigError(f"none of {list(words)} was scored in the capture; its keywords "
                          f"are {cache.keywords}")
    return dataclasses.replace(cache, keywords=[cache.keywords[j] for j in idx],
                               keyword_probs=cache.keyword_probs[..., idx])


def _ms(df: pd.DataFrame, metric: str) -> tuple[float, float]:
    v = df[metric].to_numpy(dtype=float)
    return float(v.mean()), float(v.std())


def _fmt(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


# --------------------------------------------------------------------------------------
# Notebook 2: the logit lens across layers and prompt positions (Figures 3, 7, 8)


def lens_grid(cache: ResidualCache, image: int, keyword: str, unembed: Unembed | None = None,
              tokenizer=None) -> pd.DataFrame:
    """Lens probability of ``keyword`` at every (layer, prompt position) of one image.

    Read from the capture when it scored the keyword, else computed from the stored states
    (needs ``unembed`` and ``tokenizer``). Index: stream index (``layer``); columns:
    position labels ``"seq_index:token"``.
    """
    from ..lens.readout import keyword_probs
    from ..localization.votes import cell_labels

    words = [w.lower() for w in (cache.keywords or [])]
    if keyword.strip().lower() in words and cache.keyword_probs is not None:
        values = cache.keyword_probs[image, :, :, words.index(keyword.strip().lower())]
    else:
        if unembed is None or tokenizer is None:
            raise ConfigError(f"{keyword!r} was not scored in the capture: pass unembed= and "
                              "tokenizer= to compute it from the states")
        groups = keyword_token_ids(tokenizer, [keyword]).groups
        values = keyword_probs(cache.states[image].float(), unembed, groups)[..., 0]
    values = values.float().numpy().copy()
    values[:, (cache.positions[image] < 0).numpy()] = np.nan
    return pd.DataFrame(values, index=pd.Index(cache.stream, name="layer"),
                        columns=pd.Index(cell_labels(cache), name="position"))


def lens_examples(bench: Workbench, n_images: int = 3) -> list[dict]:
    """For ``n_images`` images (different classes of the first criterion): per criterion,
    the lens grid of the image's true class name and of a wrong class name (Figure 3)."""
    first = next(iter(bench.criteria))
    ds = bench.images(first)
    y = ds.y(first)
    shared = set(ds.names).intersection(*(bench.images(c).names for c in bench.criteria))
    picks = []
    for c in range(len(bench.class_names(first))):  # one image per class, shown everywhere
        hits = [i for i in np.flatnonzero(y == c) if ds.names[int(i)] in shared] or \
            np.flatnonzero(y == c).tolist()
        if hits:
            picks.append(ds.names[int(hits[0])])
        if len(picks) == n_images:
            break
    out = []
    for name in picks:
        item = {"image_id": name, "panels": []}
        for crit in bench.criteria:
            cds = bench.images(crit)
            if name not in cds.names:
                continue
            i = cds.names.index(name)
            cache = bench.cache(crit)
            classes = bench.class_names(crit)
            true = classes[int(cds.y(crit)[i])]
            wrong = next(c for c in classes if c != true)
            for kw, is_true in ((true, True), (wrong, False)):
                grid = lens_grid(cache, i, kw, bench.unembed, bench.vlm.tokenizer)
                item["panels"].append({"criterion": crit, "keyword": kw, "true": is_true,
                                       "grid": grid, "prompt": bench.criteria[crit].prompt})
            item.setdefault("image", cds.open(i))
        out.append(item)
    return out


def lens_peak_table(bench: Workbench, examples: list[dict]) -> pd.DataFrame:
    """Where each panel of :func:`lens_examples` peaks: layer, position and probability."""
    rows = []
    for ex in examples:
        for p in ex["panels"]:
            g = p["grid"]
            arr = np.nan_to_num(g.to_numpy(), nan=-1)
            s, q = np.unravel_index(int(np.argmax(arr)), arr.shape)
            rows.append({"image": ex["image_id"], "criterion": p["criterion"],
                         "keyword": p["keyword"], "true_class": p["true"],
                         "peak": f"E_{g.index[s]}({g.columns[q]})",
                         "peak_prob": float(arr[s, q])})
    return bench.table(rows)


# --------------------------------------------------------------------------------------
# Notebook 3: localization ablations (Tables 6 and 7)


def sample_size_ablation(bench: Workbench, criterion: str,
                         sizes: Sequence[int] = (3, 5, 10, 20),
                         source: str = "user") -> pd.DataFrame:
    """Table 6: the target chosen from ``n`` sampled images and the final NMI there."""
    rows = []
    n_all = len(bench.images(criterion))
    for n in sizes:
        loc = bench.localize(criterion, source, n_samples=n)
        ev = bench.evaluate(criterion, loc, kmeans=False)["ESMC"]
        m, s = _ms(ev, "nmi")
        rows.append({"criterion": criterion, "n_samples": n, "n_sampled": min(n, n_all),
                     "target": ", ".join(loc.label(c) for c in loc.targets),
                     "votes": f"{loc.max_votes}/{loc.n_pairs}", "nmi_mean": m, "nmi_std": s})
    return bench.table(rows)


def keyword_source_ablation(bench: Workbench, criterion: str,
                            sources: Sequence[str] = ("user", "lm", "class_names")
                            ) -> pd.DataFrame:
    """Table 7: keywords from the user, the local LM and the class names; target and NMI."""
    rows = []
    for src in sources:
        kw = bench.keywords(criterion, src)
        row = {"criterion": criterion, "keyword_source": src,
               "keywords": ", ".join(kw.words) or "(none parsed)"}
        try:
            loc = bench.localize(criterion, src)
        except ConfigError as exc:  # e.g. the LM answered no usable word
            rows.append(row | {"target": "n/a", "votes": "", "nmi_mean": np.nan,
                               "nmi_std": np.nan, "note": str(exc)[:120]})
            continue
        ev = bench.evaluate(criterion, loc, kmeans=False)["ESMC"]
        m, s = _ms(ev, "nmi")
        rows.append(row | {"target": ", ".join(loc.label(c) for c in loc.targets),
                           "votes": f"{loc.max_votes}/{loc.n_pairs}", "nmi_mean": m,
                           "nmi_std": s, "note": loc.message[:120]})
    return bench.table(rows)


# --------------------------------------------------------------------------------------
# Notebook 4: main results (Tables 1 and 2) with named clusters


def main_results(bench: Workbench, criteria: Sequence[str] | None = None,
                 source: str = "user") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """ESMC, ESMC w/o head and the vision-only baseline per criterion, NMI and RI
    (mean ± std over seeds), with the paper's ESMC numbers beside ours; and the named
    clusters of each criterion (seed ``bench.seed``)."""
    rows, named = [], {}
    for crit in criteria or list(bench.criteria):
        loc = bench.localize(crit, source)
        ev = bench.evaluate(crit, loc)
        cache = bench.cache(crit)
        y, k = bench.y(crit), bench.n_clusters(crit)
        ev = dict(ev) | {"Vision only": vision_baseline(cache.vision.numpy(), y, k,
                                                        seeds=bench.seeds)}
        t1 = paper_row(bench.name, crit, "table1")
        t2 = paper_row(bench.name, crit, "table2")
        for method, df in ev.items():
            nmi, ri = _ms(df, "nmi"), _ms(df, "ri")
            rows.append({"criterion": crit, "method": method,
                         "target": ", ".join(loc.label(c) for c in loc.targets),
                         "nmi": _fmt(*nmi), "ri": _fmt(*ri),
                         "nmi_mean": nmi[0], "ri_mean": ri[0],
                         f"paper_nmi ({PAPER_MODEL})": t1["ESMC"] if t1 and method == "ESMC"
                         else np.nan,
                         f"paper_ri ({PAPER_MODEL})": t2["ESMC"] if t2 and method == "ESMC"
                         else np.nan})
        named[crit] = name_result(bench, crit, loc)
    return bench.table(rows), named


def head_labels(X: np.ndarray, k: int, alpha: float, seed: int, epochs: int):
    """(labels, probabilities, fitted head) of one ESMC head fit."""
    from ..cluster.head import PseudoLabelHead

    head = PseudoLabelHead(n_clusters=k, alpha=alpha, random_state=seed, epochs=epochs).fit(X)
    return head.labels_, head.predict_proba(X), head


def name_result(bench: Workbench, criterion: str, loc: Localization) -> pd.DataFrame:
    """Cluster names of one ESMC fit (seed ``bench.seed``): name, size, lens tokens, purity."""
    key = ("named", criterion, tuple(loc.targets))
    if key not in bench._mem:
        X = bench.features(criterion, loc)
        s = bench.settings

        def fit():
            labels, proba, _ = head_labels(X, bench.n_clusters(criterion), s.alpha,
                                           bench.seed, s.epochs)
            return {"labels": labels.tolist(), "proba": proba.tolist(),
                    "dtype": str(proba.dtype)}

        doc = bench._derived("head_fit", criterion, loc.targets, None, fit, alpha=s.alpha,
                             seed=bench.seed, epochs=s.epochs)
        labels = np.asarray(doc["labels"], dtype=np.int64)
        proba = np.asarray(doc["proba"], dtype=doc["dtype"])
        kw = bench.keywords(criterion, "user")
        df = name_clusters(X[:, : bench.unembed.vocab_size], labels, bench.vlm.tokenizer,
                           keywords=kw.words, y_true=bench.y(criterion),
                           class_names=bench.class_names(criterion))
        df.insert(0, "model", bench.model)
        bench._mem[key] = (df, labels, proba)
    return bench._mem[key][0]


def cluster_labels(bench: Workbench, criterion: str, loc: Localization):
    """(labels, probabilities) of the fit :func:`name_result` named."""
    name_result(bench, criterion, loc)
    _, labels, proba = bench._mem[("named", criterion, tuple(loc.targets))]
    return labels, proba


def side_by_side(ours: pd.DataFrame, table: str, metric: str, dataset: str) -> pd.DataFrame:
    """Our ESMC rows next to the paper's row of the same (dataset, criterion), if any."""
    rows = []
    for _, r in ours[ours["method"] == "ESMC"].iterrows():
        p = paper_row(dataset, r["criterion"], table)
        rows.append({"criterion": r["criterion"], f"ours ({r['model']})": r[f"{metric}_mean"],
                     f"paper ESMC ({PAPER_MODEL})": p["ESMC"] if p else np.nan,
                     f"paper Multi-Sub ({PAPER_MODEL})": p["Multi-Sub"] if p else np.nan})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------
# Notebook 5: Table 3 and Figures 4-5


def method_ablation(bench: Workbench, criteria: Sequence[str] | None = None,
                    source: str = "user", encoder: str = "minilm") -> pd.DataFrame:
    """Table 3: Output (answers embedded by a text encoder, then k-means) vs ESMC w/o head
    vs ESMC, NMI and RI, with the paper's Table 3 numbers beside ours."""
    rows = []
    for crit in criteria or bench.focus:
        loc = bench.localize(crit, source)
        ev = dict(bench.evaluate(crit, loc))
        y, k = bench.y(crit), bench.n_clusters(crit)
        X_text = embed_answers(bench.answers(crit), encoder)
        ev = {"Output": kmeans_scores(X_text, y, k, seeds=bench.seeds)} | ev
        p = paper_row(bench.name, crit, "table3")
        for method in ("Output", "ESMC w/o head", "ESMC"):
            nmi, ri = _ms(ev[method], "nmi"), _ms(ev[method], "ri")
            rows.append({"criterion": crit, "method": method, "nmi": _fmt(*nmi),
                         "ri": _fmt(*ri), "nmi_mean": nmi[0], "ri_mean": ri[0],
                         f"paper_nmi ({PAPER_MODEL})": p[f"nmi_{method}"] if p else np.nan,
                         f"paper_ri ({PAPER_MODEL})": p[f"ri_{method}"] if p else np.nan})
    df = bench.table(rows)
    df.attrs["text_encoder"] = encoder
    return df


def _cos_within(X: np.ndarray) -> float:
    if len(X) < 2:
        return float("nan")
    Z = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
    S = Z @ Z.T
    n = len(Z)
    return float((S.sum() - np.trace(S)) / (n * (n - 1)))


def consistency_table(bench: Workbench, criterion: str, source: str = "user",
                      encoder: str = "minilm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 4: per class, how varied the generated answers are and how consistent the
    class keyword's lens probability at the target is.

    Returns (per-class summary, per-image detail). Summary columns: ``n_images``,
    ``distinct_answers``, ``answer_cosine`` (mean pairwise cosine of the answers' text
    embeddings within the class), ``target_cosine`` (same for the target embeddings),
    ``keyword_prob_mean``/``_std`` (the class name's lens probability at the target).
    """
    loc = bench.localize(criterion, source)
    cache = bench.cache(criterion)
    answers = bench.answers(criterion)
    X = bench.features(criterion, loc)
    T = embed_answers(answers, encoder)
    y, names = bench.y(criterion), bench.class_names(criterion)
    s, p = loc.primary
    kv = keyword_view(cache, names)
    have = [w.lower() for w in kv.keywords]
    probs = kv.keyword_probs[:, cache.stream_index(s), p].float().numpy()  # [n, K']
    detail, rows = [], []
    for i, (yi, ans) in enumerate(zip(y, answers, strict=True)):
        cls = names[int(yi)]
        prob = float(probs[i, have.index(cls.lower())]) if cls.lower() in have else np.nan
        detail.append({"image": cache.image_ids[i], "class": cls, "answer": ans,
                       "keyword_prob": prob})
    detail = pd.DataFrame(detail)
    for c, cls in enumerate(names):
        m = y == c
        if not m.any():
            continue
        kp = detail.loc[m, "keyword_prob"]
        rows.append({"criterion": criterion, "class": cls, "target": loc.label((s, p)),
                     "n_images": int(m.sum()),
                     "distinct_answers": len({a.strip().lower() for a in np.asarray(answers)[m]}),
                     "answer_cosine": _cos_within(T[m]), "target_cosine": _cos_within(X[m]),
                     "keyword_prob_mean": float(kp.mean()), "keyword_prob_std": float(kp.std())})
    detail.insert(0, "model", bench.model)
    return bench.table(rows), detail


def criterion_specificity(bench: Workbench, criterion: str, other: str,
                          source: str = "user") -> pd.DataFrame:
    """Figure 5: at ``criterion``'s target, the lens probability of each image's true class
    name under ``criterion`` vs under ``other`` (e.g. "rose" vs "pink" at the species
    target), and how often the answer names the ``other`` criterion's value."""
    loc = bench.localize(criterion, source)
    cache = bench.cache(criterion)
    ds = bench.images(criterion)
    s, p = loc.primary
    grid_of = {}
    rows = []
    answers = bench.answers(criterion)
    for i, name in enumerate(ds.names):
        row = {"image": name}
        for crit in (criterion, other):
            yi = int(bench.dataset.y(crit)[bench.dataset.names.index(name)])
            if yi < 0:
                row[crit] = np.nan
                continue
            word = bench.class_names(crit)[yi]
            key = (i, word)
            if key not in grid_of:
                grid_of[key] = lens_grid(cache, i, word, bench.unembed, bench.vlm.tokenizer)
            row[f"{crit}_word"] = word
            row[f"{crit}_prob"] = float(grid_of[key].loc[s].iloc[p])
        row["answer"] = answers[i]
        row["answer_names_" + other] = row.get(f"{other}_word", "") in answers[i].lower()
        row["answer_names_" + criterion] = row.get(f"{criterion}_word", "") in answers[i].lower()
        rows.append(row)
    df = bench.table(rows)
    df.attrs["target"] = loc.label((s, p))
    return df


# --------------------------------------------------------------------------------------
# Notebook 6: prompt robustness (Table 5, Figure 10)


def prompt_robustness(bench: Workbench, criteria: Sequence[str] | None = None,
                      source: str = "user", variants: Sequence[str] | None = None
                      ) -> tuple[pd.DataFrame, dict]:
    """Table 5: the four prompt forms per criterion; target, NMI, RI. Also returns the
    localizations (for Figure 10's heatmaps), keyed by (criterion, variant).

    ``variants``: the forms to run, by name (``"Original"``, ``"Variant 1"`` ..); default
    all four. Each form other than the original is one more capture of every image.
    """
    rows, locs = [], {}
    for crit in criteria or bench.focus:
        forms = prompt_variants(bench.criteria[crit])
        unknown = sorted(set(variants or ()) - {v for v, _ in forms})
        if unknown:
            raise ConfigError(f"variants {unknown}: use {[v for v, _ in forms]}")
        for variant, prompt in forms:
            if variants is not None and variant not in variants:
                continue
            cache = keyword_view(bench.cache(crit, prompt), bench.keywords(crit, source))
            loc = localize(cache, n_samples=bench.settings.n_samples, seed=bench.seed)
            ev = bench.evaluate(crit, loc, prompt=prompt, kmeans=False)["ESMC"]
            nmi, ri = _ms(ev, "nmi"), _ms(ev, "ri")
            locs[(crit, variant)] = (prompt, loc)
            rows.append({"criterion": crit, "variant": variant, "prompt": prompt,
                         "target": ", ".join(loc.label(c) for c in loc.targets),
                         "nmi": _fmt(*nmi), "ri": _fmt(*ri), "nmi_mean": nmi[0],
                         "ri_mean": ri[0]})
    return bench.table(rows), locs


# --------------------------------------------------------------------------------------
# Notebook 7: alpha sensitivity (Figure 6)


def alpha_sweep(bench: Workbench, criterion: str, alphas: Sequence[float],
                source: str = "user") -> tuple[pd.DataFrame, pd.DataFrame]:
    """NMI and RI against the pseudo-label ratio alpha, and the k-means baseline (the same
    target embeddings without the head)."""
    loc = bench.localize(criterion, source)
    rows = []
    for a in alphas:
        ev = bench.evaluate(criterion, loc, alpha=float(a), kmeans=False)["ESMC"]
        (nm, ns), (rm, rs) = _ms(ev, "nmi"), _ms(ev, "ri")
        rows.append({"criterion": criterion, "alpha": float(a), "nmi_mean": nm, "nmi_std": ns,
                     "ri_mean": rm, "ri_std": rs})
    km = bench._kmeans(criterion, tuple(tuple(c) for c in loc.targets), None)
    (nm, ns), (rm, rs) = _ms(km, "nmi"), _ms(km, "ri")
    base = bench.table([{"criterion": criterion, "method": "k-means (ESMC w/o head)",
                         "nmi_mean": nm, "nmi_std": ns, "ri_mean": rm, "ri_std": rs,
                         "target": ", ".join(loc.label(c) for c in loc.targets)}])
    return bench.table(rows), base


# --------------------------------------------------------------------------------------
# Notebook 8: failure cases (Figure 9)


def failure_cases(bench: Workbench, criterion: str, n: int = 6,
                  source: str = "user") -> pd.DataFrame:
    """The worst-assigned images: wrong after matching clusters to classes (Hungarian),
    most confident first; with what the lens said at the target and what the model answered.
    """
    from scipy.optimize import linear_sum_assignment

    loc = bench.localize(criterion, source)
    labels, proba = cluster_labels(bench, criterion, loc)
    named = name_result(bench, criterion, loc)
    names = dict(zip(named["cluster"], named["name"], strict=True))
    y, classes = bench.y(criterion), bench.class_names(criterion)
    k = max(len(classes), int(labels.max()) + 1)
    C = np.zeros((k, k), dtype=int)
    for a, b in zip(labels, y, strict=True):
        if b >= 0:
            C[a, b] += 1
    r, c = linear_sum_assignment(-C)
    to_class = dict(zip(r.tolist(), c.tolist(), strict=True))
    cache = bench.cache(criterion)
    s, p = loc.primary
    j = cache.stream_index(s)
    answers = bench.answers(criterion)
    tok = bench.vlm.tokenizer
    rows = []
    for i in range(len(labels)):
        if y[i] < 0:
            continue
        matched = to_class.get(int(labels[i]), -1)
        lens_words = [w for w in (clean_token(tok, t) for t in cache.top_ids[i, j, p].tolist())
                      if w]
        rows.append({"image": cache.image_ids[i], "index": i, "true": classes[int(y[i])],
                     "cluster": int(labels[i]), "cluster_name": names.get(int(labels[i]), ""),
                     "matched_class": classes[matched] if 0 <= matched < len(classes) else "",
                     "confidence": float(proba[i].max()),
                     "correct": matched == int(y[i]),
                     "lens_top": ", ".join(lens_words[:5]), "answer": answers[i]})
    df = pd.DataFrame(rows)
    wrong = df[~df["correct"]].sort_values("confidence", ascending=False)
    out = wrong.head(n).reset_index(drop=True)
    out.insert(0, "model", bench.model)
    out.attrs["target"] = loc.label((s, p))
    out.attrs["n_wrong"] = int((~df["correct"]).sum())
    out.attrs["n_images"] = len(df)
    return out


# --------------------------------------------------------------------------------------
# Notebook 9: cost (Table 4)


def cost_table(bench: Workbench, criteria: Sequence[str] | None = None,
               epochs: int = 100) -> pd.DataFrame:
    """Table 4 and more: wall time of ESMC's steps, measured now (nothing read from cache).

    Per criterion: the localization capture (every layer and prompt position with keyword
    probabilities, ``n_samples`` images), Algorithm 1, the target capture of every image
    (only the target layer and position), and training the head for ``epochs`` epochs
    (the paper's Table 4 setting) on those embeddings.
    """
    rows = []
    dev = str(bench.vlm.device)
    for crit in criteria or bench.focus:
        images = bench.images(crit)
        prompt = bench.criteria[crit].prompt
        kw = bench.keywords(crit, "user").words
        n_s = min(bench.settings.n_samples, len(images))
        sample = [images.open(i) for i in range(n_s)]
        t = time.perf_counter()
        loc_cache = capture(bench.vlm, sample, prompt, keywords=kw, progress=False,
                            positions=bench.settings.positions,
                            batch_size=bench.settings.batch_size)
        t_loc_capture = time.perf_counter() - t
        t = time.perf_counter()
        loc = localize(loc_cache, n_samples=n_s)
        t_vote = time.perf_counter() - t
        seq, targets = target_tail_positions(loc_cache, loc.targets)
        t = time.perf_counter()
        tc = capture(bench.vlm, images, prompt, positions=seq,
                     layers=sorted({s for s, _ in loc.targets}), progress=False,
                     batch_size=bench.settings.batch_size, store_dtype=torch.float32)
        t_target = time.perf_counter() - t
        X = target_embeddings(tc, targets, space="probs", unembed=bench.unembed)
        t = time.perf_counter()
        head_labels(X, bench.n_clusters(crit), bench.settings.alpha, bench.seed, epochs)
        t_head = time.perf_counter() - t
        rows.append({"criterion": crit, "device": dev, "n_images": len(images),
                     "n_sampled": n_s, "dim": X.shape[1],
                     "localization_capture_s": t_loc_capture, "vote_s": t_vote,
                     "target_capture_s": t_target,
                     "capture_per_image_s": t_target / len(images),
                     f"head_train_s ({epochs} epochs)": t_head})
    return bench.table(rows)


def paper_cost(dataset: str) -> pd.DataFrame:
    """The paper's Table 4 (head training time, RTX3090), with our dataset's row marked."""
    df = paper_table("table4").reset_index()
    from ..report.paper_numbers import DATASET_ALIASES

    want = DATASET_ALIASES.get(dataset.lower(), dataset).lower().rstrip("s")
    df["this_dataset"] = [d.lower().rstrip("s") == want for d in df["dataset"]]
    return df


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """A table for display: ``<m>_mean`` dropped where a ``"mean ± std"`` column ``<m>``
    shows it, floats rounded to 4 digits."""
    drop = [c for c in df.columns if c.endswith("_mean") and c[:-5] in df.columns]
    return df.drop(columns=drop).round(4)

