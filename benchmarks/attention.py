"""Benchmark the attention implementations: time, TFLOP/s, compiled memory, error.

For every implementation available on this platform (plus "auto", i.e. implementation=None)
x sequence length x head dim x causal/non-causal it measures forward and forward+backward
(median of --repeats runs after warm-up), the temporary bytes of the compiled program
(memory_analysis), and the error of the output and of the gradients (max |error| / max |value|)
against a float32 yardstick (the reference where its score matrix fits in
--reference-max-gib, else blockwise), computed on fresh random inputs before anything is
timed. A variant whose error exceeds the dtype's tolerance is reported and not timed.

FLOPs: forward 4*b*h*n^2*d, halved when causal; forward+backward 3.5x that.

Grids: "small" (CPU default; ~1-2 minutes on 2 cores) and "flash" (GPU default: the
FlashAttention paper's grid: batch*seq = 16k tokens, hidden 2048, d in {64, 128},
seq 512..16k, bfloat16).

Usage: PYTHONPATH=. python benchmarks/attention.py [--grid flash] [--out DIR]
  --seq-lens 1048576 --head-dims 64 --heads 1 --batch 1 --implementations blockwise
      the one-million-token run (one head, d=64)
  --blockwise-blocks 512 1024                 blockwise tiles (block_q, block_k)
  --pallas-blocks 128 64 [32 128 128 32] --pallas-warps 8 [8] --pallas-stages 3 [2]
      a Pallas tiling other than the table's (forward tiles, then dK/dV and dQ tiles)
Writes attention.csv, attention.json and attention.png into --out.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp

from transformer_jax.attention import BlockSizes, dot_product_attention, select_implementation
from transformer_jax.attention.pallas_tuning import default_block_sizes

GRIDS = {
    # tokens = batch * seq, hidden = heads * head_dim
    "small": dict(tokens=1024, hidden=256, seq_lens=[128, 256, 512, 1024], head_dims=[64], dtype="float32"),
    "flash": dict(tokens=16384, hidden=2048, seq_lens=[512, 1024, 2048, 4096, 8192, 16384],
                  head_dims=[64, 128], dtype="bfloat16"),
}
CANDIDATES = ("reference", "blockwise", "xla", "cudnn", "pallas", "auto")
TOLERANCE = {"float32": 2e-3, "bfloat16": 3e-2, "float16": 1e-2}  # max |error| / max |value|


def parse_args() -> argparse.Namespace:
    on_gpu = jax.default_backend() == "gpu"
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--grid", choices=sorted(GRIDS), default="flash" if on_gpu else "small")
    parser.add_argument("--seq-lens", type=int, nargs="+", help="override the grid's sequence lengths")
    parser.add_argument("--head-dims", type=int, nargs="+", help="override the grid's head dims")
    parser.add_argument("--dtype", choices=sorted(TOLERANCE), help="override the grid's dtype")
    parser.add_argument("--heads", type=int, help="override heads (default: grid hidden / head_dim)")
    parser.add_argument("--batch", type=int, help="override batch (default: grid tokens / seq_len)")
    parser.add_argument("--blockwise-blocks", type=int, nargs=2, metavar=("BQ", "BK"),
                        help="blockwise tiles (default: blockwise.default_block_sizes())")
    parser.add_argument("--pallas-blocks", type=int, nargs="+", metavar="B",
                        help="BQ BK [BQ_DKV BK_DKV BQ_DQ BK_DQ]: Pallas tiles (default: the tuning table)")
    parser.add_argument("--pallas-warps", type=int, nargs="+", metavar="W", help="W [W_BWD]: Pallas warps")
    parser.add_argument("--pallas-stages", type=int, nargs="+", metavar="S", help="S [S_BWD]: Pallas stages")
    parser.add_argument("--implementations", nargs="+", choices=CANDIDATES, default=list(CANDIDATES))
    parser.add_argument("--causal", choices=["both", "yes", "no"], default="both")
    parser.add_argument("--repeats", type=int, default=20 if on_gpu else 3)
    parser.add_argument("--reference-max-gib", type=float, default=8.0 if on_gpu else 1.0,
                        help="largest reference score-matrix memory to use as the yardstick")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    args = parser.parse_args()
    for flag, counts in (("pallas_blocks", (2, 6)), ("pallas_warps", (1, 2)), ("pallas_stages", (1, 2))):
        value = getattr(args, flag)
        if value is not None and len(value) not in counts:
            parser.error(f"--{flag.replace('_', '-')} takes {' or '.join(map(str, counts))} values, got {value}")
    return args


def pallas_tiling(args, head_dim: int) -> BlockSizes | None:
    """The BlockSizes the --pallas-* flags ask for (table entry with those fields replaced)."""
    if not (args.pallas_blocks or args.pallas_warps or args.pallas_stages):
        return None
    fields = {}
    names = ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq")
    fields.update(zip(names, args.pallas_blocks or ()))
    fields.update(zip(("num_warps", "num_warps_bwd"), args.pallas_warps or ()))
    fields.update(zip(("num_stages", "num_stages_bwd"), args.pallas_stages or ()))
    return dataclasses.replace(default_block_sizes(head_dim), **fields)


def block_sizes_for(implementation: str, args, head_dim: int):
    if implementation == "blockwise" and args.blockwise_blocks:
        return tuple(args.blockwise_blocks)
    if implementation == "pallas":
        return pallas_tiling(args, head_dim)
    return None


def attention_fn(implementation: str, is_causal: bool, block_sizes=None):
    impl = None if implementation == "auto" else implementation
    return lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=is_causal, implementation=impl, block_sizes=block_sizes)


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


def unavailable(implementation, q, is_causal, block_sizes=None) -> str | None:
    """Why `implementation` cannot run this call here, or None."""
    if implementation == "auto":
        return None
    try:
        select_implementation(q, q, q, is_causal=is_causal, implementation=implementation, block_sizes=block_sizes)
    except ValueError as e:
        return str(e)
    return None


def measure(implementation, q, k, v, d_out, is_causal, expected, flops, args) -> dict:
    """Checks `implementation` against `expected` = (out, (dq, dk, dv)), then times it."""
    row = {"implementation": implementation}
    if implementation == "auto":
        row["auto_choice"] = select_implementation(q, k, v, is_causal=is_causal).implementation
    block_sizes = block_sizes_for(implementation, args, q.shape[-1])
    if block_sizes is not None:
        row["block_sizes"] = str(block_sizes)
    reason = unavailable(implementation, q, is_causal, block_sizes)
    if reason:
        return {**row, "status": f"unavailable: {reason}"}
    fn = attention_fn(implementation, is_causal, block_sizes)
    tolerance = TOLERANCE[str(q.dtype)]
    try:
        fwd = jax.jit(fn).lower(q, k, v).compile()
        row["max_error"] = relative_error(fwd(q, k, v), expected[0])
        if not row["max_error"] <= tolerance:
            return {**row, "status": "wrong: output error above tolerance, not timed"}
        bwd = jax.jit(forward_backward(fn)).lower(q, k, v, d_out).compile()
        row["max_grad_error"] = max(map(relative_error, bwd(q, k, v, d_out), expected[1]))
        if not row["max_grad_error"] <= tolerance:
            return {**row, "status": "wrong: gradient error above tolerance, not timed"}
        row["fwd_ms"] = 1e3 * median_seconds(fwd, (q, k, v), args.repeats)
        row["fwd_temp_mib"] = fwd.memory_analysis().temp_size_in_bytes / 2**20
        row["fwd_tflops"] = flops / (row["fwd_ms"] * 1e-3) / 1e12
        row["fwd_bwd_ms"] = 1e3 * median_seconds(bwd, (q, k, v, d_out), args.repeats)
        row["fwd_bwd_temp_mib"] = bwd.memory_analysis().temp_size_in_bytes / 2**20
        row["fwd_bwd_tflops"] = 3.5 * flops / (row["fwd_bwd_ms"] * 1e-3) / 1e12
    except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record it and go on
        return {**row, "status": f"error: {type(e).__name__}: {str(e).splitlines()[0][:200]}"}
    return {**row, "status": "ok"}


def relative_error(got: jax.Array, want: jax.Array) -> float:
    """max |got - want| / max |want| (outputs and gradients differ in scale)."""
    want = want.astype(jnp.float32)
    return float(jnp.max(jnp.abs(got.astype(jnp.float32) - want)) / jnp.maximum(jnp.max(jnp.abs(want)), 1e-30))


def yardstick(q, k, v, d_out, is_causal, max_gib) -> tuple[jax.Array, tuple[jax.Array, ...]]:
    """float32 output and (dq, dk, dv) of the reference (if its scores fit in max_gib) or of blockwise."""
    b, n, h, _ = q.shape
    fits = b * h * n * n * 4 * 3 <= max_gib * 2**30  # scores, probabilities, slack
    f32 = [x.astype(jnp.float32) for x in (q, k, v, d_out)]
    fn = attention_fn("reference" if fits else "blockwise", is_causal)

    @jax.jit
    def out_and_grads(q, k, v, d_out):
        out, vjp = jax.vjp(fn, q, k, v)
        return out, vjp(d_out)

    return out_and_grads(*f32)


def run_grid(args) -> list[dict]:
    grid = dict(GRIDS[args.grid])
    seq_lens = args.seq_lens or grid["seq_lens"]
    head_dims = args.head_dims or grid["head_dims"]
    dtype = jnp.dtype(args.dtype or grid["dtype"])
    causal = {"both": [False, True], "yes": [True], "no": [False]}[args.causal]
    rows = []
    for d in head_dims:
        for n in seq_lens:
            heads = args.heads or grid["hidden"] // d
            batch = args.batch or max(1, grid["tokens"] // n)
            keys = jax.random.split(jax.random.key(n * 1000 + d), 4)
            q, k, v, d_out = (jax.random.normal(key, (batch, n, heads, d), dtype) for key in keys)
            for is_causal in causal:
                flops = 4 * batch * heads * n * n * d / (2 if is_causal else 1)
                expected = yardstick(q, k, v, d_out, is_causal, args.reference_max_gib)
                for impl in args.implementations:
                    row = measure(impl, q, k, v, d_out, is_causal, expected, flops, args)
                    row.update(batch=batch, seq_len=n, heads=heads, head_dim=d, causal=is_causal, dtype=str(dtype))
                    rows.append(row)
                    print(format_row(row), flush=True)
    return rows


COLUMNS = ["implementation", "auto_choice", "batch", "seq_len", "heads", "head_dim", "causal", "dtype",
           "fwd_ms", "fwd_tflops", "fwd_temp_mib", "fwd_bwd_ms", "fwd_bwd_tflops", "fwd_bwd_temp_mib",
           "max_error", "max_grad_error", "block_sizes", "status"]


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
