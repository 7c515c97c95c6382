"""Name clusters in words: the explainable part of ESMC (paper Figures 4-5).

The target embeddings live in vocabulary space, so each cluster can be read as words:

* ``top_tokens``: the most probable tokens of the cluster's mean lens distribution;
* ``name``: the criterion keyword most *enriched* in the cluster (rule below), or the top
  token when no keywords are given.

Naming rule
-----------
For keyword ``k`` (its lens probability per image is the sum over its token group, the
rule of :func:`esmc_lens.lens.keyword_rule.keyword_token_ids`), the enrichment in cluster ``c`` is::

    enrichment(k, c) = mean_{i in c} p_k(i) - mean_{i not in c} p_k(i)

and ``name(c) = argmax_k enrichment(k, c)`` (first keyword on ties). A keyword that is
probable everywhere ("the") is not enriched anywhere; one that is probable only inside the
cluster is. With a single cluster the outside mean is taken as 0. Two clusters may get the
same name; that is reported, not hidden.

>>> feats = target_embeddings(cache, loc, space="logits", unembed=unembed)     # doctest: +SKIP
>>> df = name_clusters(feats, labels, vlm.tokenizer, keywords=kw, y_true=y,
...                    class_names=ds.classes["color"])                          # doctest: +SKIP
>>> naming_accuracy(df)                                                          # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError
from ..lens.keyword_rule import KeywordTokens, keyword_token_ids
from ..lens.tokens import decode_each
from ..residual.cache import strip_token

__all__ = ["as_probs", "clean_token", "name_clusters", "naming_accuracy"]


def clean_token(tokenizer, token_id: int) -> str:
    """A token as a lower-case word ("" for whitespace/punctuation-only tokens)."""
    word = strip_token(decode_each(tokenizer, [token_id])[0])
    return word if any(ch.isalnum() for ch in word) else ""


def as_probs(features: np.ndarray, space: str = "auto") -> np.ndarray:
    """Rows of ``features`` [n, V] as probability vectors (float32).

    ``space``: "probs" (used as is), "logits" (softmax), or "auto": probabilities if every
    row is non-negative and sums to 1 (within 1e-3), else logits.
    """
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ConfigError(f"features must be [n_images, vocab], got shape {x.shape}")
    if space == "auto":
        space = ("probs" if (x >= 0).all() and np.allclose(x.sum(1), 1, atol=1e-3)
                 else "logits")
    if space == "probs":
        return x
    if space == "logits":
        return torch.softmax(torch.from_numpy(x), dim=-1).numpy()
    raise ConfigError(f"space={space!r}: use 'auto', 'logits' or 'probs' (hidden states "
                      "cannot be named: they are not in vocabulary space)")


def _top_words(tokenizer, mean: np.ndarray, top: int) -> list[tuple[str, float]]:
    """Top ``top`` words of a distribution; variants (" Red", "red") summed into one word."""
    words: dict[str, float] = {}
    order = np.argsort(-mean, kind="stable")
    # Enough candidates for ``top`` distinct words after dropping punctuation and merging.
    for tid in order[: max(50, 20 * top)]:
        w = clean_token(tokenizer, int(tid))
        if w:
            words[w] = words.get(w, 0.0) + float(mean[tid])
    return sorted(words.items(), key=lambda kv: -kv[1])[:top]


def name_clusters(
    features_vocab: np.ndarray,
    labels: np.ndarray,
    tokenizer,
    keywords: Sequence[str] | None = None,
    keyword_groups: KeywordTokens | Sequence[Sequence[int]] | None = None,
    top: int = 5,
    y_true: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
    space: str = "auto",
) -> pd.DataFrame:
    """One row per cluster: its size, name, top lens words and (with labels) purity.

    Parameters
    ----------
    features_vocab : array [n_images, V]
        Target embeddings in vocabulary space, lens logits or probabilities
        (``space``: "auto" detects which).
    labels : int array [n_images]
        Cluster of each image.
    tokenizer : the model's tokenizer (decodes token ids; builds keyword groups).
    keywords : list of str, optional
        Candidate names (criterion keywords); without them the name is the top word.
    keyword_groups : ``KeywordTokens`` or list of token-id lists, optional
        Token ids scoring each keyword (default: ``keyword_token_ids(tokenizer, keywords)``).
    top : int
        Number of ``top_tokens`` per cluster.
    y_true : int array [n_images], optional
        Ground-truth class codes (``-1`` = unlabelled, ignored for purity).
    class_names : list of str, optional
        Names of the ``y_true`` codes (for ``majority_label``).

    Returns
    -------
    DataFrame [n_clusters rows], columns
        ``cluster``, ``size``, ``name``, ``name_enrichment`` (NaN without keywords),
        ``top_tokens`` (list of str), ``top_probs`` (list of float, summed over a word's
        token variants), ``enriched_keywords`` (top 3 ``(keyword, enrichment)``), and
        with ``y_true``: ``majority_label``, ``purity`` (majority share of the labelled
        members), ``name_matches_majority`` (case-insensitive equality).
    """
    probs = as_probs(features_vocab, space)
    labels = np.asarray(labels)
    if labels.shape != (probs.shape[0],):
        raise ConfigError(f"labels has shape {labels.shape}, expected ({probs.shape[0]},): "
                          "one cluster label per image")
    if top < 1:
        raise ConfigError(f"top={top} must be >= 1")
    kw_probs = None
    if keywords is not None and len(keywords):
        keywords = [str(k).strip() for k in keywords]
        if keyword_groups is None:
            keyword_groups = keyword_token_ids(tokenizer, keywords)
        groups = getattr(keyword_groups, "groups", keyword_groups)
        if len(groups) != len(keywords):
            raise ConfigError(f"{len(groups)} keyword groups for {len(keywords)} keywords")
        kw_probs = np.stack([probs[:, list(g)].sum(1) for g in groups], axis=1)  # [n, K]
    if y_true is not None:
        y_true = np.asarray(y_true)
        if y_true.shape != labels.shape:
            raise ConfigError(f"y_true has shape {y_true.shape}, labels {labels.shape}")

    rows = []
    for c in np.unique(labels):
        inside = labels == c
        row: dict = {"cluster": c.item(), "size": int(inside.sum())}
        tops = _top_words(tokenizer, probs[inside].mean(0), top)
        row["top_tokens"] = [w for w, _ in tops]
        row["top_probs"] = [p for _, p in tops]
        if kw_probs is not None:
            out_mean = kw_probs[~inside].mean(0) if (~inside).any() else 0.0
            enr = kw_probs[inside].mean(0) - out_mean  # [K]
            order = np.argsort(-enr, kind="stable")
            row["name"] = keywords[order[0]]
            row["name_enrichment"] = float(enr[order[0]])
            row["enriched_keywords"] = [(keywords[j], float(enr[j])) for j in order[:3]]
        else:
            row["name"] = row["top_tokens"][0] if row["top_tokens"] else ""
            row["name_enrichment"] = np.nan
            row["enriched_keywords"] = []
        if y_true is not None:
            ys = y_true[inside]
            ys = ys[ys >= 0] if np.issubdtype(ys.dtype, np.integer) else ys
            if len(ys):
                vals, counts = np.unique(ys, return_counts=True)
                maj = vals[np.argmax(counts)]
                label = (class_names[int(maj)] if class_names is not None else maj.item())
                row["majority_label"] = label
                row["purity"] = float(counts.max() / len(ys))
                row["name_matches_majority"] = (str(row["name"]).strip().lower()
                                                == str(label).strip().lower())
            else:
                row.update(majority_label=None, purity=np.nan, name_matches_majority=False)
        rows.append(row)
    cols = ["cluster", "size", "name", "name_enrichment", "top_tokens", "top_probs",
            "enriched_keywords"]
    if y_true is not None:
        cols += ["majority_label", "purity", "name_matches_majority"]
    return pd.DataFrame(rows, columns=cols)


def naming_accuracy(df: pd.DataFrame) -> float:
    """Fraction of images (cluster sizes as weights) whose cluster's name is its majority label.

    Needs the ``name_matches_majority`` column (call :func:`name_clusters` with ``y_true``).
    """
    if "name_matches_majority" not in df.columns:
        raise ConfigError("naming_accuracy needs name_clusters(..., y_true=...) output "
                          "(column 'name_matches_majority')")
    size = df["size"].to_numpy(dtype=np.float64)
    if size.sum() == 0:
        raise ConfigError("no images in the clusters")
    return float((size * df["name_matches_majority"].to_numpy(dtype=bool)).sum() / size.sum())
