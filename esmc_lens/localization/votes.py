"""Keyword-vote localization of the target embedding (paper §3.1, Algorithm 1), vectorised.

For a few sampled images and the criterion keywords, every (layer, position) cell of the
residual stream gets one vote per (image, keyword) pair whose logit-lens probability is
strictly above ``tau`` (0.2 in the paper). The target embeddings are the cells with the
most votes.

>>> cache = capture(vlm, images, "The color of the flower is", keywords=kw)  # doctest: +SKIP
>>> loc = localize(cache, tau=0.2, n_samples=10)                             # doctest: +SKIP
>>> print(loc.summary()); loc.votes                                          # doctest: +SKIP

Conventions
-----------
* A cell is ``(stream index, slot)``: the stream index is the value in ``cache.stream``
  (``0`` = embeddings, ``l + 1`` = output of decoder layer ``l``, i.e. HF's
  ``hidden_states[l + 1]``; labels write it ``E_s`` like the paper's ``E_27``), the slot
  is the axis-2 index of the cache's positions.
* Ties: Algorithm 1 returns the *set* of cells whose count equals the maximum, and the
  pipeline concatenates their embeddings
  (:func:`esmc_lens.localization.targets.target_embeddings`), ``|V|`` features each. Tied
  cells beyond ``max_targets`` (3) are dropped, keeping those with the highest mean keyword
  probability, with an ``EsmcWarning``: 30 ties on 533 images would otherwise be ~3 GB of
  features. ``targets`` is ordered by layer, then position; ``primary`` is the kept cell
  with the highest mean keyword probability.
* No votes: when no (image, keyword) pair is above ``tau`` anywhere, the fallback stays
  where the paper looks: the cell with the highest keyword probability among the
  criterion sentence's own tokens (:func:`criterion_slots`) in the later half of the
  layers. ``max_prob`` (the highest keyword probability over every cell) says how weak the
  evidence was; results carry it beside ``tau``.
* Empty slots (``cache.positions == -1``, prompts of different lengths) never vote.
"""

from __future__ import annotations

import numbers
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import ConfigError

__all__ = ["Localization", "cell_labels", "criterion_slots", "localize", "vote_table"]

TAU = 0.2  # the paper's "high logit" threshold (jiang2024interpreting)
N_SAMPLES = 10  # the paper's recommended sample per feature
MAX_TARGETS = 3  # tied cells kept (each adds |V| features)


def _as_numpy(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().float().cpu().numpy()
    return np.asarray(x, dtype=np.float32)


def vote_table(keyword_probs, tau: float = TAU, valid=None) -> np.ndarray:
    """Algorithm 1's vote counts.

    Parameters
    ----------
    keyword_probs : tensor or array [n_images, n_stream, n_positions, n_keywords]
        Lens probability of each keyword at each cell of each image.
    tau : float
        Threshold; a pair votes when its probability is strictly greater than ``tau``.
    valid : bool array [n_images, n_positions], optional
        False where a slot is empty for an image (such cells never vote).

    Returns
    -------
    np.ndarray of int64, [n_stream, n_positions]
        Number of (image, keyword) pairs above ``tau`` at each cell.
    """
    p = _as_numpy(keyword_probs)
    if p.ndim != 4:
        raise ConfigError(f"keyword_probs must be [images, stream, positions, keywords], got "
                          f"shape {p.shape}")
    above = p > tau  # NaN compares False: never votes
    if valid is not None:
        v = np.asarray(_as_numpy(valid) if isinstance(valid, torch.Tensor) else valid, bool)
        if v.shape != (p.shape[0], p.shape[2]):
            raise ConfigError(f"valid mask has shape {v.shape}, expected "
                              f"{(p.shape[0], p.shape[2])} (images, positions)")
        above &= v[:, None, :, None]
    return above.sum(axis=(0, 3)).astype(np.int64)


def cell_labels(cache) -> list[str]:
    """One label per position slot, unique, from the first image where the slot is filled.

    Equals ``cache.position_labels()`` when every image has the same prompt.
    """
    labels = cache.position_labels()
    pos = cache.positions
    for p in range(cache.n_positions):
        filled = (pos[:, p] >= 0).nonzero()
        if len(filled) and pos[0, p] < 0:
            labels[p] = cache.position_labels(int(filled[0, 0]))[p]
    seen: dict[str, int] = {}
    for p, lab in enumerate(labels):
        if lab in seen:  # e.g. several empty slots: keep columns unique
            labels[p] = f"{lab}#{p}"
        seen[labels[p]] = p
    return labels


_MARKERS = str.maketrans({"Ġ": " ", "▁": " ", "Ċ": "\n"})


def criterion_slots(cache, image: int = 0) -> list[int]:
    """Slots whose tokens spell the criterion prompt (image ``image``'s sequence).

    The captured tokens' text (byte-level and SentencePiece space markers turned into
    spaces) is searched for the prompt's words, any whitespace between them, case ignored;
    a slot whose token overlaps the last match is the criterion sentence's. ``[]`` when
    the prompt is not found or the cache has no prompt.
    """
    prompts = getattr(cache, "prompts", None) or []
    words = str(prompts[image]).split() if prompts else []
    if not words:
        return []
    text, spans = "", []
    for p in range(cache.n_positions):
        tok = cache.tokens[image][p] if cache.positions[image, p] >= 0 else ""
        piece = tok.translate(_MARKERS)
        spans.append((len(text), len(text) + len(piece)))
        text += piece
    matches = list(re.finditer(r"\s*".join(map(re.escape, words)), text, re.IGNORECASE))
    if not matches:
        return []
    lo, hi = matches[-1].span()
    return [p for p, (a, b) in enumerate(spans) if a < hi and b > lo]


@dataclass
class Localization:
    """Result of :func:`localize`.

    Attributes
    ----------
    votes : DataFrame [n_stream, n_positions] of int
        Votes per cell; index = stream index (named ``"layer"``), columns = position
        labels ``"seq_index:token"``.
    probs_max : DataFrame [n_stream, n_positions] of float
        Max keyword probability over the sampled images and keywords per cell (NaN where
        the slot is empty for every sampled image).
    probs_mean : DataFrame [n_stream, n_positions] of float
        Mean keyword probability over sampled images (with the slot filled) and keywords.
    targets : list of (stream index, slot)
        Every cell with ``max_votes`` votes (ties kept, by layer then slot); if no cell got
        a vote, the single cell with the highest ``probs_max`` (see ``message``).
    max_votes : int
        Votes of the targets (0 on the fallback).
    n_pairs : int
        Number of (sampled image, keyword) pairs, the most votes a cell can get.
    tau : float
    sample : np.ndarray of int [n_sampled]
        Indices (into the cache) of the sampled images, sorted.
    keywords : list of str
    message : str
        Empty when votes were found and no tie was dropped; otherwise explains the
        fallback or the dropped ties.
    max_prob : float
        Highest keyword probability at any cell of any sampled image: the strength of the
        evidence (compare with ``tau``; below it, no cell got a vote).
    n_tied : int
        Cells that tied for the most votes (``len(targets)`` unless ties were capped).
    per_keyword : DataFrame, one row per keyword
        The keyword's own best cell (most votes over sampled images, ties to the higher
        mean probability): ``layer``, ``slot``, ``position``, ``votes`` (of ``n_sampled``),
        ``mean_prob`` there.
    """

    votes: pd.DataFrame
    probs_max: pd.DataFrame
    probs_mean: pd.DataFrame
    targets: list[tuple[int, int]]
    max_votes: int
    n_pairs: int
    tau: float
    sample: np.ndarray
    keywords: list[str]
    message: str = ""
    per_keyword: pd.DataFrame = field(default_factory=pd.DataFrame)
    max_prob: float = float("nan")
    n_tied: int = 0

    @property
    def evidence(self) -> str:
        """One line: the votes of the target, or how weak the evidence was."""
        if self.found:
            return f"{self.max_votes}/{self.n_pairs} votes (max p {self.max_prob:.3f})"
        return (f"no votes: max keyword p {self.max_prob:.3f} <= tau {self.tau:g} "
                "(fallback target)")

    @property
    def found(self) -> bool:
        """True when at least one cell got a vote (targets are not a fallback)."""
        return self.max_votes > 0

    @property
    def primary(self) -> tuple[int, int]:
        """The tied target with the highest mean keyword probability (first on equality)."""
        means = [self.probs_mean.iat[self._row(s), p] for s, p in self.targets]
        means = [-np.inf if np.isnan(m) else m for m in means]
        return self.targets[int(np.argmax(means))]

    def _row(self, stream: int) -> int:
        return int(self.votes.index.get_loc(stream))

    def label(self, cell: tuple[int, int]) -> str:
        """Paper notation ``E_l(seq_index:token)`` of a (stream index, slot) cell."""
        s, p = cell
        return f"E_{s}({self.votes.columns[p]})"

    def summary(self) -> str:
        """A few lines: the sample, the winning cells and their votes."""
        head = (f"keyword-vote localization: tau={self.tau:g}, {len(self.sample)} sampled "
                f"images x {len(self.keywords)} keywords = {self.n_pairs} pairs")
        if not self.found:
            return f"{head}\n{self.message}"
        cells = ", ".join(self.label(c) for c in self.targets)
        lines = [head,
                 f"max votes {self.max_votes}/{self.n_pairs} at {len(self.targets)} cell(s): "
                 f"{cells}"]
        if len(self.targets) > 1:
            lines.append(f"primary (highest mean keyword prob): {self.label(self.primary)}")
        total = int(self.votes.to_numpy().sum())
        lines.append(f"{int((self.votes.to_numpy() > 0).sum())} cells got votes, "
                     f"{total} votes in all")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"Localization(targets={[self.label(c) for c in self.targets]}, "
                f"max_votes={self.max_votes}/{self.n_pairs}, tau={self.tau:g}, "
                f"n_sampled={len(self.sample)})")


def _sample(n: int, n_samples: int, seed: int, sample: Sequence[int] | None) -> np.ndarray:
    if sample is not None:
        idx = np.asarray(list(sample), dtype=np.int64)
        if idx.ndim != 1 or idx.size == 0:
            raise ConfigError(f"sample={sample!r}: give a non-empty list of image indices")
        if ((idx < -n) | (idx >= n)).any():
            raise ConfigError(f"sample indices {idx[(idx < -n) | (idx >= n)].tolist()} are "
                              f"outside the cache's {n} images")
        idx = idx % n
        if len(set(idx.tolist())) != idx.size:
            raise ConfigError("sample has repeated image indices; each image votes once")
        return np.sort(idx)
    if isinstance(n_samples, bool) or not isinstance(n_samples, int | np.integer) \
            or n_samples < 1:
        raise ConfigError(f"n_samples={n_samples!r} must be an int >= 1 (the paper uses 10)")
    if n_samples >= n:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=int(n_samples), replace=False))


def localize(cache, tau: float = TAU, n_samples: int = N_SAMPLES, seed: int = 0,
             sample: Sequence[int] | None = None,
             max_targets: int = MAX_TARGETS) -> Localization:
    """Algorithm 1 on a cache captured with ``keywords=...``.

    Parameters
    ----------
    cache : :class:`~esmc_lens.residual.cache.ResidualCache` with ``keyword_probs``
        [n_images, n_stream, n_positions, K].
    tau : float in [0, 1)
        Vote threshold (strict ``>``, as the paper).
    n_samples : int
        Images drawn at random without replacement (``numpy.random.default_rng(seed)``);
        all images when the cache holds fewer.
    seed : int
    sample : list of int, optional
        Explicit image indices; overrides ``n_samples``/``seed``.
    max_targets : int
        Most tied cells kept (see "Ties" in the module docstring).

    Returns
    -------
    Localization
        Never raises for lack of votes: see ``Localization.message``.
    """
    kp = getattr(cache, "keyword_probs", None)
    if kp is None:
        raise ConfigError("the cache has no keyword probabilities: capture with "
                          "keywords=[...] (e.g. capture(vlm, images, prompt, "
                          "keywords=['red', 'white'])) to localize")
    if isinstance(tau, bool) or not isinstance(tau, numbers.Real) or not 0 <= tau < 1:
        raise ConfigError(f"tau={tau!r} must be a probability in [0, 1) (the paper uses 0.2)")
    idx = _sample(len(cache), n_samples, seed, sample)
    probs = _as_numpy(kp)[idx]  # [n, S, P, K]
    valid = (cache.positions[idx] >= 0).numpy()  # [n, P]
    n, S, P, K = probs.shape
    keywords = list(cache.keywords or [f"kw{j}" for j in range(K)])

    counts = vote_table(probs, tau, valid)
    masked = np.where(valid[:, None, :, None], probs, np.nan)
    all_empty = ~valid.any(axis=0)  # [P] slots empty in every sampled image
    with np.errstate(invalid="ignore"):
        pmax = np.full((S, P), np.nan, dtype=np.float64)
        pmean = np.full((S, P), np.nan, dtype=np.float64)
        pmax[:, ~all_empty] = np.nanmax(masked[:, :, ~all_empty], axis=(0, 3))
        pmean[:, ~all_empty] = np.nanmean(masked[:, :, ~all_empty], axis=(0, 3))

    labels = cell_labels(cache)
    index = pd.Index(list(cache.stream), name="layer")
    columns = pd.Index(labels, name="position")
    frame = lambda a: pd.DataFrame(a, index=index, columns=columns)  # noqa: E731
    votes, probs_max, probs_mean = frame(counts), frame(pmax), frame(pmean)

    max_votes = int(counts.max()) if counts.size else 0
    max_prob = float(np.nanmax(pmax)) if not np.isnan(pmax).all() else float("nan")
    message = ""
    if max_votes > 0:
        cells = np.argwhere(counts == max_votes)  # row-major: by layer, then slot
        n_tied = len(cells)
        if n_tied > max_targets:
            strength = np.nan_to_num(pmean[cells[:, 0], cells[:, 1]], nan=-np.inf)
            keep = np.sort(np.argsort(-strength, kind="stable")[:max_targets])
            dropped = [f"E_{cache.stream[s]}({labels[p]})"
                       for s, p in np.delete(cells, keep, axis=0)]
            cells = cells[keep]
            message = (f"{n_tied} cells tie with {max_votes} votes; kept the {max_targets} "
                       f"with the highest mean keyword probability and dropped "
                       f"{', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}")
        targets = [(int(cache.stream[s]), int(p)) for s, p in cells]
    else:
        n_tied = 0
        if np.isnan(pmax).all():
            raise ConfigError("every sampled slot is empty: the cache holds no positions")
        # Stay where the paper looks: the criterion's own tokens, in the later layers.
        rows = [i for i, s in enumerate(cache.stream) if s >= max(cache.stream) / 2] \
            or list(range(S))
        cols = [c for c in criterion_slots(cache, int(idx[0])) if not all_empty[c]] \
            or [c for c in range(P) if not all_empty[c]]
        region = np.full_like(pmax, -np.inf)
        sub = np.ix_(rows, cols)
        region[sub] = np.nan_to_num(pmax[sub], nan=-np.inf)
        flat = region.ravel()
        order = np.argsort(-flat, kind="stable")[:5]
        best = [(int(cache.stream[i // P]), int(i % P), float(flat[i])) for i in order
                if np.isfinite(flat[i])]
        targets = [best[0][:2]]
        top = ", ".join(f"E_{s}({labels[p]}) {v:.3f}" for s, p, v in best)
        message = (f"no (image, keyword) pair has lens probability > tau={tau:g} at any cell "
                   f"(the highest anywhere is {max_prob:.3f}); falling back to the cell with "
                   f"the highest keyword probability among the criterion's tokens in layers "
                   f">= {cache.stream[rows[0]]}, E_{best[0][0]}({labels[best[0][1]]}). Top "
                   f"cells there by max probability: {top}. The evidence is weak: check the "
                   f"keywords, Lower tau (below {max_prob:.3f}), or sample more images.")
    per_kw = _per_keyword(probs, valid, tau, keywords, list(cache.stream), labels)
    return Localization(votes=votes, probs_max=probs_max, probs_mean=probs_mean,
                        targets=targets, max_votes=max_votes, n_pairs=n * K, tau=float(tau),
                        sample=idx, keywords=keywords, message=message, per_keyword=per_kw,
                        max_prob=max_prob, n_tied=n_tied)


def _per_keyword(probs: np.ndarray, valid: np.ndarray, tau: float, keywords: list[str],
                 stream: list[int], labels: list[str]) -> pd.DataFrame:
    """Each keyword's own best cell: most votes, ties (and no votes) by mean probability."""
    above = (probs > tau) & valid[:, None, :, None]
    votes = above.sum(axis=0)  # [S, P, K]
    filled = np.maximum(valid.sum(axis=0), 1)[None, :, None]  # images with the slot
    mean = np.where(valid[:, None, :, None], probs, 0).sum(axis=0) / filled  # [S, P, K]
    rows = []
    S, P, K = votes.shape
    for j in range(K):
        # lexicographic: votes first, then mean probability
        key = votes[:, :, j] * 2.0 + np.clip(mean[:, :, j], 0, 1)
        s, p = np.unravel_index(int(np.argmax(key)), (S, P))
        rows.append({"keyword": keywords[j], "layer": int(stream[s]), "slot": int(p),
                     "position": labels[p], "votes": int(votes[s, p, j]),
                     "mean_prob": float(mean[s, p, j])})
    return pd.DataFrame(rows, columns=["keyword", "layer", "slot", "position", "votes",
                                       "mean_prob"]).set_index("keyword")
