"""Validation and normalisation of `dot_product_attention`'s arguments.

Everything is checked here, at trace time, before any implementation runs, so a bad
call fails with a ValueError/TypeError that names the argument instead of an XLA error.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.attention.masks import SequenceInfo
from transformer_jax.attention.pallas_tuning import BlockSizes

IMPLEMENTATIONS = ("reference", "blockwise", "xla", "cudnn", "pallas")


class Operands(NamedTuple):
    """The array arguments, in canonical 4-D form.

    query [B, T, N, d]; key, value [B, S, K, d] (B: the batch dims flattened into one);
    bias/mask [B|1, N|1, T|1, S|1] or None; seq: lengths [B] int32 and segment ids [B, T],
    [B, S] (fields may be None); dropout_rng: a PRNG key when dropout is active, else None;
    scale: None, or a traced scalar when the caller passed one (see `normalise`).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    bias: jax.Array | None
    mask: jax.Array | None
    seq: SequenceInfo
    dropout_rng: Any


@dataclasses.dataclass(frozen=True)
class Options:
    """The static (hashable) arguments, normalised."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    logits_soft_cap: float | None
    dropout_rate: float  # 0.0 when deterministic
    broadcast_dropout: bool
    block_sizes: tuple[int, int] | BlockSizes | None  # BlockSizes: the Pallas kernel's full tiling
    precision: Any
    return_residual: bool = False


class Layout(NamedTuple):
    """How to give the result back the caller's shape: output [*out_lead, d] and the
    log-sum-exp residual [*out_lead] (out_lead: query's shape without head_dim)."""

    out_lead: tuple[int, ...]

    def output(self, out: jax.Array) -> jax.Array:
        return out.reshape(*self.out_lead, out.shape[-1])

    def residual(self, lse: jax.Array) -> jax.Array:
        return lse.reshape(self.out_lead)


def normalise(
    query, key, value, bias, mask, *, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
    local_window_size, segment_ids, block_sizes, logits_soft_cap, dropout_rng, dropout_rate,
    broadcast_dropout, deterministic, dtype, precision, return_residual=False, numeric_mask=False,
) -> tuple[Operands, Options, Layout]:
    """Validate every argument; return (operands, options, layout).

    query/key/value are [batch..., seq, heads, head_dim] with any number (>= 0) of batch
    dims; an operand with fewer dims than another gets leading 1s (jax.nn's rule for a 3-D
    query with 4-D key/value), after which their batch dims must be equal. They are
    flattened into the one batch dim of the operands. `numeric_mask` accepts a non-bool
    mask with flax's meaning (non-zero = attend); otherwise a mask must be bool, as in jax.
    A traced `scale` (e.g. a learned temperature under jit) is folded into the query, so
    every implementation, and its gradient, sees it; a concrete one becomes a float.
    """
    query, key, value = (_as_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    if min(query.ndim, key.ndim, value.ndim) < 3:
        raise ValueError(
            "query, key and value must be [batch..., seq, heads, head_dim] (at least 3-D, as "
            f"[seq, heads, head_dim]); got query {query.shape}, key {key.shape}, value {value.shape}"
        )
    out_lead = query.shape[:-1]
    rank = max(query.ndim, key.ndim, value.ndim)
    query, key, value = (_reshape(x, (1,) * (rank - x.ndim) + x.shape) for x in (query, key, value))
    batch_shape = query.shape[:-3]
    if key.shape[:-3] != batch_shape or value.shape[:-3] != batch_shape:
        raise ValueError(
            f"query, key and value must have equal batch dims, got query {query.shape}, key {key.shape}, "
            f"value {value.shape}"
        )
    b = int(np.prod(batch_shape, dtype=np.int64))
    query, key, value = (_reshape(x, (b, *x.shape[-3:])) for x in (query, key, value))
    if dtype is not None:
        query, key, value = (_astype(x, dtype) for x in (query, key, value))
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(f"{name} must have a floating (or complex) dtype, got {x.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )

    _, t, n, d = query.shape
    _, s, kv_heads, _ = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {key.shape}, got {value.shape}")
    if key.shape[3] != d:
        raise ValueError(f"key head_dim must equal query's ({d}), got key shape {key.shape}")
    if (kv_heads == 0 and n != 0) or (kv_heads and n % kv_heads != 0):
        raise ValueError(
            f"key/value heads ({kv_heads}) must divide query heads ({n}); "
            f"got query {query.shape}, key {key.shape}"
        )

    full = (b, n, t, s)
    bias = _pairwise(bias, "bias", batch_shape, full)
    mask = _pairwise(mask, "mask", batch_shape, full)
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.inexact):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if mask is not None and mask.dtype != jnp.bool_:
        if not numeric_mask:
            raise TypeError(
                f"mask must be boolean (True = attend), as in jax.nn.dot_product_attention; got dtype "
                f"{mask.dtype}. An additive mask (0 / large negative) goes in `bias`; flax's 0/1 float "
                f"masks (make_causal_mask, combine_masks) are taken by `flax_attention_fn`, or pass "
                f"mask.astype(bool)"
            )
        if not jnp.issubdtype(mask.dtype, jnp.number):
            raise TypeError(f"mask must be boolean (True = attend) or numeric, got dtype {mask.dtype}")
        mask = mask != 0  # flax's meaning: jnp.where(mask, logits, big_neg)

    seq = SequenceInfo(
        q_len=_lengths(query_seq_lengths, "query_seq_lengths", batch_shape),
        kv_len=_lengths(key_value_seq_lengths, "key_value_seq_lengths", batch_shape),
        **_segments(segment_ids, batch_shape, t, s),
    )

    scale, traced_scale = _scale(scale, d)
    if traced_scale is not None and not isinstance(query, jax.ShapeDtypeStruct):
        query = (query * traced_scale.astype(query.dtype)).astype(query.dtype)
    if logits_soft_cap is not None and (
        not isinstance(logits_soft_cap, (int, float, np.floating, np.integer)) or not logits_soft_cap > 0
    ):
        raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
    if not isinstance(dropout_rate, (int, float, np.floating, np.integer)) or not 0.0 <= dropout_rate < 1.0:
        raise ValueError(f"dropout_rate must be a float in [0, 1), got {dropout_rate!r}")
    # As flax's MultiHeadDotProductAttention (merge_param): with dropout on, whether this
    # is a training call must be stated; it never passes None itself.
    if deterministic is None and dropout_rate > 0:
        raise ValueError(f"deterministic must be True or False when dropout_rate={dropout_rate} > 0, got None")
    active_dropout = float(dropout_rate) if (not deterministic and dropout_rate > 0) else 0.0
    if active_dropout and dropout_rng is None:
        raise ValueError(
            f"dropout_rng is required when dropout_rate={dropout_rate} and deterministic=False"
        )

    options = Options(
        scale=scale,
        is_causal=_flag(is_causal, "is_causal"),
        window=_pair(local_window_size, "local_window_size", minimum=0),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=active_dropout,
        broadcast_dropout=_flag(broadcast_dropout, "broadcast_dropout"),
        block_sizes=_block_sizes(block_sizes),
        precision=precision,
        return_residual=_flag(return_residual, "return_residual"),
    )
    operands = Operands(query, key, value, bias, mask, seq, dropout_rng if active_dropout else None)
    return operands, options, Layout(out_lead)


def _scale(scale, d):
    """(static float scale, traced scalar or None). A traced scale gives (1.0, scale)."""
    if scale is None:
        return (1.0 / float(np.sqrt(d)) if d else 1.0), None
    if isinstance(scale, bool) or not hasattr(scale, "__float__") and not hasattr(scale, "dtype"):
        raise TypeError(f"scale must be a real scalar (float, NumPy/jnp scalar or traced) or None, got {scale!r}")
    dt = getattr(scale, "dtype", None)
    if dt is not None and (np.ndim(scale) != 0 or not jnp.issubdtype(dt, jnp.number)
                           or jnp.issubdtype(dt, jnp.complexfloating) or dt == jnp.bool_):
        raise TypeError(f"scale must be a real scalar, got {getattr(scale, 'dtype', '')}{list(np.shape(scale))}")
    if isinstance(scale, jax.core.Tracer):
        return 1.0, scale
    return float(scale), None


def _reshape(x, shape):
    """x.reshape(shape), also for the jax.ShapeDtypeStruct that `select_implementation` takes."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(tuple(shape), x.dtype)
    return x.reshape(shape) if x.shape != tuple(shape) else x


def _astype(x, dtype):
    if isinstance(x, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(x.shape, dtype)
    return x.astype(dtype)


def _as_array(x, name):
    """A jax array (NumPy arrays and lists converted, as jax.nn does); ShapeDtypeStructs pass."""
    if isinstance(x, (np.ndarray, np.generic)) or not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
    return x


def _flag(x, name):
    """A bool; Python/NumPy ints are read as truth values (jax.nn accepts is_causal=1)."""
    if not isinstance(x, (bool, np.bool_, int, np.integer)):
        raise TypeError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def _block_sizes(x):
    """None, an int, a pair of ints, or a pallas_tuning.BlockSizes (Pallas kernel only)."""
    if isinstance(x, BlockSizes):
        return x
    return _pair(x, "block_sizes", minimum=1)


def _pair(x, name, *, minimum):
    """None, an int, or a pair of ints, each >= minimum -> None or (int, int)."""
    if x is None:
        return None
    pair = (x, x) if isinstance(x, (int, np.integer)) else x
    if (
        not isinstance(pair, (tuple, list))
        or len(pair) != 2
        or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in pair)
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {x!r}")
    if min(pair) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {x!r}")
    return int(pair[0]), int(pair[1])


def _pairwise(x, name, batch_shape, full):
    """A bias/mask broadcastable to [batch..., heads, q_len, kv_len] (each dim 1 or full)
    -> [B|1, N|1, T|1, S|1] with the batch dims flattened."""
    if x is None:
        return None
    x = _as_array(x, name)
    want = len(batch_shape) + 3
    while x.ndim > want and x.shape[0] == 1:  # jax.nn: a 4-D bias for [seq, heads, head_dim] inputs
        x = x[0]
    x = x.reshape((1,) * (want - x.ndim) + x.shape) if x.ndim <= want else x
    target = (*batch_shape, *full[1:])
    if x.ndim != want or any(got not in (1, w) for got, w in zip(x.shape, target)):
        raise ValueError(
            f"{name} must be broadcastable to [batch..., heads, q_len, kv_len] = {target} "
            f"(each dim 1 or full), got shape {x.shape}"
        )
    lead = x.shape[: len(batch_shape)]
    if all(dim == 1 for dim in lead):
        return x.reshape(1, *x.shape[len(batch_shape):])
    if lead != tuple(batch_shape):  # partly broadcast batch dims: make them whole to flatten
        x = jnp.broadcast_to(x, (*batch_shape, *x.shape[len(batch_shape):]))
    return x.reshape(full[0], *x.shape[len(batch_shape):])


def _lengths(x, name, batch_shape):
    if x is None:
        return None
    x = _as_array(x, name)
    b = int(np.prod(batch_shape, dtype=np.int64))
    if x.shape not in (tuple(batch_shape), (b,)) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array of shape [batch...] = {tuple(batch_shape)}, "
            f"got {x.dtype}{list(x.shape)}"
        )
    if not isinstance(x, jax.core.Tracer) and np.any(np.asarray(x) < 0):
        raise ValueError(f"{name} must be >= 0, got {np.asarray(x).tolist()}")
    return x.reshape(b).astype(jnp.int32)


def _segments(segment_ids, batch_shape, t, s):
    if segment_ids is None:
        return {}
    if isinstance(segment_ids, (tuple, list)):
        if len(segment_ids) != 2:
            raise ValueError(
                f"segment_ids must be an array or a (query_ids, kv_ids) pair, got {len(segment_ids)} items"
            )
        q_ids, kv_ids = (_as_array(x, "segment_ids") for x in segment_ids)
    else:
        q_ids = kv_ids = _as_array(segment_ids, "segment_ids")
        if t != s:
            raise ValueError(
                f"a single segment_ids array needs q_len == kv_len, got {t} and {s}; pass a (query_ids, kv_ids) pair"
            )
    b = int(np.prod(batch_shape, dtype=np.int64))
    out = []
    for ids, length in ((q_ids, t), (kv_ids, s)):
        want = (*batch_shape, length)
        if ids.shape not in (want, (b, length)) or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer arrays of shape {want}, got {ids.dtype}{list(ids.shape)}")
        out.append(ids.reshape(b, length))
    return {"q_ids": out[0], "kv_ids": out[1]}
