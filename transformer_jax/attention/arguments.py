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

    query [B, T, N, d]; key, value [B, S, K, d]; bias/mask [B|1, N|1, T|1, S|1] or None;
    seq: lengths [B] int32 and segment ids [B, T], [B, S] (fields may be None);
    dropout_rng: a PRNG key when dropout is active, else None.
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


def normalise(
    query, key, value, bias, mask, *, scale, is_causal, query_seq_lengths, key_value_seq_lengths,
    local_window_size, segment_ids, block_sizes, logits_soft_cap, dropout_rng, dropout_rate,
    broadcast_dropout, deterministic, dtype, precision,
) -> tuple[Operands, Options, bool]:
    """Validate every argument; return (operands, options, unbatched).

    `unbatched` is True when query/key/value came without a batch dimension ([T, N, d]),
    in which case the operands carry a batch of 1 and the caller must drop it again.
    """
    query, key, value = (_as_array(x, name) for x, name in ((query, "query"), (key, "key"), (value, "value")))
    if query.ndim not in (3, 4) or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(
            "query, key and value must all be [batch, seq, heads, head_dim] (or all [seq, heads, head_dim]); "
            f"got query {query.shape}, key {key.shape}, value {value.shape}"
        )
    unbatched = query.ndim == 3
    if unbatched:
        query, key, value = query[None], key[None], value[None]
    if dtype is not None:
        query, key, value = (x.astype(dtype) for x in (query, key, value))
    for x, name in ((query, "query"), (key, "key"), (value, "value")):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            raise TypeError(f"{name} must have a floating dtype, got {x.dtype}")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value must share one dtype, got {query.dtype}, {key.dtype}, {value.dtype}"
        )

    b, t, n, d = query.shape
    _, s, kv_heads, _ = key.shape
    if value.shape != key.shape:
        raise ValueError(f"value must have key's shape {key.shape}, got {value.shape}")
    if key.shape[0] != b:
        raise ValueError(f"key batch size must equal query's ({b}), got key shape {key.shape}")
    if key.shape[3] != d:
        raise ValueError(f"key head_dim must equal query's ({d}), got key shape {key.shape}")
    if t == 0 or s == 0 or d == 0:
        raise ValueError(f"q_len, kv_len and head_dim must be >= 1, got query {query.shape}, key {key.shape}")
    if kv_heads == 0 or n % kv_heads != 0:
        raise ValueError(
            f"key/value heads ({kv_heads}) must divide query heads ({n}); "
            f"got query {query.shape}, key {key.shape}"
        )

    bias = _pairwise(bias, "bias", (b, n, t, s), unbatched)
    mask = _pairwise(mask, "mask", (b, n, t, s), unbatched)
    if bias is not None and not jnp.issubdtype(bias.dtype, jnp.floating):
        raise TypeError(f"bias must have a floating dtype, got {bias.dtype}")
    if mask is not None and mask.dtype != jnp.bool_:
        # flax's make_causal_mask / combine_masks produce float masks: nonzero = attend.
        if not jnp.issubdtype(mask.dtype, jnp.number):
            raise TypeError(f"mask must be boolean (True = attend) or numeric, got dtype {mask.dtype}")
        mask = mask != 0

    seq = SequenceInfo(
        q_len=_lengths(query_seq_lengths, "query_seq_lengths", b, unbatched),
        kv_len=_lengths(key_value_seq_lengths, "key_value_seq_lengths", b, unbatched),
        **_segments(segment_ids, b, t, s, unbatched),
    )

    if scale is None:
        scale = 1.0 / float(np.sqrt(d))
    elif not isinstance(scale, (int, float)) or isinstance(scale, bool):
        raise TypeError(f"scale must be a Python float or None, got {scale!r}")
    if logits_soft_cap is not None and (
        not isinstance(logits_soft_cap, (int, float)) or not logits_soft_cap > 0
    ):
        raise ValueError(f"logits_soft_cap must be a positive float or None, got {logits_soft_cap!r}")
    if not isinstance(dropout_rate, (int, float)) or not 0.0 <= dropout_rate < 1.0:
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
        scale=float(scale),
        is_causal=_flag(is_causal, "is_causal"),
        window=_pair(local_window_size, "local_window_size", minimum=0),
        logits_soft_cap=None if logits_soft_cap is None else float(logits_soft_cap),
        dropout_rate=active_dropout,
        broadcast_dropout=_flag(broadcast_dropout, "broadcast_dropout"),
        block_sizes=_block_sizes(block_sizes),
        precision=precision,
    )
    operands = Operands(query, key, value, bias, mask, seq, dropout_rng if active_dropout else None)
    return operands, options, unbatched


def _as_array(x, name):
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        try:
            x = jnp.asarray(x)
        except TypeError as e:
            raise TypeError(f"{name} must be an array, got {type(x).__name__}") from e
    return x


def _flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be a Python bool, got {x!r}")
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


def _pairwise(x, name, full, unbatched):
    """A bias/mask: 4-D (3-D for unbatched calls), each dim 1 or the full size."""
    if x is None:
        return None
    x = _as_array(x, name)
    if unbatched and x.ndim == 3:
        x = x[None]
    while x.ndim < 4:  # jax.nn accepts lower-rank masks broadcast from the right
        x = x[None]
    if x.ndim != 4 or any(got not in (1, want) for got, want in zip(x.shape, full)):
        raise ValueError(
            f"{name} must be broadcastable to [batch, heads, q_len, kv_len] = {full} "
            f"(each dim 1 or full), got shape {x.shape}"
        )
    return x


def _lengths(x, name, b, unbatched):
    if x is None:
        return None
    x = _as_array(x, name)
    if unbatched and x.ndim == 0:
        x = x[None]
    if x.shape != (b,) or not jnp.issubdtype(x.dtype, jnp.integer):
        raise ValueError(f"{name} must be an integer array of shape [batch] = ({b},), got {x.dtype}{list(x.shape)}")
    return x.astype(jnp.int32)


def _segments(segment_ids, b, t, s, unbatched):
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
    if unbatched:
        q_ids, kv_ids = q_ids[None], kv_ids[None]
    for ids, want in ((q_ids, (b, t)), (kv_ids, (b, s))):
        if ids.shape != want or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integer arrays of shape {want}, got {ids.dtype}{list(ids.shape)}")
    return {"q_ids": q_ids, "kv_ids": kv_ids}
