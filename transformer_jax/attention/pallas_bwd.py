"""Backward flash-attention kernels in Pallas (Triton lowering), FlashAttention-2 style.

Two kernels, no atomics: one program per key tile accumulates dK and dV over every query
tile (of every query head in its GQA group) that can see it; one program per query tile
accumulates dQ over its visible key tiles. Both recompute the probabilities from the
forward's log-sum-exp with the same `tile_logits`, so the two passes mask alike.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from transformer_jax.attention.pallas_fwd import (
    MaskSpec, cdiv, clamp_ranges, idiv, kv_tile_ranges, tile_logits, tile_loop,
)
from transformer_jax.attention.pallas_tuning import BlockSizes


def q_tile_ranges(k_start, block_k: int, block_q: int, q_len, kv_len, spec: MaskSpec):
    """Query tiles for the key tile [k_start, k_start + block_k): (lo, full_lo, full_hi, hi).

    The transpose of `pallas_fwd.kv_tile_ranges`: tiles outside [lo, hi) see none of these
    keys; tiles in [full_lo, full_hi) see all of them with every query.
    """
    lo, hi, full_hi = jnp.int32(0), cdiv(q_len, block_q), idiv(q_len, block_q)
    full_lo = lo
    if spec.right is not None:  # queries i >= j - right
        lo = idiv(jnp.maximum(k_start - spec.right, 0), block_q)
        full_lo = cdiv(jnp.maximum(k_start + block_k - 1 - spec.right, 0), block_q)
    if spec.left is not None:  # queries i <= j + left
        hi = jnp.minimum(hi, cdiv(jnp.maximum(k_start + block_k + spec.left, 0), block_q))
        full_hi = jnp.minimum(full_hi, idiv(jnp.maximum(k_start + spec.left + 1, 0), block_q))
    hi = jnp.where(k_start < kv_len, hi, lo)
    if spec.has_segments:
        full_hi = lo
    full_hi = jnp.where(k_start + block_k <= kv_len, full_hi, lo)  # keys past kv_len need the mask
    return clamp_ranges(lo, full_lo, full_hi, hi)


def _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, q_len, kv_len, q_seg, kv_seg,
                       spec: MaskSpec, masked: bool):
    """p = softmax probabilities [bq, bk] and dL/d(scaled q.k) [bq, bk], both float32."""
    s, t = tile_logits(q, k, q_start, k_start, q_len, kv_len, q_seg, kv_seg, spec, masked)
    p = jnp.exp2(s - lse[:, None])  # 0 where masked, and on fully masked rows (lse = +inf)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    if spec.soft_cap is not None:
        ds = ds * (1.0 - t * t)  # d/dx cap * tanh(x / cap)
    return p, ds


def _dkdv_kernel(q_lens_ref, kv_lens_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, spec: MaskSpec, block_q: int):
    # q_ref/do_ref: [Lq, group, d] and lse_ref/delta_ref: [group, Lq], all query heads that
    # share this program's K/V head; k_ref/v_ref: one [bk, d] key tile.
    block_k = k_ref.shape[0]
    k_start = pl.program_id(0) * block_k
    q_len, kv_len = q_lens_ref[()], kv_lens_ref[()]
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if spec.has_segments else None
    ranges = q_tile_ranges(k_start, block_k, block_q, q_len, kv_len, spec)

    def body(i, carry, masked, head):
        dk, dv = carry
        q_start = i * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        q_seg = q_seg_ref[rows] if spec.has_segments else None
        p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[head, rows], delta_ref[head, rows], q_start,
                                   k_start, q_len, kv_len, q_seg, kv_seg, spec, masked)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    carry = (zeros, zeros)
    for head in range(q_ref.shape[1]):  # static: a GQA group is a handful of heads
        carry = tile_loop(ranges, functools.partial(body, head=head), carry)
    dk, dv = carry
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_lens_ref, kv_lens_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, spec: MaskSpec, block_k: int):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q_len, kv_len = q_lens_ref[()], kv_lens_ref[()]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if spec.has_segments else None

    def body(j, dq, masked):
        k_start = j * block_k
        cols = pl.ds(k_start, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        kv_seg = kv_seg_ref[cols] if spec.has_segments else None
        _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, q_len, kv_len,
                                   q_seg, kv_seg, spec, masked)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    ranges = kv_tile_ranges(q_start, block_q, block_k, q_len, kv_len, spec)
    dq = tile_loop(ranges, body, jnp.zeros(q_ref.shape, jnp.float32))
    dq_ref[...] = (dq * spec.scale).astype(dq_ref.dtype)


@functools.partial(jax.jit, static_argnames=("spec", "blocks", "interpret"))
def backward(q, k, v, out, lse, do, q_lens, kv_lens, q_seg, kv_seg, *, spec: MaskSpec,
             blocks: BlockSizes, interpret: bool):
    """Gradients of the fused attention w.r.t. q, k, v, on padded inputs.

    Shapes as in `pallas_fwd.forward`; out, do: [b, Lq, hq, d]; lse: [b, hq, Lq] float32.
    Returns dq [b, Lq, hq, d], dk and dv [b, Lk, hkv, d], in the dtypes of q, k, v.
    """
    batch, q_len, heads, head_dim = q.shape
    kv_len, kv_heads = k.shape[1], k.shape[2]
    group = heads // kv_heads
    # delta_i = sum_j p_ij dp_ij = do_i . o_i: a cheap reduction XLA fuses on its own.
    delta = jnp.einsum("bqhd,bqhd->bhq", out.astype(jnp.float32), do.astype(jnp.float32))
    operands = (q_lens, kv_lens, q_seg, kv_seg, q, k, v, do, lse, delta)
    per_batch = pl.BlockSpec((None,), lambda i, b, h: (b,))
    segments = spec.has_segments

    # dK/dV: grid over key tiles and K/V heads; each program streams all query tiles of
    # the query heads in its group, so dK/dV are written once, never as per-head partials.
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    q_group = pl.BlockSpec((None, q_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))
    rows_group = pl.BlockSpec((None, group, q_len), lambda j, b, h: (b, h, 0))
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec, block_q=bq),
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        grid=(kv_len // bk, batch, kv_heads),
        in_specs=[
            per_batch, per_batch,
            pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)) if segments else None,
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)) if segments else None,
            q_group, kv_tile, kv_tile, q_group, rows_group, rows_group,
        ],
        out_specs=[kv_tile, kv_tile],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_bwd,
                                             num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*operands)

    # dQ: grid over query tiles; each program streams the visible key tiles.
    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    q_tile = pl.BlockSpec((None, bq, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_full = pl.BlockSpec((None, kv_len, None, head_dim), lambda i, b, h: (b, 0, h // group, 0))
    row_tile = pl.BlockSpec((None, None, bq), lambda i, b, h: (b, h, i))
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, spec=spec, block_k=bk),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        grid=(q_len // bq, batch, heads),
        in_specs=[
            per_batch, per_batch,
            pl.BlockSpec((None, bq), lambda i, b, h: (b, i)) if segments else None,
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)) if segments else None,
            q_tile, kv_full, kv_full, q_tile, row_tile, row_tile,
        ],
        out_specs=q_tile,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_bwd,
                                             num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="flash_attention_dq",
    )(*operands)
    return dq, dk, dv
