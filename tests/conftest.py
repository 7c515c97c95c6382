"""Shared fixtures: models are built once per session; data paths skip with a reason."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("ESMC_DATA", REPO.parent / "shared" / "data" / "esmc"))

# Two cores: keep torch from oversubscribing them while pytest and BLAS share the machine.
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def tiny_vlm():
    from esmc_lens.models.vlm import load_model

    return load_model("tiny")


@pytest.fixture(scope="session")
def offline_vlm():
    from esmc_lens.models.vlm import load_model

    return load_model("offline")


@pytest.fixture(scope="session")
def flower_dir() -> Path:
    d = SHARED_DATA / "flower"
    if not d.is_dir():
        pytest.skip(f"ESMC flower data not found at {d} (set ESMC_DATA to the folder holding "
                    "'flower/'); it is not redistributed with esmc_lens")
    return d


def solid(rgb, size=(224, 224)):
    from PIL import Image

    return Image.new("RGB", size, rgb)


SOLID_COLOURS = {
    "red": (220, 20, 30), "green": (30, 160, 50), "blue": (30, 60, 200),
    "yellow": (250, 220, 30), "white": (255, 255, 255), "black": (0, 0, 0),
}


@pytest.fixture(scope="module")
def one_torch_thread():
    # Two cores shared by several processes: a multi-threaded torch spends most of its time
    # in OpenMP barriers (a tiny capture goes from 0.3 s to 10 s), so use one thread.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def write_images(folder: Path, n: int, seed: int = 0) -> list[Path]:
    """``n`` random 30 x 30 RGB PNGs ``img_00.png``... in ``folder``."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        p = folder / f"img_{i:02d}.png"
        Image.fromarray(rng.integers(0, 255, (30, 30, 3), dtype=np.uint8)).save(p)
        paths.append(p)
    return paths


CACHE_TENSORS = ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
                 "top_probs")


def assert_same_cache(a, b) -> None:
    """Two ``ResidualCache`` objects hold bit-identical tensors and the same metadata."""
    for name in CACHE_TENSORS:
        x, y = getattr(a, name), getattr(b, name)
        assert (x is None) == (y is None), name
        if x is not None:
            assert x.dtype == y.dtype and torch.equal(x, y), name
    assert a.tokens == b.tokens and a.stream == b.stream and a.keywords == b.keywords
    assert a.image_ids == b.image_ids and a.prompts == b.prompts


def shard_dirs(cache_dir: Path) -> list[Path]:
    """The shard folders of every capture under a ``cached_capture`` store."""
    return sorted(p for p in cache_dir.glob("*/shards/*") if not p.name.startswith("."))


def shard_stats(paths: list[Path]) -> dict[str, tuple[int, int]]:
    """inode and mtime of each shard's tensors: unchanged iff not rewritten."""
    return {p.name: ((p / "tensors.safetensors").stat().st_ino,
                     (p / "tensors.safetensors").stat().st_mtime_ns) for p in paths}


def reference_states(vlm, images, prompts):
    """Hidden states by output_hidden_states and by plain forward hooks, plus logits."""
    enc = vlm.encode(images, prompts)
    grabbed: dict[int, torch.Tensor] = {}
    hooks = [vlm.layers[0].register_forward_pre_hook(
        lambda m, args, kwargs: grabbed.__setitem__(0, args[0] if args else
                                                    kwargs["hidden_states"]),
        with_kwargs=True)]
    for i, layer in enumerate(vlm.layers):
        hooks.append(layer.register_forward_hook(
            lambda m, a, out, i=i: grabbed.__setitem__(i + 1, out[0] if isinstance(out, tuple)
                                                       else out)))
    try:
        with torch.no_grad():
            out = vlm.model(**enc, output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    offsets = enc["input_ids"].shape[1] - enc["attention_mask"].sum(1)
    return out, grabbed, offsets.cpu()


def check_exact(vlm, cache, ref, logits_tol: float = 1e-5):
    """States equal hooks and output_hidden_states bit for bit; the last layer's lens equals
    the logits to ``logits_tol`` (fp32 models: 1e-5; an fp16 model's own logits are fp16)."""
    from esmc_lens.lens.unembed import Unembed, lens_logits

    out, hooked, offsets = ref
    L = vlm.n_layers
    # HF's last hidden state is the final norm of the last layer's output: normed here on the
    # same padded batch (one shape, one kernel), as the states equal ``hooked`` bit for bit
    normed = vlm.final_norm(hooked[L])
    for b in range(len(cache)):
        valid = cache.positions[b] >= 0
        seq = offsets[b] + cache.positions[b][valid]
        for s in range(L + 1):
            got = cache.states[b, s, : int(valid.sum())]
            assert torch.equal(got, hooked[s][b, seq].float().cpu()), (b, s)
            if s < L:  # HF's last hidden state is already final-normed
                assert torch.equal(got, out.hidden_states[s][b, seq].float().cpu()), (b, s)
        assert torch.equal(normed[b, seq], out.hidden_states[L][b, seq])
        lens = lens_logits(cache.states[b, L, : int(valid.sum())], Unembed.from_model(vlm))
        assert (lens - out.logits[b, seq].float().cpu()).abs().max() <= logits_tol


def check_checkpoint_round_trip(src, vlm, prompt: str) -> None:
    """``vlm``, loaded in fp16 from the directory ``src`` was saved to, is ``src``: weights
    (fp16-rounded), eval mode, chat template, left padding and formatted prompt."""
    assert vlm.dtype == torch.float16 and not vlm.model.training
    assert vlm.processor.chat_template == src.processor.chat_template
    assert vlm.tokenizer.padding_side == "left"
    for (name, a), b in zip(src.model.state_dict().items(),
                            vlm.model.state_dict().values(), strict=True):
        assert torch.equal(a.half(), b), name
    assert vlm.format_prompt(prompt) == src.format_prompt(prompt)


@pytest.fixture
def readonly_dir(tmp_path):
    """A folder nobody can write, root included (chmod, else chattr +i), or a skip."""
    d = tmp_path / "ro"
    d.mkdir()
    if os.geteuid() != 0:
        d.chmod(0o555)
    elif shutil.which("chattr"):
        subprocess.run(["chattr", "+i", str(d)], capture_output=True, check=False)
    try:
        (d / "probe").write_text("x")
        (d / "probe").unlink()
        writable = True
    except OSError:
        writable = False
    if writable:
        pytest.skip("cannot make a read-only folder here (root without chattr +i)")
    yield d
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(d)], capture_output=True, check=False)
    d.chmod(0o755)


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a 256 KiB tmpfs (a disk that really fills up), or a skip."""
    d = tmp_path / "small-disk"
    d.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                       capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")
    yield d
    subprocess.run(["umount", "-l", str(d)], capture_output=True, check=False)


def fill_disk(folder: Path, leave: int = 0) -> Path:
    """Fill ``folder``'s file system with one file, then free ``leave`` bytes of it."""
    filler = folder / "filler.bin"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
    size = filler.stat().st_size
    os.truncate(filler, max(0, size - leave))
    return filler


class Stop(Exception):
    """Raised by :func:`stop_at` in place of the function it replaces."""


def stop_at(monkeypatch, module, name: str) -> dict:
    """Replace ``module.name`` by a spy that records its keyword arguments (and ``prompt``)
    and raises :class:`Stop`: what a caller passes, without running it."""
    seen: dict = {}

    def spy(vlm, images, prompt, **kw):
        seen.clear()
        seen.update(kw, prompt=prompt)
        raise Stop

    monkeypatch.setattr(module, name, spy)
    return seen
