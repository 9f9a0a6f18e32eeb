"""The textbook attention, softmax(q k^T * scale + bias) v, for one sequence and one head.

O(q_len * kv_len) memory: the whole score matrix is built. It is the yardstick the other
implementations are tested against, and the fastest choice for small score matrices
(KV-cache decoding, short sequences). `batching.lift` maps it over heads and batch.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.attention import masks


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    seq: masks.SequenceInfo,
    seed: jax.Array | None,
    *,
    scale: float,
    is_causal: bool,
    window: tuple[int, int] | None,
    logits_soft_cap: float | None,
    dropout_rate: float,
    precision=None,
) -> jax.Array:
    """Attention of one head of one sequence.

    Args:
      q: [T, d]; k, v: [S, d] (same floating dtype).
      bias: float, broadcastable to [T, S], or None. mask: bool, broadcastable to [T, S].
      seq: sequence lengths / segment ids of this sequence (full length ids).
      seed: uint32 [2] dropout seed, or None for no dropout.
    Returns:
      [T, d] in q's dtype. Rows with nothing to attend to are zero.
    """
    t, s = q.shape[0], k.shape[0]
    logits = jnp.einsum("td,sd->ts", q, k, precision=precision, preferred_element_type=jnp.float32)
    logits = logits * scale
    if logits_soft_cap is not None:
        logits = logits_soft_cap * jnp.tanh(logits / logits_soft_cap)
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    keep = masks.allowed(jnp.arange(t), jnp.arange(s), seq, mask, is_causal=is_causal, window=window)
    if keep is not None:
        logits = jnp.where(keep, logits, -jnp.inf)

    # Shift by the row max for stability; a fully masked row has max -inf: shift by 0
    # instead, so its exp() is exactly 0 and its output 0 rather than NaN.
    row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    unnormalised = jnp.exp(logits - row_max)
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    probs = unnormalised / jnp.where(total == 0.0, 1.0, total)
    if seed is not None:
        drop_keep = masks.dropout_keep(seed, jnp.arange(t), jnp.arange(s), dropout_rate)
        probs = jnp.where(drop_keep, probs / (1.0 - dropout_rate), 0.0)

    out = jnp.einsum(
        "ts,sd->td", probs.astype(v.dtype), v, precision=precision, preferred_element_type=jnp.float32
    )
    return out.astype(q.dtype)
