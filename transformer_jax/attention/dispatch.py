"""Which implementation serves a call, and why.

Auto rules (implementation=None), in order:
  1. On GPU: "cudnn" if jax.nn's cuDNN kernel accepts the call (it has no segment ids,
     soft-capping, dropout or precision; it checks dtype, head_dim and mask kind itself);
     else "pallas" if its `supports()` accepts it (no dense bias/mask, no dropout).
  2. On TPU: "pallas" (jax's splash-attention kernel, see `pallas_tpu`) if it supports the
     call and the score matrix is larger than TPU_SPLASH_MIN_SCORES = 128 * 128. Not
     measured (no TPU was available); chosen because splash is the fused kernel TPU
     training stacks use, where blockwise would be a sequential XLA loop.
  3. Complex inputs: "reference" (the only one of ours that takes them).
  4. "reference" while one head's score matrix is small (q_len * kv_len <=
     REFERENCE_MAX_SCORES = 256 * 256), else "blockwise". Measured on CPU (one core, one
     thread, quiet machine, 2026-12-01, benchmarks/RESULTS.md "Attention auto choice,
     re-measured") forward and forward+backward separately, b=8, h=4, d=32: at n <= 256
     the reference is the fastest forward+backward (n=256: 17.6 ms against blockwise 19.7
     non-causal, 17.7 against 38.4 causal) and within 3-6% of blockwise's forward; at n=384
     it still trains 9-12% faster but its causal forward is 1.8x blockwise's; from n=512
     blockwise wins both (causal fwd+bwd 74 against 166 ms). A trace cannot tell whether
     it will be differentiated, so one threshold serves both, placed where training (the
     larger gaps) is served best. At the training shape of issue 17 (batch 32, 4 heads,
     d=32, n=128, causal) the reference is 19.6 ms against xla 26.6 and blockwise 44.3.
     Not yet measured on GPU. KV-cache decoding (q_len 1 against kv_len <= 65536) stays on
     the cheap reference path.
A named implementation that cannot serve the call raises ValueError; it never falls back.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.attention import jax_nn
from transformer_jax.attention.arguments import IMPLEMENTATIONS, Operands, Options
from transformer_jax.attention.pallas_tuning import BlockSizes

# q_len * kv_len of one head up to which the reference is the better choice (measured on CPU).
REFERENCE_MAX_SCORES = 256 * 256
# ... beyond which a TPU takes the splash kernel (not measured: no TPU was available).
TPU_SPLASH_MIN_SCORES = 128 * 128


class Selection(NamedTuple):
    """The implementation that would run, and a human-readable reason."""

    implementation: str
    reason: str


def choose(ops: Operands, opts: Options, implementation: str | None) -> Selection:
    """Resolve `implementation` for these normalised arguments (see module docstring)."""
    if isinstance(opts.block_sizes, BlockSizes) and (implementation != "pallas" or jax.default_backend() == "tpu"):
        raise ValueError(
            f"block_sizes={opts.block_sizes!r} is a tiling of the Pallas GPU kernel, taken only "
            f"with implementation='pallas' on a GPU (got implementation={implementation!r} on "
            f"{jax.default_backend()!r}); other implementations take an int or (block_q, block_k)"
        )
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS} or None, got {implementation!r}")
        reason = unsupported_reason(ops, opts, implementation)
        if reason is not None:
            raise ValueError(f"implementation={implementation!r} cannot serve this call: {reason}")
        return Selection(implementation, "requested by the caller")

    if jax.default_backend() == "gpu":
        cudnn = unsupported_reason(ops, opts, "cudnn")
        if cudnn is None:
            return Selection("cudnn", "GPU, and jax.nn's cuDNN kernel supports the call")
        pallas = unsupported_reason(ops, opts, "pallas")
        if pallas is None:
            return Selection("pallas", f"GPU; cudnn unusable ({cudnn}), the Pallas kernel supports the call")

    if jnp.iscomplexobj(ops.query):
        return Selection("reference", "complex inputs: of ours, only reference (and xla) take them")
    scores = ops.query.shape[1] * ops.key.shape[1]
    if jax.default_backend() == "tpu" and scores > TPU_SPLASH_MIN_SCORES:
        pallas = unsupported_reason(ops, opts, "pallas")
        if pallas is None:
            return Selection("pallas", f"TPU, score matrix q_len*kv_len = {scores} > {TPU_SPLASH_MIN_SCORES}, "
                                       f"and the splash kernel supports the call")
    if scores <= REFERENCE_MAX_SCORES:
        return Selection("reference", f"score matrix q_len*kv_len = {scores} <= {REFERENCE_MAX_SCORES}, where the "
                                      f"reference was fastest on CPU forward+backward (forward within 6% of blockwise)")
    return Selection("blockwise", f"score matrix q_len*kv_len = {scores} > {REFERENCE_MAX_SCORES}, where blockwise "
                                  f"was fastest on CPU from n=512, forward and forward+backward")


def unsupported_reason(ops: Operands, opts: Options, implementation: str) -> str | None:
    """None if `implementation` can serve the call on this platform, else the reason."""
    if jnp.iscomplexobj(ops.query) and implementation not in ("reference", "xla"):
        return (f"complex inputs ({ops.query.dtype}) are supported by 'reference' and 'xla' only, "
                f"not by {implementation!r}")
    if implementation in ("xla", "cudnn"):
        return jax_nn.unsupported_reason(ops, opts, implementation)
    if implementation == "pallas":
        return _pallas_reason(ops, opts)
    return None


def pallas_module():
    """The fused Pallas kernel of this platform, imported on first use: jax's splash
    attention on TPU (`pallas_tpu`), our Triton kernel elsewhere (`pallas_gpu`)."""
    name = "pallas_tpu" if jax.default_backend() == "tpu" else "pallas_gpu"
    return importlib.import_module(f"transformer_jax.attention.{name}")


def _pallas_reason(ops: Operands, opts: Options) -> str | None:
    try:
        module = pallas_module()
    except ImportError as e:
        return f"the Pallas kernel is unavailable ({e})"
    if opts.precision is not None:
        return "the Pallas kernel takes no precision argument"
    if opts.return_residual:
        return "the Pallas kernel does not return the log-sum-exp (return_residual=True)"
    return module.supports(
        ops.query, ops.key, ops.value,
        bias=ops.bias, mask=ops.mask, dropout_rate=opts.dropout_rate, logits_soft_cap=opts.logits_soft_cap,
    )
