"""Fused flash attention in Pallas for GPUs (Triton lowering); interpret mode on CPU.

The dispatcher in `transformer_jax.attention` calls exactly two functions here:
`supports(...)`, which says whether this kernel can serve a call on the current platform,
and `attention(...)`, the kernel itself, differentiable through `jax.custom_vjp`.

This file validates and pads; the kernels live beside it: `pallas_fwd.py` (forward and the
shared tile logits), `pallas_bwd.py` (dK/dV and dQ), `pallas_tuning.py` (tile table).
Semantics equal `jax.nn.dot_product_attention`'s: query i attends key j iff j <= i when
causal, i - left <= j <= i + right with a local window, j < kv_len[b], i < q_len[b] and
the segment ids match; fully masked rows give zeros. With a soft-cap c the scaled logits
x become c * tanh(x / c) before the softmax. Softmax statistics are float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from transformer_jax.attention import fused_inputs
from transformer_jax.attention.pallas_bwd import backward
from transformer_jax.attention.pallas_fwd import MaskSpec, forward
from transformer_jax.attention.pallas_tuning import SUPPORTED_HEAD_DIMS, BlockSizes, default_block_sizes

GPU_DTYPES = (jnp.bfloat16, jnp.float16)
# float32 is accepted for interpret-mode checks against a float64 reference; on GPU
# Triton would run its dots in TF32, so auto-selection never picks the kernel for it.
DTYPES = GPU_DTYPES + (jnp.float32,)


def supports(query: jax.Array, key: jax.Array, value: jax.Array, *, bias, mask, dropout_rate: float,
             logits_soft_cap: float | None) -> str | None:
    """None if the compiled kernel can serve this call on the default device, else why not.

    Interpret mode (CPU) is never reported as supported: it is for tests, not for speed.
    The soft-cap is supported; it is in the signature so every implementation is asked alike.
    """
    del logits_soft_cap
    if bias is not None:
        return "the Pallas kernel takes no dense bias"
    if mask is not None:
        return ("the Pallas kernel takes no dense mask; express it with is_causal, segment_ids, "
                "local_window_size or sequence lengths")
    if dropout_rate:
        return f"the Pallas kernel has no attention dropout (dropout_rate={dropout_rate})"
    device = jax.devices()[0]
    capability = getattr(device, "compute_capability", None)
    if device.platform != "gpu" or capability is None:
        return (f"the Pallas kernel needs an NVIDIA GPU (compute capability >= 8.0); the default "
                f"device is {device.platform!r} (interpret mode there is for tests only)")
    if float(capability) < 8.0:
        return f"the Pallas kernel needs compute capability >= 8.0, got {capability}"
    problem = _shape_problem(query, key, value)
    if problem:
        return problem
    if jnp.dtype(query.dtype) not in GPU_DTYPES:
        return f"the Pallas kernel on GPU supports bfloat16 and float16 inputs, got {query.dtype}"
    return None


def _shape_problem(query, key, value) -> str | None:
    return fused_inputs.shape_problem(query, key, value, head_dims=SUPPORTED_HEAD_DIMS, dtypes=DTYPES,
                                      kernel="Pallas kernel")


def attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    scale: float,
    is_causal: bool,
    query_seq_lengths: jax.Array | None,
    key_value_seq_lengths: jax.Array | None,
    segment_ids: tuple[jax.Array, jax.Array] | None,
    local_window_size: tuple[int, int] | None,
    logits_soft_cap: float | None,
    block_sizes: BlockSizes | tuple[int, int] | None,
    interpret: bool | None = None,
) -> jax.Array:
    """Fused attention; differentiable w.r.t. query, key and value.

    Args:
      query: [batch, q_len, heads, head_dim]; key, value: [batch, kv_len, kv_heads, head_dim],
        heads a multiple of kv_heads (GQA/MQA), head_dim in SUPPORTED_HEAD_DIMS; one dtype,
        bfloat16/float16 (float32 too, mainly for interpret mode).
      scale: multiplies q.k before the soft-cap and softmax.
      is_causal: key j is visible to query i only if j <= i.
      query_seq_lengths, key_value_seq_lengths: [batch] ints or None; positions at or past
        the length are padding.
      segment_ids: (q_ids [batch, q_len], kv_ids [batch, kv_len]) ints, or None.
      local_window_size: (left, right) non-negative ints: i - left <= j <= i + right; or None.
      logits_soft_cap: positive float c (logits -> c * tanh(logits / c)) or None.
      block_sizes: a pallas_tuning.BlockSizes; or (block_q, block_k), the forward tiles,
        with the rest from the table; or None, the table entry for head_dim on this GPU.
      interpret: run in Pallas interpret mode; None means on any backend but GPU.

    Returns:
      [batch, q_len, heads, head_dim] in query's dtype; zeros on fully masked rows.
    """
    problem = _shape_problem(query, key, value)
    if problem:
        raise ValueError(problem)
    batch, q_len, _, head_dim = query.shape
    kv_len = key.shape[1]
    fused_inputs.check_options(scale, logits_soft_cap, local_window_size)
    q_lens = fused_inputs.lengths("query_seq_lengths", query_seq_lengths, batch, q_len)
    kv_lens = fused_inputs.lengths("key_value_seq_lengths", key_value_seq_lengths, batch, kv_len)
    q_seg, kv_seg = fused_inputs.check_segment_ids(segment_ids, batch, q_len, kv_len)

    left, right = fused_inputs.band(is_causal, local_window_size)
    spec = MaskSpec(scale=float(scale), left=left, right=right,
                    soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
                    has_segments=segment_ids is not None)
    blocks = _block_sizes(block_sizes, head_dim).clamped(q_len, kv_len)
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)

    # Pad both sequences to a multiple of every tile that walks them; the lengths mask the rest.
    q_pad = -q_len % max(blocks.block_q, blocks.block_q_dkv, blocks.block_q_dq)
    kv_pad = -kv_len % max(blocks.block_k, blocks.block_k_dkv, blocks.block_k_dq)
    pad = fused_inputs.pad_seq
    q, k, v = pad(query, q_pad), pad(key, kv_pad), pad(value, kv_pad)
    if q_seg is not None:
        q_seg, kv_seg = pad(q_seg.astype(jnp.int32), q_pad), pad(kv_seg.astype(jnp.int32), kv_pad)
    out = _flash(spec, blocks, interpret, q, k, v, q_lens, kv_lens, q_seg, kv_seg)
    return out[:, :q_len]


def _block_sizes(block_sizes, head_dim: int) -> BlockSizes:
    """The BlockSizes a `block_sizes` argument stands for (see `attention`)."""
    if isinstance(block_sizes, BlockSizes):
        return block_sizes
    table = default_block_sizes(head_dim)
    if block_sizes is None:
        return table
    if isinstance(block_sizes, tuple) and len(block_sizes) == 2:
        return dataclasses.replace(table, block_q=block_sizes[0], block_k=block_sizes[1])
    raise TypeError(f"block_sizes={block_sizes!r}: expected None, (block_q, block_k) or a "
                    f"pallas_tuning.BlockSizes")


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _flash(spec, blocks, interpret, q, k, v, q_lens, kv_lens, q_seg, kv_seg):
    out, _ = forward(q, k, v, q_lens, kv_lens, q_seg, kv_seg, spec=spec, blocks=blocks, interpret=interpret)
    return out


def _flash_fwd(spec, blocks, interpret, q, k, v, q_lens, kv_lens, q_seg, kv_seg):
    out, lse = forward(q, k, v, q_lens, kv_lens, q_seg, kv_seg, spec=spec, blocks=blocks, interpret=interpret)
    return out, (q, k, v, out, lse, q_lens, kv_lens, q_seg, kv_seg)


def _flash_bwd(spec, blocks, interpret, residuals, d_out):
    q, k, v, out, lse, q_lens, kv_lens, q_seg, kv_seg = residuals
    dq, dk, dv = backward(q, k, v, out, lse, d_out, q_lens, kv_lens, q_seg, kv_seg,
                          spec=spec, blocks=blocks, interpret=interpret)
    return dq, dk, dv, None, None, None, None  # lengths and segment ids are not differentiable


_flash.defvjp(_flash_fwd, _flash_bwd)
