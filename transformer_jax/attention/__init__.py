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
import jax.numpy as jnp

from transformer_jax.attention import batching, blockwise, dispatch, jax_nn, masks, reference
from transformer_jax.attention.arguments import Operands, Options, normalise
from transformer_jax.attention.dispatch import Selection
from transformer_jax.attention.pallas_tuning import BlockSizes

__all__ = ["dot_product_attention", "flax_attention_fn", "select_implementation", "Selection", "BlockSizes"]


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    *,
    scale: float | jax.Array | None = None,
    is_causal: bool = False,
    query_seq_lengths: jax.Array | None = None,
    key_value_seq_lengths: jax.Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None,
    return_residual: bool = False,
    segment_ids: jax.Array | tuple[jax.Array, jax.Array] | None = None,
    block_sizes: int | tuple[int, int] | BlockSizes | None = None,
    logits_soft_cap: float | None = None,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    broadcast_dropout: bool = True,
    deterministic: bool | None = True,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """softmax(query @ key^T * scale + bias) @ value, per head, with masking.

    A drop-in for `jax.nn.dot_product_attention` (the deliberate differences are listed in
    the README) that also takes the arguments flax's `MultiHeadDotProductAttention` passes
    its `attention_fn`; flax's float 0/1 masks need `flax_attention_fn`.

    Args:
      query: [batch..., q_len, heads, head_dim] (any number of batch dims, none included).
      key, value: [batch..., kv_len, kv_heads, head_dim]; kv_heads must divide heads
        (grouped-query / multi-query attention). Same floating (or complex) dtype as
        query. An operand with fewer dims gets leading 1s, then batch dims must be equal.
      bias: float, broadcastable to [batch..., heads, q_len, kv_len] (each dim 1 or full);
        added to the (soft-capped) logits. Its values never make a row "empty".
      mask: bool, same broadcasting as bias; True = may attend (a non-bool mask is a
        TypeError, as in jax).
      scale: logit scale: a float, NumPy/jnp scalar or traced scalar (then folded into the
        query, so it is differentiable); default 1 / sqrt(head_dim).
      is_causal: query i attends key j only if j <= i (top-left aligned when
        q_len != kv_len, as in jax.nn).
      query_seq_lengths, key_value_seq_lengths: int [batch...] >= 0; positions at or beyond
        the length are padding.
      local_window_size: int or (left, right): query i sees keys i-left ... i+right.
      implementation: None (auto, see `select_implementation`), "reference",
        "blockwise", "xla", "cudnn" or "pallas". A named one that cannot serve the call
        raises ValueError.
      return_residual: also return the log-sum-exp of each row's logits, as jax.nn does
        ([batch..., q_len, heads], input dtype, not differentiated).
      segment_ids: int [batch..., seq] (self-attention) or a pair (query_ids, kv_ids);
        attend only within equal ids.
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
      module: a flax Module: the attention weights [batch..., heads, q_len, kv_len] (before
        dropout) are sown into its 'intermediates' as 'attention_weights', as flax does
        when `sow_weights=True`. Computes the whole score matrix.
      force_fp32_for_softmax: flax's flag; the softmax is always computed in float32 (or
        float64) here, so it only makes the sown weights float32 instead of the input dtype.
    Returns:
      [batch..., q_len, heads, head_dim] in the inputs' dtype (with return_residual, also
      the log-sum-exp [batch..., q_len, heads]). Softmax statistics are float32 (float64
      for float64 inputs). A query row that the masks, lengths, segments and window leave
      no key returns zeros (log-sum-exp: the dtype's lowest finite value).
    """
    return _attention(**locals(), numeric_mask=False)


def flax_attention_fn(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: jax.Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool | None = False,
    dtype: Any = None,
    precision: Any = None,
    module: Any = None,
    force_fp32_for_softmax: bool = False,
    **kwargs: Any,
) -> jax.Array:
    """`flax.linen.dot_product_attention`'s signature and mask rule over `dot_product_attention`.

    For `flax.linen.MultiHeadDotProductAttention(attention_fn=flax_attention_fn)`. The one
    difference from `dot_product_attention`: `mask` may be numeric, non-zero = attend, as
    flax's `make_causal_mask`/`combine_masks` build it (float32 0/1). Positional order and
    defaults are flax's (deterministic=False); any of `dot_product_attention`'s other
    keyword arguments (is_causal, implementation, ...) may be added.
    """
    return _attention(
        query, key, value, bias, mask, broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
        dropout_rate=dropout_rate, deterministic=deterministic, dtype=dtype, precision=precision, module=module,
        force_fp32_for_softmax=force_fp32_for_softmax, numeric_mask=True, **kwargs,
    )


_DEFAULTS = dict(
    scale=None, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
    local_window_size=None, return_residual=False, segment_ids=None, block_sizes=None, logits_soft_cap=None,
    dropout_rng=None, dropout_rate=0.0, broadcast_dropout=True, deterministic=True,
    dtype=None, precision=None,
)


def _attention(query, key, value, bias=None, mask=None, *, implementation=None, module=None,
               force_fp32_for_softmax=False, numeric_mask, **kwargs):
    unknown = set(kwargs) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"dot_product_attention got unexpected arguments {sorted(unknown)}")
    ops, opts, layout = normalise(query, key, value, bias, mask, **{**_DEFAULTS, **kwargs},
                                  numeric_mask=numeric_mask)
    selection = dispatch.choose(ops, opts, implementation)
    if module is not None:
        weights = _weights(ops, opts)
        dtype = jnp.float32 if force_fp32_for_softmax else ops.query.dtype
        module.sow("intermediates", "attention_weights",
                   weights.astype(dtype).reshape(*layout.out_lead[:-2], *weights.shape[1:]))
    if ops.query.size == 0 or ops.key.shape[1] == 0:  # nothing to compute: as jax, empty or zeros
        b, t, n, d = ops.query.shape
        out = jnp.zeros((b, t, n, d), ops.query.dtype)
        lse = jnp.full((b, t, n), masks.lowest(ops.query.dtype), masks.stat_dtype(ops.query.dtype))
    else:
        out, lse = _run(selection.implementation, ops, opts)
    out = layout.output(out)
    if not opts.return_residual:
        return out
    return out, jax.lax.stop_gradient(layout.residual(lse).astype(ops.query.dtype))


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
      3. Complex inputs: "reference".
      4. "reference" if q_len * kv_len <= dispatch.REFERENCE_MAX_SCORES (128 * 128,
         measured forward and forward+backward on CPU), else "blockwise".
    See `transformer_jax.attention.dispatch` for the measurements behind them.
    """
    kwargs.pop("module", None)
    kwargs.pop("force_fp32_for_softmax", None)
    numeric_mask = kwargs.pop("numeric_mask", False)
    unknown = set(kwargs) - set(_DEFAULTS)
    if unknown:
        raise TypeError(f"select_implementation got unexpected arguments {sorted(unknown)}")
    ops, opts, _ = normalise(query, key, value, bias, mask, **{**_DEFAULTS, **kwargs}, numeric_mask=numeric_mask)
    return dispatch.choose(ops, opts, implementation)


def _run(implementation: str, ops: Operands, opts: Options) -> tuple[jax.Array, jax.Array | None]:
    """(out [B, T, N, d], lse [B, T, N] or None) of the chosen implementation."""
    if implementation in ("xla", "cudnn"):
        return jax_nn.attend(ops, opts, implementation)
    if implementation == "pallas":
        out = dispatch.pallas_module().attention(
            ops.query, ops.key, ops.value, scale=opts.scale, is_causal=opts.is_causal,
            query_seq_lengths=ops.seq.q_len, key_value_seq_lengths=ops.seq.kv_len,
            segment_ids=None if ops.seq.q_ids is None else (ops.seq.q_ids, ops.seq.kv_ids),
            local_window_size=opts.window, logits_soft_cap=opts.logits_soft_cap,
            block_sizes=opts.block_sizes,
        )
        return out, None
    per_head = partial(
        reference.attend if implementation == "reference" else blockwise.attend,
        scale=opts.scale, is_causal=opts.is_causal, window=opts.window,
        logits_soft_cap=opts.logits_soft_cap, dropout_rate=opts.dropout_rate, precision=opts.precision,
    )
    if implementation == "blockwise":
        per_head = partial(per_head, block_sizes=opts.block_sizes)
    bias = ops.bias
    if bias is not None:  # its gradient sums over batch and heads: in float32 (or wider), not bf16
        bias = bias.astype(jnp.promote_types(bias.dtype, masks.stat_dtype(ops.query.dtype)))
    return batching.lift(per_head, ops.query, ops.key, ops.value, bias, ops.mask, ops.seq,
                         _dropout_seeds(ops, opts))


def _weights(ops: Operands, opts: Options) -> jax.Array:
    """The attention weights [B, N, T, S] (before dropout), for flax's `sow_weights`."""
    per_head = partial(
        reference.probabilities, scale=opts.scale, is_causal=opts.is_causal, window=opts.window,
        logits_soft_cap=opts.logits_soft_cap, precision=opts.precision,
    )
    # lift maps per-head [T, S] results to [B, T, N, S]; the second output is a placeholder.
    weights, _ = batching.lift(lambda q, k, v, bias, mask, seq, seed: (per_head(q, k, bias, mask, seq), q[:, 0]),
                               ops.query, ops.key, ops.value, ops.bias, ops.mask, ops.seq, None)
    return weights.transpose(0, 2, 1, 3)


def _dropout_seeds(ops: Operands, opts: Options) -> jax.Array | None:
    """uint32 [2] (one mask shared by batch and heads) or [batch, heads, 2]; None: no dropout."""
    if ops.dropout_rng is None:
        return None
    b, _, n, _ = ops.query.shape
    shape = (2,) if opts.broadcast_dropout else (b, n, 2)
    return jax.random.bits(ops.dropout_rng, shape, jax.numpy.uint32)
