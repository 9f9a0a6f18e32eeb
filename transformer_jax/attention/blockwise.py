"""Memory-efficient attention: online softmax over key blocks (FlashAttention-2 style).

For each query block the forward pass walks the key blocks it can see, keeping a running
row max `m`, running sum `l` and a rescaled float32 accumulator, so the q_len x kv_len
score matrix is never built. The backward pass (a `jax.custom_vjp`) keeps only the
output and the per-row log-sum-exp and recomputes each block's scores, so forward plus
backward memory is O((q_len + kv_len) * head_dim), not O(q_len * kv_len).

Blocks that causal or local-window masking hides completely are skipped, by giving each
loop the block range [lo, hi) that can contribute (`masks.key_block_range`). Other masks
are evaluated per block; a dense bias or mask is sliced per block.

Written for one sequence and one head, like `reference.attend`; `batching.lift` maps it.
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.attention import masks



def default_block_sizes(is_causal: bool = False) -> tuple[int, int]:
    """(block_q, block_k) when the caller gives none.

    CPU: 512 x 512 without a causal mask, 256 x 256 with one. Measured forward+backward
    against 256 x 256, 256 x 512 and 512 x 256 at n = 2048-8192, d = 64 (benchmarks/RESULTS.md,
    "Blockwise vs torch SDPA"): larger blocks run the block products a little faster
    (2-4%), while causal attention pays for them in masked work on the diagonal blocks.
    Accelerators: 1024 x 1024, because every block is one step of a sequential loop and
    per-step overhead (kernel launches, loop predicate) dominates small blocks there;
    a guess, not yet measured on a GPU.
    """
    if jax.default_backend() != "cpu":
        return (1024, 1024)
    return (256, 256) if is_causal else (512, 512)


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a custom_vjp non-differentiable arg)."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    logits_soft_cap: float | None
    dropout_rate: float
    block_q: int
    block_k: int
    q_len: int  # unpadded lengths; keys at or beyond kv_len are padding
    kv_len: int
    precision: Any


def attend(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    bias: jax.Array | None,
    mask: jax.Array | None,
    seq: masks.SequenceInfo,
    seed: jax.Array | None,
    *,
    scale: float,
    is_causal: bool,
    window: tuple[int, int] | None,
    logits_soft_cap: float | None,
    dropout_rate: float,
    block_sizes: tuple[int, int] | None = None,
    precision=None,
) -> jax.Array:
    """Blockwise attention of one head of one sequence; same contract as `reference.attend`.

    Args:
      q: [T, d]; k, v: [S, d]. bias (float) / mask (bool): broadcastable to [T, S] or None.
      seq: lengths and full-length segment ids of this sequence. seed: uint32 [2] or None.
      block_sizes: (block_q, block_k), clipped to the sequence lengths; default
        `default_block_sizes(is_causal)`.
    Returns:
      out [T, d] in q's dtype and the per-row log-sum-exp [T] (`masks.lowest` on rows with
      nothing to attend to; not differentiated).
    """
    t, s = q.shape[0], k.shape[0]
    block_q, block_k = block_sizes or default_block_sizes(is_causal)
    block_q, block_k = min(block_q, t), min(block_k, s)
    t_pad, s_pad = -t % block_q, -s % block_k

    def pad(x, rows, cols=0):
        return None if x is None else jnp.pad(x, [(0, rows), (0, cols)][: x.ndim])

    # Dense operands are broadcast to [T, S] so blocks can be sliced from them.
    bias = None if bias is None else pad(jnp.broadcast_to(bias, (t, s)), t_pad, s_pad)
    mask = None if mask is None else pad(jnp.broadcast_to(mask, (t, s)), t_pad, s_pad)
    seq = seq._replace(q_ids=pad(seq.q_ids, t_pad), kv_ids=pad(seq.kv_ids, s_pad))
    config = _Config(scale, is_causal, window, logits_soft_cap, dropout_rate, block_q, block_k, t, s, precision)
    out, lse = _attention(config, pad(q, t_pad), pad(k, s_pad), pad(v, s_pad), bias, mask, seq, seed)
    return out[:t], lse[:t]


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, bias, mask, seq, seed):
    return _forward(config, q, k, v, bias, mask, seq, seed)[0]


def _stat(config_or_dtype):
    return masks.stat_dtype(config_or_dtype)


def _causal_only(config: _Config, mask, seq) -> bool:
    """Whether causality is the only mask: then a block is either wholly visible or on
    the diagonal, and only diagonal blocks need the per-element mask."""
    return (config.is_causal and config.window is None and mask is None and config.kv_len % config.block_k == 0
            and all(x is None for x in seq))


def _scores(config: _Config, q_blk, k_blk, bias, mask, seq, qi, kj, *, transposed=False, prescaled=False,
            masked=True):
    """Masked float32 logits of block (qi, kj), and tanh(logits / cap) for the backward.

    [bq, bk]; with `transposed`, [bk, bq] (keys along rows), the layout the backward wants.
    """
    bq, bk = config.block_q, config.block_k
    q0, k0 = qi * bq, kj * bk
    stat = _stat(q_blk.dtype)
    flip = (lambda x: x.T) if transposed else (lambda x: x)  # noqa: E731
    if transposed:
        s = jnp.einsum("kd,qd->kq", k_blk, q_blk, precision=config.precision, preferred_element_type=stat)
    else:
        s = jnp.einsum("qd,kd->qk", q_blk, k_blk, precision=config.precision, preferred_element_type=stat)
    if not prescaled:
        s = s * jnp.asarray(config.scale, stat)
    tanh = None
    if config.logits_soft_cap is not None:
        tanh = jnp.tanh(s / config.logits_soft_cap)
        s = config.logits_soft_cap * tanh
    if bias is not None:
        s = s + flip(jax.lax.dynamic_slice(bias, (q0, k0), (bq, bk))).astype(stat)
    if seq.q_ids is not None:
        seq = seq._replace(
            q_ids=jax.lax.dynamic_slice_in_dim(seq.q_ids, q0, bq),
            kv_ids=jax.lax.dynamic_slice_in_dim(seq.kv_ids, k0, bk),
        )
    dense = None if mask is None else jax.lax.dynamic_slice(mask, (q0, k0), (bq, bk))
    keep = None if not masked else masks.allowed(
        q0 + jnp.arange(bq, dtype=jnp.int32), k0 + jnp.arange(bk, dtype=jnp.int32), seq, dense,
        is_causal=config.is_causal, window=config.window,
        kv_total=config.kv_len if config.kv_len % bk else None,
    )
    if keep is not None:
        s = jnp.where(flip(keep), s, -jnp.inf)
    return s, tanh


def _dropout(config: _Config, seed, qi, kj):
    """This block's keep-mask: a function of absolute positions only (see masks.dropout_keep)."""
    q_pos = qi * config.block_q + jnp.arange(config.block_q, dtype=jnp.int32)
    k_pos = kj * config.block_k + jnp.arange(config.block_k, dtype=jnp.int32)
    return masks.dropout_keep(seed, q_pos, k_pos, config.dropout_rate)


def _forward(config: _Config, q, k, v, bias, mask, seq, seed):
    bq, bk = config.block_q, config.block_k
    num_q = q.shape[0] // bq
    stat = _stat(q.dtype)

    # Scaling the query block once saves a pass over every [bq, bk] block of logits; only
    # where q is already in the statistics dtype, so a 16-bit q is not rounded once more.
    prescaled = q.dtype == stat

    def query_block(qi):
        q_blk = jax.lax.dynamic_slice_in_dim(q, qi * bq, bq)
        if prescaled:
            q_blk = q_blk * jnp.asarray(config.scale, q.dtype)

        def key_step(kj, carry, masked=True):
            row_max, row_sum, acc = carry
            k_blk = jax.lax.dynamic_slice_in_dim(k, kj * bk, bk)
            v_blk = jax.lax.dynamic_slice_in_dim(v, kj * bk, bk)
            s, _ = _scores(config, q_blk, k_blk, bias, mask, seq, qi, kj, prescaled=prescaled, masked=masked)
            new_max = jnp.maximum(row_max, s.max(axis=-1))
            # Rows with nothing seen yet have max -inf: shift by 0 so exp() gives 0, not NaN.
            shift = jnp.where(jnp.isneginf(new_max), 0.0, new_max)
            p = jnp.exp(s - shift[:, None])
            rescale = jnp.exp(row_max - shift)
            row_sum = rescale * row_sum + p.sum(axis=-1)
            if seed is not None:
                p = jnp.where(_dropout(config, seed, qi, kj), p / (1.0 - config.dropout_rate), 0.0)
            pv = jnp.einsum(
                "qk,kd->qd", p.astype(v.dtype), v_blk,
                precision=config.precision, preferred_element_type=stat,
            )
            return new_max, row_sum, rescale[:, None] * acc + pv

        lo, hi = masks.key_block_range(
            qi, bq, bk, config.q_len, config.kv_len, is_causal=config.is_causal, window=config.window
        )
        lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)  # int32 block ids also under x64
        init = (jnp.full((bq,), -jnp.inf, stat), jnp.zeros((bq,), stat), jnp.zeros((bq, v.shape[1]), stat))
        if _causal_only(config, mask, seq):
            # Key blocks wholly at or left of the diagonal come first and need no mask.
            visible = jnp.clip((qi * bq + 1) // bk, lo, hi)
            carry = jax.lax.fori_loop(lo, visible, partial(key_step, masked=False), init)
            row_max, row_sum, acc = jax.lax.fori_loop(visible, hi, key_step, carry)
        else:
            row_max, row_sum, acc = jax.lax.fori_loop(lo, hi, key_step, init)
        empty = row_sum == 0.0  # nothing to attend to: output 0
        out = acc / jnp.where(empty, 1.0, row_sum)[:, None]
        lse = jnp.where(empty, masks.lowest(stat), row_max + jnp.log(jnp.where(empty, 1.0, row_sum)))
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(query_block, jnp.arange(num_q, dtype=jnp.int32))
    out, lse = out.reshape(q.shape[0], v.shape[1]), lse.reshape(q.shape[0])
    return (out, lse), (q, k, v, bias, mask, seq, seed, out, lse)


def _backward(config: _Config, residuals, cotangents):
    """FlashAttention-2's backward, with every block product in keys-major layout.

    For key block j the outer loop keeps dK_j, dV_j; the inner loop over query blocks i
    recomputes P_ij once and forms dP_ij, dS_ij = P_ij (dP_ij - D_i) from it. The blocks are
    built transposed ([bk, bq]) and dQ is accumulated transposed ([d, T]), so all five
    products (S^T = K Q^T, dP^T = V dO^T, dV += P^T dO, dK += dS^T Q, dQ^T += K^T dS^T)
    contract the lhs's last axis: XLA's CPU backend sends a product that contracts the
    leading axis of both operands to a generic dot at about half the speed (RESULTS.md,
    "Weight-gradient orientation").
    """
    q, k, v, bias, mask, seq, seed, out, lse = residuals
    d_out = cotangents[0]  # the log-sum-exp is returned as a residual, not differentiated
    bq, bk = config.block_q, config.block_k
    num_k = k.shape[0] // bk
    stat = _stat(q.dtype)
    # D_i = dO_i . O_i: the row term of the softmax Jacobian (FlashAttention-2, eq. for dS).
    # As a contraction, not sum(dO * O, -1): XLA's CPU reduction of a short last axis
    # costs ~10x more (2 ms against 0.2 at n = 8192, d = 64).
    delta = jnp.einsum("td,td->t", d_out.astype(stat), out.astype(stat), precision=config.precision)

    def key_block(carry, kj):
        k_blk = jax.lax.dynamic_slice_in_dim(k, kj * bk, bk)
        v_blk = jax.lax.dynamic_slice_in_dim(v, kj * bk, bk)
        k_blk_t = k_blk.T  # [d, bk], once per key block

        def query_step(qi, inner, masked=True):
            dk, dv, dq_t, d_bias_t = inner
            rows = lambda x: jax.lax.dynamic_slice_in_dim(x, qi * bq, bq)  # noqa: E731
            q_blk, do_blk = rows(q), rows(d_out)
            s, tanh = _scores(config, q_blk, k_blk, bias, mask, seq, qi, kj, transposed=True, masked=masked)  # [bk, bq]
            p = jnp.exp(s - rows(lse)[None, :])
            dp = jnp.einsum("kd,qd->kq", v_blk, do_blk, precision=config.precision, preferred_element_type=stat)
            p_used = p
            if seed is not None:
                keep = _dropout(config, seed, qi, kj).T
                p_used = jnp.where(keep, p / (1.0 - config.dropout_rate), 0.0)
                dp = jnp.where(keep, dp / (1.0 - config.dropout_rate), 0.0)
            dv = dv + jnp.einsum(
                "kq,qd->kd", p_used.astype(do_blk.dtype), do_blk,
                precision=config.precision, preferred_element_type=stat,
            )
            ds = p * (dp - rows(delta)[None, :])  # gradient w.r.t. the biased logits
            if d_bias_t is not None:
                d_bias_t = jax.lax.dynamic_update_slice(d_bias_t, ds, (kj * bk, qi * bq))
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = ds * jnp.asarray(config.scale, stat)
            dk = dk + jnp.einsum(
                "kq,qd->kd", ds.astype(q.dtype), q_blk, precision=config.precision, preferred_element_type=stat
            )
            dq_blk = jax.lax.dynamic_slice_in_dim(dq_t, qi * bq, bq, axis=1) + jnp.einsum(
                "dk,kq->dq", k_blk_t, ds.astype(k.dtype), precision=config.precision, preferred_element_type=stat
            )
            dq_t = jax.lax.dynamic_update_slice_in_dim(dq_t, dq_blk, qi * bq, axis=1)
            return dk, dv, dq_t, d_bias_t

        lo, hi = masks.query_block_range(
            kj, bq, bk, config.q_len, config.kv_len, is_causal=config.is_causal, window=config.window
        )
        lo, hi = jnp.asarray(lo, jnp.int32), jnp.asarray(hi, jnp.int32)
        dq_t, d_bias_t = carry
        zeros = jnp.zeros((bk, k.shape[1]), stat)
        inner = (zeros, zeros, dq_t, d_bias_t)
        if _causal_only(config, mask, seq):
            # Query blocks wholly at or below the diagonal come last and need no mask.
            visible = jnp.clip(-(-(kj * bk + bk - 1) // bq), lo, hi)
            inner = jax.lax.fori_loop(lo, visible, query_step, inner)
            dk, dv, dq_t, d_bias_t = jax.lax.fori_loop(visible, hi, partial(query_step, masked=False), inner)
        else:
            dk, dv, dq_t, d_bias_t = jax.lax.fori_loop(lo, hi, query_step, inner)
        return (dq_t, d_bias_t), (dk, dv)

    d_bias_t = None if bias is None else jnp.zeros(bias.shape[::-1], stat)
    init = (jnp.zeros(q.shape[::-1], stat), d_bias_t)
    (dq_t, d_bias_t), (dk, dv) = jax.lax.scan(key_block, init, jnp.arange(num_k, dtype=jnp.int32))
    dk, dv = dk.reshape(k.shape), dv.reshape(v.shape)
    d_bias = None if bias is None else d_bias_t.T.astype(bias.dtype)
    return dq_t.T.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), d_bias, None, None, None


_attention.defvjp(_forward, _backward)
