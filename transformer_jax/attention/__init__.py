"""Scaled dot-product attention with selectable implementations.

`dot_product_attention` takes the arguments of `jax.nn.dot_product_attention` (plus
segment ids, logits soft-capping, dropout and block sizes) and dispatches to one of:
"reference" (textbook, O(n^2) memory), "blockwise" (online softmax, O(n) memory),
"xla"/"cudnn" (jax.nn) or "pallas" (fused GPU kernel). `select_implementation` says
which one a call would use, and why.
"""
from __future__ import annotations

from functools import partial
from typing import Any

import jax

from transformer_jax.attention import batching, blockwise, dispatch, jax_nn, reference
from transformer_jax.attention.arguments import Operands, Options, normalise
from transformer_jax.attention.dispatch import Selection
from transformer_jax.attention.pallas_tuning import BlockSizes

__all__ = ["dot_product_attention", "select_implementation", "Selection", "BlockSizes"]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    implementation: str | None = None,
    block_sizes: int | tuple[int, int] | BlockSizes | None = None,
    logits_soft_cap: float | None = None,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool | None = True,
    dtype: Any = None,
    precision: Any = None,
) -> jax.Array:
    """softmax(query @ key^T * scale + bias) @ value, per head, with masking.

    A drop-in for `jax.nn.dot_product_attention` and a valid `attention_fn` for
    `flax.linen.MultiHeadDotProductAttention`.

    Args:
      query: [batch, q_len, heads, head_dim] (or without batch: [q_len, heads, head_dim]).
      key, value: [batch, kv_len, kv_heads, head_dim]; kv_heads must divide heads
        (grouped-query / multi-query attention). Same floating dtype as query.
      bias: float, broadcastable to [batch, heads, q_len, kv_len] (each dim 1 or full);
        added to the (soft-capped) logits.
      mask: bool, same broadcasting as bias; True = may attend.
      scale: logit scale; default 1 / sqrt(head_dim).
      is_causal: query i attends key j only if j <= i (top-left aligned when
        q_len != kv_len, as in jax.nn).
      query_seq_lengths, key_value_seq_lengths: int [batch]; positions at or beyond the
        length are padding. Padded query rows return zeros.
      local_window_size: int or (left, right): query i sees keys i-left ... i+right.
      segment_ids: int [batch, seq] (self-attention) or a pair (query_ids [batch, q_len],
        kv_ids [batch, kv_len]); attend only within equal ids.
      implementation: None (auto, see `select_implementation`), "reference",
        "blockwise", "xla", "cudnn" or "pallas". A named one that cannot serve the call
        raises ValueError.
      block_sizes: int or (block_q, block_k) for blockwise/pallas; for pallas also a
        `BlockSizes` (every tile, warp count and pipeline depth).
      logits_soft_cap: if set, logits -> cap * tanh(logits / cap) before bias and masks.
      dropout_rng, dropout_rate, broadcast_dropout, deterministic: attention-weight
        dropout as in flax (reference and blockwise only). Active only when
        deterministic is False and dropout_rate > 0 (deterministic=None with a positive
        rate is an error, as in flax's module); broadcast_dropout shares one mask across
        batch and heads. The mask is a hash of (seed, query position, key position), so
        it does not depend on the implementation or the block sizes.
      dtype: if given, query/key/value are cast to it first.
      precision: matmul precision (reference and blockwise only).
    Returns:
      [batch, q_len, heads, head_dim] in the inputs' dtype. Softmax statistics are
      float32; a query row that can attend to nothing returns zeros.
    """
    ops, opts, unbatched = normalise(
        query, key, value, bias, mask, scale=scale, is_causal=is_causal,
        query_seq_lengths=query_seq_lengths, key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, segment_ids=segment_ids, block_sizes=block_sizes,
        logits_soft_cap=logits_soft_cap, dropout_rng=dropout_rng, dropout_rate=dropout_rate,
        broadcast_dropout=broadcast_dropout, deterministic=deterministic, dtype=dtype, precision=precision,
    )
    selection = dispatch.choose(ops, opts, implementation)
    out = _run(selection.implementation, ops, opts)
    return out[0] if unbatched else out


def select_implementation(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    implementation: str | None = None,
    **kwargs: Any,
) -> Selection:
    """Which implementation `dot_product_attention` would run for these arguments, and why.

    Takes exactly `dot_product_attention`'s arguments (arrays or jax.ShapeDtypeStruct for
    query/key/value) and compiles nothing. Raises the same ValueError a call would for bad
    arguments or for a named implementation that cannot serve them.

    Auto rules (implementation=None), in order:
      1. On GPU: "cudnn" if jax.nn's cuDNN kernel accepts the call; else "pallas" if the
         Pallas kernel's `supports()` accepts it.
      2. On TPU: "pallas" (jax's splash-attention kernel) if it accepts the call and
         q_len * kv_len > dispatch.REFERENCE_MAX_SCORES.
      3. "reference" if q_len * kv_len <= dispatch.REFERENCE_MAX_SCORES (128 * 128:
         where blockwise stopped losing on CPU), else "blockwise".
    See `transformer_jax.attention.dispatch` for the measurements behind them.
    """
    defaults = dict(
        scale=None, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
        local_window_size=None, segment_ids=None, block_sizes=None, logits_soft_cap=None,
        dropout_rng=None, dropout_rate=0.0, broadcast_dropout=True, deterministic=True,
        dtype=None, precision=None,
    )
    unknown = set(kwargs) - set(defaults)
    if unknown:
        raise TypeError(f"select_implementation got unexpected arguments {sorted(unknown)}")
    ops, opts, _ = normalise(query, key, value, bias, mask, **{**defaults, **kwargs})
    return dispatch.choose(ops, opts, implementation)


def _run(implementation: str, ops: Operands, opts: Options) -> jax.Array:
    if implementation in ("xla", "cudnn"):
        return jax_nn.attend(ops, opts, implementation)
    if implementation == "pallas":
        return dispatch.pallas_module().attention(
            ops.query, ops.key, ops.value, scale=opts.scale, is_causal=opts.is_causal,
            query_seq_lengths=ops.seq.q_len, key_value_seq_lengths=ops.seq.kv_len,
            segment_ids=None if ops.seq.q_ids is None else (ops.seq.q_ids, ops.seq.kv_ids),
            local_window_size=opts.window, logits_soft_cap=opts.logits_soft_cap,
            block_sizes=opts.block_sizes,
        )
    per_head = partial(
        reference.attend if implementation == "reference" else blockwise.attend,
        scale=opts.scale, is_causal=opts.is_causal, window=opts.window,
        logits_soft_cap=opts.logits_soft_cap, dropout_rate=opts.dropout_rate, precision=opts.precision,
    )
    if implementation == "blockwise":
        per_head = partial(per_head, block_sizes=opts.block_sizes)
    return batching.lift(per_head, *ops[:6], _dropout_seeds(ops, opts))


def _dropout_seeds(ops: Operands, opts: Options) -> jax.Array | None:
    """uint32 [2] (one mask shared by batch and heads) or [batch, heads, 2]; None: no dropout."""
    if ops.dropout_rng is None:
        return None
    b, _, n, _ = ops.query.shape
    shape = (2,) if opts.broadcast_dropout else (b, n, 2)
    return jax.random.bits(ops.dropout_rng, shape, jax.numpy.uint32)
