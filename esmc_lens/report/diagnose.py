"""Why ESMC does or does not beat its baselines: what the lens says at the target.

ESMC clusters the vocabulary-space vector at the target cell. If the model itself does not
tell the classes apart there, no clustering of that vector can. :func:`lens_readout` reads
the target the way a person would: for every image, which class name gets the highest lens
probability. Its NMI against the labels is a ceiling-like reference for the embedding (not a
strict bound: the head and k-means use all |V| coordinates, not only the class words), and
its cross-table shows which classes the model confuses.

>>> res = EsmcResult.load("outputs/flower-color")                       # doctest: +SKIP
>>> r = readout_for_run(vlm, load_dataset("flower"), res, cache_dir="outputs/capture-cache")
>>> r.nmi, r.crosstab                                                    # doctest: +SKIP
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..cluster.metrics import accuracy, nmi
from ..errors import ConfigError, EsmcWarning
from ..lens.keyword_rule import keyword_token_ids, split_scorable
from ..lens.tokens import decode_each
from ..lens.unembed import Unembed
from ..localization.targets import target_embeddings
from ..pipeline import capture_target_cells
from .naming import as_probs

__all__ = ["ClassWordReadout", "lens_readout", "readout_for_run"]


@dataclass
class ClassWordReadout:
    """The class word the lens favours at the target, per image, against the labels.

    words : the class names the lens can read (the keyword rule scores them), in
        ``class_names`` order.
    unread : the class names it cannot (no token scores them): their images are counted
        in ``crosstab``'s rows and can never be read right.
    read : int [n_images], code into ``class_names`` of each image's most probable readable
        class word.
    crosstab : DataFrame, true class (rows) x class word read (columns), counts.
    nmi, acc : the readout scored against the labels (unlabelled images left out).
    class_mass : mean total probability of all class words (how much the lens is about
        the criterion at all; near 0 means the target says something else).
    top_tokens : DataFrame of the most frequent top-1 lens tokens over the images.
    """

    words: list[str]
    unread: list[str]
    read: np.ndarray
    crosstab: pd.DataFrame
    nmi: float
    acc: float
    class_mass: float
    top_tokens: pd.DataFrame


def _readable(tokenizer, class_names) -> tuple[list[str], list[str]]:
    """``(readable, unread)`` class names under the keyword rule; none readable: an error."""
    words, unread = split_scorable(tokenizer, list(class_names))
    if not words:
        raise ConfigError(f"no class name of {list(class_names)} can be scored by the lens "
                          "(esmc_lens.lens.keyword_rule): there is nothing to read")
    return words, unread


def lens_readout(features_vocab: np.ndarray, tokenizer, class_names: list[str],
                 y_true: np.ndarray, n_top: int = 8) -> ClassWordReadout:
    """Score the lens's own reading of the target against the labels.

    features_vocab : [n_images, |V|] lens logits or probabilities at the target cell.
    class_names : the criterion's class names (each scored by the keyword rule of
        :func:`~esmc_lens.lens.keyword_rule.keyword_token_ids`: its surface forms' first tokens,
        summed).
    y_true : int [n_images] class codes into ``class_names`` (-1 = unlabelled).
    """
    P = as_probs(features_vocab).astype(np.float64)
    y = np.asarray(y_true)
    if P.shape[0] != y.shape[0]:
        raise ConfigError(f"{P.shape[0]} vectors for {y.shape[0]} labels")
    words, unread = _readable(tokenizer, class_names)
    if unread:
        warnings.warn(f"class names {unread} cannot be scored by the lens (keyword rule): "
                      "their images count as misread", EsmcWarning, stacklevel=2)
    groups = keyword_token_ids(tokenizer, words).groups
    mass = np.stack([P[:, g].sum(axis=1) for g in groups], axis=1)  # [n, readable classes]
    names = np.asarray(class_names, dtype=object)
    # codes into class_names, so that the readout is scored against the labels' own codes
    read = np.asarray([list(class_names).index(w) for w in words])[mass.argmax(axis=1)]
    seen = y >= 0
    crosstab = pd.crosstab(pd.Categorical(names[y[seen]], categories=class_names),
                           pd.Categorical(names[read[seen]], categories=words),
                           rownames=["true"], colnames=["lens reads"], dropna=False)
    top, counts = np.unique(P.argmax(axis=1), return_counts=True)
    order = np.argsort(-counts, kind="stable")[:n_top]
    top_tokens = pd.DataFrame({"token": decode_each(tokenizer, top[order]),
                               "images": counts[order]})
    return ClassWordReadout(words=words, unread=unread, read=read, crosstab=crosstab,
                       nmi=nmi(y[seen], read[seen]), acc=accuracy(y[seen], read[seen]),
                       class_mass=float(mass.sum(axis=1).mean()), top_tokens=top_tokens)


def readout_for_run(vlm, dataset, result, cache_dir: str | Path | None = None,
                    batch_size: int = 8, progress: bool = True) -> ClassWordReadout:
    """:func:`lens_readout` at a saved run's first target, on the run's own images.

    Recaptures the target cell exactly as :func:`~esmc_lens.pipeline.run_esmc` did (with
    baselines on), so with the run's ``cache_dir`` (``esmc-lens run --cache-dir``) nothing is
    recomputed.
    """
    if result.y_true is None or result.class_names is None:
        raise ConfigError("the run has no labels: a readout needs the criterion's classes")
    _readable(vlm.tokenizer, result.class_names)  # before the capture, not after
    positions = [p for _, p in result.target_positions]  # from the sequence's end
    seq = sorted(set(positions))
    cache = capture_target_cells(vlm, dataset, result.prompt, seq,
                                 sorted({s for s, _ in result.target}), cache_dir=cache_dir,
                                 batch_size=batch_size, vision=True, progress=progress)
    if list(cache.image_ids) != list(result.image_ids):
        raise ConfigError("the dataset's images differ from the run's; pass the run's data")
    s, _ = result.target[0]
    cell = (s, seq.index(positions[0]))
    X = target_embeddings(cache, [cell], space="logits", unembed=Unembed.from_model(vlm))
    return lens_readout(X, vlm.tokenizer, list(result.class_names), result.y_true)
