"""Throughput work keeps results exact; the benchmark reports what it says it measures.

No timing is asserted here (the machines are shared): the benchmark's figures are checked
for their definitions (bytes, ratios, phases present), and every speed-up path of capture
(engines, prefetch, batch subsets) for bit-identical tensors.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import SOLID_COLOURS, solid

from esmc_lens.apps.bench import PeakMemory, cache_bytes, make_images, run_bench
from esmc_lens.errors import ConfigError
from esmc_lens.residual.capture import auto_batch_size, capture, estimate_batch_bytes, iter_capture

PROMPTS = ["The color of the flower is", "Describe the image.", "The shape of the object is",
           "What color is it?", "The color of the flower is"]
OPTIONS = {"keywords": ["red", "blue"], "top_k": 3, "vision": True,
           "store_dtype": torch.float32}
TENSORS = ("states", "positions", "image_span", "vision", "keyword_probs", "top_ids",
           "top_probs")


def _images(n):
    cols = list(SOLID_COLOURS.values())
    return [solid(cols[i % len(cols)], (40, 30)) for i in range(n)]


def _same(a, b) -> bool:
    return all((getattr(a, n) is None and getattr(b, n) is None)
               or torch.equal(getattr(a, n), getattr(b, n)) for n in TENSORS) and \
        a.tokens == b.tokens and a.image_ids == b.image_ids


@pytest.fixture(scope="module")
def reference(tiny_vlm):
    return capture(tiny_vlm, _images(5), PROMPTS, batch_size=2, progress=False,
                   engine="hooks", prefetch=False, **OPTIONS)


@pytest.mark.parametrize(("engine", "prefetch"), [("hooks", True), ("nnsight", False),
                                                  ("nnsight", True), ("auto", None)])
def test_engines_and_prefetch_are_bit_identical(tiny_vlm, reference, engine, prefetch):
    got = capture(tiny_vlm, _images(5), PROMPTS, batch_size=2, progress=False, engine=engine,
                  prefetch=prefetch, **OPTIONS)
    assert _same(got, reference)
    assert got.meta == reference.meta


def test_layer_subsets_stop_early_and_agree(tiny_vlm, reference):
    for layers in ([0], [1, 3], [tiny_vlm.n_layers]):
        for engine in ("hooks", "nnsight"):
            some = capture(tiny_vlm, _images(5), PROMPTS, batch_size=2, progress=False,
                           layers=layers, engine=engine, store_dtype=torch.float32)
            idx = [reference.stream.index(s) for s in layers]
            assert some.stream == layers
            assert torch.equal(some.states, reference.states[:, idx]), (layers, engine)


def test_iter_capture_yields_batches_with_their_own_metadata(tiny_vlm, reference):
    parts = list(iter_capture(tiny_vlm, _images(5), PROMPTS, batch_size=2, batches=[2, 0],
                              **OPTIONS))
    assert [idx for idx, _ in parts] == [[4], [0, 1]]
    last, first = parts[0][1], parts[1][1]
    assert torch.equal(first.states, reference.states[:2, :, : first.n_positions])
    assert torch.equal(last.states[0], reference.states[4, :, : last.n_positions])
    alone = capture(tiny_vlm, _images(5)[4:], PROMPTS[4:], progress=False, **OPTIONS)
    assert last.meta == alone.meta  # what capture() gives that batch alone
    with pytest.raises(ConfigError, match="out of range"):
        list(iter_capture(tiny_vlm, _images(5), PROMPTS, batch_size=2, batches=[3]))
    with pytest.raises(ConfigError, match="engine"):
        capture(tiny_vlm, _images(1), PROMPTS[0], engine="jax", progress=False)


def test_auto_batch_size_follows_the_budget(tiny_vlm):
    img = _images(1)[0]
    one = estimate_batch_bytes(tiny_vlm, 40, 9, 5, 1)
    assert estimate_batch_bytes(tiny_vlm, 40, 9, 5, 4) > estimate_batch_bytes(
        tiny_vlm, 40, 9, 5, 2) > one
    small = auto_batch_size(tiny_vlm, img, PROMPTS[0], budget_bytes=one)
    big = auto_batch_size(tiny_vlm, img, PROMPTS[0], budget_bytes=100 * one, max_batch=64)
    assert small == 1 and 1 < big <= 64
    assert auto_batch_size(tiny_vlm, img, PROMPTS[0], budget_bytes=1 << 40, max_batch=7) == 7
    cache = capture(tiny_vlm, _images(3), PROMPTS[0], batch_size="auto", progress=False)
    assert len(cache) == 3
    with pytest.raises(ConfigError, match="batch_size"):
        capture(tiny_vlm, _images(1), PROMPTS[0], batch_size=0, progress=False)


def test_peak_memory_sees_an_allocation():
    mem = PeakMemory(torch.device("cpu"))
    mem.reset()
    if mem.method != "vmhwm":
        pytest.skip("no /proc/self/clear_refs on this system")
    # 64 MiB of fresh pages from the kernel, every one touched. Not a torch tensor: after an
    # earlier test frees a model, malloc hands back memory that is already resident.
    import mmap

    import numpy as np

    block = mmap.mmap(-1, 64 << 20)
    np.frombuffer(block, dtype=np.uint8)[:] = 1
    out = mem.read()
    block.close()
    assert out["peak_rss_delta_mb"] >= 60
    assert out["peak_rss_mb"] >= out["peak_rss_delta_mb"]


def test_bench_report_definitions(tiny_vlm, tmp_path):
    threads = torch.get_num_threads()
    rep = run_bench(model="tiny", n_images=4, batch_size=2, n_naive=2, repeats=1, rounds=1,
                    n_clusters=2, threads=1, inline=True, workdir=str(tmp_path))
    for key in ("forward_ips", "capture_ips", "capture_states_ips", "naive_ips",
                "head_fit_s", "head_features_fit_s", "kmeans_fit_s"):
        assert rep[key] > 0, key
    assert rep["capture_over_forward"] == pytest.approx(rep["capture_ips"] / rep["forward_ips"])
    assert rep["speedup_vs_naive"] == pytest.approx(rep["capture_ips"] / rep["naive_ips"])
    assert rep["head_over_kmeans"] == pytest.approx(rep["head_fit_s"] / rep["kmeans_fit_s"])
    # bytes: what the capture stores, and what the naive way keeps, per image
    paths = make_images(tmp_path, 4)
    cache = capture(tiny_vlm, paths, rep["prompt"], batch_size=2, keywords=rep["keywords"],
                    top_k=rep["top_k"], progress=False)
    assert rep["bytes_per_image"] == cache_bytes(cache) / 4
    S, T = tiny_vlm.n_layers + 1, rep["tokens_per_image"]
    naive = S * T * (tiny_vlm.vocab_size + tiny_vlm.d_model) * 4
    assert rep["naive_bytes_per_image"] == naive
    assert rep["memory_ratio"] == pytest.approx(naive / rep["bytes_per_image"])
    assert set(rep["peak_rss_mb"]) == {"forward", "capture", "capture_states", "naive", "head"}
    ratios = {f"{w}_over_forward_k{k}{c}" for w in ("esmc", "run") for k in (1, 3)
              for c in ("", "_cpu")}
    assert set(rep["targets"]) == {"capture_over_forward", "speedup_vs_naive", "memory_ratio",
                                   "head_over_kmeans", *ratios}
    # the whole run against one bare forward over the same images, in one round
    for clock, suffix in (("wall", ""), ("cpu", "_cpu")):
        t = rep["run_times_s"][clock]
        assert len(t["forward"]) == 2 and all(x > 0 for x in t["forward"])
        for k in (1, 3):
            for what in ("esmc", "run"):
                ratio = t[f"{what}_k{k}"][0] / (sum(t["forward"]) / 2)
                assert rep[f"{what}_over_forward_k{k}{suffix}"] == pytest.approx(ratio)
    assert rep["forward_s"] == pytest.approx(sum(rep["run_times_s"]["wall"]["forward"]) / 2)
    assert torch.get_num_threads() == threads  # --threads applies to the phases only
    json.dumps(rep)


def test_cli_bench_json(capsys, tmp_path):
    from esmc_lens.apps.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--model", "tiny", "--n-images", "4", "--batch-size", "2",
                 "--repeats", "1", "--rounds", "2", "--phases", "forward,capture", "--inline",
                 "--json", "--threads", "1", "--out", str(out)]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["forward_ips"] > 0 and rep["naive_ips"] is None
    assert len(rep["times_s"]["forward"]) == 2  # two rounds of one timed pass
    assert rep["targets"]["speedup_vs_naive"]["met"] is None
    assert json.loads(out.read_text())["capture_ips"] == rep["capture_ips"]
    with pytest.raises(ConfigError, match="features"):
        run_bench(model="tiny", n_images=4, phases=["head"], inline=True)


@pytest.mark.parametrize("optimizer", ["neuron-adam", "adam"])
@pytest.mark.parametrize("batch_size", [None, 7])
def test_head_fit_loop_is_bit_identical_to_the_autograd_loop(batch_size, optimizer):
    """The head's preallocated first-layer gradients change speed, not results."""
    import math

    import numpy as np
    from sklearn.utils import check_random_state
    from torch import nn

    from esmc_lens.cluster.head import PseudoLabelHead, _init_linear
    from esmc_lens.cluster.optim import NeuronAdam

    rng = np.random.default_rng(0)
    X = (rng.normal(size=(60, 300)) + np.repeat(np.eye(3, 300) * 4, 20, 0)).astype(np.float32)
    est = PseudoLabelHead(n_clusters=3, alpha=0.4, hidden_dim=32, epochs=15, lr=1e-2,
                          batch_size=batch_size, random_state=3, basis="features",
                          optimizer=optimizer).fit(X)
    # the loop as it was: autograd allocates every gradient
    seeds = check_random_state(3)
    seeds.randint(np.iinfo(np.int32).max)
    weight_gen = torch.Generator().manual_seed(int(seeds.randint(np.iinfo(np.int32).max)))
    gen = torch.Generator().manual_seed(int(seeds.randint(np.iinfo(np.int32).max)))
    with torch.random.fork_rng(devices=[]):
        head = nn.Sequential(nn.Linear(300, 32), nn.ReLU(), nn.Linear(32, 3))
    with torch.no_grad():
        nn.init.kaiming_uniform_(head[0].weight, a=math.sqrt(5), generator=weight_gen)
        nn.init.uniform_(head[0].bias, -300 ** -0.5, 300 ** -0.5, generator=gen)
    _init_linear(head[2], gen)
    inputs = torch.from_numpy(X[est.pseudo_indices_] * np.float32(est.input_scale_))
    targets = torch.from_numpy(est.pseudo_labels_)
    opt = (torch.optim.Adam(head.parameters(), lr=1e-2, fused=True) if optimizer == "adam" else
           NeuronAdam([{"params": [head[0].weight]},
                       {"params": [head[0].bias, *head[2].parameters()], "pooled": False}],
                      lr=1e-2))
    n = inputs.shape[0]
    batch = n if batch_size is None else batch_size
    curve = []
    for _ in range(15):
        order = torch.randperm(n, generator=gen)
        total = 0.0
        for s in range(0, n, batch):
            idx = order[s:s + batch]
            opt.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(head(inputs[idx]), targets[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * idx.shape[0]
        curve.append(total / n)
    for a, b in zip(head.parameters(), est.head_.parameters(), strict=True):
        assert torch.equal(a, b)
    assert curve == est.loss_curve_
