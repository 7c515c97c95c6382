"""Logit lens: Unembed, chunked readouts, the keyword rule."""

from __future__ import annotations

import pytest
import torch

from esmc_lens.errors import ConfigError
from esmc_lens.lens.keyword_rule import keyword_token_ids
from esmc_lens.lens.readout import keyword_probs, readout, top_k, topk_rows
from esmc_lens.lens.unembed import LensWorkspace, Unembed, lens_logits, lens_probs


@pytest.fixture(scope="module")
def states(tiny_vlm):
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 4, 5, tiny_vlm.d_model, generator=g)


def test_unembed_is_norm_then_lm_head(tiny_vlm, states):
    u = Unembed.from_model(tiny_vlm)
    want = tiny_vlm.lm_head(tiny_vlm.final_norm(states))
    torch.testing.assert_close(u(states), want, rtol=0, atol=1e-6)
    # chunking never changes the answer
    torch.testing.assert_close(lens_logits(states, u, chunk=7), want, rtol=0, atol=1e-5)


def test_readout_equals_full_softmax(tiny_vlm, states):
    u = Unembed.from_model(tiny_vlm)
    probs = lens_probs(states, u)
    groups = [[5, 9], [11]]
    r = readout(states, u, groups, k=3, chunk=4)
    torch.testing.assert_close(r.keyword_probs[..., 0], probs[..., 5] + probs[..., 9])
    torch.testing.assert_close(r.keyword_probs[..., 1], probs[..., 11])
    p, i = probs.topk(3, dim=-1)
    assert torch.equal(r.top_ids, i)
    torch.testing.assert_close(r.top_probs, p)
    _, ti = top_k(states, u, k=3)
    assert torch.equal(ti, i)
    torch.testing.assert_close(keyword_probs(states, u, groups), r.keyword_probs)


def test_workspace_reuses_its_buffers_and_changes_no_value(tiny_vlm, states):
    import copy

    groups = [[5, 9], [11]]
    half = copy.deepcopy(tiny_vlm.model).half()
    biased = copy.deepcopy(tiny_vlm.model)
    head = biased.lm_head
    biased.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    biased.lm_head.weight.data.copy_(head.weight)
    biased.lm_head.bias.data.normal_(generator=torch.Generator().manual_seed(1))
    unembeds = {  # fp32 as is; fp16 up-cast into the workspace; an unembedding with a bias
        "fp32": Unembed.from_model(tiny_vlm),
        "fp16": Unembed(half.model.language_model.norm, half.lm_head),
        "bias": Unembed(biased.model.language_model.norm, biased.lm_head),
    }
    for name, u in unembeds.items():
        ws = LensWorkspace()
        flat = states.reshape(-1, states.shape[-1])
        with torch.inference_mode():
            want = u(flat)  # no workspace: the module's own computation
            got = u(flat, ws)
            assert torch.equal(got, want), name
            ptr = got.data_ptr()
            assert torch.equal(u(flat[:7], ws), want[:7]), name  # a smaller chunk: same buffer
            assert u(flat[:7], ws).data_ptr() == ptr
            assert torch.equal(u(states, ws), want.reshape(*states.shape[:-1], -1)), name
        fresh = readout(states, u, groups, k=3, chunk=4)
        for _ in range(2):  # one workspace over several calls, chunks of 4 and a last of 2
            again = readout(states, u, groups, k=3, chunk=4, workspace=ws)
            assert torch.equal(again.keyword_probs, fresh.keyword_probs), name
            assert torch.equal(again.top_ids, fresh.top_ids), name
            assert torch.equal(again.top_probs, fresh.top_probs), name
        # allocated once each: logits for the largest request (60 rows), probabilities for
        # readout's chunk (4 rows), and the fp16 weight's fp32 copy
        n_vocab = tiny_vlm.vocab_size
        expected = (60 + 4) * n_vocab * 4 + (n_vocab * tiny_vlm.d_model * 4 if name == "fp16"
                                             else 0)
        assert ws.nbytes == expected, name


def test_fp16_model_lens_is_computed_in_fp32(tiny_vlm, states):
    import copy

    half = copy.deepcopy(tiny_vlm.model).half()
    u16 = Unembed(half.model.language_model.norm, half.lm_head)  # compute dtype fp32
    u32 = Unembed.from_model(tiny_vlm)
    out = u16(states)
    assert out.dtype == torch.float32
    # only the weights' fp16 rounding separates them
    torch.testing.assert_close(out, u32(states), rtol=1e-2, atol=2e-2)


def test_keyword_rule(tiny_vlm):
    tok = tiny_vlm.tokenizer
    kt = keyword_token_ids(tok, ["red", "Blue"])
    assert kt.keywords == ["red", "Blue"]
    for word, ids in zip(["red", "blue"], kt.groups, strict=True):
        whole = []
        for v in (" " + word, word, " " + word.capitalize(), word.capitalize()):
            toks = [t for t in tok.encode(v, add_special_tokens=False)
                    if tok.decode([t]).strip()]  # bare spaces skipped
            if len(toks) == 1 and toks[0] not in whole:  # whole-word forms only
                whole.append(toks[0])
        assert whole and ids == whole
    assert tok.decode([kt.groups[0][0]]) == " red"
    assert kt.multi_token == []  # " red" and " blue" are single tokens
    assert kt.pieces == {"red": [tok.decode([i]) for i in kt.groups[0]],
                         "Blue": [tok.decode([i]) for i in kt.groups[1]]}
    with pytest.raises(ConfigError, match="empty"):
        keyword_token_ids(tok, [""])


def test_keyword_clash_is_reported(tiny_vlm):
    kt = keyword_token_ids(tiny_vlm.tokenizer, ["red", "Red"])
    assert kt.clashes and all(set(v) == {"red", "Red"} for v in kt.clashes.values())


PIECE_SPLITS = {  # variant -> its tokens
    " lily": [" lily"], "lily": ["l", "ily"], " Lily": [" Lily"], "Lily": [" Lily"],
    " carnation": [" carn", "ation"], "carnation": ["c", "arnation"],
    " Carnation": [" C", "arnation"], "Carnation": ["C", "arnation"],
    " hyacinth": [" hy", "acinth"], "hyacinth": ["hy", "acinth"],
    " Hyacinth": [" Hy", "acinth"], "Hyacinth": ["Hy", "acinth"],
    " daisy": [" d", "aisy"], "daisy": ["da", "aisy"], " Daisy": [" Daisy"],
    "Daisy": ["D", "aisy"],
    " sunflower": [" sunflower"], "sunflower": ["sun", "flower"],
    " Sunflower": [" Sun", "flower"], "Sunflower": ["Sun", "flower"],
    " theater": [" the", "ater"], "theater": ["the", "ater"], " Theater": [" The", "ater"],
    "Theater": ["The", "ater"],
    " tulip": [" tul", "ip"], "tulip": ["t", "ul", "ip"], " Tulip": [" Tul", "ip"],
    "Tulip": ["T", "ul", "ip"],
}


class PieceTokenizer:
    """A hand-made vocabulary: whole words, long and short first pieces of split words."""

    VOCAB = (" lily", " Lily", "l", "ily", " carn", "c", " C", "C", "arnation", "ation",
             " hy", "hy", " Hy", "Hy", "acinth", " Daisy", " d", "aisy", "D", "da",
             " sunflower", "sun", " Sun", "Sun", "flower", " the", "the", " The", "The",
             "ater", " tul", "t", "ul", "ip", " Tul", "T")
    unk_token_id = None

    def encode(self, text, add_special_tokens=False):
        return [self.VOCAB.index(t) for t in PIECE_SPLITS[text]]

    def decode(self, ids):
        return "".join(self.VOCAB[i] for i in ids)


def test_keyword_rule_whole_words_first_then_long_uncommon_pieces():
    tok = PieceTokenizer()
    kt = keyword_token_ids(tok, ["lily", "carnation", "daisy", "sunflower", "tulip"])
    assert kt.pieces == {
        "lily": [" lily", " Lily"],  # whole words; the piece "l" is not used
        "carnation": [" carn"],  # split everywhere: only its piece of >= 3 letters
        "daisy": [" Daisy"],  # " d", "da", "D" would score most words
        "sunflower": [" sunflower"],  # a whole word exists: "sun", " Sun" are not used
        "tulip": [" tul", " Tul"],
    }
    assert kt.multi_token == ["carnation", "tulip"]
    assert kt.clashes == {}
    # no whole word and no long piece, or only common-word pieces (" the"): not scorable
    from esmc_lens.lens.keyword_rule import split_scorable

    assert split_scorable(tok, ["lily", "hyacinth", "theater"]) == (["lily"],
                                                                     ["hyacinth", "theater"])
    with pytest.raises(ConfigError, match=r"\['hyacinth', 'theater'\] cannot be scored"):
        keyword_token_ids(tok, ["lily", "hyacinth", "theater"])


@pytest.mark.parametrize("width", [49152, 32064, 1000, 130, 7])
@pytest.mark.parametrize("k", [1, 5, 10])
def test_topk_rows_equals_torch_topk(width, k):
    g = torch.Generator().manual_seed(width + k)
    x = torch.randn(40, width, generator=g)
    if width >= 32064:  # adversarial rows: all top entries in one block; one per block
        x[0, 128:128 + k] += 100
        x[1, torch.arange(k) * 128 + 3] += 100
        x[2, -k:] += 100  # in the last, partial block
    k = min(k, width)
    want = x.topk(k, dim=-1)
    got = topk_rows(x, k)
    assert torch.equal(got[0], want.values) and torch.equal(got[1], want.indices)


def test_topk_rows_with_ties_returns_the_right_values():
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (30, 4096), generator=g).float()  # thousands of ties
    x[0] = 1.0  # a constant row
    values, ids = topk_rows(x, 5)
    assert torch.equal(values, x.topk(5, dim=-1).values)
    assert torch.equal(x.gather(1, ids), values)
    assert all(len(set(row.tolist())) == 5 for row in ids)
