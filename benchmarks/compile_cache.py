"""How much compilation JAX's persistent compilation cache saves: the same `train.py`
command run twice against an empty cache directory (the package's default location under
a temporary HOME), then once more with `--no-compile-cache`.

    python benchmarks/compile_cache.py                    # the default run, 20 steps
    python benchmarks/compile_cache.py -- --preset tiny   # flags after -- go to train.py

Per run: the XLA compilation seconds of every jitted program and of the train step alone
(JAX_LOG_COMPILES: "Finished XLA compilation ..."; a persistent-cache hit is logged there
as its retrieval), the train step's tracing and lowering seconds (Python work no cache
skips), and first_step_sec from metrics.jsonl (the first step: tracing, compilation and
the step itself). Prints one JSON object; the target is a second run whose compilation
takes under 10% of the first's.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_once(flags: list[str], home: str, out_dir: str) -> dict:
    env = {**os.environ, "HOME": home, "JAX_PLATFORMS": os.environ.get("JAX_PLATFORMS", "cpu"),
           "JAX_LOG_COMPILES": "1"}
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    command = [sys.executable, os.path.join(REPO, "train.py"), *flags, "--out-dir", out_dir, "--overwrite"]
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                          text=True, cwd=REPO)
    wall = time.perf_counter() - start
    compiles = [(name, float(sec)) for name, sec in re.findall(
        r"Finished XLA compilation of (\S+) in ([0-9.]+) sec", done.stderr)]
    front = [float(sec) for sec in re.findall(
        r"Finished (?:tracing train_step for jit|jaxpr to MLIR module conversion jit\(train_step\)) in ([0-9.]+) sec",
        done.stderr)]
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        first = json.loads(f.readline())["first_step_sec"]
    return {"wall_s": round(wall, 2), "first_step_s": round(first, 3),
            "xla_compile_s_all": round(sum(sec for _, sec in compiles), 3),
            "xla_compile_s_train_step": round(sum(sec for name, sec in compiles if name == "jit(train_step)"), 3),
            "trace_and_lower_s_train_step": round(sum(front), 3)}


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
              "warm_compile_fraction": round(warm["xla_compile_s_all"] / max(cold["xla_compile_s_all"], 1e-9), 4),
              "warm_first_step_fraction": round(warm["first_step_s"] / max(cold["first_step_s"], 1e-9), 4)}
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
