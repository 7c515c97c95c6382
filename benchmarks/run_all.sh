#!/usr/bin/env bash
# Reproduce the figures in benchmarks/README.md (writes benchmarks/results/*.json).
# CPU, shared 2-core machine: one torch thread per process (see README). On a GPU machine
# add the CUDA runs at the bottom.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
mkdir -p benchmarks/results

$PY -m esmc_lens bench --model offline --n-images 16 --batch-size 8 --n-naive 4 \
    --threads 1 --repeats 2 --out benchmarks/results/offline-cpu.json
$PY -m esmc_lens bench --model tiny --n-images 32 --batch-size 8 --n-naive 8 \
    --threads 1 --repeats 2 --out benchmarks/results/tiny-cpu.json
$PY benchmarks/streaming_memory.py --model tiny --sizes 100,1000,5000 --json \
    > benchmarks/results/streaming-tiny.json
$PY benchmarks/engine_overhead.py --model offline --batch-size 4 --repeats 4 --json \
    > benchmarks/results/engine-overhead-offline.json
$PY benchmarks/engine_overhead.py --model tiny --layers 30 --batch-size 8 --repeats 30 --json \
    > benchmarks/results/engine-overhead-tiny30.json
$PY benchmarks/head_vs_kmeans.py --sizes 16,128,512 --threads 1 --json \
    > benchmarks/results/head-vs-kmeans-cpu.json
$PY benchmarks/head_fit_loop.py --n-train 5 --epochs 100 --threads 1 --json \
    > benchmarks/results/head-fit-loop-cpu.json
$PY -m esmc_lens bench --model offline --n-images 16 --batch-size 8 --n-naive 4 \
    --threads 2 --repeats 2 --out benchmarks/results/offline-cpu-2threads.json
$PY benchmarks/lens_precision.py --n-images 4 --threads 1 --json \
    > benchmarks/results/lens-precision-cpu.json
$PY benchmarks/lens_parts.py --threads 1 --json > benchmarks/results/lens-parts-cpu.json
# issue #16: the whole run against the forward pass (K = 1 and 3), and the two heads' scores
$PY -m esmc_lens bench --model offline --phases run --n-images 96 --batch-size 8 \
    --threads 1 --rounds 2 --out benchmarks/results/offline-cpu-run96.json
$PY benchmarks/head_span_vs_features.py --dataset synthetic --json \
    > benchmarks/results/head-span-vs-features-synthetic.json
ESMC_DATA=${ESMC_DATA:-../shared/data/esmc} $PY benchmarks/head_span_vs_features.py \
    --dataset flower --json > benchmarks/results/head-span-vs-features-flower.json

if $PY -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    for model in tiny offline; do
        $PY -m esmc_lens bench --model "$model" --device cuda --dtype float16 \
            --n-images 256 --batch-size 32 --n-naive 16 --repeats 3 \
            --out "benchmarks/results/${model}-cuda-fp16.json"
        $PY -m esmc_lens bench --model "$model" --device cuda --dtype float16 --phases run \
            --n-images 96 --batch-size 32 --rounds 3 \
            --out "benchmarks/results/${model}-cuda-fp16-run96.json"
    done
    $PY benchmarks/head_vs_kmeans.py --sizes 16,128,512 --device cuda --json \
        > benchmarks/results/head-vs-kmeans-cuda.json
fi
