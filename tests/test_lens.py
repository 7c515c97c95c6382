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
    # readout's 4-row chunks round otherwise than lens_probs' one 60-row product (~1e-9
    # here): the ids are equal where the top 4 probabilities lie > 1e-6 apart (55 of the 60
    # cells; the tiny model's are ~2e-3 each), and pick the top values everywhere
    p4 = probs.topk(4, dim=-1).values
    separated = (p4[..., :-1] - p4[..., 1:]).min(-1).values > 1e-6
    assert separated.float().mean() > 0.9
    assert torch.equal(r.top_ids[separated], i[separated])
    torch.testing.assert_close(probs.gather(-1, r.top_ids), p)
    torch.testing.assert_close(r.top_probs, p)
    _, ti = top_k(states, u, k=3)
    assert torch.equal(ti, i)
    torch.testing.assert_close(keyword_probs(states, u, groups), r.keyword_probs)


def test_workspace_reuses_its_buffers_and_changes_no_value(tiny_vlm, states):
    """Bit identity only between like and like: a matrix product's rounding depends on its
    shape (BLAS blocks and edge kernels differ between 7 and 60 rows, and between CPUs), so
    each exact comparison is of the same rows through the same kernels, a fresh buffer
    against a reused one."""
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
    flat = states.reshape(-1, states.shape[-1])  # 60 rows
    for name, u in unembeds.items():
        ws = LensWorkspace()
        with torch.inference_mode():
            want = u(flat)  # no workspace: the module's own computation of the 60 rows
            got = u(flat, ws)
            ptr = got.data_ptr()
            got = got.clone()  # the next call overwrites the buffer
            if name == "bias":  # nn.Linear adds its bias inside addmm, the workspace after mm
                torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=name)
            else:  # the same 60-row product either way
                assert torch.equal(got, want), name
            # 7 rows written into the 60-row buffer equal 7 rows in a fresh workspace
            small = u(flat[:7], ws)
            assert small.data_ptr() == ptr, name  # reused, not reallocated
            assert torch.equal(small, u(flat[:7], LensWorkspace())), name
            # the first 7 rows of the 60-row product went through other BLAS blocks: close only
            torch.testing.assert_close(small, want[:7], rtol=1e-5, atol=1e-6, msg=name)
            # any leading shape: the same 60 rows, so the same product as ``got``
            assert torch.equal(u(states, ws), got.reshape(*states.shape[:-1], -1)), name
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
    """An fp16 model's lens is the fp32 lens of its (fp16-rounded) weights, not an fp16
    computation: the inputs make the two differ by far more than the tolerance."""
    import copy

    half = copy.deepcopy(tiny_vlm.model).half()
    # A final norm 64 times larger (exact in fp16): logits of |x| ~ 10-30, where fp16's
    # spacing is 2^-6..2^-4 while fp32 keeps them to ~1e-6.
    half.model.language_model.norm.weight.data *= 64
    u16 = Unembed(half.model.language_model.norm, half.lm_head)  # compute dtype fp32
    ref = copy.deepcopy(half).float()  # the same rounded weights, computed in fp32
    u32 = Unembed(ref.model.language_model.norm, ref.lm_head)
    with torch.inference_mode():
        out = u16(states)
        want = u32(states)
        in_fp16 = half.lm_head(half.model.language_model.norm(states.half())).float()
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-4)
    # the check can fail: an fp16 computation misses ``want`` by far more than the tolerance
    assert (in_fp16 - want).abs().max() > 1e-2
    # and so do the probabilities the votes compare with tau
    p16, p32 = torch.softmax(in_fp16, -1), torch.softmax(out, -1)
    torch.testing.assert_close(p32, torch.softmax(want, -1), rtol=1e-4, atol=1e-6)
    assert (p16 - p32).abs().max() > 1e-3


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
    kt = keyword_token_ids(tok, ["lily", "daisy", "sunflower", "tulip"])
    assert kt.pieces == {
        "lily": [" lily", " Lily"],  # whole words; the piece "l" is not used
        "daisy": [" Daisy"],  # " d", "da", "D" would score most words
        "sunflower": [" sunflower"],  # a whole word exists: "sun", " Sun" are not used
        "tulip": [" tul", " Tul"],  # split everywhere: pieces of >= 3 letters, half of it
    }
    assert kt.multi_token == ["tulip"]
    assert kt.clashes == {}
    # no whole word and no piece that says most of the keyword: " carn" is 4 of carnation's
    # 9 letters, " hy" 2, and " the" of theater a common word
    from esmc_lens.lens.keyword_rule import split_scorable

    bad = ["carnation", "hyacinth", "theater"]
    assert split_scorable(tok, ["lily", *bad]) == (["lily"], bad)
    with pytest.raises(ConfigError, match=r"\['carnation', 'hyacinth', 'theater'\] cannot"):
        keyword_token_ids(tok, ["lily", *bad])


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
