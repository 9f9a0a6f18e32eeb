"""Benchmark the attention implementations: time, TFLOP/s, compiled memory, error.

For every implementation available on this platform (plus "auto", i.e. implementation=None)
x sequence length x head dim x causal/non-causal it measures forward and forward+backward
(median of --repeats runs after warm-up), the temporary bytes of the compiled program
(memory_analysis), and the max error against a float32 yardstick (the reference where its
score matrix fits in --reference-max-gib, else blockwise). A variant whose error exceeds
the dtype's tolerance is reported and not timed.

FLOPs: forward 4*b*h*n^2*d, halved when causal; forward+backward 3.5x that.

Grids: "small" (CPU default; ~1-2 minutes on 2 cores) and "flash" (GPU default: the
FlashAttention paper's grid: batch*seq = 16k tokens, hidden 2048, d in {64, 128},
seq 512..16k, bfloat16).

Usage: PYTHONPATH=. python benchmarks/attention.py [--grid flash] [--out DIR]
Writes attention.csv, attention.json and attention.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from transformer_jax.attention import dot_product_attention, select_implementation

GRIDS = {
    # tokens = batch * seq, hidden = heads * head_dim
    "small": dict(tokens=1024, hidden=256, seq_lens=[128, 256, 512, 1024], head_dims=[64], dtype="float32"),
    "flash": dict(tokens=16384, hidden=2048, seq_lens=[512, 1024, 2048, 4096, 8192, 16384],
                  head_dims=[64, 128], dtype="bfloat16"),
}
CANDIDATES = ("reference", "blockwise", "xla", "cudnn", "pallas", "auto")
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 1e-2}  # max abs error, outputs O(1)


def parse_args() -> argparse.Namespace:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="flash" if on_gpu else "small")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="override the grid's sequence lengths")
    parser.add_argument("--head-dims", type=int, nargs="+", help="override the grid's head dims")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), help="override the grid's dtype")
    parser.add_argument("--implementations", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=20 if on_gpu else 3)
    parser.add_argument("--reference-max-gib", type=float, default=8.0 if on_gpu else 1.0,
                        help="largest reference score-matrix memory to use as the yardstick")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    return parser.parse_args()


def attention_fn(implementation: str, is_causal: bool):
    impl = None if implementation == "auto" else implementation
    return lambda q, k, v: dot_product_attention(q, k, v, is_causal=is_causal, implementation=impl)


def forward_backward(fn):
    """(q, k, v, d_out) -> (dq, dk, dv): one forward and one backward pass."""
    return lambda q, k, v, d_out: jax.vjp(fn, q, k, v)[1](d_out)


def median_seconds(compiled, args, repeats: int) -> float:
    for _ in range(2):
        jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def unavailable(implementation, q, is_causal) -> str | None:
    """Why `implementation` cannot run this call here, or None."""
    if implementation == "auto":
        return None
    try:
        select_implementation(q, q, q, is_causal=is_causal, implementation=implementation)
    except ValueError as e:
        return str(e)
    return None


def measure(implementation, q, k, v, d_out, is_causal, expected, flops, args) -> dict:
    row = {"implementation": implementation}
    if implementation == "auto":
        row["auto_choice"] = select_implementation(q, k, v, is_causal=is_causal).implementation
    reason = unavailable(implementation, q, is_causal)
    if reason:
        return {**row, "status": f"unavailable: {reason}"}
    fn = attention_fn(implementation, is_causal)
    try:
        fwd = jax.jit(fn).lower(q, k, v).compile()
        out = fwd(q, k, v)
        row["max_error"] = float(jnp.max(jnp.abs(out.astype(jnp.float32) - expected)))
        if not row["max_error"] <= TOLERANCE[str(q.dtype)]:
            return {**row, "status": "wrong: error above tolerance, not timed"}
        row["fwd_ms"] = 1e3 * median_seconds(fwd, (q, k, v), args.repeats)
        row["fwd_temp_mib"] = fwd.memory_analysis().temp_size_in_bytes / 2**20
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        bwd = jax.jit(forward_backward(fn)).lower(q, k, v, d_out).compile()
        row["fwd_bwd_ms"] = 1e3 * median_seconds(bwd, (q, k, v, d_out), args.repeats)
        row["fwd_bwd_temp_mib"] = bwd.memory_analysis().temp_size_in_bytes / 2**20
        row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record it and go on
        return {**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {**row, "status": "ok"}


def yardstick(q, k, v, is_causal, max_gib) -> jax.Array:
    """float32 output of the reference (if its scores fit in max_gib) or of blockwise."""
    b, n, h, _ = q.shape
    fits = b * h * n * n * 4 * 3 <= max_gib * 2**30  # scores, probabilities, slack
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    impl = "reference" if fits else "blockwise"
    return jax.jit(attention_fn(impl, is_causal))(*f32)


def run_grid(args) -> list[dict]:
    grid = dict(GRIDS[args.grid])
    seq_lens = args.seq_lens or grid["seq_lens"]
    head_dims = args.head_dims or grid["head_dims"]
    dtype = jnp.dtype(args.dtype or grid["dtype"])
    causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for d in head_dims:
        for n in seq_lens:
            heads, batch = grid["hidden"] // d, max(1, grid["tokens"] // n)
            keys = jax.random.split(jax.random.key(n * 1000 + d), 4)
            q, k, v, d_out = (jax.random.normal(key, (batch, n, heads, d), dtype) for key in keys)
            for is_causal in causal:
                flops = 4 * batch * heads * n * n * d / (2 if is_causal else 1)
                expected = yardstick(q, k, v, is_causal, args.reference_max_gib)
                for impl in args.implementations:
                    row = measure(impl, q, k, v, d_out, is_causal, expected, flops, args)
                    row.update(batch=batch, seq_len=n, heads=heads, head_dim=d, causal=is_causal, dtype=str(dtype))
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


COLUMNS = ["implementation", "auto_choice", "batch", "seq_len", "heads", "head_dim", "causal", "dtype",
           "fwd_ms", "fwd_tflops", "fwd_temp_mib", "fwd_bwd_ms", "fwd_bwd_tflops", "fwd_bwd_temp_mib",
           "max_error", "status"]


def format_row(row: dict) -> str:
    def fmt(x):
        return f"{x:.4g}" if isinstance(x, float) else str(x)

    return " ".join(f"{c}={fmt(row[c])}" for c in COLUMNS if c in row)


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["head_dim"], r["causal"]) for r in rows})
    fig, axes = plt.subplots(2, len(panels), figsize=(4.5 * len(panels), 7), squeeze=False)
    for col, (d, causal) in enumerate(panels):
        for row_i, metric in enumerate(["fwd_tflops", "fwd_bwd_tflops"]):
            ax = axes[row_i][col]
            for impl in dict.fromkeys(r["implementation"] for r in rows):
                pts = [(r["seq_len"], r[metric]) for r in rows
                       if r["implementation"] == impl and r["head_dim"] == d and r["causal"] == causal and metric in r]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_title(f"{'fwd+bwd' if 'bwd' in metric else 'fwd'}, d={d}, {'causal' if causal else 'non-causal'}")
            ax.set_xlabel("sequence length")
            ax.set_ylabel("TFLOP/s")
            ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    args = parse_args()
    os.makedirs(args.out, exist_ok=True)
    meta = {
        "device": jax.devices()[0].device_kind,
        "backend": jax.default_backend(),
        "host": platform.processor() or platform.machine(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "args": vars(args),
    }
    print(f"# {meta['device']} ({meta['backend']}), jax {meta['jax']}, {meta['date']}", flush=True)
    rows = run_grid(args)
    base = os.path.join(args.out, "attention")
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows({c: r.get(c, "") for c in COLUMNS} for r in rows)
    with open(base + ".json", "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    try:
        plot(rows, base + ".png")
    except ImportError as e:
        print(f"no plot: {e}")
    print(f"wrote {base}.csv, .json, .png")


if __name__ == "__main__":
    main()
