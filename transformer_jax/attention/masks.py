"""Structured attention masks, evaluated on any block of (query, key) positions.

Every implementation builds its mask from these functions, so the full n x m mask is
never materialised unless the block is the whole matrix (the reference).
Positions are absolute indices into the unpadded sequences.

Semantics follow `jax.nn.dot_product_attention` when query and key lengths differ:
causal means key j <= query i (top-left aligned), and a local window (left, right)
allows i - left <= j <= i + right.
"""
from __future__ import annotations

from functools import reduce
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np


def stat_dtype(dtype) -> np.dtype:
    """The real dtype softmax statistics are kept in for inputs of `dtype`: float32 for
    16-bit and 32-bit inputs, float64 for float64 (as jax.nn's logits), the real part's
    dtype for complex inputs."""
    return jnp.finfo(jnp.promote_types(dtype, jnp.float32)).dtype


def lowest(dtype) -> float:
    """The most negative finite value of `dtype`: stands in for -inf (log 0) wherever an
    infinity would trip `jax_debug_infs`."""
    return float(jnp.finfo(dtype).min)


class SequenceInfo(NamedTuple):
    """Per-sequence masking data, for one batch element (any field may be None).

    q_len, kv_len: int32 scalars, the number of real query / key tokens.
    q_ids: int [q_len_total] segment ids of the queries; kv_ids: int [kv_len_total].
    """

    q_len: jax.Array | None = None
    kv_len: jax.Array | None = None
    q_ids: jax.Array | None = None
    kv_ids: jax.Array | None = None


def allowed(
    q_pos: jax.Array,
    k_pos: jax.Array,
    seq: SequenceInfo,
    dense: jax.Array | None,
    *,
    is_causal: bool,
    window: tuple[int, int] | None,
    kv_total: int | None = None,
) -> jax.Array | None:
    """Which (query, key) pairs of a block may attend.

    Args:
      q_pos: int [bq] query positions; k_pos: int [bk] key positions.
      seq: masking data with q_ids/kv_ids already sliced to this block ([bq], [bk]).
      dense: bool [bq, bk] (or broadcastable) user mask for this block, or None.
      is_causal, window: as in `dot_product_attention`.
      kv_total: if given, keys at positions >= kv_total are padding and masked.
    Returns:
      bool [bq, bk], True = attend; None if nothing is masked.
    """
    qp, kp = q_pos[:, None], k_pos[None, :]
    conds = []
    if is_causal:
        conds.append(kp <= qp)
    if window is not None:
        left, right = window
        conds += [kp >= qp - left, kp <= qp + right]
    if seq.q_len is not None:
        conds.append(qp < seq.q_len)
    if seq.kv_len is not None:
        conds.append(kp < seq.kv_len)
    if kv_total is not None:
        conds.append(kp < kv_total)
    if seq.q_ids is not None:
        conds.append(seq.q_ids[:, None] == seq.kv_ids[None, :])
    if dense is not None:
        conds.append(dense)
    if not conds:
        return None
    return jnp.broadcast_to(reduce(jnp.logical_and, conds), (q_pos.size, k_pos.size))


def key_block_range(q_block, block_q, block_k, q_len, kv_len, *, is_causal, window):
    """[lo, hi) of the key blocks that query block `q_block` can see at all.

    q_len, kv_len: the unpadded lengths (static ints), so padding rows add no blocks.
    """
    num_k_blocks = -(-kv_len // block_k)
    lo, hi = 0, num_k_blocks
    first_q = q_block * block_q
    last_q = jnp.minimum(first_q + block_q, q_len) - 1
    right = _right_reach(is_causal, window)
    if right is not None:
        hi = jnp.clip((last_q + right) // block_k + 1, 0, num_k_blocks)
    if window is not None:
        first_k = first_q - window[0]  # may lie in the padding: then nothing is visible
        lo = jnp.where(first_k >= kv_len, num_k_blocks, jnp.clip(first_k // block_k, 0, num_k_blocks))
    return lo, hi


def query_block_range(k_block, block_q, block_k, q_len, kv_len, *, is_causal, window):
    """[lo, hi) of the query blocks that can see key block `k_block` at all."""
    num_q_blocks = -(-q_len // block_q)
    lo, hi = 0, num_q_blocks
    first_k = k_block * block_k
    last_k = jnp.minimum(first_k + block_k, kv_len) - 1
    right = _right_reach(is_causal, window)
    if right is not None:
        first_q = first_k - right  # may lie in the padding: then nothing is visible
        lo = jnp.where(first_q >= q_len, num_q_blocks, jnp.clip(first_q // block_q, 0, num_q_blocks))
    if window is not None:
        hi = jnp.clip((last_k + window[0]) // block_q + 1, 0, num_q_blocks)
    return lo, hi


def _right_reach(is_causal, window):
    """How far right of the diagonal a query may look (None: unbounded)."""
    reaches = ([0] if is_causal else []) + ([window[1]] if window is not None else [])
    return min(reaches) if reaches else None


def _mix32(x: jax.Array) -> jax.Array:
    """A 32-bit integer finaliser (lowbias32): every input bit affects every output bit."""
    x = x ^ (x >> 16)
    x = x * jnp.uint32(0x7FEB352D)
    x = x ^ (x >> 15)
    x = x * jnp.uint32(0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(seed: jax.Array, q_pos: jax.Array, k_pos: jax.Array, rate: float) -> jax.Array:
    """Dropout keep-mask for a block: a pure hash of (seed, query position, key position).

    Because each bit depends only on its absolute position, the mask is the same however
    the matrix is cut into blocks, so the blockwise backward pass regenerates exactly the
    forward's mask and every implementation drops the same entries for the same seed.

    Args:
      seed: uint32 [2]; q_pos: int [bq]; k_pos: int [bk]; rate: drop probability in [0, 1).
    Returns:
      bool [bq, bk], True = keep (probability 1 - rate).
    """
    row = _mix32(q_pos.astype(jnp.uint32) ^ seed[0])
    bits = _mix32(_mix32(row[:, None] ^ k_pos.astype(jnp.uint32)[None, :]) + seed[1])
    threshold = min(int(round((1.0 - rate) * 2.0**32)), 2**32 - 1)
    return bits < jnp.uint32(threshold)
