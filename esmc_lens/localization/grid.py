"""One image's keyword map: a keyword's lens probability at every (layer, position).

The grid Algorithm 1 votes on, for one image and one keyword; what the lens explorer, the
notebooks' Figures 3/7/8 and the static views show. Read from the capture when it scored
the keyword (those probabilities were taken from the full-precision states during the
capture), else computed from the stored states with the lens.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from ..errors import ConfigError
from ..lens.keyword_rule import keyword_token_ids
from ..lens.readout import keyword_probs
from ..lens.tokens import decode_each
from ..lens.unembed import Unembed
from ..residual.cache import ResidualCache
from .votes import cell_labels

__all__ = ["keyword_grid"]


def keyword_grid(cache: ResidualCache, image: int, keyword: str,
                 unembed: Unembed | None = None, tokenizer=None) -> pd.DataFrame:
    """Lens probability of ``keyword`` at every (layer, position) of image ``image``.

    Index: stream index (``layer``); columns: position labels ``"seq_index:token"``
    (:func:`~esmc_lens.localization.votes.cell_labels`); NaN on empty slots. Read from the
    capture when it scored ``keyword`` (case-insensitive), else computed from the stored
    states (needs ``unembed`` and ``tokenizer``). ``attrs["tokens"]``: the token strings
    that score the keyword (when the tokenizer is known); ``attrs["source"]``: ``"capture"``
    or ``"states"``.
    """
    if not keyword or not keyword.strip():
        raise ConfigError("type a keyword, e.g. 'red'")
    words = [w.strip().lower() for w in (cache.keywords or [])]
    want = keyword.strip().lower()
    groups = keyword_token_ids(tokenizer, [keyword]).groups if tokenizer is not None else None
    if want in words and cache.keyword_probs is not None:
        values, source = cache.keyword_probs[image, :, :, words.index(want)], "capture"
    else:
        if unembed is None or groups is None:
            raise ConfigError(f"{keyword!r} was not scored in the capture (its keywords are "
                              f"{cache.keywords}): pass unembed= and tokenizer= to compute "
                              "it from the states")
        values = keyword_probs(cache.states[image].float(), unembed, groups)[..., 0]
        source = "states"
    values = values.float().numpy().copy()
    values[:, (cache.positions[image] < 0).numpy()] = np.nan
    grid = pd.DataFrame(values, index=pd.Index(cache.stream, name="layer"),
                        columns=pd.Index(cell_labels(cache), name="position"))
    grid.attrs["tokens"] = decode_each(tokenizer, groups[0]) if groups is not None else []
    grid.attrs["source"] = source
    return grid
