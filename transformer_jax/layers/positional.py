"""Positional encodings: sinusoidal, learned absolute, rotary (RoPE); segment positions."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.layers import initializers as init


def sinusoidal_encoding(positions: jax.Array, features: int, layout: str = "interleaved") -> jax.Array:
    """The "Attention is all you need" encoding at integer `positions`.

    layout "interleaved": PE[p, 2i] = sin(p / 10000^(2i/features)), PE[p, 2i+1] = cos(same);
    "split" (Marian): PE[p, i] = sin(p / 10000^(2i/features)), PE[p, features/2 + i] = cos(same).
    positions: int array of any shape [...]; returns float32 [..., features].
    """
    if layout not in ("interleaved", "split"):
        raise ValueError(f"layout={layout!r} is not one of ('interleaved', 'split')")
    if features % 2:
        raise ValueError(f"features={features} must be even for the sinusoidal encoding")
    inv_freq = 10000.0 ** (-jnp.arange(0, features, 2, dtype=jnp.float32) / features)
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    if layout == "split":
        return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)
    # stack then flatten interleaves: sin at even, cos at odd feature indices.
    return jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1).reshape(*positions.shape, features)


class LearnedPositions(nn.Module):
    """A learned table `[max_len, features]`; `__call__(positions [...]) -> [..., features]`.

    Positions >= max_len are clamped by `jnp.take` (callers validate lengths).
    """

    max_len: int
    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, positions: jax.Array) -> jax.Array:
        table = self.param(
            "embedding", init.normal((None, "embed")), (self.max_len, self.features), jnp.float32
        )
        table = nn.with_logical_constraint(table, (None, None))  # see TokenEmbedding.__call__
        return jnp.take(table, positions, axis=0, mode="clip").astype(self.dtype)


def apply_rotary(x: jax.Array, positions: jax.Array, base: float = 10000.0) -> jax.Array:
    """Rotary position embedding (Su et al. 2021), half-split (GPT-NeoX) layout.

    x: [batch, length, heads, head_dim] (head_dim even); positions: int [batch, length].
    Feature i is rotated with feature i + head_dim/2 by angle p * base^(-2i/head_dim).
    Computed in float32, returned in x.dtype.
    """
    half = x.shape[-1] // 2
    inv_freq = base ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angles = positions.astype(jnp.float32)[:, :, None, None] * inv_freq  # [b, t, 1, half]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


def segment_positions(segment_ids: jax.Array) -> jax.Array:
    """Position of each token within its segment (packed sequences).

    segment_ids: int [batch, length], equal ids contiguous; returns int32 [batch, length],
    restarting at 0 wherever the id changes.
    """
    length = segment_ids.shape[-1]
    idx = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), segment_ids.shape)
    starts = jnp.concatenate(
        [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1
    )
    return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


def padding_positions(padding_mask: jax.Array) -> jax.Array:
    """Positions that count real tokens only: padding anywhere leaves them unchanged.

    padding_mask: bool [batch, length], True = real token; returns int32 [batch, length]
    (a padding slot gets the position of the preceding real token, or 0).
    """
    return jnp.maximum(jnp.cumsum(padding_mask, axis=1, dtype=jnp.int32) - 1, 0)
