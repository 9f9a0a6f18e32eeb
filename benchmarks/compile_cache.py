"""How much compilation JAX's persistent compilation cache saves: the same `train.py`
command run twice against an empty cache directory (the package's default location under
a temporary HOME), then once more with `--no-compile-cache`.

    python benchmarks/compile_cache.py                    # the default run, 20 steps
    python benchmarks/compile_cache.py -- --preset tiny   # flags after -- go to train.py

Compilation time of a run = first_step_sec (metrics.jsonl: the first step, compiled and
run) minus the median step time of the later records (from their tokens/s). Prints one JSON object; the target is a second
run that compiles in under 10% of the first's time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(flags: list[str], home: str, out_dir: str) -> dict:
    env = {**os.environ, "HOME": home, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu")}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, os.path.join(REPO, "train.py"), *flags, "--out-dir", out_dir, "--overwrite"]
    start = time.perf_counter()
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=REPO)
    wall = time.perf_counter() - start
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    with open(os.path.join(out_dir, "config.json")) as f:
        train = json.load(f)["train"]
    tokens = train["batch_size"] * train["seq_len"]
    first = records[0]["first_step_sec"]
    step_sec = statistics.median(tokens / r["tokens_per_sec"] for r in records[1:])
    return {"wall_s": round(wall, 2), "first_step_s": round(first, 3), "step_s": round(step_sec, 4),
            "compile_s": round(max(first - step_sec, 0.0), 3)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--max-steps", type=int, default=20)
    p.add_argument("train_flags", nargs="*", help="more train.py flags (after --)")
    args = p.parse_args(argv)
    flags = ["--max-steps", str(args.max_steps), "--log-every", "5", "--sample-tokens", "0", *args.train_flags]
    with tempfile.TemporaryDirectory() as home:
        out = os.path.join(home, "run")
        cold = run_once(flags, home, out)
        warm = run_once(flags, home, out)
        off = run_once(flags + ["--no-compile-cache"], home, out)
        cache = os.path.join(home, ".cache", "transformer_jax", "jax_compilation_cache")
        entries = len([n for n in os.listdir(cache) if n.endswith("-cache")]) if os.path.isdir(cache) else 0
    result = {"benchmark": "compile_cache", "command": "train.py " + " ".join(flags),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "cold_cache": cold, "warm_cache": warm, "cache_off": off, "cache_entries": entries,
              "warm_compile_fraction": round(warm["compile_s"] / max(cold["compile_s"], 1e-9), 4)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
