"""esmc_lens: explainable multiple clustering with multimodal LLMs and the logit lens.

The data flows one way: images -> :func:`capture` (:class:`ResidualCache`) -> the logit lens
(:class:`Unembed`) -> :func:`localize` (Algorithm 1) -> :class:`PseudoLabelHead`
(Algorithm 2) -> named clusters; :func:`run_esmc` does all of it.
"""

__version__ = "0.1.0"

from .cluster.head import PseudoLabelHead
from .data.dataset import ImageDataset, load_dataset
from .data.synthetic import make_synthetic_dataset
from .lens.keyword_rule import keyword_token_ids
from .lens.readout import keyword_probs, top_k
from .lens.unembed import Unembed, lens_logits
from .localization.votes import Localization, localize
from .models.vlm import VLM, load_model
from .pipeline import run_esmc
from .report.result import EsmcResult
from .residual.cache import ResidualCache
from .residual.capture import capture

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
