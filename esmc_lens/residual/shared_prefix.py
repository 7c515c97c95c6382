"""Several criteria, one image pass: the shared prefix runs once, each criterion on its KV cache.

Every criterion prompt enters the model after the same tokens: the chat template, the image
tokens and (``prompt_style="completion"``) the instruction. Those tokens, the *prefix*, and
the vision tower run once per image; the criteria's own tokens then run together on the
prefix's KV cache, as a token trie (criteria that start alike share their first tokens: "The
color of the object is" and "The color of the background is" share "The color of the"):

    [prefix: system, user, <image> x 105, instruction, assistant]  ->  KV cache
    trie:  The -> color -> of -> the -> object -> is
                                     \\-> background -> is
              \\-> shape -> of -> the -> object -> is

A trie token attends to the prefix and to its own ancestors (a 4-D attention mask) at
position ``prefix length + depth``, so each criterion's tokens see exactly the keys, values
and positions of a full forward pass of its prompt alone.

Equality with a full forward pass per criterion (:func:`~esmc_lens.residual.capture.capture`
of that prompt; ``tests/test_shared_prefix.py``):

* with eager attention, the first criterion's states are bit-identical (its keys are the
  prefix and its own tokens, in order); the others differ by fp32 rounding only, because
  masked-out trie tokens of other criteria sit between their keys and change the order of
  the attention sums (measured: up to 2e-6 of a stream's largest value on the offline model,
  2e-7 on the tiny LLaVA);
* with SDPA, the custom mask takes another kernel than a plain causal pass: the same order of
  differences for every criterion.
The stated tolerance is ``SHARED_PREFIX_RTOL`` (1e-5) of each stream's largest absolute value.

The Output baseline's answers are generated from the same prefill (:func:`capture_criteria`
with ``answer_tokens``): greedy tree decoding, one row per image, one new token per criterion
per step, each attending to the prefix, its criterion's tokens and its own answer so far. An
answer stops at an end-of-sequence token, at the end of its first sentence or line
(``SENTENCE_END``), or after ``answer_tokens`` tokens (the cap), and is cut as
:meth:`~esmc_lens.models.vlm.VLM.generate` cuts it; the reason is recorded.

Families whose position ids are not a count of tokens (Qwen2/3-VL's M-RoPE), whose prefix
attends to the prompt both ways (PaliGemma) or whose masks are built inside the forward
(Gemma 3) cannot share a prefix (:func:`shares_prefix`); the others (LLaVA, LLaVA-NeXT,
LLaVA-OneVision, InternVL, Idefics3/SmolVLM, Mistral 3, Pixtral) are tested with images of
different sizes in one batch, i.e. left-padded prefixes of different image-token counts.

>>> cc = capture_criteria(vlm, images, {"color": "The color of the flower is",
...                                     "species": "The species of the flower is"},
...                       keywords={"color": ["red", "white"], "species": ["rose", "lily"]})
...                                                                    # doctest: +SKIP
>>> cc.caches["color"]  # what capture(vlm, images, ...) gives        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from ..data.source import ImageSource
from ..errors import ConfigError, ModelError
from ..lens.keyword_rule import keyword_token_ids
from ..lens.readout import readout
from ..lens.unembed import LensWorkspace, Unembed
from ..models.vlm import SENTENCE_END, VLM, first_sentence
from .cache import ResidualCache
from .capture import image_block

__all__ = ["SHARED_PREFIX_RTOL", "CriteriaCapture", "CriteriaPrompts", "capture_criteria",
           "criteria_dict", "split_criteria"]

SHARED_PREFIX_RTOL = 1e-5  # of a stream's largest |state|: the stated fp32 tolerance
ATTENTION = ("sdpa", "eager")  # implementations that take a custom 4-D mask
LENS_CHUNK_BYTES = 256 << 20  # logits of one lens chunk (fp32)


def criteria_dict(prompts: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """``{name: prompt}`` from one prompt, a list of prompts or a mapping (names kept)."""
    if isinstance(prompts, str):
        return {"criterion": prompts}
    if isinstance(prompts, Mapping):
        out = {str(k): v for k, v in prompts.items()}
    else:
        out = {f"criterion_{i}": p for i, p in enumerate(prompts)}
    if not out:
        raise ConfigError("no criteria given: pass {'color': 'The color of the flower is', ...}")
    bad = [k for k, v in out.items() if not isinstance(v, str) or not v.strip()]
    if bad:
        raise ConfigError(f"criteria {bad} have no prompt text: give each a sentence such as "
                          "'The color of the flower is'")
    return out


# Families whose position ids are not a plain count (M-RoPE) or whose prefix attends to the
# prompt both ways (PaliGemma): a criterion's tokens cannot run on a cache shared by others.
UNSHARED_FAMILIES = {
    "qwen2_vl": "its M-RoPE position ids are computed inside the forward from the whole input",
    "qwen3_vl": "its M-RoPE position ids are computed inside the forward from the whole input",
    "paligemma": "its prefix (image and prompt) attends both ways, so no token is shared",
    "gemma3": "its attention masks are built inside the forward (an image's tokens attend "
              "both ways, sliding-window layers), which a custom mask would replace",
}


def shares_prefix(vlm: VLM) -> str | None:
    """None when ``vlm`` can run criteria on a shared prefix, else the reason it cannot."""
    reason = UNSHARED_FAMILIES.get(vlm.family.key)
    if reason is None and vlm.prompt_style == "plain":
        reason = "prompt style 'plain' lets the processor place the prompt"
    impl = getattr(vlm.model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
    if reason is None and impl not in ATTENTION:
        reason = (f"attention implementation {impl!r} takes no custom 4-D mask (load the "
                  "model with attn_implementation='sdpa' or 'eager')")
    return reason


@dataclass(frozen=True)
class CriteriaPrompts:
    """How K criterion prompts split into one shared prefix and a trie of their own tokens.

    The prefix is everything before the first token that overlaps a criterion's text; its
    length may differ per image (dynamic-resolution families), so cells are addressed from
    its end: ``("prefix", m)`` is the prefix's m-th token from its end (1 = its last),
    ``("node", j)`` trie node j.
    """

    names: tuple[str, ...]
    prompts: tuple[str, ...]
    formatted: tuple[str, ...]  # each criterion's full model input text
    node_ids: tuple[int, ...]  # [n_nodes] token of each trie node
    parents: tuple[int, ...]  # [n_nodes] parent node, -1 for a first token
    paths: tuple[tuple[int, ...], ...]  # per criterion: its trie nodes, in order
    node_tokens: tuple[str, ...]  # [n_nodes] token strings
    tail_tokens: tuple[str, ...]  # the prefix's tokens after the image block

    @property
    def n_nodes(self) -> int:
        return len(self.node_ids)

    @property
    def depth(self) -> torch.Tensor:
        """[n_nodes] long: 0 for a criterion's first token."""
        d: list[int] = []
        for p in self.parents:
            d.append(0 if p < 0 else d[p] + 1)
        return torch.tensor(d, dtype=torch.long)

    def visible(self) -> torch.Tensor:
        """[n_nodes, n_nodes] bool: node i attends to node j (j is i or an ancestor of i)."""
        n = self.n_nodes
        vis = torch.zeros(n, n, dtype=torch.bool)
        for i in range(n):
            j = i
            while j >= 0:
                vis[i, j] = True
                j = self.parents[j]
        return vis

    def prompt_len(self, c: int) -> int:
        """Tokens of criterion ``c``'s input after the image block."""
        return len(self.tail_tokens) + len(self.paths[c])

    def prompt_tokens(self, c: int) -> list[str]:
        """Token strings of criterion ``c``'s input after the image block."""
        return list(self.tail_tokens) + [self.node_tokens[j] for j in self.paths[c]]

    def cell(self, c: int, from_end: int) -> tuple[str, int]:
        """Where criterion ``c``'s token ``from_end`` (-1: its last) runs."""
        own = len(self.paths[c])
        if from_end >= -own:
            return "node", self.paths[c][own + from_end]
        return "prefix", -from_end - own

    def summary(self) -> dict:
        return {"prefix_tail_tokens": len(self.tail_tokens), "trie_nodes": self.n_nodes,
                "criterion_tokens": {n: len(p) for n, p in zip(self.names, self.paths,
                                                                strict=True)}}


def split_criteria(vlm: VLM, prompts, image) -> CriteriaPrompts:
    """Split the criteria's model inputs into the shared prefix and a token trie.

    ``image`` is any one image. The split is at the first token that overlaps the criterion
    text in the formatted input; tokens are those the processor gives each full prompt, so
    prefix + a criterion's trie path is, token for token, that criterion's input.
    """
    why = shares_prefix(vlm)
    if why is not None:
        raise ConfigError(f"{vlm.name!r} cannot share a prefix between criteria: {why}")
    crit = criteria_dict(prompts)
    names, texts = list(crit), list(crit.values())
    tok = vlm.tokenizer
    seqs, formatted, cut = [], [], []
    for name, text in zip(names, texts, strict=True):
        full = vlm.format_prompt(text)
        ids = vlm.encode([image], text)["input_ids"][0].tolist()
        start = full.rfind(text.strip())
        if start < 0:
            raise ConfigError(f"criterion {name!r}: the chat template does not keep its prompt "
                              f"{text!r} verbatim; shared-prefix capture needs it")
        enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
        n_own = sum(1 for _, end in enc["offset_mapping"] if end > start)
        if n_own == 0 or enc["input_ids"][-n_own:] != ids[-n_own:]:
            raise ConfigError(f"criterion {name!r}: its tokens could not be located at the end "
                              "of the model input; shared-prefix capture needs the criterion "
                              "text last in the prompt (prompt_style 'chat' or 'completion')")
        seqs.append(ids)
        formatted.append(full)
        cut.append(len(ids) - n_own)
    if len(set(cut)) != 1 or any(s[:cut[0]] != seqs[0][:cut[0]] for s in seqs):
        raise ConfigError(f"the criteria {names} do not share the tokens before their text "
                          "(does the template put criterion text before the image?)")
    prefix = seqs[0][:cut[0]]
    _, stop = image_block(vlm, prefix)
    node_of: dict[tuple[int, int], int] = {}
    node_ids: list[int] = []
    parents: list[int] = []
    paths = []
    for s in seqs:
        parent, path = -1, []
        for t in s[cut[0]:]:
            key = (parent, t)
            if key not in node_of:
                node_of[key] = len(node_ids)
                node_ids.append(t)
                parents.append(parent)
            parent = node_of[key]
            path.append(parent)
        paths.append(tuple(path))
    return CriteriaPrompts(
        names=tuple(names), prompts=tuple(texts), formatted=tuple(formatted),
        node_ids=tuple(node_ids), parents=tuple(parents), paths=tuple(paths),
        node_tokens=tuple(tok.convert_ids_to_tokens(node_ids)),
        tail_tokens=tuple(tok.convert_ids_to_tokens(prefix[stop:])))


# -- one batch ---------------------------------------------------------------------------


class _Stop(Exception):
    """Raised by the hook of the last stream a pass needs: the rest is not computed."""


class _StreamHooks:
    """Forward hooks keeping ``h[rows, cols]`` of every stream in ``stream`` for one pass,
    and (``vision``) the vision-only baseline's feature of each image.

    ``arm(cols, stop, image_mask)`` before a pass: ``cols`` [B, P] indexes the pass's
    sequence axis; the pass is cut short after stream ``stop`` (None: run to the end);
    ``image_mask`` [B, T] marks the image features' positions for families whose feature
    is their mean at the language model's input (``vision_feature="image_tokens"``).
    """

    def __init__(self, vlm: VLM, stream: Sequence[int], vision: bool) -> None:
        self.stream = list(stream)
        self.got: dict[int, torch.Tensor] = {}
        self.pooled: list[torch.Tensor] = []
        self.cols = self.stop = self.image_mask = None
        layers = vlm.layers
        self.handles = [layers[0].register_forward_pre_hook(
            lambda m, args, kw: self._first(args[0] if args else kw["hidden_states"]),
            with_kwargs=True)]
        for layer in range(vlm.n_layers):
            self.handles.append(layers[layer].register_forward_hook(
                lambda m, args, out, s=layer + 1: self._keep(
                    s, out[0] if isinstance(out, tuple) else out)))
        if vision and vlm.family.vision_feature == "pooler":
            self.handles.append(vlm.vision_tower.register_forward_hook(
                lambda m, args, out: self.pooled.append(out.pooler_output)))

    def arm(self, cols: torch.Tensor | None, stop: int | None,
            image_mask: torch.Tensor | None = None) -> None:
        self.got, self.cols, self.stop, self.image_mask = {}, cols, stop, image_mask

    def _first(self, h: torch.Tensor) -> None:
        if self.image_mask is not None:  # the image features, as the LM reads them
            w = self.image_mask.to(h.dtype)[..., None]
            self.pooled.append((h * w).sum(1) / w.sum(1).clamp_min(1))
        self._keep(0, h)

    def _keep(self, s: int, h: torch.Tensor) -> None:
        if self.cols is not None and s in self.stream:
            rows = torch.arange(h.shape[0], device=h.device)[:, None]
            self.got[s] = h[rows, self.cols]
        if s == self.stop:
            raise _Stop

    def states(self) -> torch.Tensor:
        """[B, S, P, d] of the last pass."""
        missing = [s for s in self.stream if s not in self.got]
        if missing:
            raise ModelError(f"capture hooks did not fire for stream indices {missing}: the "
                             "model's decoder layers were not all called")
        return torch.stack([self.got[s] for s in self.stream], dim=1)

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _mask(visible: torch.Tensor, dtype: torch.dtype, impl: str) -> torch.Tensor:
    """[B, q, kv] bool -> the [B, 1, q, kv] mask ``impl`` takes (bool for SDPA, additive
    float for eager)."""
    m = visible[:, None]
    if impl == "eager":
        return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(
            ~m, torch.finfo(dtype).min)
    return m


def _run(vlm: VLM, hooks: _StreamHooks, cols, stop, image_mask=None, **inputs):
    hooks.arm(cols, stop, image_mask)
    try:
        with torch.inference_mode():
            return vlm.model(**inputs)
    except _Stop:
        return None


@dataclass
class _Decode:
    """A prefilled batch waiting for its answers: the KV cache (prefix and trie), the logits
    [B, K, V] at each criterion's last token, the keys [B, K, kv] its first answer token sees
    and that token's position [B, K]."""

    cache: object
    logits: torch.Tensor
    visible: torch.Tensor
    next_pos: torch.Tensor
    impl: str

    @property
    def rows(self) -> int:
        return self.logits.shape[0]


@dataclass
class _BatchOut:
    states: torch.Tensor  # [B, S, n_cells, d] prefix cells, then node cells
    prefix_len: list[int]  # [B] unpadded prefix length of each image
    image_span: list[tuple[int, int]]  # [B] image block of each image (unpadded)
    vision: torch.Tensor | None  # [B, d_vision] the vision side's blocks, side by side
    decode: _Decode | None
    vision_blocks: dict[str, int] | None = None  # block name -> width (as capture records)


def _shared_batch(vlm: VLM, split: CriteriaPrompts, images, stream: list[int],
                  prefix_cells: list[int], node_cells: list[int], vision: bool,
                  answer_tokens: int) -> _BatchOut:
    """One batch: the prefix pass, the trie pass, then (``answer_tokens``) tree decoding.

    ``prefix_cells`` are prefix tokens counted from the prefix's end (1: its last): a prefix
    shorter than the batch's longest is left-padded, so they are the same padded columns in
    every row, and trie node j sits at padded position ``P + depth(j)`` as in a full
    forward pass of the left-padded batch.
    """
    impl = getattr(vlm.model.config.get_text_config(), "_attn_implementation", None) or "sdpa"
    dev = vlm.device
    enc = vlm.encode(images, split.prompts[0])
    ids, am = enc["input_ids"], enc["attention_mask"].bool()
    own = torch.tensor([split.node_ids[j] for j in split.paths[0]], device=ids.device)
    P = ids.shape[1] - len(own)  # padded prefix length
    offsets = am[:, :P].int().argmax(1).tolist()  # left padding of each row
    spans, plen = [], []
    for b in range(ids.shape[0]):
        row = ids[b, offsets[b]:P].tolist()
        start, stop = image_block(vlm, row)
        if (not torch.equal(ids[b, P:], own) or not bool(am[b, offsets[b]:].all())
                or len(row) - stop != len(split.tail_tokens)):
            raise ConfigError(f"image {b} of the batch does not give the shared prefix "
                              f"followed by criterion {split.names[0]!r}'s tokens: "
                              "shared-prefix capture needs the same text around every image")
        spans.append((start, stop))
        plen.append(len(row))
    gen = answer_tokens > 0
    # Without generation both passes stop after the deepest stream kept (the prefix's KV
    # cache is then filled up to that layer, all the trie pass reads).
    stop_at = None if gen else stream[-1]
    image_mask = vlm.image_feature_mask(ids[:, :P]) if vision else None
    hooks = _StreamHooks(vlm, stream, vision)
    try:
        pcols = (P - torch.tensor(prefix_cells, dtype=torch.long, device=dev))[None].expand(
            ids.shape[0], -1)
        pre = {k: v for k, v in enc.items() if k not in ("input_ids", "attention_mask")}
        # A cache of our own: an early stop leaves it filled, the model's would be lost.
        cache = DynamicCache(config=vlm.model.config.get_text_config())
        _run(vlm, hooks, pcols if prefix_cells else None, stop_at, image_mask,
             input_ids=ids[:, :P], attention_mask=enc["attention_mask"][:, :P],
             past_key_values=cache, use_cache=True, logits_to_keep=1, **pre)
        parts = [hooks.states()] if prefix_cells else []
        if vision and not hooks.pooled:
            raise ModelError("the vision feature's hook did not fire in the prefix pass")
        pooled = vision_blocks = None
        if vision:  # what the vision side gives the LM, as capture() keeps it
            pooled, vision_blocks = vlm.vision_row(pre["pixel_values"], hooks.pooled[0])
        pending = None
        if gen or node_cells:
            B, n = ids.shape[0], split.n_nodes
            vis_nodes = torch.cat([am[:, :P][:, None, :].expand(B, n, P).to(dev),
                                   split.visible().to(dev)[None].expand(B, n, n)], dim=2)
            leaves = [p[-1] for p in split.paths]
            node_pos = (P + split.depth).to(dev)
            out = _run(vlm, hooks, torch.tensor(node_cells, device=dev)[None].expand(B, -1)
                       if node_cells else None, stop_at,
                       input_ids=torch.tensor(split.node_ids, device=dev)[None].expand(B, -1),
                       attention_mask=_mask(vis_nodes, vlm.dtype, impl),
                       position_ids=node_pos[None].expand(B, -1), past_key_values=cache,
                       use_cache=True, logits_to_keep=torch.tensor(leaves, device=dev))
            if node_cells:
                parts.append(hooks.states())
            if gen:  # decoded later, with other batches (capture_criteria)
                pending = _Decode(cache, out.logits, vis_nodes[:, leaves],
                                  (node_pos[leaves] + 1)[None].expand(B, -1), impl)
    finally:
        hooks.close()
    return _BatchOut(torch.cat(parts, dim=2) if parts else None, plen, spans, pooled, pending,
                     vision_blocks)


def stop_token_ids(vlm: VLM) -> set[int]:
    """End-of-sequence ids: the tokenizer's and the generation config's."""
    out: set[int] = set()
    for x in (vlm.tokenizer.eos_token_id,
              getattr(getattr(vlm.model, "generation_config", None), "eos_token_id", None)):
        if isinstance(x, int):
            out.add(x)
        elif x:
            out.update(int(i) for i in x)
    return out


def _merge(parts: list[_Decode]) -> list[_Decode]:
    """Prefilled batches as one (their caches left-padded to the longest and masked there):
    a decoding step costs about as much for 32 rows as for 8 on the CPU, where it is bound
    by reading the weights. Caches with other than plain layers are decoded one by one."""
    if len(parts) == 1 or any(type(layer).__name__ != "DynamicLayer"
                              for p in parts for layer in p.cache.layers):
        return parts
    kv = max(p.visible.shape[-1] for p in parts)
    first = parts[0].cache
    if not all(layer.is_initialized for layer in first.layers):
        return parts

    def padded(t: torch.Tensor) -> torch.Tensor:  # [B, heads, T, d] -> [B, heads, kv, d]
        return torch.nn.functional.pad(t, (0, 0, kv - t.shape[-2], 0))

    for i, layer in enumerate(first.layers):
        layer.keys = torch.cat([padded(p.cache.layers[i].keys) for p in parts])
        layer.values = torch.cat([padded(p.cache.layers[i].values) for p in parts])
    vis = torch.cat([torch.nn.functional.pad(p.visible, (kv - p.visible.shape[-1], 0),
                                             value=False) for p in parts])
    return [_Decode(first, torch.cat([p.logits for p in parts]), vis,
                    torch.cat([p.next_pos for p in parts]), parts[0].impl)]


def _tree_decode(vlm: VLM, job: _Decode, cap: int) -> tuple[list[list[str]], list[list[str]]]:
    """Greedy answers of every criterion, one row per image and one token per criterion per
    step, as :meth:`~esmc_lens.models.vlm.VLM.generate` gives them (the same stop rule and
    cut): ``(answers, stop reasons)``, [B][K] each. An image whose answers have all stopped
    leaves the batch (and its cache) at the next step where a quarter of them have."""
    logits, cache, impl = job.logits, job.cache, job.impl
    B, K = logits.shape[:2]
    eos = stop_token_ids(vlm)
    tokens = [[[] for _ in range(K)] for _ in range(B)]
    reasons = [["cap"] * K for _ in range(B)]
    done = torch.zeros(B, K, dtype=torch.bool)
    rows = torch.arange(B)  # the images still in the batch
    seen, pos = job.visible, job.next_pos
    own = torch.eye(K, dtype=torch.bool, device=seen.device)[None]
    for step in range(cap):
        nxt = logits.argmax(-1)  # [rows, K]
        for r, c in (~done[rows]).nonzero().tolist():
            b, t = int(rows[r]), int(nxt[r, c])
            if t in eos:
                reasons[b][c], done[b, c] = "eos", True
                continue
            tokens[b][c].append(t)
            text = vlm.tokenizer.decode(tokens[b][c], skip_special_tokens=True)
            if any(s in text for s in SENTENCE_END):
                reasons[b][c], done[b, c] = "end", True
        if bool(done.all()) or step == cap - 1:
            break
        finished = done[rows].all(dim=1)
        if int(finished.sum()) * 4 >= len(rows):
            keep = (~finished).nonzero().flatten()
            cache.batch_select_indices(keep.to(seen.device))
            rows, nxt, seen, pos = rows[keep], nxt[keep], seen[keep], pos[keep]
        seen = torch.cat([seen, own.expand(len(rows), K, K)], dim=2)  # its own answer
        with torch.inference_mode():
            out = vlm.model(input_ids=nxt, attention_mask=_mask(seen, vlm.dtype, impl),
                            position_ids=pos + step, past_key_values=cache, use_cache=True)
        logits = out.logits
    answers = [[first_sentence(vlm.tokenizer.decode(t, skip_special_tokens=True))
                for t in row] for row in tokens]
    return answers, reasons


# -- many batches ----------------------------------------------------------------------------


@dataclass
class CriteriaCapture:
    """What :func:`capture_criteria` returns.

    ``caches[name]`` is the :class:`~esmc_lens.residual.cache.ResidualCache` that
    ``capture(vlm, images, prompt, positions=..., layers=..., keywords=...)`` gives that
    criterion (within ``SHARED_PREFIX_RTOL``); ``answers[name]`` its generated answers (one
    per image, what ``vlm.generate`` gives) and ``answer_stops[name]`` why each stopped
    ("eos", "end" of its first sentence or line, "cap").
    """

    split: CriteriaPrompts
    caches: dict[str, ResidualCache]
    answers: dict[str, list[str]] | None = None
    answer_stops: dict[str, list[str]] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def names(self) -> list[str]:
        return list(self.split.names)


def _positions(split: CriteriaPrompts, positions) -> list[list[int]]:
    """Each criterion's kept tokens, counted from the end (-1: the last): "prompt" (every
    token after the image block), or a mapping name -> negative indices."""
    out = []
    for c, name in enumerate(split.names):
        n = split.prompt_len(c)
        if isinstance(positions, str):
            if positions != "prompt":
                raise ConfigError(f"positions={positions!r}: use 'prompt' or a mapping "
                                  "criterion -> positions counted from the end (-1: the last)")
            out.append(list(range(-n, 0)))
            continue
        if not isinstance(positions, Mapping) or name not in positions:
            raise ConfigError(f"positions has no entry for criterion {name!r}: give 'prompt' "
                              "or a mapping with every criterion")
        idx = [int(p) for p in positions[name]]
        bad = [p for p in idx if not -n <= p < 0]
        if bad or not idx:
            raise ConfigError(f"positions {bad or idx} of criterion {name!r}: give tokens "
                              f"after the image, counted from the end (-1 .. -{n})")
        out.append(idx)
    return out


def capture_criteria(
    vlm: VLM,
    images,
    prompts,
    *,
    positions="prompt",
    layers: Sequence[int] | None = None,
    keywords: Mapping[str, Sequence[str]] | None = None,
    top_k: int = 0,
    store_dtype: torch.dtype = torch.float16,
    vision: bool = False,
    answer_tokens: int = 0,
    batch_size: int = 8,
    image_ids: Sequence[str] | None = None,
    split: CriteriaPrompts | None = None,
    decode_rows: int = 32,
    progress: bool = True,
) -> CriteriaCapture:
    """Capture every criterion in ``prompts`` with one pass over ``images`` (module doc).

    Parameters
    ----------
    prompts : ``{name: prompt}`` (or one prompt, or a list).
    positions : "prompt" (every token after the image block, each criterion's own) or a
        mapping name -> tokens counted from the end (-1: the last).
    layers : stream indices to keep (0 = embeddings); default all.
    keywords : name -> keywords whose lens probabilities to compute at that criterion's cells
        (a cell shared by several criteria is read by the lens once).
    answer_tokens : generate each criterion's answer from the same prefill, at most this many
        tokens (0: no generation; :data:`~esmc_lens.models.vlm.ANSWER_MAX_TOKENS` is what
        ``vlm.generate`` allows).
    split : a :func:`split_criteria` of the same prompts, to skip recomputing it.
    decode_rows : images whose answers are decoded together (their batches' KV caches are
        kept until then): a decoding step is bound by reading the weights, so its cost
        hardly grows with the rows.
    Other arguments as :func:`~esmc_lens.residual.capture.capture`.
    """
    source = ImageSource.of(images, image_ids)
    crit = criteria_dict(prompts)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1")
    if isinstance(answer_tokens, bool) or not isinstance(answer_tokens, int) or answer_tokens < 0:
        raise ConfigError(f"answer_tokens={answer_tokens!r} must be an int >= 0")
    split = split or split_criteria(vlm, crit, source.load(0))
    if list(split.prompts) != list(crit.values()):
        raise ConfigError("split= was made for other prompts: call split_criteria on these")
    stream = list(range(vlm.n_layers + 1)) if layers is None else sorted({int(s) for s in layers})
    if not stream or stream[0] < 0 or stream[-1] > vlm.n_layers:
        raise ConfigError(f"layers={layers}: stream indices run 0..{vlm.n_layers}")
    keep = _positions(split, positions)
    kws = dict(keywords or {})
    unknown = sorted(set(kws) - set(split.names))
    if unknown:
        raise ConfigError(f"keywords for unknown criteria {unknown}; criteria: {split.names}")
    # Distinct cells: a prefix position or trie node kept by several criteria runs (and is
    # read by the lens) once.
    cells = [[split.cell(c, p) for p in keep[c]] for c in range(len(split.names))]
    prefix_cells = sorted({i for cs in cells for kind, i in cs if kind == "prefix"})
    node_cells = sorted({i for cs in cells for kind, i in cs if kind == "node"})
    col = {("prefix", i): j for j, i in enumerate(prefix_cells)}
    col.update({("node", i): len(prefix_cells) + j for j, i in enumerate(node_cells)})
    kw_tokens = {n: keyword_token_ids(vlm.tokenizer, kws[n]) for n in split.names if kws.get(n)}
    groups, group_of = [], {}
    for n, kt in kw_tokens.items():
        group_of[n] = list(range(len(groups), len(groups) + len(kt.groups)))
        groups.extend(kt.groups)
    unembed = Unembed.from_model(vlm) if (groups or top_k) else None
    workspace = LensWorkspace() if unembed is not None else None
    chunk = max(64, LENS_CHUNK_BYTES // (4 * vlm.vocab_size))

    parts: dict[str, list[ResidualCache]] = {n: [] for n in split.names}
    waiting: list[_Decode] = []  # prefilled batches whose answers are decoded together
    answers = {n: [] for n in split.names} if answer_tokens else None
    stops = {n: [] for n in split.names} if answer_tokens else None
    batches = range(0, source.n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        batches = tqdm(batches, desc="capture (one pass, all criteria)")
    for start in batches:
        idx = list(range(start, min(start + batch_size, source.n)))
        out = _shared_batch(vlm, split, [source.load(i) for i in idx], stream, prefix_cells,
                            node_cells, vision, answer_tokens)
        r = None
        if unembed is not None:
            r = readout(out.states, unembed, groups, top_k, chunk=chunk, workspace=workspace)
        span = torch.tensor(out.image_span, dtype=torch.long)
        for c, name in enumerate(split.names):
            sel = torch.tensor([col[x] for x in cells[c]], dtype=torch.long)
            toks = split.prompt_tokens(c)
            n = split.prompt_len(c)
            seq_len = torch.tensor(out.prefix_len) + len(split.paths[c])  # [B]
            kwp = None
            if r is not None and name in group_of:
                kwp = r.keyword_probs[:, :, sel][..., group_of[name]]
            parts[name].append(ResidualCache(
                states=out.states[:, :, sel.to(out.states.device)].to(store_dtype).cpu(),
                positions=seq_len[:, None] + torch.tensor(keep[c], dtype=torch.long)[None],
                tokens=[[toks[n + p] for p in keep[c]] for _ in idx],
                image_span=span, stream=list(stream), image_ids=[source.ids[i] for i in idx],
                prompts=[split.prompts[c]] * len(idx),
                vision=out.vision.cpu() if vision else None,
                meta={"vision_blocks": out.vision_blocks} if vision else {},
                keywords=kw_tokens[name].keywords if name in kw_tokens else None,
                keyword_probs=kwp,
                top_ids=r.top_ids[:, :, sel] if (r is not None and top_k) else None,
                top_probs=r.top_probs[:, :, sel] if (r is not None and top_k) else None))
        if out.decode is not None:
            waiting.append(out.decode)
            if sum(p.rows for p in waiting) >= decode_rows or start + batch_size >= source.n:
                for job in _merge(waiting):
                    got, why = _tree_decode(vlm, job, answer_tokens)
                    for c, name in enumerate(split.names):
                        answers[name].extend(row[c] for row in got)
                        stops[name].extend(row[c] for row in why)
                waiting = []
    base = {k: v for k, v in vlm.metadata().items() if k != "chat_template"}
    caches = {}
    for c, name in enumerate(split.names):
        cache = ResidualCache.concat(parts[name])
        kt = kw_tokens.get(name)
        cache.meta = base | {
            "prompt": split.prompts[c], "formatted_prompt": split.formatted[c],
            "positions": positions if isinstance(positions, str) else repr(keep[c]),
            "store_dtype": str(store_dtype).replace("torch.", ""),
            "keyword_tokens": None if kt is None else {
                "groups": kt.groups, "multi_token": kt.multi_token,
                "clashes": {str(k): v for k, v in kt.clashes.items()}},
            "shared_prefix": split.summary()}
        if cache.vision is not None:
            cache.meta["vision_blocks"] = parts[name][0].meta["vision_blocks"]
        caches[name] = cache
    return CriteriaCapture(split=split, caches=caches, answers=answers, answer_stops=stops,
                           meta={"shared_prefix": split.summary(), "batch_size": batch_size,
                                 "answer_tokens": answer_tokens})
