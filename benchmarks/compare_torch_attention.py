"""Blockwise attention vs PyTorch's scaled_dot_product_attention on CPU, forward+backward.

Both run in this one process, alternating, one thread each (pin the process to a core
with `taskset -c 1`), on the same random inputs (float32, [batch, seq, heads, head_dim]).
Prints the median (or, with --statistic min, the least) seconds of each over --repeats
runs after a warm-up, and the ratio
ours / torch; checks first that the two outputs and gradients agree.

Usage (torch comes from the peers environment, which also has jax):
  taskset -c 1 env PYTHONPATH=. /work/venv-peers/bin/python benchmarks/compare_torch_attention.py \
      --seq-lens 2048 4096 --causal
"""
from __future__ import annotations

import argparse
import os

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from transformer_jax.attention import dot_product_attention  # noqa: E402


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[2048, 4096])
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--statistic", choices=["median", "min"], default="median",
                        help="min: the least-disturbed run, for a machine shared with other jobs")
    parser.add_argument("--block-sizes", type=int, nargs=2, default=None, metavar=("BQ", "BK"))
    return parser.parse_args()


def seconds(fn, repeats: int, statistic: str) -> float:
    fn()  # warm-up (and compilation)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) if statistic == "median" else min(times)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, "
          f"threads 1, causal={args.causal}, batch={args.batch}, heads={args.heads}, d={args.head_dim}")
    for n in args.seq_lens:
        rng = np.random.default_rng(n)
        q, k, v, d_out = (rng.normal(size=(args.batch, n, args.heads, args.head_dim)).astype(np.float32)
                          for _ in range(4))

        def ours(q, k, v, d_out):
            out, vjp = jax.vjp(lambda q, k, v: dot_product_attention(
                q, k, v, is_causal=args.causal, implementation="blockwise",
                block_sizes=tuple(args.block_sizes) if args.block_sizes else None), q, k, v)
            return out, vjp(d_out)

        ours_jit = jax.jit(ours)
        jq, jk, jv, jd = map(jnp.asarray, (q, k, v, d_out))

        heads_first = [torch.tensor(x).transpose(1, 2).contiguous() for x in (q, k, v, d_out)]
        tq, tk, tv = (x.requires_grad_() for x in heads_first[:3])

        def theirs():
            for x in (tq, tk, tv):
                x.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)
            out.backward(heads_first[3])
            return out

        out, grads = jax.block_until_ready(ours_jit(jq, jk, jv, jd))
        t_out = theirs().detach().transpose(1, 2).numpy()
        error = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
                    [(out, t_out)] + [(g, x.grad.transpose(1, 2).numpy()) for g, x in zip(grads, (tq, tk, tv))])
        assert error < 1e-3, f"outputs or gradients disagree by {error}"
        ours_s = seconds(lambda: jax.block_until_ready(ours_jit(jq, jk, jv, jd)), args.repeats, args.statistic)
        theirs_s = seconds(theirs, args.repeats, args.statistic)
        print(f"n={n} blockwise_fwd_bwd_s={ours_s:.4f} torch_sdpa_fwd_bwd_s={theirs_s:.4f} "
              f"ratio={ours_s / theirs_s:.2f} max_abs_diff={error:.1e}")


if __name__ == "__main__":
    main()
