"""Logit processors for sampling: temperature, top-k and top-p (nucleus) filtering.

Each takes logits `[..., vocab]` float32 and returns logits of the same shape in which
removed tokens are `-inf`, so `jax.random.categorical` samples from the renormalised
distribution over the kept tokens. All parameters may be traced scalars, so changing
them does not recompile the decoding loop.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def apply_temperature(logits: jax.Array, temperature: jax.typing.ArrayLike) -> jax.Array:
    """Divides logits `[..., vocab]` by `temperature` (> 0): < 1 sharpens, > 1 flattens."""
    return logits / jnp.asarray(temperature, logits.dtype)


def _keep_at_least(logits: jax.Array, threshold: jax.Array) -> jax.Array:
    """Masks to `-inf` every logit strictly below `threshold` `[..., 1]`."""
    return jnp.where(logits < threshold, -jnp.inf, logits)


def top_k_filter(logits: jax.Array, top_k: jax.typing.ArrayLike) -> jax.Array:
    """Keeps the `top_k` (>= 1) largest logits per row of `[..., vocab]`.

    Tokens tied with the k-th largest logit are kept too, so a row may keep more than
    `top_k` tokens when logits tie exactly.
    """
    vocab = logits.shape[-1]
    descending = -jnp.sort(-logits, axis=-1)
    k = jnp.clip(jnp.asarray(top_k, jnp.int32), 1, vocab)
    kth = jnp.take(descending, k - 1, axis=-1)[..., None]
    return _keep_at_least(logits, kth)


def top_p_filter(logits: jax.Array, top_p: jax.typing.ArrayLike) -> jax.Array:
    """Keeps the smallest set of most likely tokens whose probability reaches `top_p`.

    `top_p` is in (0, 1]. A token is kept when the total probability of the tokens more
    likely than it is still below `top_p`, so the most likely token is always kept.
    Logits already at `-inf` (e.g. removed by `top_k_filter`) carry zero probability.
    """
    descending = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(descending, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    top_p = jnp.asarray(top_p, probs.dtype)
    # top_p = 1 keeps every token, even where rounding lets the running sum reach 1 early.
    kept = (mass_before < top_p) | (top_p >= 1)
    num_kept = jnp.sum(kept, axis=-1, keepdims=True)
    threshold = jnp.take_along_axis(descending, num_kept - 1, axis=-1)
    return _keep_at_least(logits, threshold)


def process_logits(
    logits: jax.Array,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    top_k: jax.typing.ArrayLike | None = None,
    top_p: jax.typing.ArrayLike | None = None,
) -> jax.Array:
    """Temperature, then top-k, then top-p, on logits `[..., vocab]` float32.

    `None` skips a filter. The order matters: top-p measures probability mass after
    temperature and over the tokens top-k kept (renormalised).
    """
    logits = apply_temperature(logits, temperature)
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    return logits
