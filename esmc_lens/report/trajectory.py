"""The prediction trajectory of one image: what the logit lens predicts at every cell.

Modelled on tuned-lens' ``PredictionTrajectory`` (``tuned_lens/plotting/
prediction_trajectory.py``): a layer x position grid with the top-1 lens token written in
each cell and a statistic as its colour. The statistics:

* ``"probability"`` — the top-1 token's lens probability (shared log scale);
* ``"entropy"`` — the entropy of the lens distribution, in nats (0 .. log |V|);
* ``"keyword"`` — the lens probability of a keyword (the paper's quantity, as the tokens
  of :func:`~esmc_lens.lens.keyword_rule.keyword_token_ids` sum it);
* ``"rank"`` — the rank of the keyword's best token (1 = the top-1 token; log scale).

>>> traj = LensTrajectory.from_cache(cache, 0, unembed, tok, keyword="red")  # doctest: +SKIP
>>> traj.plot("entropy")                                                # doctest: +SKIP
>>> traj.to_frame().head()     # one row per cell: top-1 token, statistics  # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ..lens.keyword_rule import keyword_token_ids
from ..lens.tokens import token_strings
from ..lens.unembed import Unembed
from ..residual.cache import ResidualCache
from .plotting import (
    PROB_FLOOR,
    figure_style,
    prob_norm,
    readable_tokens,
    stamp,
    token_label,
)

__all__ = ["STATISTICS", "LensTrajectory"]

STATISTICS = ("probability", "entropy", "keyword", "rank")


@dataclass
class LensTrajectory:
    """The lens of one image at every captured (layer, position), reduced to what is shown.

    Shapes: S = captured stream indices, P = captured positions, k = top tokens kept.
    Empty slots (a shorter prompt) hold NaN statistics and empty token strings.
    """

    stream: list[int]  # [S] stream indices (0 = embeddings)
    seq_index: list[int]  # [P] position in the unpadded token sequence (-1: empty slot)
    input_tokens: list[str]  # [P] raw input token at each position
    top_tokens: np.ndarray  # [S, P, k] str, raw token strings of the top-k lens tokens
    top_probs: np.ndarray  # [S, P, k] float32
    entropy: np.ndarray  # [S, P] float32, nats
    image_id: str = ""
    model: str = ""
    keyword: str | None = None
    keyword_probs: np.ndarray | None = None  # [S, P] float32
    keyword_rank: np.ndarray | None = None  # [S, P] float32 (1 = top-1), NaN on empty slots
    vocab_size: int = 0

    @classmethod
    @torch.no_grad()
    def from_cache(cls, cache: ResidualCache, image: int, unembed: Unembed, tokenizer, *,
                   k: int = 5, keyword: str | None = None,
                   layers: Sequence[int] | None = None) -> LensTrajectory:
        """The trajectory of image ``image`` of ``cache`` (``layers``: stream indices to
        keep, default all captured). The lens runs once per layer on the image's positions
        in fp32 (:class:`~esmc_lens.lens.unembed.Unembed`'s compute dtype)."""
        layers = list(cache.stream if layers is None else layers)
        rows = [cache.stream_index(s) for s in layers]
        valid = (cache.positions[image] >= 0).numpy()
        group = None
        if keyword is not None:
            group = torch.tensor(keyword_token_ids(tokenizer, [keyword]).groups[0])
        S, P = len(rows), cache.n_positions
        top_p = np.zeros((S, P, k), np.float32)
        top_i = np.zeros((S, P, k), np.int64)
        ent = np.full((S, P), np.nan, np.float32)
        kw_p = np.full((S, P), np.nan, np.float32) if group is not None else None
        kw_r = np.full((S, P), np.nan, np.float32) if group is not None else None
        for a, r in enumerate(rows):
            logits = unembed(cache.states[image, r].float()).float().cpu()  # [P, V]
            logp = torch.log_softmax(logits, dim=-1)
            p, i = logp.exp().topk(k, dim=-1)
            top_p[a], top_i[a] = p.numpy(), i.numpy()
            e = -(logp.exp() * logp).sum(-1).numpy()
            ent[a] = np.where(valid, e, np.nan)
            if group is not None:
                kw_p[a] = np.where(valid, logp[:, group].exp().sum(-1).numpy(), np.nan)
                best = logits[:, group].max(-1).values
                rank = (logits > best[:, None]).sum(-1).float() + 1
                kw_r[a] = np.where(valid, rank.numpy(), np.nan)
        flat = token_strings(tokenizer, top_i.reshape(-1).tolist())
        tokens = np.asarray(flat, dtype=object).reshape(S, P, k)
        tokens[:, ~valid] = ""
        top_p[:, ~valid] = np.nan
        return cls(stream=layers, seq_index=cache.positions[image].tolist(),
                   input_tokens=list(cache.tokens[image]), top_tokens=tokens, top_probs=top_p,
                   entropy=ent, image_id=str(cache.image_ids[image]),
                   model=str(cache.meta.get("model", "")), keyword=keyword,
                   keyword_probs=kw_p, keyword_rank=kw_r, vocab_size=unembed.vocab_size)

    # -- statistics ------------------------------------------------------------------------
    def statistic(self, name: str) -> np.ndarray:
        """[S, P] values of ``name`` (one of :data:`STATISTICS`)."""
        if name == "probability":
            return self.top_probs[..., 0]
        if name == "entropy":
            return self.entropy
        if name in ("keyword", "rank"):
            if self.keyword is None:
                raise ValueError(f"statistic {name!r} needs a keyword: build the trajectory "
                                 "with keyword='red' (say)")
            return self.keyword_probs if name == "keyword" else self.keyword_rank
        raise ValueError(f"statistic {name!r}: use one of {STATISTICS}")

    def top1_labels(self) -> np.ndarray:
        """[S, P] readable top-1 lens token of each cell (``␣``/``↵`` for whitespace)."""
        out = np.empty(self.top_tokens.shape[:2], dtype=object)
        for s in range(out.shape[0]):
            for p in range(out.shape[1]):
                tok = self.top_tokens[s, p, 0]
                out[s, p] = token_label(tok, 7) if tok else ""
        return out

    def position_labels(self) -> list[str]:
        """``"seq:token"`` of each position, readable (:func:`readable_tokens`)."""
        words = readable_tokens(self.input_tokens)
        return [f"{i}:{w}" if i >= 0 else "" for i, w in zip(self.seq_index, words,
                                                                strict=True)]

    def to_frame(self) -> pd.DataFrame:
        """One row per filled cell: layer, slot, seq_index, input token, top-1 token and its
        probability, entropy (and keyword probability and rank when built with one)."""
        rows = []
        labels = self.top1_labels()
        for a, s in enumerate(self.stream):
            for p, seq in enumerate(self.seq_index):
                if seq < 0:
                    continue
                row = {"layer": s, "slot": p, "seq_index": seq,
                       "input_token": self.input_tokens[p], "top1": labels[a, p],
                       "top1_prob": float(self.top_probs[a, p, 0]),
                       "entropy": float(self.entropy[a, p])}
                if self.keyword is not None:
                    row[f"p({self.keyword})"] = float(self.keyword_probs[a, p])
                    row[f"rank({self.keyword})"] = int(self.keyword_rank[a, p])
                rows.append(row)
        return pd.DataFrame(rows)

    # -- plotting --------------------------------------------------------------------------
    def _norm_and_label(self, name: str):
        from matplotlib.colors import LogNorm, Normalize

        if name == "probability":  # a top-1 probability is >= 1/|V|: linear, as tuned-lens
            return Normalize(0, 1), "top-1 lens probability", "viridis"
        if name == "keyword":
            return prob_norm(), f"p('{self.keyword}') (log)", "viridis"
        if name == "entropy":
            top = float(np.log(self.vocab_size)) if self.vocab_size else None
            return Normalize(0, top), "entropy (nats)", "magma_r"
        top = max(float(self.vocab_size or np.nanmax(self.keyword_rank)), 2.0)
        return LogNorm(1, top), f"rank of '{self.keyword}' (1 = top-1, log)", "viridis_r"

    def plot(self, statistic: str = "probability", *, ax=None, title: str = "",
             model: str | None = None, quick: bool = False, fontsize: float = 4.5):
        """The grid: the top-1 lens token written in each cell, ``statistic`` as its colour
        (layer on the vertical axis, last on top). Returns the figure."""
        import matplotlib as mpl
        import matplotlib.pyplot as plt

        values = np.asarray(self.statistic(statistic), dtype=float)
        norm, clabel, cmap_name = self._norm_and_label(statistic)
        cmap = mpl.colormaps[cmap_name].with_extremes(bad="#DDDDDD")
        if statistic == "keyword":
            values = np.where(np.isfinite(values), np.maximum(values, PROB_FLOOR), np.nan)
        S, P = values.shape
        with figure_style("two", font_size=7):
            if ax is None:
                fig, ax = plt.subplots(figsize=(min(1.3 + 0.62 * P, 14), 1.0 + 0.2 * S),
                                       layout="constrained")
            fig = ax.figure
            im = ax.imshow(np.ma.masked_invalid(values), aspect="auto", origin="lower",
                           norm=norm, cmap=cmap, interpolation="nearest")
            labels = self.top1_labels()
            for a in range(S):
                for p in range(P):
                    if not labels[a, p]:
                        continue
                    rgba = cmap(norm(values[a, p])) if np.isfinite(values[a, p]) else (1,) * 4
                    light = (0.299 * rgba[0] + 0.587 * rgba[1] + 0.114 * rgba[2]) > 0.5
                    ax.text(p, a, labels[a, p], ha="center", va="center", fontsize=fontsize,
                            color="black" if light else "white")
            ax.set_xticks(range(P))
            ax.set_xticklabels(self.position_labels(), rotation=55, ha="right",
                               rotation_mode="anchor")
            step = max(1, S // 12)
            ax.set_yticks(range(0, S, step))
            ax.set_yticklabels([str(self.stream[i]) for i in range(0, S, step)])
            ax.set_xlabel("input position (sequence index: token)")
            ax.set_ylabel("layer (0 = embeddings)")
            fig.colorbar(im, ax=ax, label=clabel, fraction=0.03, pad=0.01)
            stamp(fig, title or f"Prediction trajectory of {self.image_id}: top-1 lens token "
                  f"per cell, colour = {statistic}", model if model is not None else self.model,
                  quick)
        return fig
