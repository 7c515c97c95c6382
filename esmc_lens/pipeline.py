"""ESMC end to end, one or many criteria: images -> capture -> lens -> localize -> cluster.

>>> vlm = load_model("offline")                                            # doctest: +SKIP
>>> ds = load_dataset("../shared/data/esmc/flower")                         # doctest: +SKIP
>>> res = run_esmc(vlm, ds, {"color": "The color of the flower is",
...                          "species": "The species of the flower is"})   # doctest: +SKIP
>>> res["color"].scores        # ESMC and its baselines, mean ± std over seeds  # doctest: +SKIP
>>> res.cross_criterion()      # the partitions differ: NMI between them       # doctest: +SKIP
>>> res.save("outputs/flower")                                               # doctest: +SKIP

A single prompt (``run_esmc(vlm, ds, "The color of the flower is", criterion="color")``)
gives one :class:`~esmc_lens.report.result.EsmcResult`; a mapping ``name -> prompt`` gives a
:class:`~esmc_lens.report.result.MultiResult` over the same images.

The stages, each a function here that the CLI, the demo, the notebooks' workbench and the
widgets call (so they all compute the same thing, through the same disk cache):

1. :func:`select_keywords`: per criterion, the user's keywords, else the local LM's answer
   (label-free; class names only when asked for, and then the run is marked supervised);
2. :func:`localize_criteria`: ``n_samples`` sampled images (the same for every criterion)
   captured at every layer and prompt position with the keywords' lens probabilities, then
   Algorithm 1 (:func:`~esmc_lens.localization.votes.localize`) picks each target;
3. :func:`embed_criteria`: every image at its criterion's target cells only (the trace
   stops after the deepest target layer), read in ``space`` (lens probabilities, the
   paper's vocabulary space, by default), plus what the vision side gives the language
   model (:meth:`~esmc_lens.models.vlm.VLM.vision_side`) for the vision-only baselines;
4. :func:`cluster_criterion`: :class:`~esmc_lens.cluster.head.PseudoLabelHead`
   (Algorithm 2) over ``n_seeds`` seeds, and the baselines (k-means on the same
   embeddings, the Output baseline on generated answers, vision-only);
5. the clusters are named by the lens of their mean vocabulary-space vector.

Scores are the mean and std over ``n_seeds`` seeds; the reported labels are seed ``seed``'s.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .cluster.baselines import (
    head_scores,
    kmeans_scores,
    output_baseline,
    score_table,
    vision_baselines,
)
from .cluster.head import check_head_options
from .data.dataset import ImageDataset
from .data.source import ImageSource
from .errors import ConfigError, EsmcWarning
from .lens.keyword_rule import keyword_token_ids
from .lens.unembed import Unembed
from .localization.keywords import Keywords, choose_keywords
from .localization.targets import target_embeddings, target_labels
from .localization.votes import Localization, localize
from .models.vlm import ANSWER_MAX_TOKENS, VLM
from .report.naming import name_clusters
from .report.result import EsmcResult, MultiResult
from .residual.cache import ResidualCache
from .residual.capture import capture
from .residual.shared_prefix import capture_criteria, shares_prefix, split_criteria
from .residual.store import cached_capture
from .validate import check_api_inputs, check_finite, check_run, keyword_notes

__all__ = [
    "Criterion",
    "CriterionEmbedding",
    "as_criteria",
    "capture_fn",
    "capture_target_cells",
    "cluster_criterion",
    "criterion_embedding",
    "embed_criteria",
    "labels_for",
    "localization_sample",
    "localize_criteria",
    "run_esmc",
    "select_keywords",
    "shared_pass",
    "target_tail_positions",
]


@dataclass(frozen=True)
class Criterion:
    """One clustering criterion: its name (a dataset criterion folder, if labelled) and the
    prompt that asks for it ("The color of the flower is")."""

    name: str | None
    prompt: str


def as_criteria(prompt: str | Mapping[str, str], criterion: str | None = None
                ) -> list[Criterion]:
    """The criteria of a run: one prompt (named ``criterion``) or a mapping name -> prompt."""
    if isinstance(prompt, Mapping):
        if criterion is not None:
            raise ConfigError("criterion= names a single prompt; with several criteria the "
                              "mapping's keys are their names")
        if not prompt:
            raise ConfigError("no criteria: give {'color': 'The color of the flower is', ...}")
        out = []
        for name, text in prompt.items():
            if not isinstance(name, str) or not name.strip():
                raise ConfigError(f"criterion name {name!r} must be a non-empty string")
            if not isinstance(text, str):
                raise ConfigError(f"the prompt of criterion {name!r} must be a string, got "
                                  f"{type(text).__name__}")
            out.append(Criterion(name, text))
        return out
    if not isinstance(prompt, str):
        raise ConfigError(f"prompt must be a string or a mapping name -> prompt, got "
                          f"{type(prompt).__name__}")
    return [Criterion(criterion, prompt)]


def labels_for(images, criterion: str | None, y_true=None, class_names=None
               ) -> tuple[np.ndarray | None, list[str] | None]:
    """``(y [n_images] or None, class names or None)``: ``y_true`` if given, else the
    dataset's labels of ``criterion`` (``-1`` = unlabelled), else none."""
    if y_true is not None:
        return np.asarray(y_true), class_names
    if isinstance(images, ImageDataset) and criterion is not None:
        if criterion not in images.criteria:
            raise ConfigError(f"criterion {criterion!r} is not in {images.root}; its criteria "
                              f"are {images.criteria}")
        return images.y(criterion), list(images.classes[criterion])
    return None, class_names


def _per_criterion(value, criteria: list[Criterion], what: str) -> dict:
    """``value`` for each criterion: a mapping keyed by criterion name, or one for all."""
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {c.name for c in criteria})
        if unknown:
            raise ConfigError(f"{what} for unknown criteria {unknown}; the criteria are "
                              f"{[c.name for c in criteria]}")
        return {c.name: value.get(c.name) for c in criteria}
    return {c.name: value for c in criteria}


# -- stage 1: keywords -----------------------------------------------------------------


def select_keywords(vlm: VLM, criteria: list[Criterion], keywords=None, images=None,
                    source: str = "auto") -> dict[str | None, Keywords]:
    """Each criterion's keywords (:func:`~esmc_lens.localization.keywords.choose_keywords`).

    ``keywords``: one list for every criterion, or a mapping criterion name -> list (or
    ``"class-names"``); ``source``: ``"auto"`` (the user's, else the LM's), ``"user"``,
    ``"lm"`` or ``"class_names"`` (supervised).
    """
    per = _per_criterion(keywords, criteria, "keywords")
    out = {}
    for c in criteria:
        kw = choose_keywords(vlm, c.prompt, per[c.name], images, c.name, source)
        for note in keyword_notes(vlm.tokenizer, kw.words):
            warnings.warn(note, EsmcWarning, stacklevel=3)
        out[c.name] = kw
    return out


# -- stage 2: localization -------------------------------------------------------------


def capture_fn(cache_dir: str | Path | None):
    """:func:`~esmc_lens.residual.capture.capture`, or its disk-cached form if ``cache_dir``."""
    if cache_dir is None:
        return capture
    return partial(cached_capture, cache_dir=cache_dir)


def localization_sample(n_images: int, n_samples: int, seed: int) -> np.ndarray:
    """Indices of the images Algorithm 1 reads (sorted; ``numpy.random.default_rng(seed)``),
    the same for every criterion of a run."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n_images, size=min(n_samples, n_images), replace=False))


def localize_criteria(vlm: VLM, images, criteria: list[Criterion],
                      keywords: Mapping[str | None, Keywords], sample: np.ndarray, *,
                      tau: float = 0.2, seed: int = 0, batch_size: int = 8,
                      cache_dir: str | Path | None = None, progress: bool = True
                      ) -> dict[str | None, tuple[ResidualCache, Localization]]:
    """Algorithm 1 for every criterion on the images ``sample``: ``{name: (cache, loc)}``.

    The cache holds every layer at every prompt position of the sampled images, with the
    keywords' lens probabilities computed from the full-precision states during capture.
    """
    source = ImageSource.of(images)
    imgs = [source.load(int(i)) for i in sample]
    ids = [source.ids[int(i)] for i in sample]
    cap = capture_fn(cache_dir)
    out = {}
    for c in criteria:
        cache = cap(vlm, imgs, c.prompt, keywords=keywords[c.name].words,
                    batch_size=batch_size, image_ids=ids, progress=progress)
        out[c.name] = (cache, _localize_checked(cache, c, tau, len(sample), seed))
    return out


def _localize_checked(cache: ResidualCache, c: Criterion, tau: float, n_samples: int,
                      seed: int) -> Localization:
    """Algorithm 1 on a localization cache, after checking its lens readout is finite; a
    weak or absent vote is a warning naming the criterion."""
    check_finite(cache.keyword_probs.reshape(len(cache), -1).numpy(), cache.image_ids,
                 "lens keyword probabilities")
    loc = localize(cache, tau=tau, n_samples=n_samples, seed=seed)
    if loc.message:
        warnings.warn(f"{c.name or c.prompt!r}: {loc.message}", EsmcWarning, stacklevel=3)
    return loc


# -- stage 3: target embeddings ---------------------------------------------------------


@dataclass
class CriterionEmbedding:
    """What :func:`embed_criteria` gives one criterion.

    ``X`` [n_images, n_targets * dim] in ``space``; ``vocab`` [n_images, |V|] the first
    target in a vocabulary space (for naming; ``X``'s first block unless ``space`` is
    "hidden"); ``cells`` the targets as ``(stream index, sequence position counted from the
    end)`` (-1: the last token), ``labels`` their ``E_l(position:token)`` names (position
    from the start, in the first sampled image); ``cache`` the target cache (``vision`` holds the
    vision side's features when asked for).
    """

    X: np.ndarray
    vocab: np.ndarray
    cells: list[tuple[int, int]]
    labels: list[str]
    cache: ResidualCache


def capture_target_cells(vlm: VLM, images, prompt: str, positions: list[int],
                         layers: list[int], *, cache_dir: str | Path | None = None,
                         batch_size: int = 8, vision: bool = True, progress: bool = True):
    """Every image at the target cells only.

    ``positions`` are sequence positions, ``layers`` stream indices; states are kept in fp32.
    Anything that recaptures a run's targets (e.g.
    :func:`esmc_lens.report.diagnose.readout_for_run`) goes through here, so with the run's
    ``cache_dir`` its batches are read back, not recomputed.
    """
    return capture_fn(cache_dir)(vlm, images, prompt, positions=positions, layers=layers,
                                 batch_size=batch_size, vision=vision,
                                 store_dtype=torch.float32, progress=progress)


def target_tail_positions(loc_cache, targets) -> tuple[list[int], list[tuple[int, int]]]:
    """The target cells' sequence positions counted from the end (-1: the last token), and
    the ``(stream, slot)`` targets re-indexed into that sorted list.

    ``loc_cache`` holds the prompt's positions (the tokens after the image, to the end), so
    counted from the end a target is the same prompt token in every image with the same
    prompt, also where the image-token count differs per image (dynamic resolution, e.g.
    Qwen2-VL, LLaVA-NeXT): row 0's indices from the start would name other tokens there.
    """
    n0 = int(loc_cache.positions[0].max()) + 1  # row 0's sequence length
    tail_of = {p: int(loc_cache.positions[0, p]) - n0 for _, p in targets}
    tail = sorted(set(tail_of.values()))
    return tail, [(s, tail.index(tail_of[p])) for s, p in targets]


def criterion_embedding(cache: ResidualCache, tail: list[int], slots: list[tuple[int, int]],
                        labels: list[str], space: str, unembed: Unembed
                        ) -> CriterionEmbedding:
    """Every image's embedding at the target cells of ``cache`` (a capture of them at the
    positions ``tail``, counted from the end; ``slots`` as
    :func:`target_tail_positions` gives them), read in ``space``."""
    X = target_embeddings(cache, slots, space=space, unembed=unembed)
    check_finite(X, cache.image_ids, "target embeddings")
    vocab = (X if space != "hidden" else
             target_embeddings(cache, slots[:1], "logits", unembed))[:, :unembed.vocab_size]
    return CriterionEmbedding(X, vocab, [(s, tail[j]) for s, j in slots], labels, cache)


def embed_criteria(vlm: VLM, images, criteria: list[Criterion],
                   localized: Mapping[str | None, tuple[ResidualCache, Localization]], *,
                   space: str = "probs", batch_size: int = 8, vision: bool = True,
                   cache_dir: str | Path | None = None, progress: bool = True
                   ) -> dict[str | None, CriterionEmbedding]:
    """Every image's target embedding for every criterion (see :class:`CriterionEmbedding`)."""
    unembed = Unembed.from_model(vlm)
    out = {}
    for c in criteria:
        loc_cache, loc = localized[c.name]
        tail, slots = target_tail_positions(loc_cache, loc.targets)
        cache = capture_target_cells(vlm, images, c.prompt, tail,
                                     sorted({s for s, _ in loc.targets}), cache_dir=cache_dir,
                                     batch_size=batch_size, vision=vision, progress=progress)
        out[c.name] = criterion_embedding(cache, tail, slots,
                                          target_labels(loc_cache, loc.targets), space, unembed)
    return out


def generate_answers(vlm: VLM, images, prompt: str, batch_size: int = 8,
                     progress: bool = True) -> list[str]:
    """The model's answer to ``prompt`` for every image, each to the end of its sentence
    (:meth:`~esmc_lens.models.vlm.VLM.generate`): the Output baseline's input."""
    source = ImageSource.of(images)
    starts = range(0, source.n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="answers", total=len(starts))
    answers: list[str] = []
    for s in starts:
        answers.extend(vlm.generate([source.load(i) for i in range(s, min(s + batch_size,
                                                                          source.n))], prompt))
    return answers


# -- stages 2, 3 and the answers in one pass over the images -----------------------------


def _cells(cache: ResidualCache, stream: list[int], tail: list[int]) -> ResidualCache:
    """``cache`` (every prompt position of one prompt) at ``stream`` and the positions
    ``tail`` counted from the end only: what a target capture of those cells gives."""
    s_idx = [cache.stream_index(s) for s in stream]
    slots = [cache.n_positions + t for t in tail]  # one prompt: the same slots in every row
    return ResidualCache(
        states=cache.states[:, s_idx][:, :, slots], positions=cache.positions[:, slots],
        tokens=[[row[j] for j in slots] for row in cache.tokens], image_span=cache.image_span,
        stream=list(stream), image_ids=list(cache.image_ids), prompts=list(cache.prompts),
        meta=dict(cache.meta), vision=cache.vision)


def shared_pass(vlm: VLM, images, criteria: list[Criterion],
                keywords: Mapping[str | None, Keywords], sample: np.ndarray, *,
                tau: float = 0.2, seed: int = 0, space: str = "probs", batch_size: int = 8,
                vision: bool = True, answers: bool = True, progress: bool = True,
                timings: dict[str, float] | None = None):
    """Stages 2 and 3 and the Output baseline's answers, every criterion, each image passed
    through the model once (:mod:`~esmc_lens.residual.shared_prefix`).

    The sampled images run first, at every layer and prompt position with each criterion's
    keyword lens (Algorithm 1 picks every target from them); the others then run at the
    targets' cells only; both passes generate the answers from the same prefill. Returns
    ``(localized, embedded, answers)`` as :func:`localize_criteria`,
    :func:`embed_criteria` and :func:`generate_answers` per criterion would. ``timings``, if
    given, receives the seconds of the sampled images' pass (``"localize"``) and of the
    others' (``"capture"``), the answers' generation included in both.
    """
    t0 = time.perf_counter()
    source = ImageSource.of(images)
    key = {c.name: c.name if c.name is not None else "criterion" for c in criteria}
    prompts = {key[c.name]: c.prompt for c in criteria}
    split = split_criteria(vlm, prompts, source.load(int(sample[0])))
    cap = ANSWER_MAX_TOKENS if answers else 0
    common = dict(split=split, vision=vision, answer_tokens=cap, batch_size=batch_size,
                  store_dtype=torch.float32, progress=progress)
    loc_cc = capture_criteria(vlm, [source.load(int(i)) for i in sample], prompts,
                              keywords={key[c.name]: keywords[c.name].words for c in criteria},
                              image_ids=[source.ids[int(i)] for i in sample], **common)
    localized, tails = {}, {}
    for c in criteria:
        cache = loc_cc.caches[key[c.name]]
        loc = _localize_checked(cache, c, tau, len(sample), seed)
        localized[c.name] = (cache, loc)
        tails[c.name] = target_tail_positions(cache, loc.targets)
    stream = sorted({s for c in criteria for s, _ in localized[c.name][1].targets})
    t1 = time.perf_counter()
    rest = np.setdiff1d(np.arange(source.n), sample)
    rest_cc = None
    if rest.size:
        rest_cc = capture_criteria(
            vlm, ImageSource(int(rest.size), [source.ids[int(i)] for i in rest],
                             lambda j: source.load(int(rest[j]))),
            prompts, positions={key[c.name]: tails[c.name][0] for c in criteria},
            layers=stream, **common)
    if timings is not None:
        timings.update(localize=t1 - t0, capture=time.perf_counter() - t1)
    order = np.argsort(np.concatenate([sample, rest]), kind="stable")  # back to input order
    unembed = Unembed.from_model(vlm)
    embedded, answer_lists = {}, {}
    for c in criteria:
        loc_cache, loc = localized[c.name]
        tail, slots = tails[c.name]
        parts = [_cells(loc_cache, stream, tail)]
        got = [loc_cc.answers[key[c.name]]] if answers else []
        if rest_cc is not None:
            parts.append(rest_cc.caches[key[c.name]])
            got += [rest_cc.answers[key[c.name]]] if answers else []
        cache = ResidualCache.concat(parts).select(order)
        cache.meta = dict(rest_cc.caches[key[c.name]].meta if rest_cc else loc_cache.meta)
        embedded[c.name] = criterion_embedding(cache, tail, slots,
                                               target_labels(loc_cache, loc.targets), space,
                                               unembed)
        if answers:
            flat = [a for part in got for a in part]
            answer_lists[c.name] = [flat[i] for i in order]
    return localized, embedded, (answer_lists if answers else None)


# -- stage 4: clustering -----------------------------------------------------------------


def cluster_criterion(X: np.ndarray, y: np.ndarray | None, n_clusters: int, *, alpha: float,
                      seeds: Sequence[int], epochs: int = 100, head_lr: float = 1e-3,
                      head_basis: str = "auto", head_optimizer: str = "neuron-adam",
                      baselines: bool = True,
                      answers: Sequence[str] | None = None,
                      vision: ResidualCache | None = None, progress: bool = True
                      ) -> tuple[dict[str, pd.DataFrame], np.ndarray]:
    """``({method: per-seed scores}, labels [n_images] of the first seed)``.

    ESMC is the head on ``X``; the baselines (with labels) are k-means on the same ``X``
    ("ESMC w/o head"), the Output baseline on ``answers`` and k-means on what the vision
    side of the model gives its language model (``vision``: a capture with ``vision=True``;
    :func:`~esmc_lens.cluster.baselines.vision_baselines` names each variant's inputs).
    Without labels every score is computed against a constant labelling and not reported.
    """
    y_eval = y if y is not None else np.zeros(X.shape[0], dtype=int)
    per_seed: dict[str, pd.DataFrame] = {}
    df, labels = head_scores(X, y_eval, n_clusters, alpha, seeds=seeds, return_labels=True,
                             epochs=epochs, lr=head_lr, basis=head_basis,
                             optimizer=head_optimizer, progress=progress)
    per_seed["ESMC"] = df
    if baselines and y is not None:
        bar = (lambda name: f"{name} (seeds)") if progress else (lambda name: False)
        per_seed["ESMC w/o head"] = kmeans_scores(X, y, n_clusters, seeds=seeds,
                                                  progress=bar("k-means"))
        if answers is not None:
            per_seed["Output"] = output_baseline(list(answers), y, n_clusters, seeds=seeds,
                                                 progress=bar("Output"))
        if vision is not None and vision.vision is not None:
            per_seed.update(vision_baselines(vision, y, n_clusters, seeds=seeds,
                                             progress=bar("vision only")))
    return per_seed, np.asarray(labels[0])


# -- the whole run -----------------------------------------------------------------------


def run_esmc(
    vlm: VLM,
    images,
    prompt: str | Mapping[str, str],
    *,
    n_clusters: int | Mapping[str, int] | None = None,
    criterion: str | None = None,
    y_true=None,
    class_names: list[str] | None = None,
    keywords=None,
    keyword_source: str = "auto",
    alpha: float = 0.3,
    tau: float = 0.2,
    n_samples: int = 10,
    space: str = "probs",
    seed: int = 0,
    n_seeds: int = 10,
    epochs: int = 100,
    head_lr: float = 1e-3,
    head_basis: str = "auto",
    head_optimizer: str = "neuron-adam",
    baselines: bool = True,
    batch_size: int = 8,
    progress: bool = True,
    cache_dir: str | Path | None = None,
    one_pass: bool = True,
) -> EsmcResult | MultiResult:
    """Run ESMC on ``images`` for one criterion prompt or several (see the module docstring).

    ``images``: an :class:`~esmc_lens.data.dataset.ImageDataset` (labels from each
    criterion's name), PIL images or paths (labels from ``y_true`` if any, one criterion).
    ``prompt``: a prompt, or a mapping criterion name -> prompt (then a
    :class:`~esmc_lens.report.result.MultiResult`). ``n_clusters`` defaults to the number of
    classes when labels exist (a mapping gives one per criterion). ``keywords``: a list, or
    a mapping criterion name -> list; none: the LM's (``keyword_source="auto"``).
    ``cache_dir``: keep the captures on disk there, so an interrupted run resumes.
    ``head_basis``, ``head_optimizer``: :class:`~esmc_lens.cluster.head.PseudoLabelHead`'s
    ``basis`` ("features": the |V|-space head, "span": the same head in n dimensions) and
    ``optimizer`` ("neuron-adam", or "adam": the published code's per-weight Adam, which runs
    on the features only).

    Every criterion is captured in one pass over the images (:func:`shared_pass`), the
    answers of the Output baseline generated from the same prefill, unless the model's family
    cannot share a prefix, ``cache_dir`` is set or ``one_pass=False``: then each criterion
    has its own captures and ``generate`` (``settings["one_pass_why_not"]`` says which). The
    two paths agree to float rounding, not bit for bit (a KV-cache continuation is another
    sequence of matrix products than one forward pass).
    """
    check_api_inputs(vlm, images, prompt, criterion=criterion, y_true=y_true,
                     class_names=class_names, keywords=keywords, keyword_source=keyword_source,
                     space=space, cache_dir=cache_dir, baselines=baselines, progress=progress,
                     n_clusters=n_clusters, alpha=alpha, tau=tau, n_samples=n_samples,
                     batch_size=batch_size, n_seeds=n_seeds, epochs=epochs, seed=seed,
                     head_lr=head_lr)
    check_head_options(head_basis, head_optimizer)
    t0 = time.perf_counter()
    criteria = as_criteria(prompt, criterion)
    if y_true is not None and len(criteria) > 1:
        raise ConfigError("y_true labels one criterion; with several, pass an ImageDataset "
                          "whose criterion folders label the images")
    source = ImageSource.of(images)
    labels_of, ks = {}, {}
    k_per = _per_criterion(n_clusters, criteria, "n_clusters")
    for c in criteria:
        check_run(vlm, images, c.prompt, criterion=c.name, n_images=source.n,
                  n_clusters=k_per[c.name], alpha=alpha, tau=tau, n_samples=n_samples,
                  batch_size=batch_size, n_seeds=n_seeds, epochs=epochs)
        labels_of[c.name] = labels_for(images, c.name, y_true, class_names)
        k = k_per[c.name]
        if k is None:
            y, names = labels_of[c.name]
            if y is None or names is None:
                raise ConfigError("n_clusters is needed when the images have no labels (--k K)")
            k = len(names)
        if not 2 <= k <= source.n:
            raise ConfigError(f"n_clusters={k}: need 2 <= k <= {source.n} (the number of "
                              "images)")
        ks[c.name] = k
    kws = select_keywords(vlm, criteria, keywords, images, keyword_source)
    t_kw = time.perf_counter() - t0

    sample = localization_sample(source.n, n_samples, seed)
    want_answers = baselines and any(labels_of[c.name][0] is not None for c in criteria)
    # One pass over the images for every criterion, unless asked not to, the captures are
    # to be kept on disk (the per-criterion path resumes from there) or the model cannot
    # share a prefix.
    why_not = ("one_pass=False" if not one_pass
               else "cache_dir is set" if cache_dir is not None else shares_prefix(vlm))
    t = time.perf_counter()
    if why_not is None:
        split_t: dict[str, float] = {}
        localized, embedded, shared_answers = shared_pass(
            vlm, images, criteria, kws, sample, tau=tau, seed=seed, space=space,
            batch_size=batch_size, vision=baselines, answers=want_answers,
            progress=progress, timings=split_t)
        t_loc, t_emb = split_t["localize"], split_t["capture"]
    else:
        localized = localize_criteria(vlm, images, criteria, kws, sample, tau=tau, seed=seed,
                                      batch_size=batch_size, cache_dir=cache_dir,
                                      progress=progress)
        t_loc = time.perf_counter() - t
        t = time.perf_counter()
        embedded = embed_criteria(vlm, images, criteria, localized, space=space,
                                  batch_size=batch_size, vision=baselines, cache_dir=cache_dir,
                                  progress=progress)
        t_emb = time.perf_counter() - t

    seeds = list(range(seed, seed + n_seeds))
    results = {}
    for c in criteria:
        t = time.perf_counter()
        emb, (_, loc), kw = embedded[c.name], localized[c.name], kws[c.name]
        y, names = labels_of[c.name]
        answers = None
        if baselines and y is not None:
            answers = (shared_answers[c.name] if why_not is None else
                       generate_answers(vlm, images, c.prompt, batch_size, progress))
        t_ans = time.perf_counter() - t
        t = time.perf_counter()
        per_seed, labels = cluster_criterion(
            emb.X, y, ks[c.name], alpha=alpha, seeds=seeds, epochs=epochs, head_lr=head_lr,
            head_basis=head_basis, head_optimizer=head_optimizer, baselines=baselines,
            answers=answers, vision=emb.cache, progress=progress)
        clusters = name_clusters(emb.vocab, labels, vlm.tokenizer, keywords=kw.words,
                                 keyword_groups=keyword_token_ids(vlm.tokenizer, kw.words),
                                 y_true=y, class_names=names)
        results[c.name] = EsmcResult(
            model=vlm.name, criterion=c.name, prompt=c.prompt,
            image_ids=list(emb.cache.image_ids), labels=labels, clusters=clusters,
            scores=score_table(per_seed) if y is not None else pd.DataFrame(),
            per_seed=per_seed, target=[tuple(x) for x in loc.targets],
            target_positions=emb.cells, target_labels=emb.labels, space=space, keywords=kw,
            localization=loc, y_true=y, class_names=names, answers=answers,
            # per criterion: a stage run once for all criteria is split evenly between them
            timings={"keywords": t_kw / len(criteria), "localize": t_loc / len(criteria),
                     "capture": t_emb / len(criteria), "answers": t_ans,
                     "cluster": time.perf_counter() - t},
            settings={"n_clusters": ks[c.name], "alpha": alpha, "tau": tau,
                      "n_samples": n_samples, "seed": seed, "n_seeds": n_seeds,
                      "epochs": epochs, "head_lr": head_lr, "space": space,
                      "keyword_source": keyword_source, "head_basis": head_basis,
                      "head_optimizer": head_optimizer,
                      # one pass over the images for all criteria, or why not
                      "one_pass": why_not is None, "one_pass_why_not": why_not,
                      # dataset indices of the images Algorithm 1 sampled
                      "localization_sample": [int(sample[i]) for i in loc.sample]},
            meta={k: v for k, v in emb.cache.meta.items() if k != "chat_template"},
        )
    if isinstance(prompt, Mapping):
        return MultiResult(results)
    return results[criteria[0].name]
