"""The textbook attention, softmax(q k^T * scale + bias) v, for one sequence and one head.

O(q_len * kv_len) memory: the whole score matrix is built. It is the yardstick the other
implementations are tested against, and the fastest choice for small score matrices
(KV-cache decoding, short sequences). `batching.lift` maps it over heads and batch.

The backward pass is written out (`jax.custom_vjp`) rather than derived by autodiff from
the forward's `exp / sum`: with the probabilities P = exp(...) * (1 / sum) saved as their
two factors (the forward divides the [T, d] output, not the [T, S] matrix), the gradient is
dS = P * (dP - rowsum(dO * O)), whose row term is a reduction over head_dim instead of
the kv_len-long reductions and mask selects autodiff emits for the normalisation. It is
the same O(n^2) algorithm and exact (not the online softmax of `blockwise`).
Complex inputs (supported, as in jax.nn's XLA path: softmax of the real part of q.k)
are differentiated by autodiff through the same forward.

Causal attention of 128 to 255 queries is computed in two row blocks of queries, each
against only the keys its last row may see (`causal_row_blocks`): a quarter of the score
matrix less to build; at T = 128, 27% less CPU time forward+backward, and a `small`
training step 5% cheaper (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import dataclasses
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp

from transformer_jax.attention import masks


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one call (hashable: a custom_vjp non-differentiable arg)."""

    scale: float
    is_causal: bool
    window: tuple[int, int] | None
    logits_soft_cap: float | None
    dropout_rate: float
    precision: Any
    q_offset: int = 0  # position of the first query row (a causal row block's start)


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
    precision=None,
) -> tuple[jax.Array, jax.Array]:
    """Attention of one head of one sequence.

    Args:
      q: [T, d]; k, v: [S, d] (same floating or complex dtype).
      bias: float, broadcastable to [T, S], or None. mask: bool, broadcastable to [T, S].
      seq: sequence lengths / segment ids of this sequence (full length ids).
      seed: uint32 [2] dropout seed, or None for no dropout.
    Returns:
      out [T, d] in q's dtype (rows with nothing to attend to are zero) and the log-sum-exp
      of each row's logits [T] in `masks.stat_dtype` (`masks.lowest` on empty rows), not
      differentiated.
    """
    config = _Config(scale, is_causal, window, logits_soft_cap, dropout_rate, precision)
    if jnp.iscomplexobj(q):
        out, lse, _ = _forward(config, q, k, v, bias, mask, seq, seed)
        return out.astype(q.dtype), jax.lax.stop_gradient(lse)  # autodiff through the forward
    blocks = tuple(causal_row_blocks(q.shape[0])) if is_causal else ((0, q.shape[0]),)
    if len(blocks) == 1:
        return _attention(config, q, k, v, bias, mask, seq, seed)
    # query i sees keys 0..i (top-left aligned): the rows before `stop` see the keys before it
    key_spans = tuple((0, min(stop, k.shape[0])) for _, stop in blocks)
    outs, lses = [], []
    for (start, stop), (_, keys), q_rows, k_rows, v_rows in zip(
            blocks, key_spans, _slices(blocks, q.shape[0], q), _slices(key_spans, k.shape[0], k),
            _slices(key_spans, k.shape[0], v)):
        rows_seq = seq._replace(q_ids=None if seq.q_ids is None else seq.q_ids[start:stop],
                                kv_ids=None if seq.kv_ids is None else seq.kv_ids[:keys])
        out, lse = _attention(dataclasses.replace(config, q_offset=start), q_rows, k_rows, v_rows,
                              _block(bias, start, stop, keys), _block(mask, start, stop, keys), rows_seq, seed)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs), jnp.concatenate(lses)


# Causal queries split into two row blocks: lengths from 128 (under that, one block was as
# fast) to 255. CPU ms forward+backward from a fused [b, T, 3, h, d] projection, one core,
# with 1 / 2 / 4 / 8 blocks: b=64, T=64, h=4, d=32: 10.9 / 11.2 / 12.9; b=32, T=128: 23.7 /
# 17.3 / 18.4 / 23.0; b=16, T=256: 67.5 / 39.4 / 29.6 / 50.7. Not from 256 on, although
# faster there too: in char-small's training step (T = 256) the blocked program made the
# host memory that malloc keeps (`run.host_memory`) grow by a whole temp buffer, 13.2 GB
# peak against 5.0 (benchmarks/RESULTS.md).
SPLIT_Q_LENS = range(128, 256)


def causal_row_blocks(q_len: int) -> list[tuple[int, int]]:
    """The [start, stop) query rows that causal attention computes apart: two halves for
    a length in SPLIT_Q_LENS, else all rows at once."""
    if q_len not in SPLIT_Q_LENS:
        return [(0, q_len)]
    return [(0, q_len // 2), (q_len // 2, q_len)]


def _block(x: jax.Array | None, start: int, stop: int, keys: int) -> jax.Array | None:
    """Rows start:stop and the first `keys` columns of `x` (broadcastable to [T, S])."""
    if x is None:
        return None
    x = x.reshape((1,) * (2 - x.ndim) + x.shape)
    rows = slice(start, stop) if x.shape[0] > 1 else slice(None)
    cols = slice(keys) if x.shape[1] > 1 else slice(None)
    return x[rows, cols]


@partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _slices(spans: tuple[tuple[int, int], ...], length: int, x: jax.Array) -> tuple[jax.Array, ...]:
    """x[a:b] for each (a, b) in `spans` (x: [length, ...]). Differentiated by adding each
    slice's cotangent into its rows in place, or concatenating them where the spans tile x,
    instead of autodiff's sum of one padded copy per slice, which XLA's CPU backend fused
    with the layout change after it into a loop 5x slower (benchmarks/RESULTS.md)."""
    return tuple(x[a:b] for a, b in spans)


def _slices_fwd(spans, length, x):
    return _slices(spans, length, x), None


def _slices_bwd(spans, length, _, cotangents):
    starts, stops = [a for a, _ in spans], [b for _, b in spans]
    if starts == [0, *stops[:-1]] and stops[-1] == length:
        return (jnp.concatenate(cotangents),)
    total = jnp.zeros((length, *cotangents[0].shape[1:]), cotangents[0].dtype)
    for (a, b), ct in zip(spans, cotangents):
        total = jax.lax.dynamic_update_slice_in_dim(total, jax.lax.dynamic_slice_in_dim(total, a, b - a) + ct, a, 0)
    return (total,)


_slices.defvjp(_slices_fwd, _slices_bwd)


def probabilities(q, k, bias, mask, seq, *, scale, is_causal, window, logits_soft_cap, precision=None):
    """The attention weights [T, S] (before dropout) of one head, in `masks.stat_dtype`."""
    config = _Config(scale, is_causal, window, logits_soft_cap, 0.0, precision)
    unnormalised, inv_total, _, _ = _softmax(config, q, k, bias, mask, seq)
    return unnormalised * inv_total


def _softmax(config: _Config, q, k, bias, mask, seq):
    """(unnormalised [T, S], 1 / row sum [T, 1], lse [T], tanh of the capped logits or None).

    The probabilities are unnormalised * (1 / row sum); the forward applies the division
    to the [T, d] output instead of the [T, S] matrix. Masked entries never hold an
    infinity: they are excluded from the row max by a finite stand-in and get weight
    exactly 0, so `jax_debug_infs` stays quiet. A row has nothing to attend to exactly when
    the boolean masks leave it no key (then its sum is 0; otherwise the sum is >= 1); the
    bias's values never decide it.
    """
    stat = masks.stat_dtype(q.dtype)
    acc = jnp.promote_types(q.dtype, stat)  # complex inputs: a complex product, then its real part
    logits = jnp.einsum("td,sd->ts", q, k, precision=config.precision, preferred_element_type=acc)
    logits = jnp.real(logits).astype(stat) * jnp.asarray(config.scale, stat)
    tanh = None
    if config.logits_soft_cap is not None:
        tanh = jnp.tanh(logits / config.logits_soft_cap)
        logits = config.logits_soft_cap * tanh
    if bias is not None:
        logits = logits + jnp.real(bias).astype(stat)
    t, s = q.shape[0], k.shape[0]
    keep = masks.allowed(_positions(config, t), jnp.arange(s, dtype=jnp.int32), seq, mask,
                         is_causal=config.is_causal, window=config.window)
    lowest = masks.lowest(stat)
    if keep is None:
        row_max = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
        unnormalised = jnp.exp(logits - row_max)
    else:
        masked = jnp.where(keep, logits, lowest)
        row_max = jax.lax.stop_gradient(jnp.max(masked, axis=-1, keepdims=True))
        unnormalised = jnp.exp(jnp.where(keep, masked - row_max, lowest))  # exp(lowest) == 0
    total = jnp.sum(unnormalised, axis=-1, keepdims=True)
    empty = total == 0.0
    inv_total = 1.0 / jnp.where(empty, 1.0, total)
    lse = jnp.where(empty, lowest, row_max + jnp.log(jnp.where(empty, 1.0, total)))[:, 0]
    return unnormalised, inv_total, lse, tanh


def _positions(config: _Config, rows: int) -> jax.Array:
    """Positions of the query rows: int32 [rows] from config.q_offset."""
    return jnp.arange(config.q_offset, config.q_offset + rows, dtype=jnp.int32)


def _dropped(config: _Config, weights, seed):
    """The weights after dropout (kept ones scaled by 1 / (1 - rate)) and the keep mask."""
    if seed is None:
        return weights, None
    t, s = weights.shape
    keep = masks.dropout_keep(seed, _positions(config, t), jnp.arange(s, dtype=jnp.int32),
                              config.dropout_rate)
    return jnp.where(keep, weights * (1.0 / (1.0 - config.dropout_rate)), 0.0), keep


def _forward(config: _Config, q, k, v, bias, mask, seq, seed):
    """(out [T, d] in the accumulation dtype, lse [T], (unnormalised, 1 / row sum, tanh))."""
    unnormalised, inv_total, lse, tanh = _softmax(config, q, k, bias, mask, seq)
    used, _ = _dropped(config, unnormalised, seed)
    out = jnp.einsum("ts,sd->td", used.astype(v.dtype), v, precision=config.precision,
                     preferred_element_type=jnp.promote_types(v.dtype, masks.stat_dtype(v.dtype)))
    return out * inv_total, lse, (unnormalised, inv_total, tanh)


@partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attention(config, q, k, v, bias, mask, seq, seed):
    out, lse, _ = _forward(config, q, k, v, bias, mask, seq, seed)
    return out.astype(q.dtype), lse


def _attention_fwd(config, q, k, v, bias, mask, seq, seed):
    out, lse, (unnormalised, inv_total, tanh) = _forward(config, q, k, v, bias, mask, seq, seed)
    return (out.astype(q.dtype), lse), (q, k, v, bias, seq, seed, unnormalised, inv_total, tanh, out)


def _attention_bwd(config, residuals, cotangents):
    q, k, v, bias, seq, seed, unnormalised, inv_total, tanh, out = residuals
    d_out = cotangents[0]  # the log-sum-exp is a residual, not differentiated (as in jax.nn)
    probs = unnormalised * inv_total
    stat = probs.dtype
    precision = config.precision
    d_out_f = d_out.astype(stat)
    d_used = jnp.einsum("td,sd->ts", d_out, v, precision=precision, preferred_element_type=stat)
    used, keep = _dropped(config, probs, seed)
    d_probs = d_used if keep is None else jnp.where(keep, d_used * (1.0 / (1.0 - config.dropout_rate)), 0.0)
    d_v = jnp.einsum("ts,td->sd", used.astype(d_out.dtype), d_out, precision=precision, preferred_element_type=stat)
    # Row term of the softmax Jacobian: sum_j P_ij dP_ij = dO_i . O_i (O includes dropout).
    delta = jnp.sum(d_out_f * out.astype(stat), axis=-1, keepdims=True)
    d_logits = probs * (d_probs - delta)  # 0 wherever a key is masked (P = 0 there)
    d_bias = None
    if bias is not None:
        d_bias = _unbroadcast(d_logits, bias.shape).astype(bias.dtype)
    if tanh is not None:
        d_logits = d_logits * (1.0 - tanh * tanh)
    # The logit scale is applied to the [T, d] products, not to the [T, S] matrix (XLA's CPU
    # backend materialises a scalar broadcast to [T, S] for the fused dot that reads it).
    scale = jnp.asarray(config.scale, stat)
    d_q = jnp.einsum("ts,sd->td", d_logits.astype(k.dtype), k, precision=precision, preferred_element_type=stat)
    d_k = jnp.einsum("ts,td->sd", d_logits.astype(q.dtype), q, precision=precision, preferred_element_type=stat)
    return ((d_q * scale).astype(q.dtype), (d_k * scale).astype(k.dtype), d_v.astype(v.dtype), d_bias,
            None, None, None)


def _unbroadcast(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Sum `x` [T, S] down to a bias's broadcastable `shape` (each dim 1 or full)."""
    x = jnp.sum(x, axis=tuple(i for i, n in enumerate(shape) if n == 1 and x.shape[i] != 1), keepdims=True)
    return x.reshape(shape)


_attention.defvjp(_attention_fwd, _attention_bwd)
