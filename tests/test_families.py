"""Every supported family, through the transformers classes its checkpoints use.

For each family a tiny random model built from its own config classes, a BPE tokenizer with
its special tokens and its real processor class (image-only without torchvision, or
PixtralTextImageProcessor where PixtralProcessor cannot be imported: see
``esmc_lens.models.processors``). Each is checked for: capture equal to hooks and
``output_hidden_states`` at every layer and the last layer's lens equal to the logits; every
prompt position mapped to its token in a left-padded batch of images of different sizes (so
different image-token counts) and prompts of different lengths; a save_pretrained ->
load_model round trip; run_esmc end to end on 8 synthetic images of different sizes.
"""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from conftest import (
    SOLID_COLOURS,
    assert_same_cache,
    check_checkpoint_round_trip,
    check_exact,
    reference_states,
    solid,
)

from esmc_lens.errors import EsmcWarning, ModelError
from esmc_lens.lens.unembed import Unembed, float_module, lens_logits
from esmc_lens.models.families import FAMILIES, family_of
from esmc_lens.models.tiny_families import TINY_BUILDERS
from esmc_lens.models.vlm import load_model
from esmc_lens.residual.capture import capture

KEYS = sorted(TINY_BUILDERS)  # every family, and the second model type of two of them
PROMPTS = [
    "The color of the flower is",
    "Describe the image.",
    "What are common colors of flowers? Answer with single words.",
]
SIZES = [(64, 24), (20, 56), (30, 30)]  # wide, tall, square: different image-token counts
# text the processor adds around the image's block (the rest comes from the chat template)
AROUND_PROMPT = {"gemma3": ("\n\n", ""), "paligemma": ("<bos>", "\n")}


def _images(sizes=SIZES):
    cols = list(SOLID_COLOURS.values())
    return [solid(cols[i % len(cols)], size) for i, size in enumerate(sizes)]


@pytest.fixture(scope="module", params=KEYS)
def fam(request, one_torch_thread):
    """One tiny model per family, its capture of a mixed batch and the references (built
    once for all of this module's tests)."""
    if request.param == "smolvlm":
        pytest.importorskip("num2words", reason="SmolVLMProcessor needs num2words")
    vlm = load_model(f"tiny:{request.param}")
    images = _images()
    cache = capture(vlm, images, PROMPTS, store_dtype=torch.float32, progress=False,
                    batch_size=3, vision=True)
    return SimpleNamespace(key=request.param, vlm=vlm, images=images, cache=cache,
                           ref=reference_states(vlm, images, PROMPTS))


def test_capture_equals_hidden_states_and_lens_equals_logits(fam):
    vlm, cache = fam.vlm, fam.cache
    assert type(vlm.model).__name__ == vlm.family.model_types[vlm.model.config.model_type][0]
    assert cache.states.shape[:2] == (3, vlm.n_layers + 1)
    check_exact(vlm, cache, fam.ref)  # every layer bit for bit; lens vs logits <= 1e-5
    nns = capture(vlm, fam.images, PROMPTS, store_dtype=torch.float32, progress=False,
                  batch_size=3, vision=True, engine="nnsight")
    assert_same_cache(nns, cache)


def test_vision_feature_is_the_images_own(fam):
    """The vision-only baseline's vector: CLIP's pooled output (LLaVA-1.5) or the mean of
    the language model's input over the image's feature positions (every other family)."""
    vlm, hooked = fam.vlm, fam.ref[1]
    enc = vlm.encode(fam.images, PROMPTS)
    if vlm.family.vision_feature == "pooler":
        with torch.no_grad():
            want = vlm.vision_tower(enc["pixel_values"]).pooler_output
    else:
        feats = enc["input_ids"] == vlm.image_token_id
        want = torch.stack([hooked[0][b, feats[b]].mean(0) for b in range(3)])
        assert want.shape == (3, vlm.d_model)
    torch.testing.assert_close(fam.cache.vision, want.float(), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(fam.cache.vision[0], fam.cache.vision[1])  # red vs green


def test_positions_map_to_tokens_in_a_mixed_batch(fam):
    vlm, cache, tok = fam.vlm, fam.cache, fam.vlm.tokenizer
    enc = vlm.encode(fam.images, PROMPTS)
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert len(set(mask.sum(1).tolist())) > 1  # different lengths: left padding exercised
    offsets = ids.shape[1] - mask.sum(1)
    placeholders = (ids == vlm.image_token_id).sum(1).tolist()
    if vlm.family.dynamic:  # the image-token count follows the image's size
        assert len(set(placeholders)) > 1, placeholders
    else:
        assert len(set(placeholders)) == 1, placeholders
    before, after = AROUND_PROMPT.get(vlm.family.key, ("", ""))
    for b, prompt in enumerate(PROMPTS):
        valid = cache.positions[b] >= 0
        pos = cache.positions[b][valid]
        row = ids[b, offsets[b] + pos].tolist()
        assert tok.convert_ids_to_tokens(row) == [t for t in cache.tokens[b] if t]
        # the image's block: its first and last tokens are image tokens, it holds all the
        # row's image features, and the prompt's positions follow it to the sequence's end
        start, stop = cache.image_span[b].tolist()
        seq = ids[b, offsets[b]:].tolist()
        assert seq[start] in vlm.image_token_ids and seq[stop - 1] in vlm.image_token_ids
        assert seq[start:stop].count(vlm.image_token_id) == placeholders[b]
        assert pos.tolist() == list(range(stop, len(seq)))
        # what the positions read is the formatted prompt after its image placeholder
        formatted = vlm.format_prompt(prompt)
        marks = [vlm.processor.image_token, *vlm.family.image_markers]
        cut = max(formatted.rfind(m) + len(m) for m in marks if m in formatted)
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(row)) == (
            before + formatted[cut:] + after)
        assert prompt in formatted[cut:]
        assert (cache.states[b, :, ~valid] == 0).all()


def test_batch_equals_each_image_alone(fam):
    """Left padding and different image sizes change nothing but rounding: the model's own
    position ids (Qwen's 3-D M-RoPE included) follow the attention mask."""
    vlm, cache = fam.vlm, fam.cache
    for b, (image, prompt) in enumerate(zip(fam.images, PROMPTS, strict=True)):
        alone = capture(vlm, [image], prompt, store_dtype=torch.float32, progress=False)
        n = alone.n_positions
        assert alone.positions[0].tolist() == cache.positions[b, :n].tolist()
        assert alone.tokens[0] == cache.tokens[b][:n]
        assert alone.image_span[0].tolist() == cache.image_span[b].tolist()
        torch.testing.assert_close(alone.states[0], cache.states[b, :, :n], rtol=1e-4,
                                   atol=1e-4)


def test_qwen3_deepstack_leaves_prompt_positions_alone(one_torch_thread):
    """DeepStack adds vision features to the first layers' outputs at image positions only:
    there the next layer reads more than the captured (HF) hidden state; at the prompt's
    positions the captured state is exactly what the next layer reads."""
    vlm = load_model("tiny:qwen3_vl")
    images, prompts = _images()[:2], PROMPTS[:2]
    enc = vlm.encode(images, prompts)
    inputs: dict[int, torch.Tensor] = {}
    hooks = [layer.register_forward_pre_hook(
        lambda m, a, k, i=i: inputs.__setitem__(i, a[0] if a else k["hidden_states"]),
        with_kwargs=True) for i, layer in enumerate(vlm.layers)]
    try:
        with torch.no_grad():
            vlm.model(**enc, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    cache = capture(vlm, images, prompts, store_dtype=torch.float32, progress=False)
    _, hooked, offsets = reference_states(vlm, images, prompts)
    image = enc["input_ids"] == vlm.image_token_id
    n_deepstack = len(vlm.model.config.vision_config.deepstack_visual_indexes)
    for s in range(1, vlm.n_layers):  # stream s: output of layer s - 1, input of layer s
        differs = (hooked[s] != inputs[s]).any(-1)
        assert not differs[~image].any(), s
        assert bool(differs[image].all()) == (s <= n_deepstack), s
        for b in range(2):
            valid = cache.positions[b] >= 0
            seq = offsets[b] + cache.positions[b][valid]
            assert torch.equal(cache.states[b, s, : int(valid.sum())], inputs[s][b, seq])


def test_paligemma_prefix_attends_both_ways(one_torch_thread):
    """PaliGemma's prefix is bidirectional: an early prompt token's state depends on a later
    one. (Gemma 3, causal over text, as the control.)"""
    image = _images()[2]
    for key, both_ways in (("paligemma", True), ("gemma3", False)):
        vlm = load_model(f"tiny:{key}")
        a, b = (capture(vlm, [image], p, positions=["color"], layers=[1],
                        store_dtype=torch.float32, progress=False)
                for p in ("The color of the flower is", "The color of the flower was"))
        assert a.tokens == b.tokens == [["Ġcolor"]]
        gap = (a.states - b.states).abs().max().item()  # causal: rounding (other lengths)
        assert (gap > 1e-2) if both_ways else (gap < 1e-5), (key, gap)


def test_fp16_lens_runs_the_models_own_norm_in_fp32(one_torch_thread):
    """Gemma's RMSNorm scales by (1 + w): an fp16 model's lens runs that module on fp32
    copies of its weights, equal to the fp32 model with fp16-rounded weights."""
    import copy

    vlm = load_model("tiny:gemma3")
    norm = vlm.final_norm
    with torch.no_grad():
        norm.weight.normal_(generator=torch.Generator().manual_seed(0))
    half = copy.deepcopy(vlm.model).half()
    u16 = Unembed(half.model.language_model.norm, half.lm_head)
    rounded = copy.deepcopy(vlm.model)
    rounded.load_state_dict({k: v.half().float() for k, v in vlm.model.state_dict().items()})
    u32 = Unembed(rounded.model.language_model.norm, rounded.lm_head)
    h = torch.randn(5, vlm.d_model, generator=torch.Generator().manual_seed(1))
    normed = float_module(half.model.language_model.norm, h)
    assert normed.dtype == torch.float32
    assert torch.equal(normed, rounded.model.language_model.norm(h))
    torch.testing.assert_close(u16(h), u32(h), rtol=1e-6, atol=1e-6)
    # the hand-written Llama formula (w * x) the lens used before is not Gemma's norm
    x = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)
    assert not torch.allclose(x * rounded.model.language_model.norm.weight, normed)


def test_paligemma2_lens_soft_caps_like_the_model(one_torch_thread):
    vlm = load_model("tiny:paligemma")
    assert vlm.logit_softcap == 30.0
    images = _images()[:1]
    cache = capture(vlm, images, PROMPTS[0], store_dtype=torch.float32, progress=False)
    out, _, offsets = reference_states(vlm, images, PROMPTS[:1])
    h = cache.states[0, vlm.n_layers]
    capped = lens_logits(h, Unembed.from_model(vlm))
    raw = lens_logits(h, Unembed(vlm.final_norm, vlm.lm_head))
    want = out.logits[0, offsets[0] + cache.positions[0]]
    assert (capped - want).abs().max() <= 1e-5 < (raw - want).abs().max()


def test_save_pretrained_and_load_model_round_trip(fam, tmp_path):
    """A checkpoint directory loads as the same family, class, template, padding side and
    processor settings (same ids and pixels), in the dtype asked for."""
    src = load_model(f"tiny:{fam.key}")  # save_pretrained edits the config: a fresh model
    src.model.save_pretrained(tmp_path)
    src.processor.save_pretrained(tmp_path)
    vlm = load_model(str(tmp_path), dtype="float16")
    assert type(vlm.model) is type(src.model) and vlm.family is src.family
    assert type(vlm.processor) is type(src.processor)
    assert vlm.prompt_style == src.prompt_style
    check_checkpoint_round_trip(src, vlm, PROMPTS[0])
    got, want = vlm.encode(fam.images, PROMPTS), src.encode(fam.images, PROMPTS)
    assert sorted(got) == sorted(want)
    for k in want:
        assert torch.equal(got[k], want[k].to(got[k].dtype)), k


def test_run_esmc_end_to_end(fam, tmp_path):
    """ESMC on 8 synthetic images of 8 sizes: the target cell is the same prompt token in
    every image, whatever its image-token count."""
    from esmc_lens.data.dataset import load_dataset
    from esmc_lens.data.synthetic import make_synthetic_dataset
    from esmc_lens.pipeline import capture_target_cells, run_esmc

    ds = load_dataset(make_synthetic_dataset(tmp_path / "s", n_images=8, seed=0, image_size=32))
    sizes = [(32, 32), (48, 20), (20, 44), (40, 40), (56, 24), (24, 24), (36, 28), (28, 52)]
    images = [ds.open(i).resize(size) for i, size in enumerate(sizes)]
    y, names = ds.y("color"), list(ds.classes["color"])
    vlm, prompt = fam.vlm, "The color of the object is"
    from sklearn.exceptions import ConvergenceWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", EsmcWarning)  # a random model: no cell passes tau
        warnings.simplefilter("ignore", ConvergenceWarning)  # nor separates the images
        res = run_esmc(vlm, images, prompt, y_true=y, class_names=names, keywords=names,
                       keyword_source="user", n_seeds=1, n_samples=4, batch_size=4,
                       epochs=10, progress=False)
    assert res.labels.shape == (8,) and set(res.labels) <= set(range(4))
    assert list(res.scores.index) == ["ESMC", "ESMC w/o head", "Output", "Vision only"]
    assert np.isfinite(res.scores["nmi_mean"]).all() and len(res.answers) == 8
    assert res.meta["family"] == vlm.family.key
    # the target, counted from the sequence's end, is one prompt token in all 8 images
    stream, tail = res.target[0][0], [p for _, p in res.target_positions]
    assert all(t < 0 for t in tail)
    cells = capture_target_cells(vlm, images, prompt, sorted(set(tail)), [stream],
                                 batch_size=1, vision=False, progress=False)
    slot = sorted(set(tail)).index(tail[0])
    assert len({row[slot] for row in cells.tokens}) == 1, cells.tokens
    prompt_cells = capture(vlm, images, prompt, layers=[stream], batch_size=1,
                           store_dtype=torch.float32, progress=False)
    for b in range(8):  # the same state as the prompt's own capture at that token
        n = int((prompt_cells.positions[b] >= 0).sum())
        assert torch.equal(cells.states[b, 0, slot], prompt_cells.states[b, 0, n + tail[0]])


def test_family_of_picks_by_config_and_names_the_supported_ones(one_torch_thread):
    from transformers import AutoConfig, LlavaConfig

    assert family_of(load_model("tiny:pixtral").model.config).key == "pixtral"
    assert family_of(LlavaConfig()).key == "llava"
    for fam_ in FAMILIES.values():
        for model_type in fam_.model_types:
            if fam_.key != "pixtral":
                assert family_of(AutoConfig.for_model(model_type)) is fam_
    with pytest.raises(ModelError, match=r"'bert'.*Supported: LLaVA-1.5 \(llava\)"):
        family_of(AutoConfig.for_model("bert"))


def test_sharded_capture_merges_to_the_single_capture(fam, tmp_path):
    """Two "ranks" write their batches' shards; merged, they are the one-process capture."""
    from esmc_lens.residual.distributed import capture_to_disk, merge_capture, shard_batches

    options = dict(store_dtype=torch.float32, vision=True, keywords=["red", "blue"], top_k=2)
    ref = capture(fam.vlm, fam.images, PROMPTS, batch_size=1, progress=False, **options)
    for rank in range(2):
        capture_to_disk(fam.vlm, fam.images, PROMPTS, tmp_path, batch_size=1, progress=False,
                        batches=shard_batches(3, 1, rank, 2), **options)
    merged = merge_capture(fam.vlm, fam.images, PROMPTS, tmp_path, batch_size=1, **options)
    assert merged.meta["capture_cache"]["computed"] == 0
    assert_same_cache(merged, ref)


def test_cli_lens_on_a_dynamic_resolution_family(tmp_path, capsys, one_torch_thread):
    """``esmc-lens lens --model tiny:qwen2_vl`` reads the same top tokens as capture."""
    import json

    from esmc_lens.apps.cli import main

    path, prompt = tmp_path / "wide.png", "The color of the flower is"
    solid((220, 20, 30), (64, 24)).save(path)
    assert main(["lens", "--model", "tiny:qwen2_vl", "--image", str(path), "--prompt", prompt,
                 "--top-k", "2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    vlm = load_model("tiny:qwen2_vl")
    want = capture(vlm, [solid((220, 20, 30), (64, 24))], prompt, top_k=2, progress=False)
    assert [p["token"] for p in out["positions"]] == want.tokens[0]
    got = [[[t["token"] for t in p["top"]] for p in lay["positions"]] for lay in out["layers"]]
    assert got == [[[vlm.tokenizer.decode([int(i)]) for i in ids] for ids in layer]
                   for layer in want.top_ids[0].tolist()]


def test_readme_support_table_lists_every_family():
    from conftest import REPO

    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("## Supported models"):readme.index("## Results on")]
    for fam_ in FAMILIES.values():
        assert f'load_model("{fam_.example}")' in table, fam_.key
        for model_type, (model_class, processor) in fam_.model_types.items():
            assert f"`{model_class}` (`{model_type}`" in table, (fam_.key, model_type)
            assert f"`{processor}`" in table, (fam_.key, processor)
