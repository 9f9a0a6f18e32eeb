"""Decoding throughput of `transformer_jax.generate`, with and without the KV cache.

For each batch size, greedy-decodes `--new-tokens` tokens after random prompts of
`--prompt-len` tokens (no EOS, so every call does the same work) with the KV cache and
with a full forward pass recomputed at every step, checks that both give the same
tokens, and reports new tokens per second (prefill included) and the cache's speed-up.
Prints a table and writes JSON.

    PYTHONPATH=. python benchmarks/generate.py          # char-small on CPU, short context
    PYTHONPATH=. python benchmarks/generate.py --run runs/clm-stdlib --prompt-len 16
    PYTHONPATH=. python benchmarks/generate.py --preset gpt2-small --prompt-len 960 \\
        --new-tokens 64 --dtype bfloat16 --json $OUT/generate.json   # 1k context on a GPU
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import generate, load_run
from transformer_jax.config import get_config
from transformer_jax.models import DecoderLM


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="char-small", help="model preset (random weights)")
    parser.add_argument("--run", default=None,
                        help="a trained clm run directory (load_run) instead of a random --preset")
    parser.add_argument("--dtype", default=None, help="compute dtype override, e.g. bfloat16")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (median)")
    parser.add_argument("--json", default="out/benchmarks/generate.json", help="where to write results")
    return parser.parse_args()


def time_generate(model, params, batch: int, prompt_len: int, new_tokens: int, use_cache: bool,
                  repeats: int, rng: np.random.Generator
                  ) -> tuple[float, list[float], np.ndarray, np.ndarray]:
    """First-call (compile) time, per-call times on fresh random prompts, and the last
    call's prompts and tokens."""
    def call():
        prompts = rng.integers(0, model.cfg.vocab_size, (batch, prompt_len), dtype=np.int32)
        start = time.perf_counter()
        out = jax.block_until_ready(generate(model, params, prompts, max_new_tokens=new_tokens,
                                             use_cache=use_cache))
        return time.perf_counter() - start, prompts, out

    compile_s, _, _ = call()
    times = []
    for _ in range(repeats):
        seconds, prompts, out = call()
        times.append(seconds)
    return compile_s, times, prompts, np.asarray(out.tokens)


def main() -> None:
    args = parse_args()
    context = args.prompt_len + args.new_tokens
    overrides = dict(dropout_rate=0.0, attention_dropout_rate=0.0)
    if args.dtype:
        overrides["dtype"] = args.dtype
    if args.run:  # a trained model: its context bounds prompt + new tokens
        run = load_run(args.run)
        cfg, params = run.model_config, run.params
        cfg = dataclasses.replace(cfg, **overrides)
        if context - 1 > cfg.max_len:
            raise ValueError(f"--prompt-len + --new-tokens = {context} exceeds the run's context {cfg.max_len}")
        model, args.preset = DecoderLM(cfg), args.run
    else:
        cfg = get_config(args.preset, **overrides)
        if context - 1 > cfg.max_len:
            cfg = get_config(args.preset, max_len=context, **overrides)
        model = DecoderLM(cfg)
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
    rng = np.random.default_rng(0)
    device = jax.devices()[0]
    print(f"{args.preset} ({cfg.dtype}) on {device.device_kind}; prompt {args.prompt_len} "
          f"+ {args.new_tokens} new tokens, greedy")

    rows = []
    for batch in args.batch_sizes:
        measured = {}
        for use_cache in (True, False):
            compile_s, times, prompts, tokens = time_generate(
                model, params, batch, args.prompt_len, args.new_tokens, use_cache, args.repeats, rng)
            measured[use_cache] = (compile_s, statistics.median(times), prompts, tokens)
        # Both paths must decode the same tokens: re-run the cached path on the last
        # uncached prompts (already compiled) and compare.
        _, _, prompts, uncached_tokens = measured[False]
        cached_tokens = np.asarray(generate(model, params, prompts, max_new_tokens=args.new_tokens).tokens)
        agree = float(np.mean(cached_tokens == uncached_tokens))
        for use_cache in (True, False):
            compile_s, seconds, _, _ = measured[use_cache]
            rows.append(dict(batch=batch, cache=use_cache, compile_s=compile_s, seconds=seconds,
                             tokens_per_s=batch * args.new_tokens / seconds,
                             speedup=measured[False][1] / seconds, tokens_agree=agree))

    print(f"{'batch':>5} {'cache':>5} {'compile s':>9} {'call s':>8} {'tokens/s':>10} "
          f"{'speed-up':>8} {'agree':>6}")
    for r in rows:
        print(f"{r['batch']:>5} {str(r['cache']):>5} {r['compile_s']:>9.2f} {r['seconds']:>8.3f} "
              f"{r['tokens_per_s']:>10.1f} {r['speedup']:>7.1f}x {r['tokens_agree']:>6.3f}")

    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(
            benchmark="generate", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            device=device.device_kind, platform=device.platform, jax=jax.__version__,
            preset=args.preset, config=cfg.to_dict(), prompt_len=args.prompt_len,
            new_tokens=args.new_tokens, repeats=args.repeats, results=rows,
        ), f, indent=2)
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
