"""ESMC end to end: images -> capture -> lens -> localize -> cluster -> report.

>>> vlm = load_model("offline")                                            # doctest: +SKIP
>>> ds = load_dataset("../shared/data/esmc/flower")                         # doctest: +SKIP
>>> res = run_esmc(vlm, ds, "The color of the flower is", criterion="color")  # doctest: +SKIP
>>> res.scores                 # ESMC and its baselines, mean ± std over seeds  # doctest: +SKIP
>>> res.clusters               # each cluster named by the lens                  # doctest: +SKIP
>>> res.save("outputs/flower-color")                                        # doctest: +SKIP

Two passes over the model, as the paper's section 3.1 intends:

1. *localization*: ``n_samples`` sampled images are captured at every layer and prompt
   position with the keywords' lens probabilities (Algorithm 1 picks the target cells);
2. *embedding*: every image is captured only at the target layer(s) and position(s) (the
   trace stops after the deepest target layer), plus the vision encoder's pooled feature for
   the vision-only baseline.

The target embedding (``space``: lens probabilities, ``"probs"``, by default: the paper's
vocabulary space, |V| dimensions, "after applying the softmax function to embedding
logits" as its section 4.3 reads; ``"logits"`` and ``"hidden"`` are available) is
clustered by :class:`~esmc_lens.cluster.head.PseudoLabelHead` (Algorithm 2). Scores of every method
are the mean and std over ``n_seeds`` seeds; ``labels`` are those of ``seed``.
"""

from __future__ import annotations

import time
import warnings
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
from .data.dataset import ImageDataset
from .data.source import ImageSource
from .errors import ConfigError, EsmcWarning
from .lens.keyword_rule import keyword_token_ids
from .lens.unembed import Unembed
from .localization.keywords import choose_keywords
from .localization.targets import target_embeddings, target_labels
from .localization.votes import localize
from .models.vlm import VLM
from .report.naming import name_clusters
from .report.result import EsmcResult
from .residual.capture import capture
from .validate import check_finite, check_run, keyword_notes


def _labels_for(images, criterion: str | None, y_true, class_names):
    if y_true is not None:
        return np.asarray(y_true), class_names
    if isinstance(images, ImageDataset) and criterion is not None:
        if criterion not in images.criteria:
            raise ConfigError(f"criterion {criterion!r} is not in {images.root}; its criteria "
                              f"are {images.criteria}")
        return images.y(criterion), list(images.classes[criterion])
    return None, class_names


def capture_fn(cache_dir: str | Path | None):
    """:func:`~esmc_lens.residual.capture.capture`, or its disk-cached form if ``cache_dir``."""
    if cache_dir is None:
        return capture
    from .residual.store import cached_capture

    return partial(cached_capture, cache_dir=cache_dir)


def capture_target_cells(vlm: VLM, images, prompt: str, positions: list[int],
                         layers: list[int], *, cache_dir: str | Path | None = None,
                         batch_size: int = 8, vision: bool = True, progress: bool = True):
    """Every image at the target cells only: :func:`run_esmc`'s second capture.

    ``positions`` are sequence positions, ``layers`` stream indices; states are kept in fp32.
    Anything that recaptures a run's targets (e.g.
    :func:`esmc_lens.report.diagnose.readout_for_run`)
    goes through here, so with the run's ``cache_dir`` its batches are read back, not
    recomputed.
    """
    return capture_fn(cache_dir)(vlm, images, prompt, positions=positions, layers=layers,
                                 batch_size=batch_size, vision=vision,
                                 store_dtype=torch.float32, progress=progress)


def run_esmc(
    vlm: VLM,
    images,
    prompt: str,
    *,
    n_clusters: int | None = None,
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
    baselines: bool = True,
    batch_size: int = 8,
    answer_tokens: int = 8,
    progress: bool = True,
    cache_dir: str | Path | None = None,
) -> EsmcResult:
    """Run ESMC on ``images`` for the criterion ``prompt`` (see the module docstring).

    ``images``: an :class:`~esmc_lens.data.dataset.ImageDataset` (labels from ``criterion``),
    PIL images or paths (labels from ``y_true`` if any). ``n_clusters`` defaults to the
    number of classes when labels exist. ``cache_dir``: keep both captures on disk there
    (:func:`~esmc_lens.residual.store.cached_capture`), so an interrupted run resumes.
    """
    timings: dict[str, float] = {}
    t = time.perf_counter()
    source = ImageSource.of(images)
    check_run(vlm, images, prompt, criterion=criterion, n_images=source.n, n_clusters=n_clusters,
              alpha=alpha, tau=tau, n_samples=n_samples, batch_size=batch_size,
              n_seeds=n_seeds, epochs=epochs)
    y, class_names = _labels_for(images, criterion, y_true, class_names)
    if n_clusters is None:
        if y is None or class_names is None:
            raise ConfigError("n_clusters is needed when the images have no labels "
                              "(--k K)")
        n_clusters = len(class_names)
    if not 2 <= n_clusters <= source.n:
        raise ConfigError(f"n_clusters={n_clusters}: need 2 <= k <= {source.n} (the number "
                          "of images)")
    if not 0 < alpha <= 1:
        raise ConfigError(f"alpha={alpha}: the pseudo-label ratio must be in (0, 1]")
    kw = choose_keywords(vlm, prompt, keywords, images, criterion, keyword_source)
    for note in keyword_notes(vlm.tokenizer, kw.words):
        warnings.warn(note, EsmcWarning, stacklevel=2)
    cap = capture_fn(cache_dir)
    timings["keywords"] = time.perf_counter() - t

    # 1. localization on sampled images: every layer, every prompt position.
    t = time.perf_counter()
    rng = np.random.default_rng(seed)
    sample = np.sort(rng.choice(source.n, size=min(n_samples, source.n), replace=False))
    sample_imgs = [source.load(int(i)) for i in sample]
    loc_cache = cap(vlm, sample_imgs, prompt, keywords=kw.words, batch_size=batch_size,
                    image_ids=[source.ids[i] for i in sample], progress=progress)
    check_finite(loc_cache.keyword_probs.reshape(len(loc_cache), -1).numpy(),
                 loc_cache.image_ids, "lens keyword probabilities")
    loc = localize(loc_cache, tau=tau, n_samples=len(sample), seed=seed)
    if not loc.found:
        warnings.warn(loc.message, EsmcWarning, stacklevel=2)
    timings["localize"] = time.perf_counter() - t

    # 2. every image at the target cells only.
    t = time.perf_counter()
    seq = sorted({int(loc_cache.positions[0, p]) for _, p in loc.targets})
    cache = capture_target_cells(vlm, images, prompt, seq, sorted({s for s, _ in loc.targets}),
                                 cache_dir=cache_dir, batch_size=batch_size, vision=baselines,
                                 progress=progress)
    targets = [(s, seq.index(int(loc_cache.positions[0, p]))) for s, p in loc.targets]
    unembed = Unembed.from_model(vlm)
    X = target_embeddings(cache, targets, space=space, unembed=unembed)
    check_finite(X, cache.image_ids, "target embeddings")
    timings["capture"] = time.perf_counter() - t

    # 3. cluster: the reported labels are seed ``seed``; scores are over n_seeds seeds.
    t = time.perf_counter()
    seeds = list(range(seed, seed + n_seeds))
    per_seed: dict[str, pd.DataFrame] = {}
    y_eval = y if y is not None else np.zeros(source.n, dtype=int)
    esmc_df, esmc_labels = head_scores(X, y_eval, n_clusters, alpha, seeds=seeds,
                                       return_labels=True, epochs=epochs, lr=head_lr)
    labels = np.asarray(esmc_labels[0])
    per_seed["ESMC"] = esmc_df
    timings["cluster"] = time.perf_counter() - t

    answers = None
    if baselines and y is not None:
        t = time.perf_counter()
        per_seed["ESMC w/o head"] = kmeans_scores(X, y, n_clusters, seeds=seeds)
        answers = []
        for s in range(0, source.n, batch_size):
            batch = [source.load(i) for i in range(s, min(s + batch_size, source.n))]
            answers.extend(vlm.generate(batch, prompt, max_new_tokens=answer_tokens))
        per_seed["Output"] = output_baseline(answers, y, n_clusters, seeds=seeds)
        per_seed.update(vision_baselines(cache, y, n_clusters, seeds=seeds))
        timings["baselines"] = time.perf_counter() - t
    scores = score_table(per_seed) if y is not None else pd.DataFrame()

    # 4. explain: name each cluster by the lens of its mean vocabulary-space vector.
    vocab = X if space != "hidden" else target_embeddings(cache, targets, "logits", unembed)
    if len(targets) > 1:  # name by the first target's vocabulary block
        vocab = vocab[:, : unembed.vocab_size]
    clusters = name_clusters(vocab, labels, vlm.tokenizer, keywords=kw.words,
                             keyword_groups=keyword_token_ids(vlm.tokenizer, kw.words),
                             y_true=y, class_names=class_names)
    return EsmcResult(
        model=vlm.name, criterion=criterion, prompt=prompt, image_ids=list(cache.image_ids),
        labels=labels, clusters=clusters, scores=scores, per_seed=per_seed,
        target=[tuple(x) for x in loc.targets],
        target_labels=target_labels(loc_cache, loc.targets), space=space, keywords=kw,
        localization=loc, y_true=y, class_names=class_names, answers=answers,
        timings=timings,
        settings={"n_clusters": n_clusters, "alpha": alpha, "tau": tau,
                  "n_samples": n_samples, "seed": seed, "n_seeds": n_seeds,
                  "epochs": epochs, "head_lr": head_lr, "space": space,
                  "keyword_source": keyword_source,
                  # dataset indices of the images Algorithm 1 sampled
                  "localization_sample": [int(sample[i]) for i in loc.sample]},
        meta={k: v for k, v in cache.meta.items() if k != "chat_template"},
    )
