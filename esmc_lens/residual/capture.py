"""Capture every layer's residual stream at the prompt positions, one forward pass per batch.

``capture(vlm, images, prompt)`` -> :class:`~esmc_lens.residual.cache.ResidualCache`.

Per batch: the processor builds left-padded inputs; one forward pass saves the input of
decoder layer 0 and the output of every captured decoder layer, gathered on the device at
the requested positions only (so a 600-token LLaVA sequence costs ~35 positions of
storage); the pass stops after the last captured layer (the full-vocabulary logits of
every position are never computed). Optional lens readouts (keyword probabilities, top-k)
are computed from the full-precision states on the device before they are cast to
``store_dtype`` and moved to the CPU.

Engines (``engine=``), bit-identical results:

* ``"hooks"`` (the default): plain PyTorch forward hooks, the least overhead per batch;
* ``"nnsight"``: one ``nnsight`` trace per batch; required for ``remote=`` (NDIF, or
  ``remote="local"``, nnsight's serialising dry run of the remote path).

Throughput: while the model runs on batch ``i`` a background thread decodes and
preprocesses batch ``i + 1`` (``prefetch=True``); lens readouts run in chunks sized to
~256 MB of logits; nothing calls ``torch.cuda.empty_cache``. :func:`iter_capture` yields
one batch at a time (the building block of the disk-streaming and sharded captures in
:mod:`esmc_lens.residual.distributed`); :func:`auto_batch_size` picks a batch size that fits the
device's free memory.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from operator import attrgetter

import torch

from ..data.source import ImageSource
from ..errors import ConfigError, ModelError
from ..lens.keyword_rule import KeywordTokens, keyword_token_ids
from ..lens.readout import readout
from ..lens.unembed import LensWorkspace, Unembed
from ..models.vlm import VLM
from .cache import ResidualCache, strip_token
from .options import CaptureOptions, PositionSpec

ENGINES = ("auto", "hooks", "nnsight")
LENS_CHUNK_BYTES = 256 << 20  # logits of one lens chunk (fp32), e.g. 1365 x 49152 x 4



def resolve_positions(tokens: list[str], image_stop: int, spec: PositionSpec) -> list[int]:
    """Indices (into one unpadded sequence of ``tokens``) selected by ``spec``.

    ``"prompt"``: every token after the image; ``"all"``: every token; a ``slice`` or a
    list of ints: sequence indices (negative from the end); a list of strings: the prompt
    tokens whose word (:func:`~esmc_lens.residual.cache.strip_token`) is one of them.
    """
    n = len(tokens)
    prompt = list(range(image_stop, n))
    if isinstance(spec, str):
        if spec == "prompt":
            return prompt
        if spec == "all":
            return list(range(n))
        raise ConfigError(f"positions={spec!r}: use 'prompt', 'all', a slice, a list of "
                          "sequence indices or a list of token words")
    if isinstance(spec, slice):
        return list(range(n))[spec]
    spec = list(spec)
    if all(isinstance(s, int) for s in spec):
        bad = [s for s in spec if not -n <= s < n]
        if bad:
            raise ConfigError(f"positions {bad} are outside the {n}-token sequence")
        return [s % n for s in spec]
    if all(isinstance(s, str) for s in spec):
        want = {strip_token(s) for s in spec}
        hits = [i for i in prompt if strip_token(tokens[i]) in want]
        if not hits:
            raise ConfigError(f"none of the tokens {spec} is in the prompt; its tokens are "
                              f"{[tokens[i] for i in prompt]}")
        return hits
    raise ConfigError(f"positions={spec!r} mixes ints and strings")


def capture(
    vlm: VLM,
    images,
    prompt: str | Sequence[str],
    options: CaptureOptions | None = None,
    *,
    batch_size: int | str = 8,
    image_ids: Sequence[str] | None = None,
    progress: bool = True,
    engine: str = "auto",
    remote: bool | str = False,
    prefetch: bool | None = None,
    **option_fields,
) -> ResidualCache:
    """Run ``vlm`` on ``images`` with ``prompt`` and keep the residual stream.

    Parameters
    ----------
    images : PIL images, image paths, or an :class:`~esmc_lens.data.dataset.ImageDataset`
        (read lazily, one batch at a time).
    prompt : one criterion prompt, or one per image.
    options, **option_fields : what to keep, a
        :class:`~esmc_lens.residual.options.CaptureOptions` and/or its fields by name:
        ``positions`` (default the prompt's tokens after the image, see
        :func:`resolve_positions`), ``layers`` (stream indices: 0 = embeddings, l + 1 =
        after decoder layer l; default all), ``store_dtype`` (fp16 by default; float32 for
        exact comparisons), ``keywords`` and ``top_k`` (lens readouts computed on the device
        during capture), ``vision`` (also keep what the vision side gives the language
        model about each image, :meth:`~esmc_lens.models.vlm.VLM.vision_side`, concatenated
        in ``cache.vision`` [n_images, d]; ``cache.meta["vision_blocks"]`` names each block
        and its width, in order).
    batch_size : images per forward pass, or ``"auto"`` (:func:`auto_batch_size`).
        Batch composition changes padding and kernel shapes, hence the last bits of the
        states: compare captures made with the same batch size.
    engine : ``"hooks"`` (default; ``"auto"`` picks it unless ``remote``) or
        ``"nnsight"``; both give the same tensors bit for bit.
    remote : run the forward passes through nnsight's remote execution: ``True`` sends
        them to NDIF (the model must be one NDIF hosts, and nnsight must hold your API
        key: see ``docs/scaling.md``), a URL string to that host, ``"local"`` serialises
        the request and runs it here (a dry run of the remote path). Lens readouts are
        computed locally from the returned states.
    prefetch : decode and preprocess the next batch in a background thread while the
        model runs on the current one; default (``None``) on CUDA, or on the CPU when torch
        leaves a core free (otherwise the thread only competes with the model for cores).
    """
    opts = CaptureOptions.of(options, **option_fields)
    source, prompts = capture_inputs(images, prompt, image_ids)
    if batch_size == "auto":
        batch_size = auto_batch_size(vlm, source.load(0), prompts[0], positions=opts.positions,
                                     layers=opts.layers)
    n_batches = -(-source.n // _check_batch_size(batch_size))
    parts = [part for _, part in _progress(
        iter_capture(vlm, source, prompts, opts, batch_size=batch_size, engine=engine,
                     remote=remote, prefetch=prefetch),
        progress, total=n_batches, desc="capture")]
    cache = ResidualCache.concat(parts)
    cache.meta = _meta(vlm, prompts, opts.positions, opts.store_dtype, parts[0].meta)
    return cache


def iter_capture(
    vlm: VLM,
    images,
    prompt: str | Sequence[str],
    options: CaptureOptions | None = None,
    *,
    batch_size: int = 8,
    image_ids: Sequence[str] | None = None,
    engine: str = "auto",
    remote: bool | str = False,
    prefetch: bool | None = None,
    batches: Iterable[int] | None = None,
    **option_fields,
) -> Iterator[tuple[list[int], ResidualCache]]:
    """Capture batch by batch: yields ``(image indices, cache of that batch)``.

    Same arguments as :func:`capture` (which concatenates what this yields), plus
    ``batches``: the batch numbers to run (batch ``b`` holds images
    ``b * batch_size .. (b + 1) * batch_size - 1``), default all. Each yielded cache
    carries the metadata :func:`capture` would give that batch alone, so it can be saved
    as a shard on its own. Only one batch's states are held at a time.
    """
    opts = CaptureOptions.of(options, **option_fields)
    source, prompts = capture_inputs(images, prompt, image_ids)
    _check_batch_size(batch_size)
    plan = _plan(vlm, opts, engine, remote)
    n_batches = -(-source.n // batch_size)
    todo = list(range(n_batches)) if batches is None else [int(b) for b in batches]
    bad = [b for b in todo if not 0 <= b < n_batches]
    if bad:
        raise ConfigError(f"batches {bad[:5]} out of range: {source.n} images make "
                          f"{n_batches} batches of {batch_size}")
    base_meta = vlm.metadata()

    def prepare(b: int) -> _Prepared:
        idx = list(range(b * batch_size, min((b + 1) * batch_size, source.n)))
        return _prepare(vlm, [source.load(i) for i in idx], [prompts[i] for i in idx],
                        opts.positions, idx, [source.ids[i] for i in idx])

    def run(prep: _Prepared) -> tuple[list[int], ResidualCache]:
        part = _capture_prepared(vlm, prep, plan, opts.store_dtype)
        part.meta = _meta(vlm, prep.prompts, opts.positions, opts.store_dtype, base_meta,
                          kw=plan.kw, formatted=prep.formatted) | part.meta
        return prep.index, part

    if not todo:
        return
    if prefetch is None:
        prefetch = vlm.device.type == "cuda" or (os.cpu_count() or 1) > torch.get_num_threads()
    if not prefetch or len(todo) == 1:
        for b in todo:
            yield run(prepare(b))
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="esmc-prefetch") as pool:
        pending = pool.submit(prepare, todo[0])
        try:
            for nxt in [*todo[1:], None]:
                prep = pending.result()
                pending = pool.submit(prepare, nxt) if nxt is not None else None
                yield run(prep)
        finally:
            if pending is not None:
                pending.cancel()


# -- settings ----------------------------------------------------------------------------


@dataclass
class _Plan:
    stream: list[int]
    kw: KeywordTokens | None
    top_k: int
    unembed: Unembed | None
    vision: bool
    engine: str
    remote: bool | str
    lens_chunk: int
    workspace: LensWorkspace | None = None  # the lens's buffers, reused by every batch


def capture_inputs(images, prompt, image_ids) -> tuple[ImageSource, list[str]]:
    """The images as an ``ImageSource`` and one prompt per image."""
    source = ImageSource.of(images, image_ids)
    prompts = [prompt] * source.n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != source.n:
        raise ConfigError(f"{len(prompts)} prompts for {source.n} images: give one prompt, "
                          "or one per image")
    return source, prompts


def _check_batch_size(batch_size) -> int:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size={batch_size!r} must be an int >= 1 or 'auto'")
    return batch_size


def _plan(vlm, opts: CaptureOptions, engine, remote) -> _Plan:
    layers, keywords, top_k, vision = opts.layers, opts.keywords, opts.top_k, opts.vision
    stream = list(range(vlm.n_layers + 1)) if layers is None else sorted(set(layers))
    if not stream or stream[0] < 0 or stream[-1] > vlm.n_layers:
        raise ConfigError(f"layers={layers}: stream indices run 0..{vlm.n_layers}")
    if engine not in ENGINES:
        raise ConfigError(f"engine={engine!r}: use one of {ENGINES}")
    if remote and engine == "hooks":
        raise ConfigError("remote execution goes through nnsight: use engine='nnsight' "
                          "(or 'auto') with remote=...")
    engine = "nnsight" if remote else ("hooks" if engine == "auto" else engine)
    kw = keyword_token_ids(vlm.tokenizer, keywords) if keywords else None
    unembed = Unembed.from_model(vlm) if (kw or top_k) else None
    chunk = max(64, LENS_CHUNK_BYTES // (4 * vlm.vocab_size))
    return _Plan(stream, kw, int(top_k), unembed, bool(vision), engine, remote, chunk,
                 LensWorkspace() if unembed is not None else None)


def _meta(vlm, prompts, positions, store_dtype, base: dict, kw=None, formatted=None) -> dict:
    """What :func:`capture` records about a run (``base``: ``vlm.metadata()``)."""
    meta = {k: v for k, v in base.items()
            if k not in ("prompt", "formatted_prompt", "positions", "store_dtype",
                         "keyword_tokens")}
    if kw is None and "keyword_tokens" in base:
        keyword_tokens = base["keyword_tokens"]
    else:
        keyword_tokens = None if kw is None else {
            "groups": kw.groups, "multi_token": kw.multi_token,
            "clashes": {str(k): v for k, v in kw.clashes.items()}}
    meta.update({
        "prompt": prompts[0] if len(set(prompts)) == 1 else None,
        "formatted_prompt": formatted or vlm.format_prompt(prompts[0]),
        "positions": positions if isinstance(positions, str) else repr(positions),
        "store_dtype": str(store_dtype).replace("torch.", ""),
        "keyword_tokens": keyword_tokens,
    })
    return meta


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


# -- one batch -----------------------------------------------------------------------------


@dataclass
class _Prepared:
    """A batch decoded, preprocessed and tokenised (built on the prefetch thread)."""

    index: list[int]
    ids: list[str]
    prompts: list[str]
    formatted: str
    enc: object
    pos_t: torch.Tensor  # [B, width] unpadded sequence index or -1
    offsets: list[int]
    spans: list[tuple[int, int]]
    toks: list[list[str]]


def image_block(vlm: VLM, ids: Sequence[int]) -> tuple[int, int]:
    """(first, one after the last) index of the image's block in one unpadded sequence.

    Found by its token ids (the placeholder and the family's image markers), per sequence:
    its length varies with the image's size in the dynamic-resolution families, so no
    fixed offset would do.
    """
    block = vlm.image_token_ids
    img = [i for i, t in enumerate(ids) if t in block]
    if not img:
        raise ConfigError("the processor produced no image tokens; is the prompt's chat "
                          "template missing its image placeholder?")
    return img[0], img[-1] + 1


def _prepare(vlm, batch, prompts, positions, index, ids) -> _Prepared:
    enc = vlm.encode(batch, prompts)
    input_ids, mask = enc["input_ids"].cpu(), enc["attention_mask"].cpu().bool()
    B = input_ids.shape[0]
    lengths = mask.sum(1)
    offsets = mask.int().argmax(1).tolist()  # first real token (left padding: T - length)
    rows, spans, toks = [], [], []
    for b in range(B):
        stop = offsets[b] + int(lengths[b])
        if not mask[b, offsets[b]:stop].all():
            raise ModelError("the attention mask has padding inside a sequence; esmc_lens "
                             "expects padding on one side")
        seq = input_ids[b, offsets[b]:stop].tolist()
        span = image_block(vlm, seq)
        strings = vlm.tokenizer.convert_ids_to_tokens(seq)
        pos = resolve_positions(strings, span[1], positions)
        rows.append(pos)
        spans.append(span)
        toks.append([strings[p] for p in pos])
    width = max(len(r) for r in rows)
    pos_t = torch.full((B, width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        pos_t[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return _Prepared(list(index), list(ids), list(prompts), vlm.format_prompt(prompts[0]),
                     enc, pos_t, offsets, spans, toks)


def _capture_prepared(vlm, prep: _Prepared, plan: _Plan, store_dtype) -> ResidualCache:
    B, width = prep.pos_t.shape
    # Gather index into the padded batch; empty slots read position 0 and are zeroed below.
    gather = (prep.pos_t + torch.tensor(prep.offsets)[:, None]).clamp_min(0).to(vlm.device)
    bidx = torch.arange(B, device=vlm.device)[:, None]
    run = _run_nnsight if plan.engine == "nnsight" else _run_hooks
    features = vlm.image_feature_mask(prep.enc["input_ids"]) if plan.vision else None
    states, pooled = run(vlm, prep.enc, bidx, gather, plan, features)  # [B, S, P, d]
    empty = (prep.pos_t < 0).to(states.device)
    states = states.masked_fill(empty[:, None, :, None], 0)
    r = None
    if plan.unembed is not None:
        r = readout(states, plan.unembed, plan.kw.groups if plan.kw else (), plan.top_k,
                    chunk=plan.lens_chunk, workspace=plan.workspace)
    vision, meta = None, {}
    if plan.vision:
        vision, meta["vision_blocks"] = vlm.vision_row(prep.enc["pixel_values"], pooled)
        vision = vision.cpu()
    return ResidualCache(
        states=states.to(store_dtype).cpu(), positions=prep.pos_t,
        tokens=[t + [""] * (width - len(t)) for t in prep.toks],
        image_span=torch.tensor(prep.spans, dtype=torch.long), stream=list(plan.stream),
        image_ids=list(prep.ids), prompts=list(prep.prompts),
        vision=vision, meta=meta,
        keywords=plan.kw.keywords if plan.kw else None,
        keyword_probs=None if r is None else r.keyword_probs,
        top_ids=None if r is None else r.top_ids,
        top_probs=None if r is None else r.top_probs,
    )


class _StopForward(Exception):
    """Raised by the last capture hook: the rest of the forward pass is not needed."""


def _image_mean(h: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
    """[B, T, d] language-model input, [B, T] bool -> [B, d]: the mean of each image's
    features (the vision feature of families whose vision tower has no per-image pooling)."""
    w = features.to(h.dtype)[..., None]
    return (h * w).sum(1) / w.sum(1).clamp_min(1)


def _layer_input(args, kwargs) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _run_hooks(vlm, enc, bidx, gather, plan: _Plan, features=None):
    stream, last = plan.stream, plan.stream[-1]
    got: dict[int, torch.Tensor] = {}
    pooled: list = []
    layers = vlm.layers
    handles = []

    def keep(s: int, h: torch.Tensor) -> None:
        got[s] = h[bidx, gather]
        if s == last:
            raise _StopForward

    if features is not None:  # before stream 0's hook, which may stop the pass
        handles.append(layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: pooled.append(_image_mean(_layer_input(args, kwargs),
                                                              features)),
            with_kwargs=True))
    if 0 in stream:
        handles.append(layers[0].register_forward_pre_hook(
            lambda m, args, kwargs: keep(0, _layer_input(args, kwargs)), with_kwargs=True))
    for layer in range(last):
        if layer + 1 in stream:
            handles.append(layers[layer].register_forward_hook(
                lambda m, args, out, s=layer + 1: keep(s, out[0] if isinstance(out, tuple)
                                                       else out)))
    if plan.vision and features is None:
        handles.append(vlm.vision_tower.register_forward_hook(
            lambda m, args, out: pooled.append(out.pooler_output)))
    try:
        with torch.inference_mode():
            vlm.model(**enc, use_cache=False)
    except _StopForward:
        pass
    finally:
        for h in handles:
            h.remove()
    if len(got) != len(stream) or (plan.vision and not pooled):
        raise ModelError(f"capture hooks fired for stream indices {sorted(got)} of "
                         f"{stream}: the model's decoder layers were not all called")
    return torch.stack([got[s] for s in stream], dim=1), pooled[0] if pooled else None


def _run_nnsight(vlm, enc, bidx, gather, plan: _Plan, features=None):
    import nnsight

    stream, last = plan.stream, plan.stream[-1]
    envoy = remote_envoy(vlm) if plan.remote else vlm.envoy
    layers = attrgetter(vlm.layout.layers)(envoy)
    pooler = plan.vision and features is None
    vision_envoy = attrgetter(vlm.layout.vision_tower)(envoy) if pooler else None
    kwargs = {"remote": plan.remote} if plan.remote else {}
    with torch.inference_mode(), envoy.trace(**enc, use_cache=False, **kwargs) as tracer:
        saved = nnsight.save([])
        if pooler:
            pooled = vision_envoy.output.pooler_output.save()
        if features is not None or 0 in stream:
            first = layers[0].input  # read once: modules are visited in execution order
            if features is not None:  # _image_mean, written out: a remote trace runs
                w = features.to(first.dtype)[..., None]  # its body, not esmc_lens's code
                pooled = ((first * w).sum(1) / w.sum(1).clamp_min(1)).save()
            if 0 in stream:
                saved.append(first[bidx, gather])
        for layer in range(last):  # decoder layers up to the last captured one
            if layer + 1 in stream:
                saved.append(layers[layer].output[bidx, gather])
        tracer.stop()  # skip the remaining layers and the full-vocabulary logits
    states = torch.stack([s.to(vlm.device) for s in saved], dim=1)
    return states, (pooled.to(vlm.device) if plan.vision else None)


def remote_envoy(vlm: VLM):
    """The nnsight model that ``remote=`` capture traces (built once per ``vlm``).

    An ``nnsight`` ``TransformersModel`` around ``vlm.model``, keyed by the checkpoint's
    hub id (``vlm.model.name_or_path``), which is what NDIF looks the model up by. Set
    ``vlm._remote_envoy`` yourself to use another nnsight model (e.g. one built with
    ``TransformersModel(repo_id)`` on the meta device, without local weights).
    """
    if getattr(vlm, "_remote_envoy", None) is None:
        from nnsight.modeling.transformers import TransformersModel

        vlm._remote_envoy = TransformersModel(vlm.model, processor=vlm.processor,
                                              tokenizer=vlm.tokenizer)
    return vlm._remote_envoy


# -- memory-aware batch size ---------------------------------------------------------------


def _available_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            m = re.search(r"MemAvailable:\s+(\d+) kB", f.read())
        if m:
            return int(m.group(1)) * 1024
    except OSError:
        pass
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except ImportError:
        return 8 << 30


def estimate_batch_bytes(vlm: VLM, n_tokens: int, n_positions: int, n_stream: int,
                         batch_size: int) -> int:
    """Rough upper bound of the device memory one capture batch needs beyond the weights.

    Per image: the live activations of one decoder layer (residual, norms, q/k/v/o, the MLP's
    intermediate, eager attention scores), the vision tower's tokens, the captured states
    and their fp32 copy; per batch: one lens chunk (logits and probabilities).
    """
    text = vlm.model.config.text_config
    d, f = vlm.d_model, int(getattr(text, "intermediate_size", 4 * vlm.d_model))
    heads = int(getattr(text, "num_attention_heads", 1))
    b = torch.finfo(vlm.dtype).bits // 8
    vcfg = getattr(vlm.model.config, "vision_config", None)
    d_vis = int(getattr(vcfg, "hidden_size", 1024) or 1024)
    vis_tokens = int(getattr(vlm.model.config, "image_seq_length", 576) or 576)
    per_image = (n_tokens * (8 * d + 3 * f) * b + 2 * heads * n_tokens**2 * b
                 + 16 * vis_tokens * d_vis * 4 + n_stream * n_positions * d * (b + 4))
    lens = 2 * LENS_CHUNK_BYTES
    return 2 * (batch_size * per_image) + lens  # x2: allocator slack, temporaries


def auto_batch_size(vlm: VLM, image, prompt: str, *, positions: PositionSpec = "prompt",
                    layers: Sequence[int] | None = None, budget_bytes: int | None = None,
                    max_batch: int | None = None) -> int:
    """The largest batch size whose :func:`estimate_batch_bytes` fits ``budget_bytes``.

    ``budget_bytes`` defaults to 80% of the free CUDA memory, or 50% of the available RAM
    on the CPU. ``max_batch`` defaults to 64 on CUDA and 16 on the CPU (where larger
    batches buy no throughput). One image is preprocessed to count the tokens.
    """
    device = vlm.device
    if budget_bytes is None:
        frac = 0.8 if device.type == "cuda" else 0.5
        budget_bytes = int(frac * _available_bytes(device))
    if max_batch is None:
        max_batch = 64 if device.type == "cuda" else 16
    prep = _prepare(vlm, [image], [prompt], positions, [0], ["0"])
    T = int(prep.enc["input_ids"].shape[1])
    P = int(prep.pos_t.shape[1])
    S = vlm.n_layers + 1 if layers is None else len(set(layers))
    best = 1
    for bs in range(1, max_batch + 1):
        if estimate_batch_bytes(vlm, T, P, S, bs) > budget_bytes:
            break
        best = bs
    return best
