"""The KV cache: creating it, and per-row decode positions.

Usage (DecoderLM; EncoderDecoder.decode the same way, with `encoded` passed along and
`init_cache(model, batch_size, max_len, src_len=encoded.shape[1])`):

    cache = init_cache(model, batch_size, max_len)          # zeros, every row at position 0
    logits, state = model.apply(
        {"params": params, "cache": cache}, prompt,          # prompt [b, t], right-padded
        decode=True, decode_lengths=prompt_lengths,          # int32 [b]: valid tokens per row
        mutable=["cache"])
    cache = state["cache"]
    next_logits = logits[jnp.arange(b), prompt_lengths - 1]  # last valid token of each row
    # then one token per call: tokens [b, 1], decode_lengths None (= 1 each)

A call writes row i's first decode_lengths[i] tokens at that row's cache position and
advances it by decode_lengths[i]; tokens past that are ignored (their logits are
meaningless). A row with decode_lengths[i] = 0 stays where it is. Positions
(learned, sinusoidal or rotary) are the per-row cache positions; the cache holds
`max_len` of them and writes past it are dropped.

The cache is a pytree of arrays: per layer `cached_key` / `cached_value`
[b, max_len, kv_heads, head_dim] in cfg.dtype (EncoderDecoder: also `cross_key` /
`cross_value` [b, src_len, kv_heads, head_dim]; with `scan_layers`, a leading
"layers" axis: [num_layers, b, ...]), and `cache_position/index` int32 [b]. To reorder
rows (beam search), take along the batch axis of each leaf (axis 1 for scanned layers).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.models.checks import check_decode_lengths


def init_cache(model: nn.Module, batch_size: int, max_len: int, src_len: int | None = None) -> Any:
    """An empty cache (zeros, positions 0) for `batch_size` rows of up to `max_len` tokens.

    model: a DecoderLM or EncoderDecoder. src_len: the source length of an
    EncoderDecoder (required for it: its cache also holds the cross-attention keys
    and values, [b, src_len, kv_heads, head_dim] per layer, filled by the first call).
    No parameters are created: the shapes come from `jax.eval_shape`.
    """
    cfg = model.cfg
    for name, value in (("batch_size", batch_size), ("max_len", max_len)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    if cfg.pos_encoding == "learned" and max_len > cfg.max_len:
        raise ValueError(
            f"max_len={max_len} exceeds the learned position table (cfg.max_len={cfg.max_len})"
        )
    key = jax.random.key(0)
    tokens = jax.ShapeDtypeStruct((batch_size, max_len), jnp.int32)
    if hasattr(model, "encode"):  # EncoderDecoder: the cache lives in its decoder
        if not isinstance(src_len, (int, np.integer)) or isinstance(src_len, bool) or src_len <= 0:
            raise ValueError(f"src_len={src_len!r} must be a positive int for an EncoderDecoder")
        encoded = jax.ShapeDtypeStruct((batch_size, src_len, cfg.d_model), cfg.compute_dtype)
        init = functools.partial(model.init, decode=True, method="decode")
        shapes = jax.eval_shape(init, key, encoded, tokens)
    else:
        shapes = jax.eval_shape(functools.partial(model.init, decode=True), key, tokens)
    return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes["cache"])


class CachePosition(nn.Module):
    """Per-row decode position: the cache variable `index` int32 [b].

    `__call__(tokens [b, t], decode_lengths [b] | None) -> (positions int32 [b, t],
    valid bool [b, t])`, and advances each row's index by its length (default t).
    """

    @nn.compact
    def __call__(self, tokens: jax.Array, decode_lengths: jax.Array | None) -> tuple[jax.Array, jax.Array]:
        check_decode_lengths(decode_lengths, tokens)
        batch, length = tokens.shape
        if not self.is_initializing() and not self.has_variable("cache", "index"):
            raise ValueError(
                "decode=True needs a cache: apply with {'params': ..., 'cache': init_cache(...)} "
                "and mutable=['cache']"
            )
        if decode_lengths is None:
            lengths = jnp.full((batch,), length, jnp.int32)
        else:
            lengths = decode_lengths.astype(jnp.int32)
        index = self.variable("cache", "index", jnp.zeros, (batch,), jnp.int32)
        steps = jnp.arange(length, dtype=jnp.int32)
        positions = index.value[:, None] + steps
        valid = steps[None, :] < lengths[:, None]
        index.value = index.value + lengths
        return positions, valid
