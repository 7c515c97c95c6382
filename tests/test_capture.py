"""Capture equals plain hooks and output_hidden_states; positions map to the right tokens."""

from __future__ import annotations

import pytest
import torch
from conftest import (
    SOLID_COLOURS,
    check_checkpoint_round_trip,
    check_exact,
    reference_states,
    solid,
)

from esmc_lens.errors import ConfigError
from esmc_lens.lens.unembed import Unembed, lens_logits
from esmc_lens.residual.cache import ResidualCache
from esmc_lens.residual.capture import capture, resolve_positions

PROMPTS = [
    "The color of the flower is",
    "Describe the image.",
    "What are common colors of flowers? Answer with single words.",
]


def _images(n=3, size=(40, 50)):
    cols = list(SOLID_COLOURS.values())
    return [solid(cols[i % len(cols)], size) for i in range(n)]


@pytest.fixture(scope="module")
def tiny_case(tiny_vlm):
    images = _images()
    cache = capture(tiny_vlm, images, PROMPTS, store_dtype=torch.float32, progress=False,
                    batch_size=3)
    return images, cache, reference_states(tiny_vlm, images, PROMPTS)


def test_tiny_capture_equals_hooks_and_hidden_states(tiny_vlm, tiny_case):
    _, cache, ref = tiny_case
    assert cache.states.shape[:2] == (3, tiny_vlm.n_layers + 1)
    check_exact(tiny_vlm, cache, ref)


def test_llava_checkpoint_dir_in_fp16(tiny_vlm, tmp_path):
    """The path real users take: a saved LlavaForConditionalGeneration + processor loaded by
    directory (as from the hub), in fp16, captured bit for bit."""
    from transformers import LlavaForConditionalGeneration

    from esmc_lens.models.vlm import load_model

    src = load_model("tiny")  # save_pretrained edits the config: not the shared fixture
    src.model.save_pretrained(tmp_path)
    src.processor.save_pretrained(tmp_path)
    vlm = load_model(str(tmp_path), dtype="float16")
    assert type(vlm.model) is LlavaForConditionalGeneration and vlm.prompt_style == "chat"
    check_checkpoint_round_trip(src, vlm, PROMPTS[0])
    images = _images()
    cache = capture(vlm, images, PROMPTS, store_dtype=torch.float32, progress=False,
                    batch_size=3, keywords=["red"], top_k=2)
    # the model's fp16 logits (|x| < 1 here) are within a few fp16 ulps of the fp32 lens
    check_exact(vlm, cache, reference_states(vlm, images, PROMPTS), logits_tol=1e-3)
    assert cache.keyword_probs.dtype == torch.float32
    assert torch.equal(cache.positions, capture(tiny_vlm, images, PROMPTS, progress=False,
                                                batch_size=3).positions)


def test_positions_map_to_tokens_under_left_padding(tiny_vlm, tiny_case):
    images, cache, (_, _, offsets) = tiny_case
    enc = tiny_vlm.encode(images, PROMPTS)
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == 3  # three different lengths in one batch: padding exercised
    for b, prompt in enumerate(PROMPTS):
        valid = cache.positions[b] >= 0
        ids = enc["input_ids"][b, offsets[b] + cache.positions[b][valid]]
        tokens = tiny_vlm.tokenizer.convert_ids_to_tokens(ids.tolist())
        assert tokens == [t for t in cache.tokens[b] if t]
        text = tiny_vlm.tokenizer.convert_tokens_to_string(tokens)
        # the prompt's tokens after the image: "\n{prompt} ASSISTANT:"
        assert text == "\n" + prompt + " ASSISTANT:"
        start, stop = cache.image_span[b].tolist()
        assert stop == cache.positions[b][0] and stop - start == 25  # 5x5 patches
        # empty slots are zero and marked
        assert (cache.states[b, :, ~valid] == 0).all()
        assert all(t == "" for t, v in zip(cache.tokens[b], valid, strict=True) if not v)


def test_batching_does_not_change_states(tiny_vlm, tiny_case):
    images, cache, _ = tiny_case
    one_by_one = capture(tiny_vlm, images, PROMPTS, store_dtype=torch.float32, batch_size=1,
                         progress=False)
    assert one_by_one.positions.tolist() == cache.positions.tolist()
    torch.testing.assert_close(one_by_one.states, cache.states, rtol=1e-5, atol=1e-5)


def test_position_specs(tiny_vlm):
    images = _images(2)
    prompt = "The color of the flower is"
    named = capture(tiny_vlm, images, prompt, positions=["color", "flower"], progress=False)
    assert [t for t in named.tokens[0]] == ["Ġcolor", "Ġflower"]
    assert named.position_index("color") == 0 and named.position_index("flower") == 1
    full = capture(tiny_vlm, images, prompt, positions="all", store_dtype=torch.float32,
                   progress=False)
    sliced = capture(tiny_vlm, images, prompt, positions=slice(-3, None),
                     store_dtype=torch.float32, progress=False)
    assert sliced.tokens[0] == full.tokens[0][-3:]
    assert torch.equal(sliced.states, full.states[:, :, -3:])
    ints = capture(tiny_vlm, images, prompt, positions=[0, -1], store_dtype=torch.float32,
                   progress=False)
    assert torch.equal(ints.states[:, :, 1], full.states[:, :, -1])
    some = capture(tiny_vlm, images, prompt, layers=[0, 2], store_dtype=torch.float32,
                   progress=False)
    assert some.stream == [0, 2]
    prompt_full = capture(tiny_vlm, images, prompt, store_dtype=torch.float32, progress=False)
    assert torch.equal(some.layer(2), prompt_full.layer(2))
    assert torch.equal(some.cell(0, "color"), prompt_full.cell(0, "color"))
    with pytest.raises(ConfigError, match="not captured"):
        some.layer(1)
    with pytest.raises(ConfigError, match="none of the tokens"):
        resolve_positions(["a", "b"], 1, ["zebra"])
    with pytest.raises(ConfigError, match="empty"):
        capture(tiny_vlm, images, "  ", progress=False)


def test_store_dtype_and_metadata(tiny_vlm):
    cache = capture(tiny_vlm, _images(2), "The color of the flower is", progress=False)
    assert cache.states.dtype == torch.float16 and cache.states.device.type == "cpu"
    m = cache.meta
    assert m["model"] == "tiny" and m["prompt"] == "The color of the flower is"
    assert m["formatted_prompt"] == "USER: <image>\nThe color of the flower is ASSISTANT:"
    assert m["chat_template"] == tiny_vlm.processor.chat_template
    assert set(m["versions"]) >= {"torch", "transformers", "nnsight"}


def test_save_load_roundtrip_and_concat(tiny_vlm, tmp_path):
    a = capture(tiny_vlm, _images(2), "The color of the flower is", keywords=["red", "blue"],
                top_k=3, vision=True, progress=False)
    b = capture(tiny_vlm, _images(3), "Describe the image.", keywords=["red", "blue"],
                top_k=3, vision=True, progress=False)
    both = ResidualCache.concat([a, b])
    assert len(both) == 5 and both.n_positions == max(a.n_positions, b.n_positions)
    assert torch.equal(both.states[:2, :, : a.n_positions], a.states)
    assert (both.positions[:2, a.n_positions:] == -1).all()
    both.save(tmp_path / "c")
    back = ResidualCache.load(tmp_path / "c")
    for name in ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
                 "top_probs"):
        assert torch.equal(getattr(back, name), getattr(both, name)), name
    assert back.tokens == both.tokens and back.meta["model"] == "tiny"
    assert back.keywords == ["red", "blue"] and back.prompts == both.prompts
    # a damaged file is detected
    f = tmp_path / "c" / "tensors.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-1] ^= 0xFF
    f.write_bytes(bytes(raw))
    from esmc_lens.errors import CaptureError

    with pytest.raises(CaptureError, match="damaged"):
        ResidualCache.load(tmp_path / "c")


def test_capture_readouts_match_lens_of_states(tiny_vlm):
    cache = capture(tiny_vlm, _images(2), "The color of the flower is", keywords=["red"],
                    top_k=4, store_dtype=torch.float32, progress=False)
    probs = torch.softmax(lens_logits(cache.states, Unembed.from_model(tiny_vlm)), -1)
    top_p, top_i = probs.topk(4, dim=-1)
    assert torch.equal(cache.top_ids, top_i)
    torch.testing.assert_close(cache.top_probs, top_p, rtol=1e-5, atol=1e-6)
    from esmc_lens.lens.keyword_rule import keyword_token_ids

    ids = keyword_token_ids(tiny_vlm.tokenizer, ["red"]).groups[0]
    torch.testing.assert_close(cache.keyword_probs[..., 0], probs[..., ids].sum(-1),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_offline_capture_equals_hooks_and_hidden_states(offline_vlm):
    images = _images(3, (224, 224))
    prompts = ["The color of the image is", "Describe it.", "The shape of the object is"]
    cache = capture(offline_vlm, images, prompts, store_dtype=torch.float32, progress=False)
    check_exact(offline_vlm, cache, reference_states(offline_vlm, images, prompts))
    start, stop = cache.image_span[0].tolist()
    assert stop - start == 105  # 7 foreground + 49 colour + 49 object tokens
