#!/usr/bin/env bash
# Every GPU figure the issues ask for, in parts.
#
#   bash benchmarks/gpu_session.sh PART [RESULTS_DIR]
#
# A session is lent 15 device-minutes at most, start-up included: run `essentials` (one call,
# at most 7 minutes) first; the other parts are for the rare session with time left.
# PART:
#   essentials    benchmarks/essentials.py: the Pallas kernel's tests compiled for the GPU, every
#                 attention implementation at d=128 n=2k/8k/16k (causal and not, fwd and fwd+bwd),
#                 gpt2-small training tokens/s and MFU, decoding with and without the KV cache at
#                 a 1k context; one summary table and essentials.json
#   attention128  the FlashAttention grid at d=128 (all implementations, causal and not)
#   attention64   the same at d=64, then blockwise forward+backward at n=1,048,576 (1 head, d=64)
#   tune          the Pallas tile search (benchmarks/tune_pallas.py) at d=128, then d=64
#   blockwise     blockwise tile sizes at d=128, n=16k (causal and not): picks its GPU default
#   train         gpt2-small throughput (auto, cudnn, pallas, blockwise attention), then the
#                 Shakespeare convergence run (needs out/shakespeare.txt, see below)
#   generate      gpt2-small generation with and without the KV cache at a 1k context
#   followups     word vectors at batch 16,384 with the implicit row step (needs gensim's test
#                 data in out/wordvec/, carried: see benchmarks/RESULTS.md "Word vectors"), then
#                 exact search over 10M random 384-d vectors (MiniLM encoding too where its
#                 directory is present); about 50 GB of host memory at peak
#
# After essentials, in this order: followups, tune, attention64, blockwise, train (with the convergence run).
# RESULTS_DIR defaults to $OUT (the device tool's returned folder) or benchmarks/results.
# The device has no network: write the corpus here first and carry it along, e.g.
#   python -c "from transformer_jax import data; open('out/shakespeare.txt','w').write(data.load_text('shakespeare'))"
# Each part prints the device, jax version and date, and writes JSON/CSV next to its log.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python3}"  # the GPU image has python3, not always python
part="${1:?usage: gpu_session.sh essentials|followups|attention128|attention64|tune|blockwise|train|generate [RESULTS_DIR]}"
results="${2:-${OUT:-benchmarks/results}}/$part"
mkdir -p "$results"
exec > >(tee "$results/log.txt") 2>&1
date -u +"%Y-%m-%dT%H:%M:%SZ"
nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no nvidia-smi"
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

case "$part" in
  essentials)
    "$PY" benchmarks/essentials.py --out "$results"
    ;;
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
  followups)
    timeout 200 "$PY" benchmarks/word_vectors.py --no-gensim --eval-dir out/wordvec \
      --data out/wordvec/head500.noblanks.cor --repeat 4 --batch-size 16384 --glove-batch-size 65536 \
      --json "$results/word_vectors_gpu.json"
    timeout 300 "$PY" benchmarks/search.py --sizes 10000000 --queries 1000 --no-compare --no-fake-devices \
      --json "$results/search_gpu.json"
    ;;
  *)
    echo "unknown part: $part" >&2
    exit 2
    ;;
esac
