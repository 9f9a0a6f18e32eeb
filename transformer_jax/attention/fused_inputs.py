"""Input checks and padding shared by the fused kernels (`pallas_gpu`, `pallas_tpu`)."""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp


def shape_problem(query, key, value, *, head_dims: tuple[int, ...], dtypes: tuple, kernel: str) -> str | None:
    """A sentence naming what is wrong with the q/k/v shapes and dtypes for `kernel`, or None."""
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        return (f"query, key, value must be [batch, seq, heads, head_dim], got shapes "
                f"{query.shape}, {key.shape}, {value.shape}")
    if key.shape != value.shape or query.shape[0] != key.shape[0] or query.shape[3] != key.shape[3]:
        return (f"key and value must have equal shapes, and batch and head_dim equal to the "
                f"query's: got query {query.shape}, key {key.shape}, value {value.shape}")
    if query.shape[2] % key.shape[2]:
        return (f"query heads ({query.shape[2]}) must be a multiple of key/value heads "
                f"({key.shape[2]})")
    if query.shape[3] not in head_dims:
        return f"the {kernel} supports head_dim in {head_dims}, got {query.shape[3]}"
    names = ", ".join(jnp.dtype(d).name for d in dtypes)
    if not (query.dtype == key.dtype == value.dtype) or jnp.dtype(query.dtype) not in dtypes:
        return (f"query, key, value must share one dtype among {names}; got "
                f"{query.dtype}, {key.dtype}, {value.dtype}")
    return None


def lengths(name: str, values, batch: int, full: int) -> jax.Array:
    """[batch] int32 lengths clipped to [0, full]; `full` everywhere when None."""
    if values is None:
        return jnp.full((batch,), full, jnp.int32)
    if jnp.shape(values) != (batch,) or not jnp.issubdtype(jnp.result_type(values), jnp.integer):
        raise ValueError(f"{name}: expected ints of shape ({batch},), got {jnp.result_type(values)}"
                         f"{list(jnp.shape(values))}")
    return jnp.clip(jnp.asarray(values, jnp.int32), 0, full)


def pad_seq(x: jax.Array, n: int) -> jax.Array:
    """Appends n zero positions to axis 1 (the sequence axis)."""
    return jnp.pad(x, [(0, 0), (0, n)] + [(0, 0)] * (x.ndim - 2))


def check_segment_ids(segment_ids, batch: int, q_len: int, kv_len: int):
    """(q_ids, kv_ids) or (None, None), after checking their shapes and dtypes."""
    if segment_ids is None:
        return None, None
    q_ids, kv_ids = segment_ids
    for name, ids, length in (("query", q_ids, q_len), ("key/value", kv_ids, kv_len)):
        if ids.shape != (batch, length) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name} segment ids: expected ints of shape {(batch, length)}, "
                             f"got {ids.dtype}{list(ids.shape)}")
    return q_ids, kv_ids


def check_options(scale, logits_soft_cap, local_window_size) -> None:
    """ValueError/TypeError for a scale, soft-cap or window a fused kernel cannot take."""
    if not isinstance(scale, numbers.Real):
        raise TypeError(f"scale={scale!r}: expected a Python float (it is baked into the kernel)")
    if logits_soft_cap is not None and not (isinstance(logits_soft_cap, numbers.Real) and logits_soft_cap > 0):
        raise ValueError(f"logits_soft_cap={logits_soft_cap!r}: expected None or a positive float")
    if local_window_size is not None and not (
        len(local_window_size) == 2 and all(isinstance(w, numbers.Integral) and w >= 0 for w in local_window_size)
    ):
        raise ValueError(f"local_window_size={local_window_size!r}: expected None or (left, right) ints >= 0")


def band(is_causal: bool, local_window_size) -> tuple[int | None, int | None]:
    """(left, right): query i sees keys i-left ... i+right; None = unbounded on that side."""
    left, right = local_window_size if local_window_size is not None else (None, None)
    if is_causal:
        right = 0 if right is None else min(right, 0)
    return left, right
