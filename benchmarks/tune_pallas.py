"""Tune the Pallas flash-attention tile table on the GPU at hand.

For each head dim it runs the coordinate-descent search of `pallas_tuning.STAGES`: forward
tiles, then forward warps/stages, then backward tiles, then backward warps/stages, each
stage starting from the best configuration so far (the first from the table entry). Every
candidate is checked against a float32 yardstick (output, and gradients for backward
stages) on the benchmark's inputs before it is timed; one that fails to compile (e.g. too
much shared memory) or is wrong is recorded and skipped. The score of a candidate is its
time summed over the causal modes asked for: forward time in forward stages, forward +
backward time in backward stages.

Shapes follow the attention benchmark's "flash" grid at one length: batch * seq = --tokens,
heads = --hidden / head_dim, bfloat16.

Usage (GPU):  PYTHONPATH=. python benchmarks/tune_pallas.py [--head-dims 64 128] [--out DIR]
Smoke run (CPU, Pallas interpret mode; timings meaningless):
  PYTHONPATH=. python benchmarks/tune_pallas.py --interpret --seq-len 32 --tokens 32 --hidden 64
      --head-dims 64 --max-per-stage 2 --repeats 1 --dtype float32
Writes tune_pallas.json (every candidate, in order) into --out as it goes, and prints the
winning BlockSizes per head dim in the form of pallas_tuning._TABLE rows.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import time

import jax
import jax.numpy as jnp

from attention import TOLERANCE, median_seconds, relative_error, yardstick
from transformer_jax.attention import pallas_gpu
from transformer_jax.attention.pallas_tuning import STAGES, BlockSizes, default_block_sizes, gpu_generation, \
    stage_candidates


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[128, 64])
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--tokens", type=int, default=16384, help="batch * seq_len")
    parser.add_argument("--hidden", type=int, default=2048, help="heads * head_dim")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), default="bfloat16")
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--max-per-stage", type=int, help="try only the first N options of each stage")
    parser.add_argument("--budget-s", type=float, default=float("inf"),
                        help="stop starting new candidates after this many seconds; report the best so far")
    parser.add_argument("--interpret", action="store_true", help="Pallas interpret mode (CPU smoke runs)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    return parser.parse_args()


def pallas_fn(blocks: BlockSizes, is_causal: bool, interpret: bool):
    def fn(q, k, v):
        return pallas_gpu.attention(
            q, k, v, scale=q.shape[-1] ** -0.5, is_causal=is_causal, query_seq_lengths=None,
            key_value_seq_lengths=None, segment_ids=None, local_window_size=None,
            logits_soft_cap=None, block_sizes=blocks, interpret=interpret)
    return fn


def evaluate(blocks: BlockSizes, timed_pass: str, problems: list[dict], args) -> dict:
    """{'seconds': score, 'per_mode': {...}} or {'error': why}, checking before timing."""
    tolerance = TOLERANCE[args.dtype]
    per_mode = {}
    try:
        for problem in problems:
            q, k, v, d_out = problem["inputs"]
            fn = pallas_fn(blocks, problem["causal"], args.interpret)
            fwd = jax.jit(fn).lower(q, k, v).compile()
            error = relative_error(fwd(q, k, v), problem["expected"][0])
            if not error <= tolerance:
                return {"error": f"output error {error:.3g} > {tolerance} (causal={problem['causal']})"}
            if timed_pass == "forward":
                per_mode[problem["causal"]] = median_seconds(fwd, (q, k, v), args.repeats)
                continue
            bwd = jax.jit(lambda q, k, v, d, fn=fn: jax.vjp(fn, q, k, v)[1](d)).lower(q, k, v, d_out).compile()
            error = max(map(relative_error, bwd(q, k, v, d_out), problem["expected"][1]))
            if not error <= tolerance:
                return {"error": f"gradient error {error:.3g} > {tolerance} (causal={problem['causal']})"}
            per_mode[problem["causal"]] = median_seconds(bwd, (q, k, v, d_out), args.repeats)
    except Exception as e:  # noqa: BLE001 -- e.g. shared memory exceeded: record and skip
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"}
    return {"seconds": sum(per_mode.values()), "per_mode": {str(c): s for c, s in per_mode.items()}}


def tune_head_dim(head_dim: int, args, deadline: float, log: list[dict], save) -> BlockSizes:
    """The best BlockSizes for head_dim after the staged search (or as far as the budget went)."""
    dtype = jnp.dtype(args.dtype)
    heads, batch = args.hidden // head_dim, max(1, args.tokens // args.seq_len)
    keys = jax.random.split(jax.random.key(head_dim), 4)
    inputs = tuple(jax.random.normal(key, (batch, args.seq_len, heads, head_dim), dtype) for key in keys)
    causal_modes = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    problems = [dict(causal=c, inputs=inputs, expected=yardstick(*inputs, c, max_gib=8.0)) for c in causal_modes]

    best = default_block_sizes(head_dim)
    for stage in STAGES:
        options = stage_candidates(stage, best)[: args.max_per_stage]
        scored = []
        for blocks in options:
            if time.monotonic() > deadline:
                print(f"budget spent: stopping in stage {stage.name!r}", flush=True)
                return best
            result = evaluate(blocks, stage.timed_pass, problems, args)
            entry = dict(head_dim=head_dim, stage=stage.name, blocks=dataclasses.asdict(blocks), **result)
            log.append(entry)
            save()
            outcome = result["error"] if "error" in result else f"{1e3 * result['seconds']:.3f} ms"
            print(f"d={head_dim} {stage.name}: {blocks} -> {outcome}", flush=True)
            if "seconds" in result:
                scored.append((result["seconds"], blocks))
        if scored:
            best = min(scored, key=lambda pair: pair[0])[1]
    return best


def main() -> None:
    args = parse_args()
    if jax.default_backend() != "gpu" and not args.interpret:
        raise SystemExit(f"tune_pallas.py tunes the GPU kernel; the default backend is "
                         f"{jax.default_backend()!r} (pass --interpret for a smoke run)")
    os.makedirs(args.out, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    meta = {
        "device": jax.devices()[0].device_kind,
        "generation": gpu_generation(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "args": vars(args),
    }
    print(f"# {meta['device']} ({meta['generation']}), jax {meta['jax']}, {meta['date']}", flush=True)
    log: list[dict] = []
    winners: dict[int, BlockSizes] = {}
    path = os.path.join(args.out, "tune_pallas.json")

    def save():
        with open(path, "w") as f:
            json.dump({"meta": meta, "candidates": log,
                       "best": {d: dataclasses.asdict(b) for d, b in winners.items()}}, f, indent=1)

    for head_dim in args.head_dims:
        winners[head_dim] = tune_head_dim(head_dim, args, deadline, log, save)
        save()
    for head_dim, blocks in winners.items():
        print(f"    ({head_dim}, {meta['generation']!r}): {blocks},")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
