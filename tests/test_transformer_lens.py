"""Cross-check the lens against TransformerLens' TransformerBridge on the tiny LLaVA."""

from __future__ import annotations

import pytest
import torch
from conftest import solid

from esmc_lens.lens.unembed import Unembed, lens_logits
from esmc_lens.residual.capture import capture

pytest.importorskip("transformer_lens")


def test_lens_matches_transformer_bridge(tiny_vlm, monkeypatch):
    import subprocess

    from transformer_lens.model_bridge.sources.transformers import helpers

    from esmc_lens.models.transformer_lens import transformer_lens_bridge

    original_helper = helpers._ensure_torchvision
    # the guard must stop any run-time pip install: fail loudly if one is attempted
    monkeypatch.setattr(subprocess, "check_call",
                        lambda *a, **k: pytest.fail(f"run-time install attempted: {a}"))
    attn_before = tiny_vlm.model.config._attn_implementation
    bridge = transformer_lens_bridge(tiny_vlm)
    assert tiny_vlm.model.config._attn_implementation == attn_before  # not switched in place
    assert helpers._ensure_torchvision is original_helper  # guard undone

    images = [solid((200, 30, 30), (40, 50)), solid((20, 20, 220), (40, 50))]
    prompt = "The color of the flower is"
    cache = capture(tiny_vlm, images, prompt, store_dtype=torch.float32, progress=False)
    enc = tiny_vlm.encode(images, prompt)
    with torch.no_grad():
        logits, tl = bridge.run_with_cache(enc["input_ids"], pixel_values=enc["pixel_values"],
                                           attention_mask=enc["attention_mask"])
    pos = cache.positions[0]  # same prompt: no padding
    unembed = Unembed.from_model(tiny_vlm)
    for layer in range(tiny_vlm.n_layers):
        resid = tl[f"blocks.{layer}.hook_resid_post"][:, pos]
        torch.testing.assert_close(resid, cache.layer(layer + 1), rtol=1e-4, atol=1e-5)
        theirs = bridge.unembed(bridge.ln_final(resid))
        ours = lens_logits(cache.layer(layer + 1), unembed)
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits[:, pos], lens_logits(cache.layer(-1), unembed),
                               rtol=1e-4, atol=1e-5)
