"""The offline model is a real LLaVA-layout VLM whose lens and answers carry image content."""

from __future__ import annotations

import pytest
import torch
from conftest import SOLID_COLOURS, solid

from esmc_lens.lens.readout import top_k
from esmc_lens.lens.unembed import Unembed
from esmc_lens.residual.capture import capture

pytestmark = pytest.mark.slow


def test_module_layout_is_llava(offline_vlm):
    from transformers import LlavaForConditionalGeneration, LlavaProcessor

    m = offline_vlm.model
    assert isinstance(m, LlavaForConditionalGeneration)
    assert isinstance(offline_vlm.processor, LlavaProcessor)
    assert len(m.model.language_model.layers) == 30 and offline_vlm.d_model == 576
    assert offline_vlm.vocab_size == 49152
    assert offline_vlm.tokenizer.convert_ids_to_tokens(offline_vlm.image_token_id) == "<image>"
    # tied unembedding, as SmolLM2
    assert m.lm_head.weight.data_ptr() == m.model.language_model.embed_tokens.weight.data_ptr()
    assert m.config.esmc_offline["name"] == "offline"


def test_second_load_reads_the_cache(offline_vlm, monkeypatch):
    """Converted once, then read from the cache (no timing here: speed lives in benchmarks)."""
    import esmc_lens.models.offline as offline
    from esmc_lens.models.vlm import load_model

    def no_convert(*args, **kwargs):
        raise AssertionError("the offline model was converted again")

    monkeypatch.setattr(offline, "convert", no_convert)
    again = load_model("offline")
    for (n, p), (_, q) in zip(offline_vlm.model.state_dict().items(),
                              again.model.state_dict().items(), strict=True):
        assert torch.equal(p, q), n


def test_colour_words_in_lens_and_answers(offline_vlm):
    names = list(SOLID_COLOURS)
    images = [solid(SOLID_COLOURS[c]) for c in names]
    prompt = "The color of the image is"
    cache = capture(offline_vlm, images, prompt, positions=[-1], layers=[28, 29, 30],
                    store_dtype=torch.float32, progress=False)
    _, ids = top_k(cache.states[:, -1, 0], Unembed.from_model(offline_vlm), k=5)
    words = [[offline_vlm.tokenizer.decode([i]).strip().lower() for i in row] for row in ids]
    in_lens = [c in w for c, w in zip(names, words, strict=True)]
    answers = offline_vlm.generate(images, prompt, max_new_tokens=10)
    named = [c in a.lower() for c, a in zip(names, answers, strict=True)]
    both = [a and b for a, b in zip(in_lens, named, strict=True)]
    assert sum(both) >= 5, (words, answers)


def test_cat_photo_is_named_a_cat(offline_vlm):
    from PIL import Image
    from skimage import data

    cat = Image.fromarray(data.chelsea())
    answer = offline_vlm.generate([cat], "The animal in the image is", max_new_tokens=8)[0]
    cache = capture(offline_vlm, [cat], "The animal in the image is", positions=[-1],
                    store_dtype=torch.float32, progress=False)
    _, ids = top_k(cache.states[0, -8:, 0], Unembed.from_model(offline_vlm), k=10)
    lens_words = {offline_vlm.tokenizer.decode([i]).strip().lower() for i in ids.flatten()}
    cat_words = {"cat", "cats", "kitten", "tabby"}
    assert any(w in answer.lower() for w in cat_words) or lens_words & cat_words, answer


def test_fp16_reads_the_same_colours_as_fp32(offline_vlm):
    """The dtype GPU users get by default (fp16), here on the CPU: same weights rounded, the
    lens still in fp32, so the colour readout moves by fp16 rounding only."""
    from esmc_lens.models.vlm import load_model

    half = load_model("offline", dtype="float16")
    assert half.dtype == torch.float16
    assert {p.dtype for p in half.model.parameters() if p.is_floating_point()} == {torch.float16}
    names = ["red", "green", "blue", "yellow"]
    images = [solid(SOLID_COLOURS[c]) for c in names]
    kw = dict(positions=[-1], layers=[28, 29, 30], keywords=names, top_k=5, progress=False)
    c16 = capture(half, images, "The color of the image is", **kw)
    c32 = capture(offline_vlm, images, "The color of the image is", **kw)
    assert c16.keyword_probs.dtype == torch.float32
    # each image's own colour is the most probable keyword in both, with close probabilities
    assert torch.equal(c16.keyword_probs[:, -1, 0].argmax(-1), torch.arange(len(names)))
    assert torch.equal(c32.keyword_probs[:, -1, 0].argmax(-1), torch.arange(len(names)))
    torch.testing.assert_close(c16.keyword_probs, c32.keyword_probs, rtol=0.05, atol=2e-3)
    # the same top token: two computations, so an ordering claim with its margin (fp32's top
    # two tokens lie further apart than the fp16 model moves a probability)
    top = c32.top_probs[:, -1, 0]
    assert ((top[:, 0] - top[:, 1]) > 2 * ((c16.top_probs - c32.top_probs).abs().max())).all()
    assert torch.equal(c16.top_ids[:, -1, 0, 0], c32.top_ids[:, -1, 0, 0])
