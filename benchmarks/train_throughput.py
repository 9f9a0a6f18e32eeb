"""Training throughput (tokens/s, MFU) of a DecoderLM preset, and the Shakespeare
convergence run.

    python benchmarks/train_throughput.py                                  # CPU: tiny preset
    python benchmarks/train_throughput.py --preset gpt2-small --batch-size 12 --seq-len 1024 \\
        --dtype bfloat16                                                   # GPU
    python benchmarks/train_throughput.py --convergence                    # char-small, shakespeare

Throughput: one jitted, buffer-donating train step (AdamW, clipping: `compile_run`, as
`train()` compiles it) on fresh random tokens; compilation and warm-up steps excluded; the median of the
timed steps (each waited for with block_until_ready). MFU = flops_per_token(cfg, seq_len)
x tokens/s / the device's dense bf16 peak (transformer_jax.training.PEAK_FLOPS).

Convergence: `transformer_jax.train` on `--data shakespeare` with char-small, batch 64, 5000
steps, lr 1e-3, dropout 0.2 (nanoGPT's shakespeare-char recipe); reports the wall
time of the whole run (compilation included) and when the validation loss first
reached --target.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from transformer_jax import config as config_lib  # noqa: E402
from transformer_jax import models, training  # noqa: E402
from transformer_jax.objectives import Task  # noqa: E402
from transformer_jax.run import compile_run  # noqa: E402


def throughput(args: argparse.Namespace) -> dict:
    overrides = {"dtype": args.dtype}
    if args.attention_impl:
        overrides["attention_impl"] = args.attention_impl
    if args.remat_policy:
        overrides["remat_policy"] = args.remat_policy
    if args.scan_layers:
        overrides["scan_layers"] = True
    cfg = config_lib.get_config(args.preset, **overrides)
    if args.seq_len > cfg.max_len:
        raise ValueError(f"--seq-len={args.seq_len} exceeds {args.preset}'s max_len={cfg.max_len}")
    task = Task(models.DecoderLM(cfg), (jnp.zeros((1, args.seq_len), jnp.int32),), train_batch=None,
                val_batches=[], tokens_per_batch=args.batch_size * args.seq_len)
    run = compile_run(task, "clm", lr=6e-4, warmup_steps=10, decay_steps=10_000, batch_size=args.batch_size,
                      accum_steps=args.accum_steps)  # one device: train()'s compiled steps without a mesh
    state, step = run.init_state(), run.train_step
    rng = np.random.default_rng(0)

    def batch():
        tokens = rng.integers(0, cfg.vocab_size, size=(args.batch_size, args.seq_len + 1), dtype=np.int32)
        return jax.device_put({"inputs": tokens[:, :-1], "targets": tokens[:, 1:]})

    t0 = time.perf_counter()
    state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
    compile_s = time.perf_counter() - t0
    if not bool(metrics["finite"]):
        raise FloatingPointError("the first step's loss is not finite")
    for _ in range(args.warmup):
        state, metrics = step(state, batch())
    jax.block_until_ready(metrics)
    batches = [batch() for _ in range(args.steps)]  # host work outside the timed region
    times = []
    for b in batches:
        t0 = time.perf_counter()
        state, metrics = step(state, b)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    tokens_per_sec = args.batch_size * args.seq_len / median
    peak = training.peak_flops(jax.devices()[0])
    flops = models.flops_per_token(cfg, args.seq_len)
    return {
        "device": jax.devices()[0].device_kind, "backend": jax.default_backend(),
        "preset": args.preset, "dtype": args.dtype, "batch_size": args.batch_size,
        "seq_len": args.seq_len, "attention_impl": cfg.attention_impl,
        "params_M": round(models.count_params(cfg) / 1e6, 2),
        "compile_s": round(compile_s, 2), "median_step_ms": round(1e3 * median, 2),
        "min_step_ms": round(1e3 * min(times), 2), "tokens_per_sec": round(tokens_per_sec),
        "tflops_per_sec": round(flops * tokens_per_sec / 1e12, 2),
        "mfu": round(flops * tokens_per_sec / peak, 4) if peak else None,
        "final_loss": float(metrics["loss"]),
    }


def convergence(args: argparse.Namespace) -> dict:
    from transformer_jax import TrainConfig, train

    out_dir = args.out_dir or tempfile.mkdtemp(prefix="convergence-")
    config = TrainConfig(data=args.data, preset="char-small", batch_size=64, seq_len=256,
                         max_steps=args.max_steps, lr=1e-3, dropout=0.2, eval_every=args.eval_every,
                         eval_batches=20, warmup_steps=100, out_dir=out_dir, overwrite=True, dtype=args.dtype)
    t0 = time.perf_counter()
    train(config)
    wall = time.perf_counter() - t0
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        evals = [r for r in map(json.loads, f) if "val_loss" in r]
    reached = next((r for r in evals if r["val_loss"] <= args.target), None)
    return {
        "device": jax.devices()[0].device_kind, "config": repr(config),
        "wall_s_including_compile_and_data": round(wall, 1),
        "final_val_loss": round(evals[-1]["val_loss"], 4), "target": args.target,
        "first_step_at_target": reached and reached["step"],
        "train_time_s_at_target": reached and round(reached["elapsed_sec"], 1),
    }


def main(argv: list[str] | None = None) -> dict:
    accelerator = jax.default_backend() != "cpu"
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="gpt2-small" if accelerator else "tiny")
    p.add_argument("--batch-size", type=int, default=12 if accelerator else 8)
    p.add_argument("--seq-len", type=int, default=1024 if accelerator else 16)
    p.add_argument("--accum-steps", type=int, default=1)
    p.add_argument("--dtype", default="bfloat16" if accelerator else "float32")
    p.add_argument("--attention-impl", default=None)
    p.add_argument("--remat-policy", default=None)
    p.add_argument("--scan-layers", action="store_true")
    p.add_argument("--steps", type=int, default=20, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps after compilation")
    p.add_argument("--convergence", action="store_true", help="run the shakespeare convergence run")
    p.add_argument("--data", default="shakespeare",
                   help="--convergence: corpus (a machine without network: a file written by "
                        "data.load_text('shakespeare') elsewhere)")
    p.add_argument("--max-steps", type=int, default=5000, help="--convergence: steps")
    p.add_argument("--eval-every", type=int, default=250, help="--convergence: eval interval")
    p.add_argument("--target", type=float, default=1.30, help="--convergence: val loss target")
    p.add_argument("--out-dir", default=None, help="--convergence: run directory (default: a temp dir)")
    p.add_argument("--json", default=None, help="also write the result to this file")
    args = p.parse_args(argv)
    result = convergence(args) if args.convergence else throughput(args)
    result["date"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    result["jax"] = jax.__version__
    print(json.dumps(result, indent=2))
    if args.json:
        os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
