"""``esmc-lens bench``: throughput and memory of capture against the forward pass and the naive way.

On the same images (synthetic shapes, written as PNG files) and the same prompt, it measures

* ``forward``: the limit, a bare batched forward pass of the model (inputs preprocessed
  beforehand and not timed; ``use_cache=False``, logits of the last position only);
* ``capture``: :func:`~esmc_lens.residual.capture.capture` of every layer at the prompt positions
  with the keyword and top-k lens, timed end to end (decoding, preprocessing, forward,
  lens, copy to the CPU), as the pipeline's localization pass uses it;
* ``capture_states``: the same without the lens (what the pipeline's embedding pass costs
  at most: it keeps fewer cells and stops at the deepest target layer);
* ``naive``: the published code's way, one image at a time, ``output_hidden_states=True``,
  the full-vocabulary lens (softmax) of every (layer, position) kept in memory
  (``torch.cuda.empty_cache()`` after every image on CUDA), on ``n_naive`` images;
* ``head``: :class:`~esmc_lens.cluster.head.PseudoLabelHead` fit time (the default, span
  basis, and the paper's ``basis="features"`` as ``head_features_fit_s``) against
  scikit-learn ``KMeans(n_init=10)`` fit time, on the lens probabilities of the capture's
  last layer and last prompt position (|V|-dimensional, the pipeline's default space);
* ``run``: the whole run against the forward pass, in one process on the same N images (a
  synthetic dataset with its labels): ``forward_s``, one bare batched forward pass over the N
  images (inputs preprocessed beforehand), and :func:`~esmc_lens.pipeline.run_esmc` end to
  end (images read from disk, 10 seeds, user keywords so no keyword generation is timed)
  for K = 1 criterion (colour) and K = 3 (colour, shape, background), without baselines
  (``esmc_over_forward_k{K}``) and with all of them (``run_over_forward_k{K}``). Each
  round times forward, the K = 1 runs, forward, the K = 3 runs; a run is divided by the
  mean of its round's two forward passes, and the median over rounds is reported, in
  wall-clock seconds and (``*_cpu``) in CPU seconds of the process, which other jobs on a
  shared machine do not inflate. A warm-up run on 8 images first pays the one-time costs
  (text encoder, lazy imports).

Speeds come from the ``paired`` phase: in one process, the four modes run back to back on
every batch (order rotated per batch and repeat; per batch the minimum over ``repeats``),
so that a shared machine's load, which changes by the minute, falls on all of them alike.
The other phases run each mode in its own Python process (``--inline`` runs them in this
one) for its peak memory (and an isolated speed, reported as ``isolated_ips``): on the
CPU the peak resident set size (``VmHWM``, reset through
``/proc/self/clear_refs`` after the model is loaded and warmed up; ``ru_maxrss`` where that
is unavailable), reported absolute and as the increase over the process's resident size
at the reset; on CUDA ``torch.cuda.max_memory_allocated`` over ``memory_allocated`` at the
reset. Every timed stretch follows a warm-up batch and is bracketed by
``torch.cuda.synchronize`` on CUDA.

>>> report = run_bench(model="tiny", n_images=8, batch_size=4, inline=True)  # doctest: +SKIP
>>> report["capture_over_forward"], report["speedup_vs_naive"]              # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..errors import ConfigError

__all__ = ["PHASES", "TARGETS", "format_report", "run_bench", "run_phase"]

PHASES = ("paired", "forward", "capture", "capture_states", "naive", "head", "run")
RUN_CRITERIA = ("color", "shape", "background")  # K = 3; K = 1 is the first
PAIRED_MODES = ("forward", "capture", "capture_states", "naive")
DEFAULT_PROMPT = "The color of the object is"
DEFAULT_KEYWORDS = ("red", "green", "blue", "yellow")
# The targets (offline model, 2-core CPU): name -> (comparison, threshold).
TARGETS = {
    "capture_over_forward": (">=", 0.85),
    "speedup_vs_naive": (">=", 5.0),
    "memory_ratio": (">=", 100.0),
    "head_over_kmeans": ("<=", 3.0),
    # issue #16 (offline model, CPU, N = 96)
    "esmc_over_forward_k1": ("<=", 1.15),
    "run_over_forward_k1": ("<=", 1.6),
    "esmc_over_forward_k3": ("<=", 1.3),
    "run_over_forward_k3": ("<=", 2.5),
}
# The same ratios in CPU seconds of the bench's process: on a machine shared with other
# jobs, the wall clock also counts the time the process waits for a core.
TARGETS |= {f"{k}_cpu": v for k, v in list(TARGETS.items()) if "_over_forward_k" in k}
MEMORY_METHOD = {
    "cpu": "peak RSS (VmHWM) of the phase's own process, reset via /proc/self/clear_refs "
           "after model load and warm-up; delta = peak - RSS at the reset",
    "cuda": "torch.cuda.max_memory_allocated after reset_peak_memory_stats; delta = peak - "
            "memory_allocated at the reset (host RSS reported alongside)",
}


# -- memory -----------------------------------------------------------------------------


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            m = re.search(rf"{field}:\s+(\d+) kB", f.read())
        return int(m.group(1)) if m else None
    except OSError:
        return None


class PeakMemory:
    """Peak memory of a stretch of code: ``reset()`` before, ``read()`` after."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.method = "vmhwm"
        self.base_rss = 0
        self.base_cuda = 0

    def reset(self) -> None:
        import gc

        gc.collect()
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        except OSError:
            self.method = "ru_maxrss"
        self.base_rss = self._rss()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base_cuda = torch.cuda.memory_allocated(self.device)

    def _rss(self) -> int:
        kb = _status_kb("VmRSS")
        return (kb or 0) * 1024

    def _peak_rss(self) -> int:
        if self.method == "vmhwm":
            kb = _status_kb("VmHWM")
            if kb is not None:
                return kb * 1024
        import resource

        ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return ru * (1 if sys.platform == "darwin" else 1024)

    def read(self) -> dict:
        peak = self._peak_rss()
        out = {"peak_rss_mb": peak / 2**20, "peak_rss_delta_mb": (peak - self.base_rss) / 2**20,
               "memory_method": self.method}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            p = torch.cuda.max_memory_allocated(self.device)
            out["peak_cuda_mb"] = p / 2**20
            out["peak_cuda_delta_mb"] = (p - self.base_cuda) / 2**20
        return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


# -- images -----------------------------------------------------------------------------


def make_images(folder: str | os.PathLike, n_images: int, image_size: int = 224,
                seed: int = 0) -> list[Path]:
    """``n_images`` synthetic shape images as PNG files under ``folder`` (in index order)."""
    from ..data.synthetic import make_synthetic_dataset

    root = make_synthetic_dataset(Path(folder) / f"synthetic-{n_images}-{image_size}-{seed}",
                                  n_images=max(4, n_images), seed=seed, image_size=image_size)
    paths = sorted((root / "color").glob("*/*.png"), key=lambda p: p.name)
    return paths[:n_images]


# -- phases -----------------------------------------------------------------------------


def _tensor_bytes(obj) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, list | tuple):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def cache_bytes(cache) -> int:
    """Bytes of the tensors a :class:`~esmc_lens.residual.cache.ResidualCache` stores."""
    from ..residual.cache import TENSOR_FIELDS

    return sum(_tensor_bytes(getattr(cache, n)) for n in TENSOR_FIELDS)


def _naive_one(vlm, unembed, image, prompt) -> dict:
    """The published code's per-image work: every layer's full-vocabulary lens kept."""
    enc = vlm.encode([image], prompt)
    with torch.no_grad():
        out = vlm.model(**enc, output_hidden_states=True)
        hidden = out.hidden_states
        probs = []
        for layer, h in enumerate(hidden):
            # HF's last hidden state is already final-normed: its lens is the model's logits
            logits = out.logits[0] if layer == len(hidden) - 1 else unembed(h[0])
            probs.append(torch.softmax(logits.float(), dim=-1).cpu())
    kept = {"hidden_states": [h[0].float().cpu() for h in hidden], "probs": torch.stack(probs)}
    if vlm.device.type == "cuda":
        torch.cuda.empty_cache()
    return kept


def run_phase(phase: str, spec: dict) -> dict:
    """Run one phase in this process and return its figures (see the module docstring)."""
    if phase not in PHASES:
        raise ConfigError(f"phase {phase!r}: use one of {PHASES}")
    threads = torch.get_num_threads()
    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    try:
        return _run_phase(phase, spec)
    finally:
        torch.set_num_threads(threads)


def _run_phase(phase: str, spec: dict) -> dict:
    from ..models.vlm import load_model
    from ..residual.capture import capture

    t0 = time.perf_counter()
    vlm = load_model(spec["model"], device=spec.get("device"), dtype=spec.get("dtype"))
    load_s = time.perf_counter() - t0
    device = vlm.device
    paths = [Path(p) for p in spec["images"]]
    prompt, B, repeats = spec["prompt"], int(spec["batch_size"]), int(spec["repeats"])
    kw = {"keywords": list(spec["keywords"]), "top_k": int(spec["top_k"])}
    mem = PeakMemory(device)
    out: dict = {"phase": phase, "load_s": load_s, "device": str(device),
                 "dtype": str(vlm.dtype).replace("torch.", "")}

    if phase == "paired":
        return _paired_phase(vlm, spec, out)
    if phase == "run":
        return _run_phase_whole(vlm, spec, out)
    if phase == "forward":
        from ..data.images import open_rgb

        encs = [vlm.encode([open_rgb(p) for p in paths[s:s + B]], prompt)
                for s in range(0, len(paths), B)]
        out["tokens_per_image"] = int(encs[0]["input_ids"].shape[1])

        def work():
            with torch.inference_mode():
                for enc in encs:
                    vlm.model(**enc, use_cache=False, logits_to_keep=1)

        with torch.inference_mode():
            vlm.model(**encs[0], use_cache=False, logits_to_keep=1)  # warm-up
        n = len(paths)
    elif phase in ("capture", "capture_states"):
        opts = kw if phase == "capture" else {}
        capture(vlm, paths[:B], prompt, batch_size=B, progress=False, **opts)  # warm-up
        result: dict = {}

        def work():
            result["cache"] = capture(vlm, paths, prompt, batch_size=B, progress=False, **opts)

        n = len(paths)
    elif phase == "naive":
        from ..data.images import open_rgb
        from ..lens.unembed import Unembed

        unembed = Unembed.from_model(vlm)
        naive_paths = paths[: int(spec["n_naive"])]
        _naive_one(vlm, unembed, open_rgb(naive_paths[0]), prompt)  # warm-up
        kept: list = []

        def work():
            kept.clear()
            for p in naive_paths:
                kept.append(_naive_one(vlm, unembed, open_rgb(p), prompt))

        n = len(naive_paths)
    else:  # head
        return _head_phase(spec, out)

    mem.reset()
    times = [_timed(work, device) for _ in range(repeats)]
    out.update(mem.read())
    out.update({"n": n, "times_s": times, "ips": n / min(times)})
    if phase in ("capture", "capture_states"):
        cache = result["cache"]
        out["bytes_per_image"] = cache_bytes(cache) / len(cache)
        out["cache_shape"] = list(cache.states.shape)
        if phase == "capture" and spec.get("features"):
            _save_features(vlm, cache, spec["features"])
    if phase == "naive":
        out["naive_bytes_per_image"] = _tensor_bytes(kept) / len(kept)
    return out


def _paired_phase(vlm, spec: dict, out: dict) -> dict:
    """Every mode on the same batch, one after the other, batch after batch (one process).

    A shared machine's load changes by the minute; timing the modes back to back on each
    batch (in an order rotated per batch and repeat) makes their ratios robust to it. Per
    batch the minimum over ``repeats`` is kept. The naive mode runs on
    ``ceil(n_naive / n_batches)`` images of each batch (its results are dropped after each
    image here; its memory is measured by the ``naive`` phase).
    """
    from ..data.images import open_rgb
    from ..lens.unembed import Unembed
    from ..residual.capture import capture

    device = vlm.device
    paths = [Path(p) for p in spec["images"]]
    prompt, B = spec["prompt"], int(spec["batch_size"])
    kw = {"keywords": list(spec["keywords"]), "top_k": int(spec["top_k"])}
    batches = [paths[s:s + B] for s in range(0, len(paths), B)]
    per_batch_naive = -(-int(spec["n_naive"]) // len(batches))
    encs = [vlm.encode([open_rgb(p) for p in b], prompt) for b in batches]
    unembed = Unembed.from_model(vlm)

    def run(mode: str, b: int):
        if mode == "forward":
            with torch.inference_mode():
                vlm.model(**encs[b], use_cache=False, logits_to_keep=1)
        elif mode == "capture":
            capture(vlm, batches[b], prompt, batch_size=B, progress=False, **kw)
        elif mode == "capture_states":
            capture(vlm, batches[b], prompt, batch_size=B, progress=False)
        else:
            for p in batches[b][:per_batch_naive]:
                _naive_one(vlm, unembed, open_rgb(p), prompt)

    for mode in PAIRED_MODES:  # warm-up
        run(mode, 0)
    best = {m: [float("inf")] * len(batches) for m in PAIRED_MODES}
    for r in range(max(1, int(spec["repeats"]))):
        for b in range(len(batches)):
            k = (b + r) % len(PAIRED_MODES)
            for mode in PAIRED_MODES[k:] + PAIRED_MODES[:k]:
                best[mode][b] = min(best[mode][b],
                                    _timed(lambda m=mode, i=b: run(m, i), device))
    n = {m: len(paths) for m in PAIRED_MODES}
    n["naive"] = sum(len(b[:per_batch_naive]) for b in batches)
    out.update({"n": n, "batch_times_s": best,
                "tokens_per_image": int(encs[0]["input_ids"].shape[1]),
                "ips": {m: n[m] / sum(best[m]) for m in PAIRED_MODES}})
    return out


def _run_phase_whole(vlm, spec: dict, out: dict) -> dict:
    """forward_s and run_esmc for K = 1 and 3, with and without baselines (module doc)."""
    import statistics

    from ..data.dataset import load_dataset
    from ..data.images import open_rgb
    from ..data.synthetic import SYNTHETIC_KEYWORDS, SYNTHETIC_PROMPTS, make_synthetic_dataset
    from ..pipeline import run_esmc

    device, B, n = vlm.device, int(spec["batch_size"]), int(spec["n_run"])
    root = Path(spec["workdir"]) / f"run-{n}"
    ds = load_dataset(make_synthetic_dataset(root, n_images=n, seed=0,
                                             image_size=int(spec["image_size"])))
    paths = ds.paths
    crit = {c: SYNTHETIC_PROMPTS[c] for c in RUN_CRITERIA}
    encs = [vlm.encode([open_rgb(p) for p in paths[s:s + B]], crit["color"])
            for s in range(0, len(paths), B)]

    def forward():
        with torch.inference_mode():
            for enc in encs:
                vlm.model(**enc, use_cache=False, logits_to_keep=1)

    def esmc(k: int, baselines: bool, data=ds, seeds: int = 10, epochs: int = 100):
        names = list(crit)[:k]
        return lambda: run_esmc(vlm, data, {c: crit[c] for c in names},
                                keywords={c: SYNTHETIC_KEYWORDS[c] for c in names},
                                baselines=baselines, n_seeds=seeds, epochs=epochs,
                                batch_size=B, progress=False)

    warm = load_dataset(make_synthetic_dataset(root.with_name("warm-up"), n_images=8, seed=1,
                                               image_size=int(spec["image_size"])))
    with torch.inference_mode():
        vlm.model(**encs[0], use_cache=False, logits_to_keep=1)
    esmc(3, True, warm, seeds=1, epochs=1)()
    names = ("esmc_k1", "run_k1", "esmc_k3", "run_k3")
    times: dict[str, dict[str, list[float]]] = {
        clock: {m: [] for m in ("forward", *names)} for clock in ("wall", "cpu")}
    ratios: dict[str, dict[str, list[float]]] = {
        clock: {m: [] for m in names} for clock in ("wall", "cpu")}

    def both(fn) -> dict[str, float]:
        """Wall-clock and CPU seconds (this process, every thread) of ``fn()``."""
        cpu = time.process_time()
        wall = _timed(fn, device)
        return {"wall": wall, "cpu": time.process_time() - cpu}

    for _ in range(max(1, int(spec["rounds"]))):
        f1 = both(forward)
        t = {"esmc_k1": both(esmc(1, False)), "run_k1": both(esmc(1, True))}
        f2 = both(forward)
        t |= {"esmc_k3": both(esmc(3, False)), "run_k3": both(esmc(3, True))}
        for clock in ("wall", "cpu"):
            times[clock]["forward"] += [f1[clock], f2[clock]]
            for m in names:
                times[clock][m].append(t[m][clock])
                ratios[clock][m].append(t[m][clock] / ((f1[clock] + f2[clock]) / 2))
    out.update({"n": n, "run_times_s": times, "ratios": ratios,
                "forward_s": statistics.median(times["wall"]["forward"]),
                "forward_cpu_s": statistics.median(times["cpu"]["forward"]),
                "tokens_per_image": int(encs[0]["input_ids"].shape[1])})
    for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
        out.update({f"{m.split('_')[0]}_over_forward_{m.split('_')[1]}{suffix}":
                    statistics.median(r) for m, r in ratios[clock].items()})
    return out


def _save_features(vlm, cache, path: str) -> None:
    """Lens probabilities at the last layer and last prompt position (the head's input)."""
    import numpy as np

    from ..lens.unembed import Unembed
    from ..localization.targets import target_embeddings

    X = target_embeddings(cache, [(cache.stream[-1], cache.n_positions - 1)], space="probs",
                          unembed=Unembed.from_model(vlm))
    np.save(path, X.astype(np.float32))


def _head_phase(spec: dict, out: dict) -> dict:
    import numpy as np
    from sklearn.cluster import KMeans

    from ..cluster.head import PseudoLabelHead

    X = np.load(spec["features"])
    k = int(spec["n_clusters"])
    dev = "cuda" if str(spec.get("device") or "").startswith("cuda") or (
        spec.get("device") is None and torch.cuda.is_available()) else "cpu"
    head_t, paper_t, km_t = [], [], []

    def head(basis: str, epochs: int = 100):
        return PseudoLabelHead(n_clusters=k, random_state=0, epochs=epochs, device=dev,
                               basis=basis).fit(X)

    head("auto", 2), head("features", 2)  # warm-up
    mem = PeakMemory(torch.device(dev))
    mem.reset()
    for _ in range(max(2, int(spec["repeats"]))):  # alternate: all see the same load
        t = time.perf_counter()
        KMeans(n_clusters=k, n_init=10, random_state=0).fit(X)
        km_t.append(time.perf_counter() - t)
        head_t.append(_timed(lambda: head("auto"), torch.device(dev)))
        paper_t.append(_timed(lambda: head("features"), torch.device(dev)))
    out.update(mem.read())
    # head_fit_s: the default head (the span basis for these wide features);
    # head_features_fit_s: the paper's |V|-space head (basis="features")
    out.update({"n": int(X.shape[0]), "dim": int(X.shape[1]), "head_device": dev,
                "head_times_s": head_t, "head_features_times_s": paper_t,
                "kmeans_times_s": km_t, "head_fit_s": min(head_t),
                "head_features_fit_s": min(paper_t), "kmeans_fit_s": min(km_t)})
    return out


# -- driver ------------------------------------------------------------------------------


def _run_subprocess(phase: str, spec: dict) -> dict:
    cmd = [sys.executable, "-m", "esmc_lens.apps.bench", "--phase", phase,
           "--spec", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"bench phase {phase!r} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def run_bench(model: str = "offline", n_images: int = 16, batch_size: int = 8,
              n_naive: int | None = None, prompt: str = DEFAULT_PROMPT,
              keywords=DEFAULT_KEYWORDS, top_k: int = 5, repeats: int = 2, rounds: int = 1,
              device: str | None = None, dtype: str | None = None,
              threads: int | None = None, image_size: int = 224, n_clusters: int = 4,
              phases=PHASES, inline: bool = False, workdir: str | None = None,
              n_run: int | None = None) -> dict:
    """Run the benchmark and return its report (a dict; see :func:`format_report`).

    The timed phases run ``rounds`` times in turn (forward, capture, capture_states,
    naive, forward, ...), each time in a fresh process timing ``repeats`` passes, so that
    a shared machine's changing load falls on all of them; the minimum time is kept. The
    ``run`` phase runs once, its ``rounds`` inside (median), on ``n_run`` images (default
    ``n_images``).
    """
    if n_images < max(2, n_clusters):
        raise ConfigError(f"n_images={n_images}: need at least {max(2, n_clusters)}")
    if batch_size < 1 or repeats < 1 or rounds < 1:
        raise ConfigError("batch_size, repeats and rounds must be >= 1")
    n_naive = min(n_images, 4) if n_naive is None else min(n_images, n_naive)
    phases = [p for p in PHASES if p in set(phases)]
    if "head" in phases and "capture" not in phases:
        raise ConfigError("the head phase needs the capture phase's features")
    tmp = tempfile.TemporaryDirectory(prefix="esmc-bench-", dir=workdir)
    started = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    load_before = os.getloadavg()
    spec = {"model": model, "device": device, "dtype": dtype, "batch_size": batch_size,
            "repeats": repeats, "rounds": rounds, "prompt": prompt,
            "keywords": list(keywords), "top_k": top_k,
            "n_naive": n_naive, "threads": threads, "n_clusters": n_clusters,
            "n_run": n_images if n_run is None else int(n_run), "image_size": image_size,
            "workdir": tmp.name,
            "images": [str(p) for p in make_images(tmp.name, n_images, image_size)],
            "features": str(Path(tmp.name) / "features.npy")}
    runs: dict[str, list[dict]] = {p: [] for p in phases}
    try:
        for r in range(rounds):
            for phase in phases:
                if phase in ("paired", "head", "run") and r > 0:
                    continue  # they alternate their modes themselves (repeats, rounds)
                runs[phase].append(run_phase(phase, spec) if inline
                                   else _run_subprocess(phase, spec))
    finally:
        tmp.cleanup()
    return _report({p: _combine(rs) for p, rs in runs.items()}, spec, started, load_before,
                   inline)


def _combine(rounds: list[dict]) -> dict:
    """One phase's figures over rounds: all times, the best speed, the highest peaks."""
    out = dict(rounds[0])
    if "times_s" in out:
        times = [t for r in rounds for t in r["times_s"]]
        out.update({"times_s": times, "ips": out["n"] / min(times)})
    for key in ("peak_rss_mb", "peak_rss_delta_mb", "peak_cuda_mb", "peak_cuda_delta_mb"):
        if key in out:
            out[key] = max(r[key] for r in rounds)
    return out


def _machine() -> dict:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"model name\s*:\s*(.+)", f.read())
            cpu = m.group(1).strip() if m else cpu
    except OSError:
        pass
    from ..models.vlm import library_versions

    info = {"platform": platform.platform(), "cpu": cpu, "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "versions": library_versions()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _ratio(a, b):
    return None if a is None or b in (None, 0) else a / b


def _report(results: dict, spec: dict, started: str, load_before, inline: bool) -> dict:
    g = lambda phase, key: results.get(phase, {}).get(key)  # noqa: E731
    paired = results.get("paired")
    rep = {
        "model": spec["model"], "device": next(r["device"] for r in results.values()),
        "dtype": next(r["dtype"] for r in results.values()),
        "n_images": len(spec["images"]), "n_naive": spec["n_naive"],
        "batch_size": spec["batch_size"], "repeats": spec["repeats"],
        "rounds": spec["rounds"],
        "prompt": spec["prompt"], "keywords": spec["keywords"], "top_k": spec["top_k"],
        "tokens_per_image": g("forward", "tokens_per_image") or g("paired", "tokens_per_image"),
        "cache_shape": g("capture", "cache_shape"),
        "timing": ("paired: the modes back to back on every batch, in one process"
                   if paired else "isolated: each mode in its own process"),
    }
    for m in PAIRED_MODES:
        rep[f"{m}_ips"] = paired["ips"][m] if paired else g(m, "ips")
    rep["isolated_ips"] = {m: g(m, "ips") for m in PAIRED_MODES if g(m, "ips") is not None}
    if paired:
        rep["naive_images_timed"] = paired["n"]["naive"]
    rep["capture_over_forward"] = _ratio(rep["capture_ips"], rep["forward_ips"])
    rep["capture_states_over_forward"] = _ratio(rep["capture_states_ips"], rep["forward_ips"])
    rep["speedup_vs_naive"] = _ratio(rep["capture_ips"], rep["naive_ips"])
    rep["bytes_per_image"] = g("capture", "bytes_per_image")
    rep["naive_bytes_per_image"] = g("naive", "naive_bytes_per_image")
    rep["memory_ratio"] = _ratio(rep["naive_bytes_per_image"], rep["bytes_per_image"])
    rep["head_fit_s"] = g("head", "head_fit_s")
    rep["head_features_fit_s"] = g("head", "head_features_fit_s")
    rep["kmeans_fit_s"] = g("head", "kmeans_fit_s")
    rep["head_over_kmeans"] = _ratio(rep["head_fit_s"], rep["kmeans_fit_s"])
    rep["head_features"] = ({"n": g("head", "n"), "dim": g("head", "dim"),
                             "device": g("head", "head_device")} if "head" in results else None)
    rep["forward_s"] = g("run", "forward_s")
    rep["forward_cpu_s"] = g("run", "forward_cpu_s")
    rep["run_images"] = g("run", "n")
    for k in (1, 3):
        for what in ("esmc", "run"):
            for suffix in ("", "_cpu"):
                key = f"{what}_over_forward_k{k}{suffix}"
                rep[key] = g("run", key)
    if "run" in results:
        rep["run_ratios"] = results["run"]["ratios"]
        rep["run_times_s"] = results["run"]["run_times_s"]
    for key in ("peak_rss_mb", "peak_rss_delta_mb", "peak_cuda_mb", "peak_cuda_delta_mb"):
        vals = {p: r[key] for p, r in results.items() if r.get(key) is not None}
        if vals:
            rep[key] = vals
    dev = "cuda" if str(rep["device"] or "").startswith("cuda") else "cpu"
    rep["memory_method"] = MEMORY_METHOD[dev] + ("" if not inline else
                                                 " (phases run in one process: --inline)")
    rep["times_s"] = {p: r.get("times_s") or r.get("batch_times_s") or {
        "head": r.get("head_times_s"), "kmeans": r.get("kmeans_times_s")}
        for p, r in results.items()}
    rep["targets"] = {}
    for name, (op, thr) in TARGETS.items():
        v = rep.get(name)
        met = None if v is None else (v >= thr if op == ">=" else v <= thr)
        rep["targets"][name] = {"value": v, "target": f"{op} {thr}", "met": met}
    rep["machine"] = _machine()
    rep["loadavg_before"] = list(load_before)
    rep["loadavg_after"] = list(os.getloadavg())
    rep["date"] = started
    return rep


def format_report(rep: dict) -> str:
    """A plain-text table of a :func:`run_bench` report."""
    def f(v, fmt="{:.3g}"):
        return "-" if v is None else fmt.format(v)

    lines = [f"esmc-lens bench: model={rep['model']} device={rep['device']} "
             f"dtype={rep['dtype']} images={rep['n_images']} (naive {rep['n_naive']}) "
             f"batch={rep['batch_size']} tokens/image={rep['tokens_per_image']}",
             f"  forward_ips          {f(rep['forward_ips'])}",
             f"  capture_ips          {f(rep['capture_ips'])}   (keywords + top-{rep['top_k']} "
             "lens at every layer x prompt position)",
             f"  capture_states_ips   {f(rep['capture_states_ips'])}   (no lens)",
             f"  naive_ips            {f(rep['naive_ips'])}",
             f"  bytes_per_image      {f(rep['bytes_per_image'], '{:,.0f}')}",
             f"  naive_bytes_per_image {f(rep['naive_bytes_per_image'], '{:,.0f}')}",
             f"  head_fit_s {f(rep['head_fit_s'])} (paper's |V|-space head "
             f"{f(rep['head_features_fit_s'])})  kmeans_fit_s {f(rep['kmeans_fit_s'])}",
             f"  forward_s {f(rep['forward_s'])} ({rep['run_images']} images); run_esmc over "
             f"forward: K=1 {f(rep['esmc_over_forward_k1'])} (all baselines "
             f"{f(rep['run_over_forward_k1'])}), K=3 {f(rep['esmc_over_forward_k3'])} "
             f"({f(rep['run_over_forward_k3'])}); in CPU seconds: K=1 "
             f"{f(rep['esmc_over_forward_k1_cpu'])} ({f(rep['run_over_forward_k1_cpu'])}), "
             f"K=3 {f(rep['esmc_over_forward_k3_cpu'])} ({f(rep['run_over_forward_k3_cpu'])})"]
    for key in ("peak_rss_mb", "peak_rss_delta_mb", "peak_cuda_mb", "peak_cuda_delta_mb"):
        if key in rep:
            vals = ", ".join(f"{p} {v:,.0f}" for p, v in rep[key].items())
            lines.append(f"  {key:20s} {vals}")
    lines.append("  targets:")
    for name, t in rep["targets"].items():
        mark = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        lines.append(f"    {name:22s} {f(t['value'])} (target {t['target']}): {mark}")
    lines.append(f"  timing: {rep['timing']}; isolated-process ips: " + ", ".join(
        f"{m} {v:.3g}" for m, v in rep["isolated_ips"].items()))
    lines.append(f"  capture_states_over_forward {f(rep['capture_states_over_forward'])}; "
                 f"load average {rep['loadavg_before'][0]:.1f} -> "
                 f"{rep['loadavg_after'][0]:.1f} on {rep['machine']['cpu_count']} CPUs")
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``esmc-lens bench`` options (of the CLI and ``python -m esmc_lens.apps.bench``)."""
    p.add_argument("--model", default="offline", help="'offline' (default), 'tiny' or a hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if any)")
    p.add_argument("--dtype", default=None, help="float16, bfloat16, float32 (default: fp16 "
                                                 "on CUDA, fp32 on CPU)")
    p.add_argument("--n-images", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--n-run", type=int, default=None,
                   help="images of the run phase (default --n-images; the issue's targets "
                        "are for 96)")
    p.add_argument("--n-naive", type=int, default=None,
                   help="images for the naive reference (default min(n-images, 4))")
    p.add_argument("--repeats", type=int, default=2,
                   help="timed passes per phase process (min kept)")
    p.add_argument("--rounds", type=int, default=1,
                   help="times the isolated phases run in turn, each in a fresh process")
    p.add_argument("--threads", type=int, default=None, help="torch threads per phase")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--keywords", default=",".join(DEFAULT_KEYWORDS))
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--phases", default=",".join(PHASES), help="comma-separated subset")
    p.add_argument("--inline", action="store_true", help="run every phase in this process")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--out", default=None, help="also write the JSON report to this file")


def main_from_args(args: argparse.Namespace) -> int:
    rep = run_bench(model=args.model, n_images=args.n_images, batch_size=args.batch_size,
                    n_naive=args.n_naive, prompt=args.prompt,
                    keywords=[k for k in args.keywords.split(",") if k], top_k=args.top_k,
                    repeats=args.repeats, rounds=args.rounds, device=args.device, dtype=args.dtype,
                    threads=args.threads, phases=args.phases.split(","), inline=args.inline,
                    n_run=args.n_run)
    rep["command"] = " ".join(["esmc-lens", *sys.argv[1:]]) if sys.argv else None
    if args.out:
        Path(args.out).write_text(json.dumps(rep, indent=1, default=str))
    if args.json:
        print(json.dumps(rep, indent=1, default=str))
    else:
        print(format_report(rep))
    return 0


def _worker_main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m esmc_lens.apps.bench")
    p.add_argument("--phase", choices=PHASES)
    p.add_argument("--spec", help="JSON phase spec (internal)")
    add_arguments(p)
    args = p.parse_args(argv)
    if args.phase:  # one phase, in this process: print its JSON on the last line
        print(json.dumps(run_phase(args.phase, json.loads(args.spec)), default=str))
        return 0
    return main_from_args(args)


if __name__ == "__main__":
    raise SystemExit(_worker_main())
