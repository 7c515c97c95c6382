"""The notebooks' view of ESMC: every table and figure of the paper from ``run_esmc``.

A notebook opens a :class:`Workbench` (model, dataset, quick or full mode) and asks it for
runs: :meth:`Workbench.run` is :func:`esmc_lens.pipeline.run_esmc` with the notebook's
settings, its captures in the one disk cache (:func:`esmc_lens.residual.store.cached_capture`
under ``outputs/captures``), the result kept in memory for the other cells. Nothing here
captures, localizes or clusters on its own: a table is read off runs, and the few views that
need more (a target's embeddings, an explorer's capture) call the pipeline's own stage
functions with the run's settings, so they see exactly what the run saw. A notebook's
number and the CLI's for the same settings are the same number (``tests/test_experiments``).

>>> bench = Workbench.open("offline", data=None, quick=True)       # doctest: +SKIP
>>> res = bench.run("color")          # run_esmc, the user's keywords  # doctest: +SKIP
>>> sample_size_ablation(bench, "color")                            # Table 6  # doctest: +SKIP

Keywords are label-free unless asked otherwise: ``"user"`` is a list written in esmc_lens
for each known criterion (:data:`KNOWN_CRITERIA`: generic vocabularies such as the basic
colour terms, never read from the dataset's folders), ``"lm"`` the local language model's
answer; ``"class_names"`` (the folder names, so supervised) only where a table compares
sources, and marked "supervised localization" there.

Quick mode (``quick=True``) keeps 2 images per class, 2 seeds, 10 epochs and a localization
sample of 4: a smoke run, not a result (every table and figure says QUICK). Full mode uses
every labelled image, 10 seeds and the paper's 100 epochs.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from sklearn.metrics.pairwise import cosine_similarity

from ..cluster.baselines import embed_answers, kmeans_scores
from ..cluster.head import PseudoLabelHead
from ..data.dataset import ImageDataset, load_dataset
from ..data.synthetic import make_synthetic_dataset
from ..errors import ConfigError
from ..lens.keyword_rule import keyword_token_ids, split_scorable
from ..lens.unembed import Unembed
from ..localization.grid import keyword_grid
from ..localization.keywords import Keywords, choose_keywords, merge
from ..localization.votes import Localization
from ..models.vlm import VLM, load_model
from ..pipeline import (
    Criterion,
    CriterionEmbedding,
    capture_fn,
    cluster_criterion,
    embed_criteria,
    localization_sample,
    localize_criteria,
    run_esmc,
)
from ..report.naming import as_probs, clean_token
from ..report.paper_numbers import PAPER_MODEL, beside_paper
from ..report.plotting import caption_text, provenance
from ..report.result import EsmcResult
from ..report.trajectory import LensTrajectory
from ..residual.cache import ResidualCache
from .html_views import HtmlView, lens_explorer_view, vote_map_view

__all__ = [
    "KNOWN_CRITERIA",
    "CriterionSpec",
    "Workbench",
    "alpha_sweep",
    "consistency_table",
    "cost_table",
    "criterion_specificity",
    "failure_captions",
    "failure_cases",
    "format_table",
    "keyword_source_ablation",
    "lens_examples",
    "lens_peak_table",
    "main_results",
    "method_ablation",
    "model_label",
    "prompt_robustness",
    "prompt_variants",
    "resolve_dataset",
    "run_table",
    "sample_size_ablation",
]


# --------------------------------------------------------------------------------------
# Criteria of the datasets the notebooks know

# The eleven basic colour terms of English (Berlin & Kay, 1969): a user's colour list that
# owes nothing to any dataset's folder names.
BASIC_COLOURS = ("black", "white", "red", "green", "yellow", "blue", "brown", "purple",
                 "pink", "orange", "gray")


@dataclass(frozen=True)
class CriterionSpec:
    """One clustering criterion: its prompt, nouns and the user's keyword list.

    ``keywords`` is what a user would type: a generic vocabulary of the criterion (written
    here, not read from the dataset's class folders); ``noun``/``object_noun`` build the
    prompt variants.
    """

    name: str
    prompt: str
    noun: str
    object_noun: str
    keywords: tuple[str, ...]


KNOWN_CRITERIA: dict[str, dict[str, CriterionSpec]] = {
    "flower": {
        "color": CriterionSpec("color", "The color of the flower is", "color", "flower",
                               BASIC_COLOURS),
        "species": CriterionSpec("species", "The species of the flower is", "species",
                                 "flower", ("rose", "tulip", "daisy", "lily", "sunflower",
                                            "orchid", "iris", "daffodil", "peony", "poppy",
                                            "carnation", "lotus", "hyacinth", "dandelion",
                                            "marigold")),
    },
    "synthetic": {
        "color": CriterionSpec("color", "The color of the object is", "color", "object",
                               BASIC_COLOURS),
        "shape": CriterionSpec("shape", "The shape of the object is", "shape", "object",
                               ("circle", "square", "triangle", "star", "rectangle", "oval",
                                "hexagon", "diamond", "heart", "cross")),
        "background": CriterionSpec("background", "The color of the background is", "color",
                                    "background", BASIC_COLOURS),
    },
}
# The criterion a quick run studies first (the paper's Figure 3 shows color first).
PREFERRED_ORDER = ("color", "species", "shape", "type", "background")
SUPERVISED = "supervised localization"


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
    make_synthetic_dataset(root, n_images=n_synthetic, seed=0)
    note = f"synthetic dataset ({n_synthetic} images) at {root}"
    return load_dataset(root), "synthetic", note + (f"; fallback because {why}" if why else "")


@dataclass
class Settings:
    """What quick and full mode change (everything else is ``run_esmc``'s default)."""

    per_class: int | None  # images per class (None: every labelled image)
    n_seeds: int
    epochs: int
    n_samples: int  # localization sample (Algorithm 1)
    alpha: float
    batch_size: int = 8
    explore_images: int = 12  # images an explorer's capture holds

    @classmethod
    def for_mode(cls, quick: bool) -> Settings:
        if quick:
            return cls(per_class=2, n_seeds=2, epochs=10, n_samples=4, alpha=0.3,
                       explore_images=8)
        return cls(per_class=None, n_seeds=10, epochs=100, n_samples=10, alpha=0.3)


@dataclass
class Workbench:
    """Model, dataset and settings of a notebook; runs of the pipeline, kept for reuse.

    Runs are memoised in memory by their settings; their captures live in the pipeline's
    disk cache under ``outputs/captures`` (a re-run cell, notebook or CLI call with the same
    settings reads them back instead of capturing again).
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
    _runs: dict = field(default_factory=dict, repr=False)
    _memo: dict = field(default_factory=dict, repr=False)

    # -- construction ------------------------------------------------------------------
    @classmethod
    def open(cls, model: str | VLM = "offline", data: str | Path | None = None,
             dataset: str = "flower", quick: bool = True, outputs: str | Path = "outputs",
             figures: str | Path = "figures", n_synthetic: int | None = None,
             settings: Settings | None = None, verbose: bool = True) -> Workbench:
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
                    quick=quick, settings=settings or Settings.for_mode(quick),
                    outputs=outputs, figures=figures, source_note=note)
        if verbose:
            print(bench.describe())
        return bench

    def describe(self) -> str:
        s = self.settings
        per = f"{s.per_class} images per class" if s.per_class else "every labelled image"
        kw = "; ".join(f"{c}: {self.keyword_note(c)}" for c in self.criteria)
        return (f"model: {self.model}\ndata: {self.source_note}\n"
                f"mode: {'QUICK (smoke run, not a result)' if self.quick else 'full'}: {per}, "
                f"{s.n_seeds} seeds, {s.epochs} epochs, localization sample {s.n_samples}\n"
                f"criteria: {', '.join(f'{c} ({v.prompt!r})' for c, v in self.criteria.items())}"
                f"\nkeywords (label-free): {kw}")

    @property
    def model(self) -> str:
        return model_label(self.vlm)

    @property
    def fig(self) -> dict:
        """Keyword arguments of every notebook figure: the model, and QUICK."""
        return {"model": self.model, "quick": self.quick}

    @property
    def capture_dir(self) -> Path:
        return self.outputs / "captures"

    @property
    def focus(self) -> list[str]:
        """The criteria single-criterion notebooks study: the first in quick mode, all in full."""
        crits = list(self.criteria)
        return crits[:1] if self.quick else crits

    @property
    def unembed(self) -> Unembed:
        if "unembed" not in self._memo:
            self._memo["unembed"] = Unembed.from_model(self.vlm)
        return self._memo["unembed"]

    @property
    def seeds(self) -> list[int]:
        return list(range(self.seed, self.seed + self.settings.n_seeds))

    # -- images ------------------------------------------------------------------------
    def images(self, criterion: str) -> ImageDataset:
        """The labelled images of ``criterion`` (quick: ``per_class`` per class, fixed)."""
        if ("images", criterion) not in self._memo:
            self._choose_images()
        return self._memo[("images", criterion)]

    def _choose_images(self) -> None:
        """Per-criterion subsets in the dataset's order; in quick mode a later criterion
        takes the images an earlier one chose first (so an image can be shown under every
        criterion) and fills each class at random (seeded)."""
        names = np.asarray(self.dataset.names)
        chosen: set[str] = set()
        for crit in self.criteria:
            y = self.dataset.y(crit)
            keep: set[str] = set()
            rng = np.random.default_rng(self.seed)
            n = self.settings.per_class
            for c in range(len(self.dataset.classes[crit])):
                members = names[y == c]
                if n is not None and len(members) > n:
                    prefer = [m for m in members if m in chosen][:n]
                    rest = np.setdiff1d(members, prefer)
                    members = np.concatenate([np.asarray(prefer, dtype=members.dtype),
                                              rng.choice(rest, n - len(prefer),
                                                         replace=False)])
                keep.update(members.tolist())
            chosen.update(keep)
            order = [m for m in self.dataset.names if m in keep]
            self._memo[("images", crit)] = (self.dataset if len(order) == len(names)
                                            else self.dataset.subset(order))

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
        """The criterion's keywords from ``source``: ``"user"`` (the list written in
        :data:`KNOWN_CRITERIA`), ``"lm"`` (the local LM's answer, as the pipeline asks it)
        or ``"class_names"`` (the folder names: supervised)."""
        key = ("kw", criterion, source)
        if key not in self._memo:
            spec = self.criteria[criterion]
            if source == "user" and not spec.keywords:
                raise ConfigError(f"no user keyword list is written for {criterion!r}: "
                                  "use source='lm', or add one to KNOWN_CRITERIA")
            if source not in ("user", "lm", "class_names"):
                raise ConfigError(f"source={source!r}: use 'user', 'lm' or 'class_names'")
            # the pipeline's stage 1, as run_esmc applies it (unscorable words dropped)
            self._memo[key] = choose_keywords(
                self.vlm, spec.prompt, list(spec.keywords) if source == "user" else None,
                self.dataset, criterion, source)
        return self._memo[key]

    def keyword_note(self, criterion: str, source: str = "user") -> str:
        """Where the keywords come from, in words (printed by the notebooks)."""
        if source == "user":
            return (f"the user's list written in esmc_lens, not read from the folders "
                    f"({', '.join(self.criteria[criterion].keywords) or 'none'})")
        if source == "lm":
            return "the local language model's answer to the criterion question"
        return f"the dataset's class names: {SUPERVISED}"

    # -- runs: run_esmc with the notebook's settings -------------------------------------
    def run_settings(self, criterion: str, source: str = "user", prompt: str | None = None,
                     **overrides) -> dict:
        """The keyword arguments :meth:`run` passes to ``run_esmc`` (what the CLI's flags
        set: ``--alpha --tau --n-samples --seed --n-seeds --batch-size --cache-dir``)."""
        s = self.settings
        kw = {"alpha": s.alpha, "tau": 0.2, "n_samples": s.n_samples, "seed": self.seed,
              "n_seeds": s.n_seeds, "epochs": s.epochs, "batch_size": s.batch_size,
              "baselines": True, "space": "probs"} | overrides
        return {"criterion": criterion, "source": source,
                "prompt": prompt or self.criteria[criterion].prompt, **kw}

    def run(self, criterion: str, source: str = "user", prompt: str | None = None,
            **overrides) -> EsmcResult:
        """:func:`~esmc_lens.pipeline.run_esmc` on the criterion's images (memoised).

        ``overrides``: any of :meth:`run_settings`' keys (``n_samples=5``, ``alpha=0.6``,
        ``baselines=False`` ...).
        """
        st = self.run_settings(criterion, source, prompt, **overrides)
        key = tuple(sorted((k, repr(v)) for k, v in st.items()))
        if key not in self._runs:
            args = {k: v for k, v in st.items() if k not in ("criterion", "source", "prompt")}
            words = self.keywords(criterion, source)  # raises if the LM gave none
            # the LM's keywords are passed as given (keyword_source "auto" keeps a Keywords
            # list as it is): the same words, not a second generation
            how = {"user": "user", "lm": "auto", "class_names": "class_names"}[source]
            res = run_esmc(self.vlm, self.images(criterion), st["prompt"],
                           criterion=criterion,
                           keywords=None if source == "class_names" else words,
                           keyword_source=how, progress=False, cache_dir=self.capture_dir,
                           **args)
            self._runs[key] = res
            self._memo[("args", id(res))] = st
        return self._runs[key]

    def localize(self, criterion: str, source: str = "user", prompt: str | None = None,
                 **overrides) -> Localization:
        """Algorithm 1 alone, as :meth:`run` would localize (the pipeline's keyword,
        sample and localization stages with the same settings; no embedding, no
        clustering): for views that show where a criterion is found and nothing else."""
        st = self.run_settings(criterion, source, prompt, **overrides)
        key = ("loc", tuple(sorted((k, repr(v)) for k, v in st.items())))
        if key not in self._memo:
            images = self.images(criterion)
            sample = localization_sample(len(images), st["n_samples"], st["seed"])
            crit = Criterion(criterion, st["prompt"])
            self._memo[key] = localize_criteria(
                self.vlm, images, [crit], {criterion: self.keywords(criterion, source)},
                sample, tau=st["tau"], seed=st["seed"], batch_size=st["batch_size"],
                cache_dir=self.capture_dir, progress=False)[criterion][1]
        return self._memo[key]

    def stages(self, res: EsmcResult) -> tuple[ResidualCache, Localization,
                                                CriterionEmbedding]:
        """A run's localization capture, localization and target embedding, from the
        pipeline's own stage functions with the run's settings (its captures are read back
        from the disk cache): what the figures of a run need beyond its result."""
        key = ("stages", id(res))
        if key not in self._memo:
            st = self._memo[("args", id(res))]
            images = self._images_of(res)
            crit = Criterion(res.criterion, res.prompt)
            sample = localization_sample(len(images), st["n_samples"], st["seed"])
            localized = localize_criteria(
                self.vlm, images, [crit], {res.criterion: res.keywords}, sample,
                tau=st["tau"], seed=st["seed"], batch_size=st["batch_size"],
                cache_dir=self.capture_dir, progress=False)
            emb = embed_criteria(self.vlm, images, [crit], localized, space=st["space"],
                                 batch_size=st["batch_size"], vision=st["baselines"],
                                 cache_dir=self.capture_dir, progress=False)[res.criterion]
            loc_cache, loc = localized[res.criterion]
            if loc.targets != res.target or emb.cells != res.target_positions:
                raise ConfigError("the stages gave other targets than the run: the disk cache "
                                  f"at {self.capture_dir} does not hold this run's captures")
            self._memo[key] = (res, loc_cache, loc, emb)
        return self._memo[key][1:]

    def embeddings(self, res: EsmcResult) -> np.ndarray:
        """The target embeddings a run clustered [n_images, dim] (:meth:`stages`)."""
        return self.stages(res)[2].X

    def vocab_probs(self, res: EsmcResult) -> np.ndarray:
        """The lens distribution at a run's (first) target [n_images, |V|]."""
        return as_probs(self.stages(res)[2].vocab, "auto")

    def _images_of(self, res: EsmcResult) -> ImageDataset:
        for crit in self.criteria:
            if list(self.images(crit).names) == list(res.image_ids):
                return self.images(crit)
        raise ConfigError("this run's images are none of the workbench's criteria")

    def explore_cache(self, criterion: str, prompt: str | None = None) -> ResidualCache:
        """Every layer at every prompt position of the criterion's first
        ``settings.explore_images`` images, with the lens probability of every keyword of
        the user and LM lists and the top-5 lens tokens: what the explorers and the lens
        figures show (the disk cache keeps it)."""
        prompt = prompt or self.criteria[criterion].prompt
        key = ("explore", criterion, prompt)
        if key not in self._memo:
            ds = self.images(criterion)
            names = ds.names[: self.settings.explore_images]
            sub = ds.subset(names)
            words = split_scorable(self.vlm.tokenizer, merge(*self._sources(criterion)).words)[0]
            self._memo[key] = capture_fn(self.capture_dir)(
                self.vlm, sub, prompt, keywords=words, top_k=5, image_ids=list(names),
                batch_size=self.settings.batch_size, progress=False)
        return self._memo[key]

    def _sources(self, criterion: str) -> list[Keywords]:
        out = []
        for src in ("user", "lm"):
            try:
                out.append(self.keywords(criterion, src))
            except ConfigError:
                continue
        return out

    # -- views -------------------------------------------------------------------------
    def trajectory(self, criterion: str, image: int | str = 0,
                   keyword: str | None = None) -> LensTrajectory:
        """The prediction trajectory of an explored image (index or id), tuned-lens style."""
        cache = self.explore_cache(criterion)
        i = cache.image_ids.index(image) if isinstance(image, str) else image
        return LensTrajectory.from_cache(cache, i, self.unembed, self.vlm.tokenizer,
                                         keyword=keyword)

    def lens_view(self, criterion: str, keywords: Sequence[str] | None = None) -> HtmlView:
        """A static (kernel-free) lens explorer of the explored images."""
        cache = self.explore_cache(criterion)
        words = split_scorable(self.vlm.tokenizer,
                               list(keywords or merge(*self._sources(criterion)).words))[0]
        return lens_explorer_view(cache, self.unembed, self.vlm.tokenizer, words,
                                  images=self.images(criterion), **self.fig)

    def vote_view(self, criterion: str, link: HtmlView | None = None,
                  source: str = "user") -> HtmlView:
        """A static vote map of the explored images with ``source``'s keywords."""
        cache = self.explore_cache(criterion)
        words = split_scorable(self.vlm.tokenizer, self.keywords(criterion, source).words)[0]
        return vote_map_view(cache, words, unembed=self.unembed,
                             tokenizer=self.vlm.tokenizer, link=link, **self.fig)

    # -- tables ------------------------------------------------------------------------
    def table(self, rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
        """A results table with this workbench's model and dataset in every row (and
        ``mode = QUICK`` in a quick run)."""
        df = pd.DataFrame(rows).copy()
        df.insert(0, "model", self.model)
        df.insert(1, "dataset", self.name)
        if self.quick:
            df.insert(2, "mode", "QUICK")
        return df

    def show(self, df: pd.DataFrame, title: str):
        """A table for display: helper columns dropped, floats rounded, the title with the
        model and (quick mode) QUICK as its caption."""
        shown = format_table(df)
        head = f"QUICK · {title}" if self.quick else title
        return (shown.style.set_caption(f"{head} — {provenance(self.model, self.quick)}")
                .format(precision=4, na_rep="—").hide(axis="index"))


def _ms(df: pd.DataFrame, metric: str) -> tuple[float, float]:
    v = df[metric].to_numpy(dtype=float)
    return float(v.mean()), float(v.std())


def _fmt(mean: float, std: float | None = None) -> str:
    if mean is None or (isinstance(mean, float) and np.isnan(mean)):
        return "n/a"
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def _targets(res: EsmcResult) -> str:
    return ", ".join(res.target_labels)


def format_table(df: pd.DataFrame) -> pd.DataFrame:
    """A table for display: ``<m>_mean`` dropped where a ``"mean ± std"`` column ``<m>``
    shows it, floats rounded to 4 digits."""
    drop = [c for c in df.columns if c.endswith("_mean") and c[:-5] in df.columns]
    return df.drop(columns=drop).round(4)


def _keyword_prob(P: np.ndarray, tokenizer, word: str) -> np.ndarray:
    """Lens probability of ``word`` at the (first) target of every image, from the lens
    distribution there ``P`` [n, |V|]: the keyword rule's tokens summed."""
    if not split_scorable(tokenizer, [word])[0]:  # e.g. "hyacinth" for SmolLM2: no score, no guess
        return np.full(P.shape[0], np.nan)
    group = keyword_token_ids(tokenizer, [word]).groups[0]
    return P[:, group].sum(axis=1)


# --------------------------------------------------------------------------------------
# Notebook 2: the logit lens across layers and prompt positions (Figures 3, 7, 8)


def lens_examples(bench: Workbench, n_images: int = 3) -> list[dict]:
    """For ``n_images`` images (different classes of the first criterion): per criterion,
    the lens grid of the image's true class name and of a wrong class name (Figure 3: an
    explanation of what the lens holds, not a localization: no result depends on it).
    A class name the keyword rule cannot score gets no panel."""
    first = next(iter(bench.criteria))
    caches = {c: bench.explore_cache(c) for c in bench.criteria}
    ids0 = caches[first].image_ids
    ds0 = bench.images(first)
    y0 = ds0.y(first)
    shared = set(ids0).intersection(*(caches[c].image_ids for c in bench.criteria))
    picks = []
    for c in range(len(bench.class_names(first))):  # one image per class, shown everywhere
        hits = [n for n in ids0 if y0[ds0.names.index(n)] == c and n in shared] or \
            [n for n in ids0 if y0[ds0.names.index(n)] == c]
        if hits:
            picks.append(hits[0])
        if len(picks) == n_images:
            break
    out = []
    for name in picks:
        item = {"image_id": name, "panels": []}
        for crit, cache in caches.items():
            if name not in cache.image_ids:
                continue
            i = cache.image_ids.index(name)
            cds = bench.images(crit)
            tok = bench.vlm.tokenizer
            classes = split_scorable(tok, bench.class_names(crit))[0]
            true = bench.class_names(crit)[int(cds.y(crit)[cds.names.index(name)])]
            if true not in classes or len(classes) < 2:
                continue  # the lens cannot score this class name: no panel, not a guess
            wrong = next(c for c in classes if c != true)
            for kw, is_true in ((true, True), (wrong, False)):
                grid = keyword_grid(cache, i, kw, bench.unembed, bench.vlm.tokenizer)
                item["panels"].append({"criterion": crit, "keyword": kw, "true": is_true,
                                       "grid": grid, "tokens": cache.tokens[i],
                                       "prompt": bench.criteria[crit].prompt})
            item.setdefault("image", cds.open(cds.names.index(name)))
        if item["panels"]:
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
    """Table 6: the target chosen from ``n`` sampled images and the final NMI there (one
    run per ``n``), the paper's column beside ours."""
    rows = []
    n_all = len(bench.images(criterion))
    for n in sizes:
        res = bench.run(criterion, source, n_samples=n, baselines=False)
        m, s = _ms(res.per_seed["ESMC"], "nmi")
        rows.append({"criterion": criterion, "n_samples": n, "n_sampled": min(n, n_all),
                     "target": _targets(res),
                     "votes": f"{res.localization.max_votes}/{res.localization.n_pairs}",
                     "nmi": _fmt(m, s), "nmi_mean": m})
    return beside_paper(bench.table(rows), "table6", bench.name)


def keyword_source_ablation(bench: Workbench, criterion: str,
                            sources: Sequence[str] = ("user", "lm", "class_names")
                            ) -> pd.DataFrame:
    """Table 7: keywords from the user's list, the local LM and the class names (that row
    is supervised and says so); target and NMI, the paper's column beside ours."""
    rows = []
    for src in sources:
        row = {"criterion": criterion, "keyword_source": src,
               "localization": SUPERVISED if src == "class_names" else "label-free"}
        try:
            res = bench.run(criterion, src, baselines=False)
        except ConfigError as exc:  # e.g. the LM answered no usable word
            rows.append(row | {"keywords": "(none parsed)", "target": "n/a", "votes": "",
                               "nmi": "n/a", "nmi_mean": np.nan, "note": str(exc)[:120]})
            continue
        m, s = _ms(res.per_seed["ESMC"], "nmi")
        rows.append(row | {"keywords": ", ".join(res.keywords.words) or "(none parsed)",
                           "target": _targets(res),
                           "votes": f"{res.localization.max_votes}/{res.localization.n_pairs}",
                           "nmi": _fmt(m, s), "nmi_mean": m,
                           "note": res.localization.message[:120]})
    return beside_paper(bench.table(rows), "table7", bench.name)


# --------------------------------------------------------------------------------------
# Notebook 4: main results (Tables 1 and 2) with named clusters


def run_table(bench: Workbench, res: EsmcResult) -> pd.DataFrame:
    """Every method's NMI and RI (mean ± std over seeds) of one run, the paper's Table 3
    (same dataset and criterion) beside ours."""
    rows = _method_rows(res, res.criterion, ("ESMC", "ESMC w/o head", "Output", "Vision only"))
    return beside_paper(bench.table(rows), "table3", bench.name, ("nmi", "ri"))


def _method_rows(res: EsmcResult, criterion: str, methods: Sequence[str]) -> list[dict]:
    rows = []
    # "Vision only" stands for each of its variants ("Vision only (EfficientNet pooled)", ...)
    chosen = [m for want in methods for m in res.per_seed
              if m == want or m.startswith(f"{want} (")]
    for method in chosen:
        nmi, ri = _ms(res.per_seed[method], "nmi"), _ms(res.per_seed[method], "ri")
        rows.append({"criterion": criterion, "method": method, "target": _targets(res),
                     "nmi": _fmt(*nmi), "ri": _fmt(*ri), "nmi_mean": nmi[0],
                     "ri_mean": ri[0]})
    return rows


def main_results(bench: Workbench, criteria: Sequence[str] | None = None,
                 source: str = "user") -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """ESMC, ESMC w/o head and the vision-only baseline per criterion, NMI and RI (mean ±
    std over seeds) of one run each, with the paper's ESMC (Tables 1 and 2) beside ours;
    and the named clusters of each run."""
    rows, named = [], {}
    for crit in criteria or list(bench.criteria):
        res = bench.run(crit, source)
        rows += _method_rows(res, crit, ("ESMC", "ESMC w/o head", "Vision only"))
        named[crit] = bench.table(res.clusters)
    df = beside_paper(bench.table(rows), "table1", bench.name)
    ri = beside_paper(bench.table(rows), "table2", bench.name)
    df[f"paper_ri ({PAPER_MODEL})"] = ri[f"paper_ri ({PAPER_MODEL})"]
    return df, named


# --------------------------------------------------------------------------------------
# Notebook 5: Table 3 and Figures 4-5


def method_ablation(bench: Workbench, criteria: Sequence[str] | None = None,
                    source: str = "user") -> pd.DataFrame:
    """Table 3: Output (the run's generated answers embedded by the text encoder, then
    k-means) vs ESMC w/o head vs ESMC, NMI and RI, the paper's Table 3 beside ours."""
    rows = []
    for crit in criteria or bench.focus:
        rows += _method_rows(bench.run(crit, source), crit, ("Output", "ESMC w/o head", "ESMC"))
    return beside_paper(bench.table(rows), "table3", bench.name, ("nmi", "ri"))


def _cos_within(X: np.ndarray) -> float:
    if len(X) < 2:
        return float("nan")
    S = cosine_similarity(X)
    n = len(X)
    return float((S.sum() - np.trace(S)) / (n * (n - 1)))


def consistency_table(bench: Workbench, criterion: str, source: str = "user",
                      encoder: str = "minilm") -> tuple[pd.DataFrame, pd.DataFrame]:
    """Figure 4: per class, how varied the run's generated answers are and how consistent
    the class name's lens probability at the run's target is.

    Returns (per-class summary, per-image detail). Summary columns: ``n_images``,
    ``distinct_answers``, ``answer_cosine`` (mean pairwise cosine of the answers' text
    embeddings within the class), ``target_cosine`` (same for the target embeddings),
    ``keyword_prob_mean``/``_std`` (the class name's lens probability at the target; NaN
    for a class name the keyword rule cannot score).
    """
    res = bench.run(criterion, source)
    X, P = bench.embeddings(res), bench.vocab_probs(res)
    answers = list(res.answers)
    T = embed_answers(answers, encoder)
    y, names = bench.y(criterion), bench.class_names(criterion)
    probs = {c: _keyword_prob(P, bench.vlm.tokenizer, c) for c in names}
    detail = pd.DataFrame([{"image": res.image_ids[i], "class": names[int(yi)],
                            "answer": answers[i],
                            "keyword_prob": float(probs[names[int(yi)]][i])}
                           for i, yi in enumerate(y)])
    rows = []
    for c, cls in enumerate(names):
        m = y == c
        if not m.any():
            continue
        kp = detail.loc[m, "keyword_prob"]
        rows.append({"criterion": criterion, "class": cls, "target": res.target_labels[0],
                     "n_images": int(m.sum()),
                     "distinct_answers": len({a.strip().lower() for a in np.asarray(answers)[m]}),
                     "answer_cosine": _cos_within(T[m]), "target_cosine": _cos_within(X[m]),
                     "keyword_prob_mean": float(kp.mean()), "keyword_prob_std": float(kp.std())})
    return bench.table(rows), bench.table(detail)


def criterion_specificity(bench: Workbench, criterion: str, other: str,
                          source: str = "user") -> pd.DataFrame:
    """Figure 5: at ``criterion``'s target (its run's embeddings), the lens probability of
    each image's class name under ``criterion`` vs under ``other`` (e.g. "rose" vs "pink"
    at the species target), and how often the answer names each."""
    res = bench.run(criterion, source)
    P = bench.vocab_probs(res)
    rows = []
    for i, name in enumerate(res.image_ids):
        row = {"image": name}
        for crit in (criterion, other):
            yi = int(bench.dataset.y(crit)[bench.dataset.names.index(name)])
            if yi < 0:
                row[f"{crit}_word"], row[f"{crit}_prob"] = "", np.nan
                continue
            word = bench.class_names(crit)[yi]
            row[f"{crit}_word"] = word
            row[f"{crit}_prob"] = float(_keyword_prob(P[i:i + 1], bench.vlm.tokenizer,
                                                      word)[0])
        answer = res.answers[i].lower()
        row["answer"] = res.answers[i]
        for crit in (criterion, other):
            row[f"answer_names_{crit}"] = bool(row[f"{crit}_word"]) and \
                row[f"{crit}_word"].lower() in answer
        rows.append(row)
    df = bench.table(rows)
    df.attrs["target"] = res.target_labels[0]
    return df


# --------------------------------------------------------------------------------------
# Notebook 6: prompt robustness (Table 5, Figure 10)


def prompt_robustness(bench: Workbench, criteria: Sequence[str] | None = None,
                      source: str = "user", variants: Sequence[str] | None = None
                      ) -> tuple[pd.DataFrame, dict]:
    """Table 5: one run per prompt form and criterion; target, NMI, RI, the paper's
    (Stanford_Cars) beside ours. Also returns the localizations (Figure 10's heatmaps),
    keyed by (criterion, variant): (prompt, Localization).

    ``variants``: the forms to run, by name (``"Original"``, ``"Variant 1"`` ..); default
    all four.
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
            res = bench.run(crit, source, prompt=prompt, baselines=False)
            nmi, ri = _ms(res.per_seed["ESMC"], "nmi"), _ms(res.per_seed["ESMC"], "ri")
            locs[(crit, variant)] = (prompt, res.localization)
            rows.append({"criterion": crit, "variant": variant, "prompt": prompt,
                         "target": _targets(res), "nmi": _fmt(*nmi), "ri": _fmt(*ri),
                         "nmi_mean": nmi[0], "ri_mean": ri[0]})
    return beside_paper(bench.table(rows), "table5", bench.name, ("nmi", "ri")), locs


# --------------------------------------------------------------------------------------
# Notebook 7: alpha sensitivity (Figure 6)


def alpha_sweep(bench: Workbench, criterion: str, alphas: Sequence[float],
                source: str = "user") -> tuple[pd.DataFrame, pd.DataFrame]:
    """NMI and RI against the pseudo-label ratio alpha (the head on the run's target
    embeddings, the run's seeds and epochs), and the run's k-means baseline (ESMC w/o
    head)."""
    res = bench.run(criterion, source, baselines=False)  # no answers: not shown here
    X = bench.embeddings(res)
    y, k = bench.y(criterion), bench.n_clusters(criterion)
    st = res.settings
    seeds = list(range(st["seed"], st["seed"] + st["n_seeds"]))
    # k-means on the same embeddings: what cluster_criterion reports as "ESMC w/o head"
    km = kmeans_scores(X, y, k, seeds=seeds)
    rows = []
    for a in alphas:  # the pipeline's clustering stage at another alpha
        ev = cluster_criterion(X, y, k, alpha=float(a), seeds=seeds, epochs=st["epochs"],
                               head_lr=st["head_lr"], baselines=False, progress=False)[0]["ESMC"]
        (nm, ns), (rm, rs) = _ms(ev, "nmi"), _ms(ev, "ri")
        rows.append({"criterion": criterion, "alpha": float(a), "nmi_mean": nm, "nmi_std": ns,
                     "ri_mean": rm, "ri_std": rs})
    (nm, ns), (rm, rs) = _ms(km, "nmi"), _ms(km, "ri")
    base = bench.table([{"criterion": criterion, "method": "k-means (ESMC w/o head)",
                         "nmi_mean": nm, "nmi_std": ns, "ri_mean": rm, "ri_std": rs,
                         "target": _targets(res)}])
    return bench.table(rows), base


# --------------------------------------------------------------------------------------
# Notebook 8: failure cases (Figure 9)


def failure_captions(cases: pd.DataFrame, width: int = 34) -> list[str]:
    """Figure 9's captions: the true class, the class the image's cluster was matched to
    (and the cluster's lens name), the lens's words at the target and the answer, wrapped
    at word boundaries (never cut mid-phrase)."""
    return [caption_text([f"true: {r.true}",
                          f"assigned: {r.matched_class} (cluster '{r.cluster_name}', "
                          f"p={r.confidence:.2f})",
                          f"lens: {r.lens_top}", f"answer: {r.answer}"], width=width,
                         max_lines=8) for r in cases.itertuples()]


def failure_cases(bench: Workbench, criterion: str, n: int = 6,
                  source: str = "user") -> pd.DataFrame:
    """The worst-assigned images of a run: wrong after matching its clusters to classes
    (Hungarian), the most confident first; with the class the image's cluster was matched
    to, what the lens said at the target and what the model answered.

    Confidence is the head's probability of the assigned cluster: the run's head (seed
    ``seed``) refitted on the run's embeddings, checked to give the run's labels.
    """
    from scipy.optimize import linear_sum_assignment

    res = bench.run(criterion, source)
    X = bench.embeddings(res)
    st = res.settings
    head = PseudoLabelHead(n_clusters=st["n_clusters"], alpha=st["alpha"],
                           random_state=st["seed"], epochs=st["epochs"],
                           lr=st.get("head_lr", 1e-3)).fit(X)
    if not np.array_equal(head.labels_, res.labels):
        raise ConfigError("refitting the run's head gave other labels: the head is not "
                          "deterministic here, so no confidence can be read")
    proba = head.predict_proba(X)
    labels, y = res.labels, bench.y(criterion)
    classes = bench.class_names(criterion)
    names = dict(zip(res.clusters["cluster"], res.clusters["name"], strict=True))
    k = max(len(classes), int(labels.max()) + 1)
    C = np.zeros((k, k), dtype=int)
    for a, b in zip(labels, y, strict=True):
        if b >= 0:
            C[a, b] += 1
    r, c = linear_sum_assignment(-C)
    to_class = dict(zip(r.tolist(), c.tolist(), strict=True))
    P = bench.vocab_probs(res)
    tok = bench.vlm.tokenizer
    rows = []
    for i in range(len(labels)):
        if y[i] < 0:
            continue
        matched = to_class.get(int(labels[i]), -1)
        top = np.argsort(-P[i], kind="stable")[:20]
        words = [w for w in (clean_token(tok, int(t)) for t in top) if w]
        rows.append({"image": res.image_ids[i], "index": i, "true": classes[int(y[i])],
                     "cluster": int(labels[i]), "cluster_name": names.get(int(labels[i]), ""),
                     "matched_class": classes[matched] if 0 <= matched < len(classes) else "",
                     "confidence": float(proba[i].max()),
                     "correct": matched == int(y[i]),
                     "lens_top": ", ".join(list(dict.fromkeys(words))[:5]),
                     "answer": res.answers[i] if res.answers is not None else ""})
    df = pd.DataFrame(rows)
    wrong = df[~df["correct"]].sort_values("confidence", ascending=False, kind="stable")
    out = bench.table(wrong.head(n).reset_index(drop=True))
    out.attrs["target"] = res.target_labels[0]
    out.attrs["n_wrong"] = int((~df["correct"]).sum())
    out.attrs["n_images"] = len(df)
    return out


# --------------------------------------------------------------------------------------
# Notebook 9: cost (Table 4)


def cost_table(bench: Workbench, criteria: Sequence[str] | None = None,
               epochs: int = 100) -> pd.DataFrame:
    """Table 4 and more: wall time of ESMC's stages in one run measured now (no disk
    cache: every capture is computed), one seed, ``epochs`` epochs (the paper's Table 4
    trains the head for 100), the paper's head time beside ours."""
    rows = []
    dev = str(bench.vlm.device)
    for crit in criteria or bench.focus:
        images = bench.images(crit)
        t = time.perf_counter()
        res = run_esmc(bench.vlm, images, bench.criteria[crit].prompt, criterion=crit,
                       keywords=bench.keywords(crit, "user"), keyword_source="user",
                       alpha=bench.settings.alpha, n_samples=bench.settings.n_samples,
                       seed=bench.seed, n_seeds=1, epochs=epochs, baselines=False,
                       batch_size=bench.settings.batch_size, progress=False, cache_dir=None)
        total = time.perf_counter() - t
        tm = res.timings
        rows.append({"criterion": crit, "device": dev, "n_images": len(images),
                     "n_sampled": len(res.settings.get("localization_sample", [])),
                     "localization_s": tm.get("localize", np.nan),
                     "target_capture_s": tm.get("capture", np.nan),
                     "capture_per_image_s": tm.get("capture", np.nan) / len(images),
                     f"head_train_s ({epochs} epochs)": tm.get("cluster", np.nan),
                     "total_s": total})
    return beside_paper(bench.table(rows), "table4", bench.name)
