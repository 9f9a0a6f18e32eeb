"""Blockwise attention vs PyTorch's scaled_dot_product_attention on CPU, forward+backward.

Both run in this one process, alternating run by run, one thread each (pin the process
to a core with `taskset -c 1`), on the same random inputs (float32, [batch, seq, heads,
head_dim]). Prints the median (or, with --statistic min, the least) over --repeats runs
after a warm-up of each one's CPU seconds (process time: what the issue's "CPU cost"
means, and steadier than wall time on a machine shared with other jobs) and wall seconds,
and the ratios ours / torch; checks first that the two outputs and gradients agree.

Usage (torch comes from the peers environment, which also has jax):
  taskset -c 1 env PYTHONPATH=. /work/venv-peers/bin/python benchmarks/compare_torch_attention.py \
      --seq-lens 2048 4096 --causal
  --baseline FILE also times another version of blockwise.py in the same rotation (before /
  after), e.g. `git show main:transformer_jax/attention/blockwise.py > /tmp/main_blockwise.py`.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys

os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false")

import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from functools import partial  # noqa: E402

from transformer_jax.attention import batching, dot_product_attention, masks  # noqa: E402


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
    parser.add_argument("--baseline", metavar="FILE", help="another blockwise.py to time alongside")
    return parser.parse_args()


def alternate(fns, repeats: int, statistic: str) -> list[tuple[float, float]]:
    """(CPU seconds, wall seconds) of each function, run in turn `repeats` times after a
    warm-up, so that a change in the machine's load falls on all of them alike."""
    for fn in fns:
        fn()  # warm-up (and compilation)
    cpu, wall = [[] for _ in fns], [[] for _ in fns]
    for _ in range(repeats):
        for i, fn in enumerate(fns):
            cpu_start, wall_start = time.process_time(), time.perf_counter()
            fn()
            wall[i].append(time.perf_counter() - wall_start)
            cpu[i].append(time.process_time() - cpu_start)
    pick = statistics.median if statistic == "median" else min
    return [(pick(c), pick(w)) for c, w in zip(cpu, wall)]


def baseline_attention(path: str, args: argparse.Namespace):
    """dot_product_attention's blockwise path (no masks but causal) with the `attend` of
    another version of blockwise.py, lifted over batch and heads the same way."""
    spec = importlib.util.spec_from_file_location("baseline_blockwise", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    per_head = partial(module.attend, scale=args.head_dim**-0.5, is_causal=args.causal, window=None,
                       logits_soft_cap=None, dropout_rate=0.0, precision=None,
                       block_sizes=tuple(args.block_sizes) if args.block_sizes else None)
    return lambda q, k, v: batching.lift(per_head, q, k, v, None, None, masks.SequenceInfo(), None)[0]


def main() -> None:
    args = parse_args()
    torch.set_num_threads(1)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}, torch {torch.__version__}, "
          f"threads 1, causal={args.causal}, batch={args.batch}, heads={args.heads}, d={args.head_dim}")
    attentions = {"blockwise": lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=args.causal, implementation="blockwise",
        block_sizes=tuple(args.block_sizes) if args.block_sizes else None)}
    if args.baseline:
        attentions["baseline"] = baseline_attention(args.baseline, args)
    for n in args.seq_lens:
        rng = np.random.default_rng(n)
        q, k, v, d_out = (rng.normal(size=(args.batch, n, args.heads, args.head_dim)).astype(np.float32)
                          for _ in range(4))

        def fwd_bwd(attention, q, k, v, d_out):
            out, vjp = jax.vjp(attention, q, k, v)
            return out, vjp(d_out)

        jitted = {name: jax.jit(partial(fwd_bwd, attention)) for name, attention in attentions.items()}
        jq, jk, jv, jd = map(jnp.asarray, (q, k, v, d_out))

        heads_first = [torch.tensor(x).transpose(1, 2).contiguous() for x in (q, k, v, d_out)]
        tq, tk, tv = (x.requires_grad_() for x in heads_first[:3])

        def theirs():
            for x in (tq, tk, tv):
                x.grad = None
            out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=args.causal)
            out.backward(heads_first[3])
            return out

        t_out = theirs().detach().transpose(1, 2).numpy()
        wants = [t_out] + [x.grad.transpose(1, 2).numpy() for x in (tq, tk, tv)]
        error = 0.0
        for name, fn in jitted.items():
            out, grads = jax.block_until_ready(fn(jq, jk, jv, jd))
            error = max([error] + [float(np.abs(np.asarray(a) - b).max()) for a, b in zip([out, *grads], wants)])
        assert error < 1e-3, f"outputs or gradients disagree by {error}"
        runs = [partial(lambda fn: jax.block_until_ready(fn(jq, jk, jv, jd)), fn) for fn in jitted.values()]
        times = alternate(runs + [theirs], args.repeats, args.statistic)
        (theirs_cpu, theirs_wall) = times[-1]
        for clock, index, theirs_s in (("cpu_s", 0, theirs_cpu), ("wall_s", 1, theirs_wall)):
            print(f"n={n} {clock}: " + " ".join(
                f"{name}={t[index]:.4f} (ratio {t[index] / theirs_s:.2f})" for name, t in zip(jitted, times))
                + f" torch={theirs_s:.4f} | max_abs_diff={error:.1e}", flush=True)


if __name__ == "__main__":
    main()
