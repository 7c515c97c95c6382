"""Bridges to other interpretability libraries (TransformerLens), with their side effects fenced.

``transformer_lens.model_bridge.TransformerBridge.boot_transformers`` (transformer-lens 4.x)
supports LLaVA, but when booting it

* switches the HF model it is given to eager attention *in place*, and
* if loading the processor fails, runs ``pip install torchvision`` at run time (which on a
  CPU-only torch pulls an incompatible build and breaks the environment).

:func:`transformer_lens_bridge` boots the bridge on a *copy* of the model by default (so the
caller's model keeps its attention implementation) and disables the run-time install.
"""

from __future__ import annotations

import contextlib
import copy
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import ModelError


@contextlib.contextmanager
def no_runtime_installs() -> Iterator[None]:
    """Make transformer-lens' "install torchvision on the fly" helper a no-op returning False."""
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # other versions do not have it
        yield
        return
    original = helpers._ensure_torchvision
    helpers._ensure_torchvision = lambda: False
    try:
        yield
    finally:
        helpers._ensure_torchvision = original


def transformer_lens_bridge(vlm, copy_model: bool = True, workdir: str | Path | None = None):
    """A ``TransformerBridge`` over ``vlm``'s model, booted offline.

    ``copy_model=False`` saves the memory of a copy but lets transformer-lens switch
    ``vlm.model`` to eager attention (it is switched back afterwards, the bridge keeps
    running eager).
    """
    try:
        from transformer_lens.model_bridge import TransformerBridge
    except ImportError as exc:
        raise ModelError("transformer-lens is not installed: pip install 'esmc_lens[interp]'"
                         ) from exc
    model = copy.deepcopy(vlm.model) if copy_model else vlm.model
    before = model.config._attn_implementation
    with tempfile.TemporaryDirectory(dir=workdir) as tmp, no_runtime_installs():
        # boot_transformers reads the config and processor from a directory: give it one
        # without the weights (hf_model supplies those).
        model.config.save_pretrained(tmp)
        vlm.processor.save_pretrained(tmp)
        bridge = TransformerBridge.boot_transformers(
            tmp, hf_model=model, device=vlm.device, dtype=vlm.dtype)
    if not copy_model:
        vlm.model.set_attn_implementation(before)
    return bridge
