"""Backward flash-attention kernels in Pallas (Triton lowering), FlashAttention-2 style.

Two kernels, no atomics: one program per key tile accumulates dK and dV over the query
tiles that can see it; one program per query tile accumulates dQ over its visible key
tiles. Both recompute the probabilities from the forward's log-sum-exp with the same
`tile_logits`, so the masks of the two passes cannot drift apart.

With GQA the dK/dV kernel runs per query head and writes float32 partials that are summed
over each group afterwards (K/V themselves are never repeated in memory).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from transformer_jax.attention.pallas_fwd import MaskSpec, cdiv, kv_block_range, tile_logits
from transformer_jax.attention.pallas_tuning import BlockSizes


def _q_block_range(k_start, block_k: int, block_q: int, q_len, kv_len, spec: MaskSpec):
    """[lo, hi) of the query tiles that can see the key tile [k_start, k_start + block_k)."""
    lo = jnp.int32(0)
    hi = cdiv(q_len, block_q)
    if spec.right is not None:
        lo = lax.div(jnp.maximum(k_start - spec.right, 0), block_q)
    if spec.left is not None:
        hi = jnp.minimum(hi, cdiv(jnp.maximum(k_start + block_k + spec.left, 0), block_q))
    hi = jnp.where(k_start < kv_len, hi, lo)
    return lo, jnp.maximum(lo, hi)


def _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, q_len, kv_len, q_seg, kv_seg,
                       spec: MaskSpec):
    """p = softmax probabilities [bq, bk] and dL/d(scaled q.k) [bq, bk], both float32."""
    s, t = tile_logits(q, k, q_start, k_start, q_len, kv_len, q_seg, kv_seg, spec)
    p = jnp.exp2(s - lse[:, None])  # 0 where masked, and on fully masked rows (lse = +inf)
    dp = plgpu.dot(do, v, trans_b=True)
    ds = p * (dp - delta[:, None])
    if spec.soft_cap is not None:
        ds = ds * (1.0 - t * t)  # d/dx cap * tanh(x / cap)
    return p, ds


def _dkdv_kernel(q_lens_ref, kv_lens_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref,
                 lse_ref, delta_ref, dk_ref, dv_ref, *, spec: MaskSpec, block_q: int):
    block_k = k_ref.shape[0]
    k_start = pl.program_id(0) * block_k
    q_len, kv_len = q_lens_ref[()], kv_lens_ref[()]
    k, v = k_ref[...], v_ref[...]
    kv_seg = kv_seg_ref[...] if spec.has_segments else None

    def body(i, carry):
        dk, dv = carry
        q_start = i * block_q
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        q_seg = q_seg_ref[rows] if spec.has_segments else None
        p, ds = _probs_and_dlogits(q, k, v, do, lse_ref[rows], delta_ref[rows], q_start, k_start,
                                   q_len, kv_len, q_seg, kv_seg, spec)
        dv = dv + plgpu.dot(p.astype(do.dtype), do, trans_a=True)
        dk = dk + plgpu.dot(ds.astype(q.dtype), q, trans_a=True)
        return dk, dv

    lo, hi = _q_block_range(k_start, block_k, block_q, q_len, kv_len, spec)
    zeros = jnp.zeros(k_ref.shape, jnp.float32)
    dk, dv = lax.fori_loop(lo, hi, body, (zeros, zeros))
    dk_ref[...] = (dk * spec.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_lens_ref, kv_lens_ref, q_seg_ref, kv_seg_ref, q_ref, k_ref, v_ref, do_ref,
               lse_ref, delta_ref, dq_ref, *, spec: MaskSpec, block_k: int):
    block_q = q_ref.shape[0]
    q_start = pl.program_id(0) * block_q
    q_len, kv_len = q_lens_ref[()], kv_lens_ref[()]
    q, do, lse, delta = q_ref[...], do_ref[...], lse_ref[...], delta_ref[...]
    q_seg = q_seg_ref[...] if spec.has_segments else None

    def body(j, dq):
        k_start = j * block_k
        cols = pl.ds(k_start, block_k)
        k, v = k_ref[cols, :], v_ref[cols, :]
        kv_seg = kv_seg_ref[cols] if spec.has_segments else None
        _, ds = _probs_and_dlogits(q, k, v, do, lse, delta, q_start, k_start, q_len, kv_len,
                                   q_seg, kv_seg, spec)
        return dq + plgpu.dot(ds.astype(k.dtype), k)

    lo, hi = kv_block_range(q_start, block_q, block_k, q_len, kv_len, spec)
    dq = lax.fori_loop(lo, hi, body, jnp.zeros(q_ref.shape, jnp.float32))
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

    # dK/dV: grid over key tiles; each program streams all query tiles of one query head.
    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    q_full = pl.BlockSpec((None, q_len, None, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_tile = pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h // group, 0))
    row_full = pl.BlockSpec((None, None, q_len), lambda j, b, h: (b, h, 0))
    partial_dtype = k.dtype if group == 1 else jnp.float32  # sum GQA partials in float32
    dk, dv = pl.pallas_call(
        functools.partial(_dkdv_kernel, spec=spec, block_q=bq),
        out_shape=[
            jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), partial_dtype),
            jax.ShapeDtypeStruct((batch, kv_len, heads, head_dim), partial_dtype),
        ],
        grid=(kv_len // bk, batch, heads),
        in_specs=[
            per_batch, per_batch,
            pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)) if segments else None,
            pl.BlockSpec((None, bk), lambda j, b, h: (b, j)) if segments else None,
            q_full, kv_tile, kv_tile, q_full, row_full, row_full,
        ],
        out_specs=[pl.BlockSpec((None, bk, None, head_dim), lambda j, b, h: (b, j, h, 0))] * 2,
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps_bwd,
                                             num_stages=blocks.num_stages_bwd),
        interpret=interpret,
        name="flash_attention_dkdv",
    )(*operands)
    if group > 1:
        dk = dk.reshape(batch, kv_len, kv_heads, group, head_dim).sum(3).astype(k.dtype)
        dv = dv.reshape(batch, kv_len, kv_heads, group, head_dim).sum(3).astype(v.dtype)

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
