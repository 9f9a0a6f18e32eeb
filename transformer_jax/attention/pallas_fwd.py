"""Forward flash-attention kernel in Pallas (Triton lowering), and the tile machinery the
backward reuses: the logits of a tile (`tile_logits`), which tiles a program visits and
which of them need the mask (`kv_tile_ranges`, `tile_loop`).

Inputs arrive padded: sequence lengths are multiples of every tile, and per-batch lengths
(`q_lens`, `kv_lens`) mark the real positions, so loads never go out of bounds and padding
is just another mask. Logits are kept in log2 units (scaled by log2(e)) so the softmax uses
exp2, which is what the hardware computes natively.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from transformer_jax.attention.pallas_tuning import BlockSizes

LOG2_E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the logits: scale, soft-cap and the structured mask.

    Query i may attend key j iff i < q_len, j < kv_len, i - left <= j <= i + right (a bound
    of None is unbounded; causal is right = 0) and, with segments, their ids are equal.
    """

    scale: float
    left: int | None
    right: int | None
    soft_cap: float | None
    has_segments: bool


def tile_logits(q, k, q_start, k_start, q_len, kv_len, q_seg, kv_seg, spec: MaskSpec, masked: bool):
    """Logits of one tile, in log2 units.

    q: [bq, d], k: [bk, d] (input dtype); q_start/k_start: first positions of the tile;
    q_seg [bq] / kv_seg [bk]: int32 ids or None. `masked=False` is for tiles known to be
    fully visible, where the mask would be all True. Returns (s2, t): s2 [bq, bk] float32,
    -inf where masked, and t = tanh(logits / cap) (for the soft-cap derivative) or None.
    """
    if spec.soft_cap is None:
        s = plgpu.dot(q, k, trans_b=True) * (spec.scale * LOG2_E)
        t = None
    else:
        t = jnp.tanh(plgpu.dot(q, k, trans_b=True) * (spec.scale / spec.soft_cap))
        s = t * (spec.soft_cap * LOG2_E)
    if not masked:
        return s, t
    q_pos = (q_start + jnp.arange(q.shape[0], dtype=jnp.int32))[:, None]
    k_pos = (k_start + jnp.arange(k.shape[0], dtype=jnp.int32))[None, :]
    mask = (q_pos < q_len) & (k_pos < kv_len)
    if spec.left is not None:
        mask &= k_pos >= q_pos - spec.left
    if spec.right is not None:
        mask &= k_pos <= q_pos + spec.right
    if spec.has_segments:
        mask &= q_seg[:, None] == kv_seg[None, :]
    return jnp.where(mask, s, -jnp.inf), t


def cdiv(a, b: int):
    """Ceil division of a non-negative traced int32 by a static int (// does not lower here)."""
    return idiv(a + (b - 1), b)


def idiv(a, b: int):
    """lax.div of an int32 by a static int, typed int32 (a Python int is int64 under x64)."""
    return lax.div(a, jnp.asarray(b, jnp.int32))


def kv_tile_ranges(q_start, block_q: int, block_k: int, q_len, kv_len, spec: MaskSpec):
    """Key tiles for the query tile [q_start, q_start + block_q): (lo, full_lo, full_hi, hi).

    Tiles outside [lo, hi) hold no visible key and are skipped (the causal / window band,
    keys past kv_len, everything when the query tile is past q_len). Tiles in
    [full_lo, full_hi) are visible to every query of the tile and skip the mask.
    """
    lo, hi, full_hi = jnp.int32(0), cdiv(kv_len, block_k), idiv(kv_len, block_k)
    full_lo = lo
    if spec.left is not None:  # keys j >= i - left
        lo = idiv(jnp.maximum(q_start - spec.left, 0), block_k)
        full_lo = cdiv(jnp.maximum(q_start + block_q - 1 - spec.left, 0), block_k)
    if spec.right is not None:  # keys j <= i + right
        hi = jnp.minimum(hi, cdiv(jnp.maximum(q_start + block_q + spec.right, 0), block_k))
        full_hi = jnp.minimum(full_hi, idiv(jnp.maximum(q_start + spec.right + 1, 0), block_k))
    hi = jnp.where(q_start < q_len, hi, lo)
    if spec.has_segments:  # ids can mask any pair
        full_hi = lo
    full_hi = jnp.where(q_start + block_q <= q_len, full_hi, lo)  # rows past q_len need the mask
    return clamp_ranges(lo, full_lo, full_hi, hi)


def clamp_ranges(lo, full_lo, full_hi, hi):
    """Clamps the bounds into lo <= full_lo <= full_hi <= hi (an empty middle if need be)."""
    hi = jnp.maximum(lo, hi)
    full_lo = jnp.clip(full_lo, lo, hi)
    return lo, full_lo, jnp.clip(full_hi, full_lo, hi), hi


def tile_loop(ranges, body, carry):
    """Runs body(tile, carry, masked=...) over [lo, hi): masked at the edges, unmasked inside."""
    lo, full_lo, full_hi, hi = ranges
    carry = lax.fori_loop(lo, full_lo, functools.partial(body, masked=True), carry)
    carry = lax.fori_loop(full_lo, full_hi, functools.partial(body, masked=False), carry)
    return lax.fori_loop(full_hi, hi, functools.partial(body, masked=True), carry)


def _forward_kernel(q_lens_ref, kv_lens_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref,
                    o_ref, lse_ref, *, spec: MaskSpec, block_k: int):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q_len, kv_len = q_lens_ref[()], kv_lens_ref[()]
    q = q_ref[...]
    q_seg = q_seg_ref[...] if spec.has_segments else None

    def body(j, carry, masked):
        acc, m, l = carry
        k_start = j * block_k
        k = k_ref[pl.ds(k_start, block_k), :]
        v = v_ref[pl.ds(k_start, block_k), :]
        kv_seg = kv_seg_ref[pl.ds(k_start, block_k)] if spec.has_segments else None
        s, _ = tile_logits(q, k, q_start, k_start, q_len, kv_len, q_seg, kv_seg, spec, masked)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        # A row with nothing visible yet keeps m = -inf; shift by 0 there so that
        # exp2(-inf - (-inf)) never produces a NaN.
        shift = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp2(s - shift[:, None])
        alpha = jnp.exp2(m - shift)
        l = alpha * l + jnp.sum(p, axis=1)
        acc = alpha[:, None] * acc + plgpu.dot(p.astype(v.dtype), v)
        return acc, m_new, l

    ranges = kv_tile_ranges(q_start, block_q, block_k, q_len, kv_len, spec)
    init = (
        jnp.zeros(q_ref.shape, jnp.float32),
        jnp.full((block_q,), -jnp.inf, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    acc, m, l = tile_loop(ranges, body, init)
    empty = l == 0.0  # fully masked rows: output 0, lse +inf so the backward sees p = 0
    o_ref[...] = (acc / jnp.where(empty, 1.0, l)[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(jnp.where(empty, 1.0, l)))


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def forward(q, k, v, q_lens, kv_lens, q_seg, kv_seg, *, spec: MaskSpec, blocks: BlockSizes,
            interpret: bool):
    """Fused attention forward on padded inputs.

    q: [b, Lq, hq, d]; k, v: [b, Lk, hkv, d] with hq % hkv == 0, Lq % block_q == 0,
    Lk % block_k == 0; q_lens, kv_lens: [b] int32; q_seg [b, Lq] / kv_seg [b, Lk] int32 or
    None. Returns out [b, Lq, hq, d] (q.dtype) and lse [b, hq, Lq] float32 (log2 units,
    +inf on fully masked rows).
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, group = k.shape[1], heads // k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    per_batch = pl.BlockSpec((None,), lambda i, b, h: (b,))
    in_specs = [
        per_batch,
        per_batch,
        pl.BlockSpec((None, bq), lambda i, b, h: (b, i)) if spec.has_segments else None,
        pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)) if spec.has_segments else None,
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        # GQA: each query head reads its group's K/V head; K/V are never repeated.
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
        pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0)),
        pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct(q.shape, q.dtype),
        jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32),
    ]
    return pl.pallas_call(
        functools.partial(_forward_kernel, spec=spec, block_k=bk),
        out_shape=out_shape,
        grid=(q_len // bq, batch, heads),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages),
        interpret=interpret,
        name="flash_attention_forward",
    )(q_lens, kv_lens, q_seg, kv_seg, q, k, v)
