"""One image pass for several criteria (esmc_lens.residual.shared_prefix) against a full
forward pass per criterion: the tiny LLaVA and the offline model, eager and SDPA attention,
prompts of different lengths in one batch, a left-padded reference batch, early stops, and
answers generated from the same prefill against ``model.generate``."""

from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import SOLID_COLOURS, solid

from esmc_lens.errors import ConfigError
from esmc_lens.models.tiny_families import TINY_BUILDERS
from esmc_lens.models.vlm import SENTENCE_END, load_model
from esmc_lens.residual.capture import capture
from esmc_lens.residual.shared_prefix import (
    SHARED_PREFIX_RTOL,
    capture_criteria,
    shares_prefix,
    split_criteria,
    stop_token_ids,
)

# Four lengths, shared first tokens ("The color of the ..."), one much longer.
CRITERIA = {
    "color": "The color of the object is",
    "shape": "The shape of the object is",
    "background": "The color of the background is",
    "long": "The main colour of the small object in the middle of the image is",
}
KEYWORDS = {"color": ["red", "green"], "shape": ["circle", "square"],
            "background": ["white"], "long": ["red", "blue"]}


@contextlib.contextmanager
def attention(vlm, impl: str):
    before = vlm.model.config._attn_implementation
    vlm.model.set_attn_implementation(impl)
    try:
        yield
    finally:
        vlm.model.set_attn_implementation(before)


def images(n: int, size=(224, 224)):
    colours = list(SOLID_COLOURS.values())
    return [solid(colours[i % len(colours)], size) for i in range(n)]


def rel_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """[streams] max |a - b| over each stream, over that stream's max |a|."""
    return (a - b).abs().amax((0, 2, 3)) / a.abs().amax((0, 2, 3))


def check_against_full(vlm, imgs, impl: str, batch_size: int, exact_first: bool) -> None:
    with attention(vlm, impl):
        cc = capture_criteria(vlm, imgs, CRITERIA, keywords=KEYWORDS, vision=True,
                              store_dtype=torch.float32, batch_size=batch_size,
                              progress=False)
        for i, (name, prompt) in enumerate(CRITERIA.items()):
            ref = capture(vlm, imgs, prompt, keywords=KEYWORDS[name], vision=True,
                          store_dtype=torch.float32, batch_size=batch_size, progress=False)
            got = cc.caches[name]
            assert torch.equal(got.positions, ref.positions), name
            assert got.tokens == ref.tokens and got.stream == ref.stream, name
            assert torch.equal(got.image_span, ref.image_span), name
            assert torch.equal(got.vision, ref.vision), name  # the same vision tower pass
            if exact_first and i == 0:  # its keys: the prefix, then its own tokens
                assert torch.equal(got.states, ref.states), name
                assert torch.equal(got.keyword_probs, ref.keyword_probs), name
            err = rel_error(ref.states, got.states)
            assert float(err.max()) <= SHARED_PREFIX_RTOL, (name, err.max())
            # Stream 0 is the token embedding: no attention, exact for every criterion.
            assert torch.equal(got.states[:, 0], ref.states[:, 0]), name
            torch.testing.assert_close(got.keyword_probs, ref.keyword_probs, rtol=0,
                                       atol=1e-5)


def test_split_is_each_criterions_tokens(tiny_vlm):
    img = images(1)[0]
    sp = split_criteria(tiny_vlm, CRITERIA, img)
    for c, prompt in enumerate(CRITERIA.values()):
        ids = tiny_vlm.encode([img], prompt)["input_ids"][0].tolist()
        own = [sp.node_ids[j] for j in sp.paths[c]]
        assert ids[len(ids) - len(own):] == own
        toks = tiny_vlm.tokenizer.convert_ids_to_tokens(ids)
        assert sp.prompt_tokens(c) == toks[len(toks) - sp.prompt_len(c):]
        assert "<image>" not in sp.prompt_tokens(c)  # the image is in the shared prefix
    # "The color of the" is shared by color and background: their paths start alike.
    a, b = sp.paths[0], sp.paths[2]
    shared = next(i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y)
    assert shared >= 3 and sp.n_nodes < sum(len(p) for p in sp.paths)
    for path in sp.paths:  # a criterion's k-th token sits at depth k
        assert [int(sp.depth[j]) for j in path] == list(range(len(path)))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_tiny_equals_full_forward_per_criterion(tiny_vlm, impl, one_torch_thread):
    check_against_full(tiny_vlm, images(5, (30, 30)), impl, batch_size=3,
                       exact_first=impl == "eager")


def test_tiny_equals_left_padded_mixed_batch(tiny_vlm, one_torch_thread):
    """Reference: one batch holding every criterion's prompt (left-padded to the longest)."""
    imgs = images(2, (30, 30))
    cc = capture_criteria(tiny_vlm, imgs, CRITERIA, store_dtype=torch.float32,
                          batch_size=2, progress=False)
    rows = [(i, name) for i in range(len(imgs)) for name in CRITERIA]
    ref = capture(tiny_vlm, [imgs[i] for i, _ in rows], [CRITERIA[n] for _, n in rows],
                  store_dtype=torch.float32, batch_size=len(rows), progress=False)
    assert int((ref.positions < 0).sum()) > 0  # the shorter prompts were padded
    for r, (i, name) in enumerate(rows):
        got = cc.caches[name]
        n = got.n_positions
        assert ref.positions[r, :n].tolist() == got.positions[i].tolist()
        err = rel_error(ref.states[r:r + 1, :, :n], got.states[i:i + 1])
        assert float(err.max()) <= SHARED_PREFIX_RTOL, (name, err.max())


def test_tiny_layers_and_positions_stop_early(tiny_vlm, one_torch_thread):
    imgs = images(3, (30, 30))
    want = {"color": [-1, -3], "long": [-1]}
    crit = {k: CRITERIA[k] for k in want}
    with attention(tiny_vlm, "eager"):
        cc = capture_criteria(tiny_vlm, imgs, crit, positions=want, layers=[0, 2],
                              store_dtype=torch.float32, progress=False)
        for name, pos in want.items():
            ref = capture(tiny_vlm, imgs, crit[name], positions=pos, layers=[0, 2],
                          store_dtype=torch.float32, progress=False)
            assert cc.caches[name].stream == [0, 2]
            assert torch.equal(cc.caches[name].positions, ref.positions)
            if name == "color":
                assert torch.equal(cc.caches[name].states, ref.states)
            assert float(rel_error(ref.states, cc.caches[name].states).max()) \
                <= SHARED_PREFIX_RTOL


def reference_stops(vlm, imgs, prompt: str, cap: int) -> list[str]:
    """Why ``model.generate`` (no stop strings) ends each image's answer: "eos", "end" (its
    text reaches a full stop or a newline) or "cap"."""
    eos = stop_token_ids(vlm)
    stops = []
    for img in imgs:
        enc = vlm.encode([img], prompt)
        with torch.inference_mode():
            out = vlm.model.generate(**enc, max_new_tokens=cap, do_sample=False,
                                     pad_token_id=vlm.tokenizer.pad_token_id)
        why, seen = "cap", []
        for t in out[0, enc["input_ids"].shape[1]:].tolist():
            if t in eos:
                why = "eos"
                break
            seen.append(t)
            if any(s in vlm.tokenizer.decode(seen, skip_special_tokens=True)
                   for s in SENTENCE_END):
                why = "end"
                break
        stops.append(why)
    return stops


def check_answers(vlm, imgs, cap: int, batch_size: int) -> dict:
    """Answers equal ``vlm.generate`` (stop strings, the same cut), stop reasons equal a
    plain ``model.generate``'s."""
    cc = capture_criteria(vlm, imgs, CRITERIA, layers=[vlm.n_layers], answer_tokens=cap,
                          batch_size=batch_size, progress=False)
    for name, prompt in CRITERIA.items():
        assert cc.answers[name] == vlm.generate(imgs, prompt, max_new_tokens=cap), name
        assert cc.answer_stops[name] == reference_stops(vlm, imgs, prompt, cap), name
    return cc.answer_stops


def test_tiny_answers_equal_generate(tiny_vlm, one_torch_thread):
    stops = check_answers(tiny_vlm, images(4, (30, 30)), cap=6, batch_size=3)
    assert set(stops["color"]) <= {"eos", "end", "cap"}


def test_attention_without_custom_masks_is_refused(tiny_vlm):
    before = tiny_vlm.model.config.text_config._attn_implementation
    tiny_vlm.model.config.text_config._attn_implementation = "flash_attention_2"
    try:
        assert "attn_implementation='sdpa'" in shares_prefix(tiny_vlm)
        with pytest.raises(ConfigError, match="attn_implementation='sdpa'"):
            capture_criteria(tiny_vlm, images(1, (30, 30)), CRITERIA, progress=False)
    finally:
        tiny_vlm.model.config.text_config._attn_implementation = before
    assert shares_prefix(tiny_vlm) is None


def test_bad_positions_name_the_criterion(tiny_vlm):
    for bad in ([-10_000], [3]):  # before the image block; counted from the start
        with pytest.raises(ConfigError, match="'shape'"):
            capture_criteria(tiny_vlm, images(1, (30, 30)), CRITERIA,
                             positions={"color": [-1], "shape": bad}, progress=False)


@pytest.mark.parametrize("key", sorted(TINY_BUILDERS))
def test_every_family_with_images_of_different_sizes(key, one_torch_thread):
    """Dynamic-resolution families give each image its own number of image tokens: the
    prefixes of one batch are left-padded to the longest. States equal a full forward pass
    per criterion, answers equal ``vlm.generate``; families that cannot share a prefix are
    refused with the reason."""
    if key == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")
    vlm = load_model(f"tiny:{key}")
    crit = {k: CRITERIA[k] for k in ("color", "background", "long")}
    imgs = [solid(c, size) for c, size in zip(list(SOLID_COLOURS.values()),
                                               [(64, 24), (20, 56), (30, 30)], strict=False)]
    if shares_prefix(vlm) is not None:
        assert key in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl", "paligemma", "gemma3")
        with pytest.raises(ConfigError, match="cannot share a prefix"):
            capture_criteria(vlm, imgs, crit, progress=False)
        return
    # two batches (2 + 1 images) of different prefix lengths, decoded together
    cc = capture_criteria(vlm, imgs, crit, vision=True, store_dtype=torch.float32,
                          batch_size=2, answer_tokens=5, progress=False)
    for name, prompt in crit.items():
        ref = capture(vlm, imgs, prompt, vision=True, store_dtype=torch.float32,
                      batch_size=2, progress=False)
        got = cc.caches[name]
        assert torch.equal(got.positions, ref.positions) and got.tokens == ref.tokens
        assert torch.equal(got.image_span, ref.image_span)
        assert torch.equal(got.vision, ref.vision)
        assert float(rel_error(ref.states, got.states).max()) <= SHARED_PREFIX_RTOL, name
        assert cc.answers[name] == vlm.generate(imgs, prompt, max_new_tokens=5), name
    lengths = (ref.image_span[:, 1] - ref.image_span[:, 0]).tolist()
    if vlm.family.dynamic:  # the point of the test: prefixes of several lengths (left-padded
        assert len(set(lengths)) > 1  # in a batch, or padded when batches decode together)


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_offline_equals_full_forward_per_criterion(offline_vlm, impl, one_torch_thread):
    check_against_full(offline_vlm, images(3), impl, batch_size=2,
                       exact_first=impl == "eager")


@pytest.mark.slow
def test_offline_answers_equal_generate(offline_vlm, one_torch_thread):
    stops = check_answers(offline_vlm, images(3), cap=8, batch_size=3)
    # The offline model ends most answers with a full stop ("a red.", "a square.").
    assert sum(s == "end" for v in stops.values() for s in v) >= 3
