"""A float64 NumPy yardstick for the fused kernels' tests (pallas_gpu, pallas_tpu).

Masks come straight from the definition; the backward is the textbook chain rule, itself
checked against finite differences in test_pallas_attention.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


def reference_mask(q_len, kv_len, *, causal, window, q_lens, kv_lens, q_ids, kv_ids):
    """bool [b, Lq, Lk], True = attend, straight from the definition."""
    i = np.arange(q_len)[:, None]
    j = np.arange(kv_len)[None, :]
    keep = np.ones((len(q_lens), q_len, kv_len), bool)
    if causal:
        keep &= j <= i
    if window is not None:
        keep &= (j >= i - window[0]) & (j <= i + window[1])
    keep &= i[None] < np.asarray(q_lens)[:, None, None]
    keep &= j[None] < np.asarray(kv_lens)[:, None, None]
    if q_ids is not None:
        keep &= np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
    return keep


def reference_vjp(q, k, v, d_out, keep, scale, cap):
    """float64 output and (dq, dk, dv) of masked (soft-capped) softmax attention.

    q [b, T, h, d], k/v [b, S, hk, d], keep [b, T, S]. Fully masked rows output 0.
    The backward is the textbook chain rule: dV = P^T dO, dP = dO V^T,
    dS = P (dP - rowsum(dO O)), through the cap's tanh, then dQ = scale dS K, dK = scale dS^T Q.
    """
    q, k, v, d_out = (np.asarray(x, np.float64) for x in (q, k, v, d_out))
    group = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    x = np.einsum("bthd,bshd->bhts", q, k) * scale
    t = np.tanh(x / cap) if cap else None
    s = cap * t if cap else x
    s = np.where(keep[:, None], s, -np.inf)
    row_max = np.max(s, axis=-1, keepdims=True)
    e = np.exp(s - np.where(np.isfinite(row_max), row_max, 0.0))
    total = e.sum(-1, keepdims=True)
    p = e / np.where(total == 0, 1.0, total)
    out = np.einsum("bhts,bshd->bthd", p, v)
    dv = np.einsum("bhts,bthd->bshd", p, d_out)
    dp = np.einsum("bthd,bshd->bhts", d_out, v)
    ds = p * (dp - np.einsum("bthd,bthd->bht", d_out, out)[..., None])
    if cap:
        ds = ds * (1.0 - t**2)
    dq = np.einsum("bhts,bshd->bthd", ds, k) * scale
    dk = np.einsum("bhts,bthd->bshd", ds, q) * scale
    fold = lambda g: g.reshape(g.shape[0], g.shape[1], -1, group, g.shape[3]).sum(3)  # noqa: E731
    return out, (dq, fold(dk), fold(dv))


@dataclasses.dataclass(frozen=True)
class Case:
    q_len: int
    kv_len: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = False
    window: tuple[int, int] | None = None
    cap: float | None = None
    lengths: bool = False
    segments: bool = False
    tiles: Any = None  # the kernel's block sizes (None: its default)


def make_inputs(case: Case, dtype, seed: int):
    rng = np.random.default_rng(seed)
    batch = 2
    draw = lambda *shape: jnp.asarray(rng.standard_normal(shape), dtype)  # noqa: E731
    q = draw(batch, case.q_len, case.heads, case.head_dim)
    k = draw(batch, case.kv_len, case.kv_heads, case.head_dim)
    v = draw(batch, case.kv_len, case.kv_heads, case.head_dim)
    d_out = draw(batch, case.q_len, case.heads, case.head_dim)
    q_lens = kv_lens = q_ids = kv_ids = None
    if case.lengths:  # one full sequence, one short (its tail rows are fully masked)
        q_lens = jnp.asarray([case.q_len, rng.integers(1, case.q_len)], jnp.int32)
        kv_lens = jnp.asarray([rng.integers(1, case.kv_len), case.kv_len], jnp.int32)
    if case.segments:  # packed (sorted) keys, shuffled queries with an id no key has
        kv_ids = jnp.asarray(np.sort(rng.integers(0, 3, (batch, case.kv_len)), axis=1), jnp.int32)
        q_ids = jnp.asarray(rng.integers(0, 4, (batch, case.q_len)), jnp.int32)
    return (q, k, v, d_out), (q_lens, kv_lens, q_ids, kv_ids)


def expected(case: Case, q, k, v, d_out, q_lens, kv_lens, q_ids, kv_ids):
    batch = q.shape[0]
    keep = reference_mask(
        case.q_len, case.kv_len, causal=case.causal, window=case.window,
        q_lens=[case.q_len] * batch if q_lens is None else q_lens,
        kv_lens=[case.kv_len] * batch if kv_lens is None else kv_lens,
        q_ids=q_ids, kv_ids=kv_ids,
    )
    out, grads = reference_vjp(q, k, v, d_out, keep, case.head_dim**-0.5, case.cap)
    return keep, out, grads


def run_kernel(attention, case: Case, q, k, v, d_out, q_lens, kv_lens, q_ids, kv_ids, interpret: bool = True):
    """(out, (dq, dk, dv)) of a fused kernel's `attention` (pallas_gpu's or pallas_tpu's
    signature), in interpret mode unless `interpret=False` (compiled: on the GPU), under one jit."""
    def attend(q, k, v):
        return attention(
            q, k, v, scale=case.head_dim**-0.5, is_causal=case.causal, query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens, segment_ids=None if q_ids is None else (q_ids, kv_ids),
            local_window_size=case.window, logits_soft_cap=case.cap, block_sizes=case.tiles, interpret=interpret,
        )

    @jax.jit
    def vjp(q, k, v, d_out):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(d_out)

    return vjp(q, k, v, d_out)


def assert_float32_matches(attention, case: Case, seed: int, expect_empty_rows: bool,
                           interpret: bool = True) -> None:
    """Output and gradients within float32 rounding of the float64 reference; fully masked
    rows (which the case must contain if `expect_empty_rows`) exactly zero, as their dq."""
    tensors, masking = make_inputs(case, jnp.float32, seed=seed)
    out, grads = run_kernel(attention, case, *tensors, *masking, interpret=interpret)
    keep, want_out, want_grads = expected(case, *tensors, *masking)
    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
    for label, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{label}")
    empty_rows = ~keep.any(-1)  # [b, Lq]
    if expect_empty_rows:
        assert empty_rows.any(), "the case should contain fully masked rows"
        assert np.all(np.asarray(out)[empty_rows] == 0.0)
        assert np.all(np.asarray(grads[0])[empty_rows] == 0.0)


def assert_bfloat16_within_its_precision(attention, case: Case, seed: int, interpret: bool = True,
                                         dtype=jnp.bfloat16) -> None:
    """bf16 (or fp16) inputs against the float64 reference on the same (rounded) inputs: outputs
    and gradients keep the dtype and stay within a few bf16 roundings (2**-8 ~ 0.4%) of the largest value."""
    tensors, masking = make_inputs(case, dtype, seed=seed)
    out, grads = run_kernel(attention, case, *tensors, *masking, interpret=interpret)
    _, want_out, want_grads = expected(case, *tensors, *masking)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    for label, got, want in zip(["out", "dq", "dk", "dv"], (out, *grads), (want_out, *want_grads)):
        error = np.max(np.abs(np.asarray(got, np.float64) - want))
        assert error <= 2e-2 * np.max(np.abs(want)), f"{label}: max error {error}"
