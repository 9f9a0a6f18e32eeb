"""Lift a one-sequence, one-head attention function over batch and heads with `jax.vmap`.

Grouped-query attention falls out of the vmap axes: queries are split into
[kv_heads, group] and keys/values are mapped over kv_heads only, so each key/value head
is shared by its group without being copied.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from transformer_jax.attention.masks import SequenceInfo


def lift(
    per_head: Callable,
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    seq: SequenceInfo,
    seeds: jax.Array | None,
) -> tuple[jax.Array, jax.Array]:
    """Apply `per_head(q, k, v, bias, mask, seq, seed) -> (out [T, d], lse [T])` to every
    (batch, head).

    Args:
      query: [B, T, N, d]; key, value: [B, S, K, d] with N % K == 0.
      bias, mask: [B or 1, N or 1, T or 1, S or 1], or None.
      seq: SequenceInfo with lengths [B] and segment ids [B, T] / [B, S] (or None).
      seeds: uint32 [2] (one dropout mask for all), [B, N, 2] (one per head), or None.
    Returns:
      out [B, T, N, d] and lse [B, T, N].
    """
    b, t, n, d = query.shape
    kv_heads = key.shape[2]
    groups = n // kv_heads
    q = query.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, d]
    k, v = key.transpose(0, 2, 1, 3), value.transpose(0, 2, 1, 3)  # [B, K, S, d]

    # Each argument: its array with leading mapped dims, and which of (B, K, G) it maps.
    args = [(q, (True, True, True)), (k, (True, True, False)), (v, (True, True, False))]
    args += [_per_head_operand(bias, b, n, kv_heads, groups), _per_head_operand(mask, b, n, kv_heads, groups)]
    args.append((seq, (True, False, False)))
    if seeds is not None and seeds.ndim == 3:
        args.append((seeds.reshape(b, kv_heads, groups, 2), (True, True, True)))
    else:
        args.append((seeds, (False, False, False)))

    fn = per_head
    if groups == 1:  # no group axis: 4-D arrays, which XLA's CPU backend fuses better than 5-D
        args = [(x if x is None or not mapped[2] else _squeeze_group(x, mapped), mapped) for x, mapped in args]
        levels = (1, 0)
    else:
        levels = (2, 1, 0)
    for level in levels:  # innermost vmap first: groups, kv heads, batch
        fn = jax.vmap(fn, in_axes=tuple(0 if mapped[level] else None for _, mapped in args))
    out, lse = fn(*(x for x, _ in args))  # [B, K, G, T, d], [B, K, G, T] (no G axis when G == 1)
    if groups == 1:
        out, lse = out[:, :, None], lse[:, :, None]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, out.shape[-1]), lse.transpose(0, 3, 1, 2).reshape(b, t, n)


def _squeeze_group(x: jax.Array, mapped: tuple[bool, bool, bool]) -> jax.Array:
    """Drop the size-1 group axis of an operand mapped over groups (it follows batch and
    kv-head axes where those are mapped)."""
    return jnp.squeeze(x, axis=int(mapped[0]) + int(mapped[1]))


def _per_head_operand(x, b, n, kv_heads, groups):
    """Reshape a [B|1, N|1, T|1, S|1] bias/mask so its leading dims are the mapped ones."""
    if x is None:
        return None, (False, False, False)
    by_batch, by_head = x.shape[0] == b, x.shape[1] == n
    x = x if by_batch else x[0]
    if by_head:
        lead = x.shape[:1] if by_batch else ()
        x = x.reshape(*lead, kv_heads, groups, *x.shape[-2:])
    else:
        x = jnp.take(x, 0, axis=1 if by_batch else 0)
    return x, (by_batch, by_head, by_head)
