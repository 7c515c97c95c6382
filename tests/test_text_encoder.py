"""esmc_lens.models.text_encoder (all-MiniLM-L6-v2 offline; CLIP on a tiny random model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from esmc_lens.errors import ConfigError, ModelError
from esmc_lens.models.text_encoder import (
    CLIPTextEncoder,
    MiniLMEncoder,
    TextEncoder,
    load_text_encoder,
    pool,
)


@pytest.fixture(scope="module")
def minilm() -> MiniLMEncoder:
    return MiniLMEncoder()


def test_minilm_reads_sentence_transformers_config(minilm):
    assert minilm.name == "all-MiniLM-L6-v2"
    assert minilm.dim == 384
    assert minilm.pooling == ("mean_tokens",)
    assert minilm.normalize_module  # modules.json lists a Normalize module
    assert minilm.max_seq_length == 256  # sentence_bert_config.json
    assert not minilm.model.training


def test_semantic_similarity_ordering(minilm):
    e = minilm.encode(["a red flower", "a crimson blossom", "a blue car",
                       "a white flower", "snow white"])
    sim = e @ e.T
    assert sim[0, 1] > sim[0, 2]  # red flower ~ crimson blossom, not a blue car
    assert sim[3, 4] > sim[3, 2]


def test_unit_norm_float32_shape(minilm):
    texts = ["red", "", "The color of the flower is pink.", "x " * 600]  # long: truncated
    e = minilm.encode(texts, batch_size=3)
    assert e.shape == (4, 384) and e.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    assert minilm.encode([]).shape == (0, 384)


def test_deterministic_and_batch_independent(minilm):
    texts = ["a red flower", "yellow", "The species of the flower is a daisy.", "rose"]
    a = minilm.encode(texts, batch_size=64)
    b = minilm.encode(texts, batch_size=64)
    np.testing.assert_array_equal(a, b)
    c = minilm.encode(texts, batch_size=1)  # padding differs: equal up to round-off
    np.testing.assert_allclose(a, c, atol=1e-5)


def test_equals_manual_mean_pool(minilm):
    texts = ["a red flower", "The color of the flower is white with a yellow centre"]
    tok = minilm.tokenizer(texts, padding=True, truncation=True, max_length=256,
                           return_tensors="pt")
    with torch.no_grad():
        h = minilm.model(**tok).last_hidden_state
    m = tok["attention_mask"].unsqueeze(-1).float()
    manual = (h * m).sum(1) / m.sum(1)
    manual = (manual / manual.norm(dim=1, keepdim=True)).numpy()
    np.testing.assert_allclose(minilm.encode(texts), manual, atol=1e-6)
    # the short text padded in a batch equals it encoded alone (mask excludes padding)
    np.testing.assert_allclose(minilm.encode(texts[:1])[0], manual[0], atol=1e-5)


def test_pool_modes():
    h = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    mean = pool(h, mask)
    torch.testing.assert_close(mean[0], h[0, :2].mean(0))
    torch.testing.assert_close(mean[1], h[1].mean(0))
    both = pool(h, mask, ("cls_token", "max_tokens"))
    torch.testing.assert_close(both[0], torch.cat([h[0, 0], h[0, 1]]))
    with pytest.raises(ConfigError):
        pool(h, mask, ("weird",))


def test_bad_inputs(minilm):
    with pytest.raises(ConfigError, match="wrap it"):
        minilm.encode("a red flower")
    with pytest.raises(ConfigError, match="item 1"):
        minilm.encode(["red", None])
    with pytest.raises(ConfigError, match="batch_size"):
        minilm.encode(["red"], batch_size=0)


def test_load_text_encoder_names(minilm, tmp_path):
    assert load_text_encoder(minilm) is minilm
    enc = load_text_encoder("minilm")
    assert isinstance(enc, MiniLMEncoder) and isinstance(enc, TextEncoder)
    by_dir = load_text_encoder(str(minilm.path))  # a sentence-transformers folder
    assert isinstance(by_dir, MiniLMEncoder)
    np.testing.assert_array_equal(by_dir.encode(["red"]), minilm.encode(["red"]))
    with pytest.raises(ModelError, match=r"no config\.json"):
        MiniLMEncoder(tmp_path)
    with pytest.raises(ConfigError):
        load_text_encoder("")


def test_clip_unavailable_names_the_fix():
    with pytest.raises(ModelError, match="minilm"):
        CLIPTextEncoder("openai/clip-vit-large-patch14", local_files_only=True)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPConfig, CLIPModel

    from esmc_lens.models.tiny import build_tokenizer

    tok = build_tokenizer()
    tok.padding_side = "right"
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                         num_hidden_layers=2, num_attention_heads=2,
                         max_position_embeddings=77, pad_token_id=tok.pad_token_id,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, image_size=30, patch_size=6),
        projection_dim=16,
    )
    torch.manual_seed(0)
    model = CLIPModel(cfg).eval()
    d = tmp_path_factory.mktemp("tiny_clip")
    model.save_pretrained(d)
    tok.save_pretrained(d)
    return d


def test_clip_text_encoder_equals_get_text_features(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPModel

    enc = load_text_encoder(str(tiny_clip_dir), device="cpu")
    assert isinstance(enc, CLIPTextEncoder) and enc.dim == 16
    texts = ["The color of the flower is red.", "blue", "a cat"]
    got = enc.encode(texts)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-6)

    model = CLIPModel.from_pretrained(tiny_clip_dir).eval()
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    batch = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model.get_text_features(**batch)
    feats = getattr(out, "pooler_output", out)  # a tensor in transformers 4.x
    feats = torch.nn.functional.normalize(feats, dim=1).numpy()
    np.testing.assert_allclose(got, feats, atol=1e-5)


def test_clip_encoder_rejects_other_architectures(minilm):
    with pytest.raises(ModelError, match="not CLIP"):
        CLIPTextEncoder(str(minilm.path))
