"""esmc_lens: explainable multiple clustering with multimodal LLMs and the logit lens.

The data flows one way: images -> :func:`capture` (:class:`ResidualCache`) -> the logit lens
(:class:`Unembed`) -> :func:`localize` (Algorithm 1) -> :class:`PseudoLabelHead`
(Algorithm 2) -> named clusters; :func:`run_esmc` does all of it.
"""

__version__ = "0.1.0"

from .backend import VLM, load_model
from .cache import ResidualCache
from .capture import capture
from .data import ImageDataset, load_dataset
from .head import PseudoLabelHead
from .lens import Unembed, keyword_probs, keyword_token_ids, lens_logits, top_k
from .localize import Localization, localize
from .pipeline import EsmcResult, run_esmc
from .synthetic import make_synthetic_dataset

__all__ = [
    "VLM",
    "EsmcResult",
    "ImageDataset",
    "Localization",
    "PseudoLabelHead",
    "ResidualCache",
    "Unembed",
    "capture",
    "keyword_probs",
    "keyword_token_ids",
    "lens_logits",
    "load_dataset",
    "load_model",
    "localize",
    "make_synthetic_dataset",
    "run_esmc",
    "top_k",
]
