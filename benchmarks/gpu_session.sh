#!/usr/bin/env bash
# Every GPU figure the issues ask for, in parts each sized (by estimate: not yet run on a GPU) for one 10-minute device call.
#
#   bash benchmarks/gpu_session.sh PART [RESULTS_DIR]
#
# PART:
#   attention128  the FlashAttention grid at d=128 (all implementations, causal and not)
#   attention64   the same at d=64, then blockwise forward+backward at n=1,048,576 (1 head, d=64)
#   tune          the Pallas tile search (benchmarks/tune_pallas.py) at d=128, then d=64
#   blockwise     blockwise tile sizes at d=128, n=16k (causal and not): picks its GPU default
#   train         gpt2-small throughput (auto, cudnn, pallas, blockwise attention), then the
#                 Shakespeare convergence run (needs out/shakespeare.txt, see below)
#   generate      gpt2-small generation with and without the KV cache at a 1k context
#
# A session has 30 device-minutes: run them in this order of what the open issues need
# (attention128, train, generate, tune, attention64, blockwise) and leave the rest for the next.
# RESULTS_DIR defaults to $OUT (the device tool's returned folder) or benchmarks/results.
# The device has no network: write the corpus here first and carry it along, e.g.
#   python -c "from transformer_jax import data; open('out/shakespeare.txt','w').write(data.load_text('shakespeare'))"
# Each part prints the device, jax version and date, and writes JSON/CSV next to its log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"  # the GPU image has python3, not always python
part="${1:?usage: gpu_session.sh attention128|attention64|tune|blockwise|train|generate [RESULTS_DIR]}"
results="${2:-${OUT:-benchmarks/results}}/$part"
mkdir -p "$results"
exec > >(tee "$results/log.txt") 2>&1
date -u +"%Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

case "$part" in
  attention128)
    "$PY" benchmarks/attention.py --grid flash --head-dims 128 --out "$results"
    ;;
  attention64)
    "$PY" benchmarks/attention.py --grid flash --head-dims 64 --out "$results"
    "$PY" benchmarks/attention.py --seq-lens 1048576 --head-dims 64 --heads 1 --batch 1 \
      --implementations blockwise --causal yes --repeats 2 --reference-max-gib 0 --out "$results/1m"
    ;;
  tune)
    "$PY" benchmarks/tune_pallas.py --head-dims 128 64 --budget-s 500 --out "$results"
    ;;
  blockwise)
    for bq in 512 1024 2048; do
      for bk in 512 1024 2048; do
        "$PY" benchmarks/attention.py --seq-lens 16384 --head-dims 128 --implementations blockwise \
          --blockwise-blocks "$bq" "$bk" --repeats 5 --out "$results/${bq}x${bk}"
      done
    done
    ;;
  train)
    for impl in auto cudnn pallas blockwise; do
      flag=(); [ "$impl" != auto ] && flag=(--attention-impl "$impl")
      timeout 150 "$PY" benchmarks/train_throughput.py --preset gpt2-small --batch-size 12 --seq-len 1024 \
        --dtype bfloat16 --steps 30 "${flag[@]}" --json "$results/throughput_$impl.json"
    done
    if [ -f out/shakespeare.txt ]; then
      timeout 280 "$PY" benchmarks/train_throughput.py --convergence --data out/shakespeare.txt \
        --out-dir /tmp/convergence --json "$results/convergence.json"
      cp /tmp/convergence/metrics.jsonl "$results/convergence_metrics.jsonl" 2>/dev/null
    else
      echo "out/shakespeare.txt missing: convergence run skipped"
    fi
    ;;
  generate)
    "$PY" benchmarks/generate.py --preset gpt2-small --prompt-len 960 --new-tokens 64 --dtype bfloat16 \
      --batch-sizes 1 32 --json "$results/generate.json"
    ;;
  *)
    echo "unknown part: $part" >&2
    exit 2
    ;;
esac
