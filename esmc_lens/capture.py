"""Capture every layer's residual stream at the prompt positions, one nnsight trace per batch.

``capture(vlm, images, prompt)`` -> :class:`~esmc_lens.cache.ResidualCache`.

Per batch: the processor builds left-padded inputs; one ``nnsight`` trace saves the input of
decoder layer 0 and the output of every captured decoder layer, gathered on the device at
the requested positions only (so a 600-token LLaVA sequence costs ~35 positions of
storage); the trace stops after the last captured layer (the full-vocabulary logits of
every position are never computed). Optional lens readouts (keyword probabilities, top-k)
are computed from the full-precision states on the device before they are cast to
``store_dtype`` and moved to the CPU.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .backend import VLM
from .cache import ResidualCache, strip_token
from .errors import ConfigError
from .lens import Unembed, keyword_token_ids, readout

PositionSpec = str | slice | Sequence[int] | Sequence[str]


@dataclass
class ImageSource:
    """Uniform, lazy access to images given as PIL images, paths or an ``ImageDataset``."""

    n: int
    ids: list[str]
    load: Callable[[int], Image.Image]

    @classmethod
    def of(cls, images, ids: Sequence[str] | None = None) -> ImageSource:
        from .data import ImageDataset, open_rgb

        if isinstance(images, ImageDataset):
            return cls(len(images), list(ids or images.names), images.open)
        images = list(images)
        if not images:
            raise ConfigError("no images given: pass PIL images, paths, or a dataset")

        def load(i: int) -> Image.Image:
            im = images[i]
            if isinstance(im, str | os.PathLike):
                return open_rgb(im)
            return im.convert("RGB") if im.mode != "RGB" else im

        default_ids = [Path(im).name if isinstance(im, str | os.PathLike) else str(i)
                       for i, im in enumerate(images)]
        return cls(len(images), list(ids or default_ids), load)


def resolve_positions(tokens: list[str], image_stop: int, spec: PositionSpec) -> list[int]:
    """Indices (into one unpadded sequence of ``tokens``) selected by ``spec``.

    ``"prompt"``: every token after the image; ``"all"``: every token; a ``slice`` or a
    list of ints: sequence indices (negative from the end); a list of strings: the prompt
    tokens whose word (:func:`~esmc_lens.cache.strip_token`) is one of them.
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
    *,
    positions: PositionSpec = "prompt",
    layers: Sequence[int] | None = None,
    batch_size: int = 8,
    store_dtype: torch.dtype = torch.float16,
    keywords: Sequence[str] | None = None,
    top_k: int = 0,
    vision: bool = False,
    image_ids: Sequence[str] | None = None,
    progress: bool = True,
) -> ResidualCache:
    """Run ``vlm`` on ``images`` with ``prompt`` and keep the residual stream.

    Parameters
    ----------
    images : PIL images, image paths, or an :class:`~esmc_lens.data.ImageDataset`
        (read lazily, one batch at a time).
    prompt : one criterion prompt, or one per image.
    positions : see :func:`resolve_positions` (default: the prompt's tokens after the image).
    layers : stream indices to keep (0 = embeddings, l + 1 = after decoder layer l);
        default all ``n_layers + 1``.
    store_dtype : dtype of the stored states (fp16 halves the memory; use float32 for
        exact comparisons).
    keywords, top_k : lens readouts to compute on the device during capture.
    vision : also keep the vision encoder's pooled feature of each image.
    """
    source = ImageSource.of(images, image_ids)
    prompts = [prompt] * source.n if isinstance(prompt, str) else list(prompt)
    if len(prompts) != source.n:
        raise ConfigError(f"{len(prompts)} prompts for {source.n} images")
    stream = list(range(vlm.n_layers + 1)) if layers is None else sorted(set(layers))
    if not stream or stream[0] < 0 or stream[-1] > vlm.n_layers:
        raise ConfigError(f"layers={layers}: stream indices run 0..{vlm.n_layers}")
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be >= 1")
    kw = keyword_token_ids(vlm.tokenizer, keywords) if keywords else None
    unembed = Unembed.from_model(vlm) if (kw or top_k) else None

    parts = []
    starts = range(0, source.n, batch_size)
    for s in _progress(starts, progress, total=len(starts), desc="capture"):
        idx = list(range(s, min(s + batch_size, source.n)))
        batch = [source.load(i) for i in idx]
        parts.append(_capture_batch(vlm, batch, [prompts[i] for i in idx], positions, stream,
                                    store_dtype, kw, top_k, unembed, vision,
                                    [source.ids[i] for i in idx]))
    cache = ResidualCache.concat(parts)
    cache.meta.update(vlm.metadata())
    cache.meta.update({
        "prompt": prompts[0] if len(set(prompts)) == 1 else None,
        "formatted_prompt": vlm.format_prompt(prompts[0]),
        "positions": positions if isinstance(positions, str) else repr(positions),
        "store_dtype": str(store_dtype).replace("torch.", ""),
        "keyword_tokens": None if kw is None else {
            "groups": kw.groups, "multi_token": kw.multi_token,
            "clashes": {str(k): v for k, v in kw.clashes.items()}},
    })
    return cache


def _progress(it, enabled: bool, **kw):
    if not enabled:
        return it
    from tqdm.auto import tqdm

    return tqdm(it, **kw)


def _capture_batch(vlm, batch, prompts, positions, stream, store_dtype, kw, top_k, unembed,
                   vision, ids) -> ResidualCache:
    import nnsight

    enc = vlm.encode(batch, prompts)
    input_ids, mask = enc["input_ids"].cpu(), enc["attention_mask"].cpu()
    B, T = input_ids.shape
    offsets = (T - mask.sum(1)).tolist()  # left padding
    rows, spans, toks = [], [], []
    for b in range(B):
        seq = input_ids[b, offsets[b]:].tolist()
        img = [i for i, t in enumerate(seq) if t == vlm.image_token_id]
        if not img:
            raise ConfigError("the processor produced no image tokens; is the prompt's chat "
                              "template missing its image placeholder?")
        strings = vlm.tokenizer.convert_ids_to_tokens(seq)
        pos = resolve_positions(strings, img[-1] + 1, positions)
        rows.append(pos)
        spans.append((img[0], img[-1] + 1))
        toks.append([strings[p] for p in pos])
    width = max(len(r) for r in rows)
    pos_t = torch.full((B, width), -1, dtype=torch.long)
    for b, r in enumerate(rows):
        pos_t[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    # Gather index into the padded batch; empty slots read position 0 and are zeroed below.
    gather = (pos_t + torch.tensor(offsets)[:, None]).clamp_min(0).to(vlm.device)
    bidx = torch.arange(B, device=vlm.device)[:, None]

    envoy = vlm.envoy
    layers = vlm.envoy_at(vlm.layout.layers)
    last = stream[-1]
    with torch.inference_mode(), envoy.trace(**enc) as tracer:
        saved = nnsight.save([])
        if vision:
            pooled = vlm.envoy_at(vlm.layout.vision_tower).output.pooler_output.save()
        if 0 in stream:
            saved.append(layers[0].input[bidx, gather])
        for layer in range(last):  # decoder layers up to the last captured one
            if layer + 1 in stream:
                saved.append(layers[layer].output[bidx, gather])
        tracer.stop()  # skip the remaining layers and the full-vocabulary logits
    states = torch.stack(list(saved), dim=1)  # [B, S, P, d] on the device
    empty = (pos_t < 0).to(states.device)
    states = states.masked_fill(empty[:, None, :, None], 0)

    r = None
    if unembed is not None:
        r = readout(states, unembed, kw.groups if kw else (), top_k)
    return ResidualCache(
        states=states.to(store_dtype).cpu(), positions=pos_t,
        tokens=[t + [""] * (width - len(t)) for t in toks],
        image_span=torch.tensor(spans, dtype=torch.long), stream=list(stream),
        image_ids=list(ids), prompts=list(prompts),
        vision=pooled.detach().float().cpu() if vision else None,
        keywords=kw.keywords if kw else None,
        keyword_probs=None if r is None else r.keyword_probs,
        top_ids=None if r is None else r.top_ids,
        top_probs=None if r is None else r.top_probs,
    )
