"""Which implementation serves a call, and why.

Auto rules (implementation=None), in order:
  1. Dropout, segment ids, logits soft-capping or an explicit precision: only reference
     and blockwise implement these; go to 3.
  2. On GPU: "cudnn" if jax.nn's cuDNN kernel accepts the call (dtype, head_dim, mask
     kind); else "pallas" if its `supports()` accepts it.
  3. "reference" while one head's score matrix is small (q_len * kv_len <=
     REFERENCE_MAX_SCORES), else "blockwise". On this project's 2-core CPU the reference
     was faster up to about that size (benchmarks/attention.py); beyond it, the reference's
     O(n^2) memory dominates. KV-cache decoding (q_len 1..T, kv_len = cache length) stays
     on the cheap reference path.
A named implementation that cannot serve the call raises ValueError; it never falls back.
"""
from __future__ import annotations

import importlib
from typing import NamedTuple

import jax

from transformer_jax.attention import jax_nn
from transformer_jax.attention.arguments import IMPLEMENTATIONS, Operands, Options

# q_len * kv_len of one head at which blockwise becomes the better choice (measured on CPU).
REFERENCE_MAX_SCORES = 512 * 512


class Selection(NamedTuple):
    """The implementation that would run, and a human-readable reason."""

    implementation: str
    reason: str


def choose(ops: Operands, opts: Options, implementation: str | None) -> Selection:
    """Resolve `implementation` for these normalised arguments (see module docstring)."""
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

    scores = ops.query.shape[1] * ops.key.shape[1]
    if scores <= REFERENCE_MAX_SCORES:
        return Selection("reference", f"score matrix q_len*kv_len = {scores} <= {REFERENCE_MAX_SCORES}")
    return Selection("blockwise", f"score matrix q_len*kv_len = {scores} > {REFERENCE_MAX_SCORES}")


def unsupported_reason(ops: Operands, opts: Options, implementation: str) -> str | None:
    """None if `implementation` can serve the call on this platform, else the reason."""
    if implementation in ("xla", "cudnn"):
        return jax_nn.unsupported_reason(ops, opts, implementation)
    if implementation == "pallas":
        return _pallas_reason(ops, opts)
    return None


def pallas_module():
    """The optional Pallas GPU kernel module, imported on first use."""
    return importlib.import_module("transformer_jax.attention.pallas_gpu")


def _pallas_reason(ops: Operands, opts: Options) -> str | None:
    try:
        module = pallas_module()
    except ImportError as e:
        return f"the Pallas kernel is unavailable ({e})"
    if opts.precision is not None:
        return "the Pallas kernel takes no precision argument"
    return module.supports(
        ops.query, ops.key, ops.value,
        bias=ops.bias, mask=ops.mask, dropout_rate=opts.dropout_rate, logits_soft_cap=opts.logits_soft_cap,
    )
