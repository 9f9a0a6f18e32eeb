"""Numerics of dot_product_attention's reference and blockwise implementations.

Both are compared, outputs and gradients, against a float64 NumPy implementation of the
textbook formula with hand-derived gradients, written independently below.
"""
import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from transformer_jax.attention import dot_product_attention, masks

IMPLEMENTATIONS = ("reference", "blockwise")


@dataclasses.dataclass
class Case:
    batch: int = 2
    q_len: int = 5
    kv_len: int = 7
    heads: int = 2
    kv_heads: int = 1
    head_dim: int = 8
    block_sizes: tuple = (2, 3)
    is_causal: bool = False
    window: tuple | None = None
    lengths: bool = False
    segments: bool = False
    mask: bool = False
    bias: bool = False
    soft_cap: float | None = None
    dropout: float = 0.0
    broadcast_dropout: bool = True
    seed: int = 0


def make_inputs(c: Case, dtype=jnp.float32):
    """Fresh random operands and keyword arguments for a case."""
    rng = np.random.default_rng(c.seed)
    q = rng.normal(size=(c.batch, c.q_len, c.heads, c.head_dim))
    k = rng.normal(size=(c.batch, c.kv_len, c.kv_heads, c.head_dim))
    v = rng.normal(size=(c.batch, c.kv_len, c.kv_heads, c.head_dim))
    arrays = {"query": q, "key": k, "value": v}
    kwargs = {"is_causal": c.is_causal, "local_window_size": c.window, "logits_soft_cap": c.soft_cap}
    if c.bias:  # broadcast over batch, one per head
        arrays["bias"] = rng.normal(size=(1, c.heads, c.q_len, c.kv_len))
    if c.mask:  # one per batch element, broadcast over heads
        kwargs["mask"] = jnp.asarray(rng.random((c.batch, 1, c.q_len, c.kv_len)) < 0.7)
    if c.lengths:
        kwargs["query_seq_lengths"] = jnp.asarray(rng.integers(0, c.q_len + 1, c.batch), jnp.int32)
        kwargs["key_value_seq_lengths"] = jnp.asarray(rng.integers(0, c.kv_len + 1, c.batch), jnp.int32)
    if c.segments:
        kwargs["segment_ids"] = (
            jnp.asarray(np.sort(rng.integers(0, 3, (c.batch, c.q_len)), axis=1)),
            jnp.asarray(np.sort(rng.integers(0, 3, (c.batch, c.kv_len)), axis=1)),
        )
    if c.dropout:
        kwargs.update(
            dropout_rate=c.dropout, deterministic=False, broadcast_dropout=c.broadcast_dropout,
            dropout_rng=jax.random.key(c.seed),
        )
    arrays = {name: jnp.asarray(x, dtype) for name, x in arrays.items()}
    d_out = jnp.asarray(rng.normal(size=q.shape), dtype)
    return arrays, kwargs, d_out


def numpy_attention(c: Case, arrays, kwargs, d_out):
    """float64 textbook attention and its gradients (dict with out, query, key, value, bias)."""
    f64 = {name: np.asarray(x, np.float64) for name, x in arrays.items()}
    q, k, v, g = f64["query"], f64["key"], f64["value"], np.asarray(d_out, np.float64)
    bias = f64.get("bias")
    scale = 1 / np.sqrt(c.head_dim)
    group = c.heads // c.kv_heads
    i, j = np.arange(c.q_len)[:, None], np.arange(c.kv_len)[None, :]
    seeds = _dropout_seeds(c, kwargs)
    out, dq = np.zeros_like(q), np.zeros_like(q)
    dk, dv = np.zeros_like(k), np.zeros_like(v)
    d_bias = None if bias is None else np.zeros_like(bias)
    for b in range(c.batch):
        for h in range(c.heads):
            kh = h // group
            allowed = np.ones((c.q_len, c.kv_len), bool)
            if c.is_causal:
                allowed &= j <= i
            if c.window is not None:
                allowed &= (j >= i - c.window[0]) & (j <= i + c.window[1])
            if c.lengths:
                allowed &= (i < int(kwargs["query_seq_lengths"][b])) & (j < int(kwargs["key_value_seq_lengths"][b]))
            if c.segments:
                q_ids, kv_ids = (np.asarray(x[b]) for x in kwargs["segment_ids"])
                allowed &= q_ids[:, None] == kv_ids[None, :]
            if c.mask:
                allowed &= np.asarray(kwargs["mask"][b, 0])
            raw = scale * q[b, :, h] @ k[b, :, kh].T
            tanh = np.tanh(raw / c.soft_cap) if c.soft_cap else None
            logits = c.soft_cap * tanh if c.soft_cap else raw
            if bias is not None:
                logits = logits + bias[0, h]
            logits = np.where(allowed, logits, -np.inf)
            row_max = logits.max(axis=1, keepdims=True)
            e = np.exp(logits - np.where(np.isfinite(row_max), row_max, 0))
            total = e.sum(axis=1, keepdims=True)
            p = e / np.where(total == 0, 1, total)
            drop = np.ones_like(p)
            if c.dropout:
                seed = seeds if c.broadcast_dropout else seeds[b, h]
                keep = np.asarray(masks.dropout_keep(seed, jnp.arange(c.q_len), jnp.arange(c.kv_len), c.dropout))
                drop = keep / (1 - c.dropout)
            out[b, :, h] = (p * drop) @ v[b, :, kh]
            # Gradients of sum(out * g): the softmax Jacobian, by hand.
            dv[b, :, kh] += (p * drop).T @ g[b, :, h]
            dp = (g[b, :, h] @ v[b, :, kh].T) * drop
            ds = p * (dp - (dp * p).sum(axis=1, keepdims=True))
            if d_bias is not None:
                d_bias[0, h] += ds
            if c.soft_cap:
                ds = ds * (1 - tanh**2)
            dq[b, :, h] = scale * ds @ k[b, :, kh]
            dk[b, :, kh] += scale * ds.T @ q[b, :, h]
    grads = {"query": dq, "key": dk, "value": dv, "bias": d_bias}
    return out, {name: grads[name] for name in arrays}


def _dropout_seeds(c, kwargs):
    """The per-call dropout seeds, as dot_product_attention derives them from the key."""
    if not c.dropout:
        return None
    shape = (2,) if c.broadcast_dropout else (c.batch, c.heads, 2)
    return jax.random.bits(kwargs["dropout_rng"], shape, jnp.uint32)


@partial(jax.jit, static_argnames=("implementation", "static"))
def _loss_grads(arrays, dynamic, d_out, implementation, static):
    def loss(arrays):
        out = dot_product_attention(**arrays, **dict(static), **dynamic, implementation=implementation)
        return jnp.sum(out.astype(jnp.float32) * d_out.astype(jnp.float32)), out

    return jax.grad(loss, has_aux=True)(arrays)


def run(implementation, c: Case, arrays, kwargs, d_out):
    """Output and gradients w.r.t. the float arrays (one compilation per distinct call)."""
    static = {n: v for n, v in kwargs.items() if not isinstance(v, (jax.Array, tuple)) or n == "local_window_size"}
    if implementation == "blockwise":
        static["block_sizes"] = c.block_sizes
    dynamic = {n: v for n, v in kwargs.items() if n not in static}
    grads, out = _loss_grads(arrays, dynamic, d_out, implementation, tuple(sorted(static.items())))
    return out, grads


def assert_close(got, want, tol, what):
    """Max error relative to the largest |want|, or absolute where |want| < 1.

    Inputs are standard normal, so outputs and gradients are O(1); the floor of 1 only
    matters where the exact value is (near) zero, e.g. d/dq with a single key.
    """
    got = np.asarray(got, np.float64)
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1.0)
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


def check(c: Case, implementations=IMPLEMENTATIONS, dtype=jnp.float32, tol=1e-5):
    arrays, kwargs, d_out = make_inputs(c, dtype)
    want_out, want_grads = numpy_attention(c, arrays, kwargs, d_out)
    for impl in implementations:
        out, grads = run(impl, c, arrays, kwargs, d_out)
        assert out.dtype == dtype
        assert_close(out, want_out, tol, f"{impl} output")
        for name in arrays:
            assert grads[name].dtype == dtype
            assert_close(grads[name], want_grads[name], tol, f"{impl} d{name}")


GRID = {
    "plain": Case(),
    "causal-gqa": Case(heads=4, kv_heads=2, is_causal=True, q_len=7, kv_len=7),
    "causal-cross": Case(is_causal=True, q_len=7, kv_len=4),
    # causality the only mask and kv_len a multiple of block_k: blockwise leaves the blocks
    # off the diagonal unmasked (forward and backward), for wide and for tall blocks
    "causal-blocks": Case(is_causal=True, q_len=7, kv_len=6, block_sizes=(2, 3), bias=True),
    "causal-blocks-tall": Case(is_causal=True, q_len=9, kv_len=8, block_sizes=(3, 2)),
    "window": Case(window=(2, 1), q_len=9, kv_len=9, block_sizes=(2, 2)),
    "causal-window": Case(is_causal=True, window=(3, 2), q_len=11, kv_len=11, block_sizes=(4, 3)),
    "lengths": Case(lengths=True, is_causal=True, batch=3),
    "segments": Case(segments=True, q_len=6, kv_len=6),
    "mask-bias": Case(mask=True, bias=True),
    "soft-cap": Case(soft_cap=1.5, bias=True),
    "len-1": Case(q_len=1, kv_len=1, block_sizes=(1, 1)),
    "decode": Case(q_len=1, kv_len=13, mask=True, block_sizes=(1, 4)),
    "big-blocks": Case(q_len=5, kv_len=7, block_sizes=(64, 64), is_causal=True),
    "dropout": Case(dropout=0.3, bias=True, is_causal=True),
    "dropout-per-head": Case(dropout=0.5, broadcast_dropout=False),
    # long enough for the reference to split causal queries into row blocks (uneven ones
    # here: 100/101 and 70/70 rows), with every mask, and kv_len below and above q_len
    "causal-row-blocks": Case(is_causal=True, q_len=201, kv_len=201, bias=True, mask=True, segments=True,
                              lengths=True, block_sizes=(32, 64)),
    "causal-row-blocks-fewer-keys": Case(is_causal=True, q_len=140, kv_len=100, window=(40, 0), soft_cap=2.0,
                                         dropout=0.3, bias=True, block_sizes=(32, 32)),
    "causal-row-blocks-more-keys": Case(is_causal=True, q_len=128, kv_len=180, heads=4, kv_heads=2, dropout=0.2,
                                        broadcast_dropout=False, block_sizes=(64, 64)),
}


@pytest.mark.parametrize("name", list(GRID))
def test_matches_float64_reference(name):
    check(GRID[name])


@settings(max_examples=10, deadline=None, derandomize=True)
@given(
    lengths=st.sampled_from([(1, 1), (2, 3), (5, 5), (7, 11), (13, 13), (17, 6)]),
    heads=st.sampled_from([(1, 1), (2, 2), (4, 2), (3, 1)]),
    head_dim=st.sampled_from([4, 8, 16]),
    block_sizes=st.tuples(st.integers(1, 8), st.integers(1, 8)),
    is_causal=st.booleans(),
    window=st.sampled_from([None, (0, 0), (2, 3), (4, 0)]),
    options=st.sets(st.sampled_from(["lengths", "segments", "mask", "bias"])),
    seed=st.integers(0, 2**16),
)
def test_random_cases(lengths, heads, head_dim, block_sizes, is_causal, window, options, seed):
    q_len, kv_len = lengths
    check(Case(
        batch=2, q_len=q_len, kv_len=kv_len, heads=heads[0], kv_heads=heads[1], head_dim=head_dim,
        block_sizes=block_sizes, is_causal=is_causal, window=window,
        segments="segments" in options, lengths="lengths" in options,
        mask="mask" in options, bias="bias" in options, seed=seed,
    ))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_half_precision_within_its_tolerance(dtype):
    # Inputs are rounded to the half dtype before the float64 reference sees them, so
    # the error left is the kernels' own: half-precision probabilities and outputs.
    check(Case(is_causal=True, bias=True, q_len=9, kv_len=9, block_sizes=(4, 4)), dtype=dtype, tol=3e-2)


def test_causal_row_blocks_take_broadcast_biases_and_masks():
    # one bias row for every query and one mask column for every key, cut per row block
    c = Case(is_causal=True, q_len=192, kv_len=192, heads=2, kv_heads=2)
    arrays, kwargs, d_out = make_inputs(c)
    rng = np.random.default_rng(1)
    bias = rng.normal(size=(1, 1, 1, c.kv_len))
    mask = rng.random((c.batch, 1, c.q_len, 1)) < 0.8
    full = {**arrays, "bias": jnp.asarray(np.broadcast_to(bias, (1, c.heads, c.q_len, c.kv_len)), jnp.float32)}
    want_out, want_grads = numpy_attention(dataclasses.replace(c, bias=True, mask=True), full,
                                           {**kwargs, "mask": jnp.asarray(np.broadcast_to(mask, (c.batch, 1, c.q_len, c.kv_len)))},
                                           d_out)
    out, grads = run("reference", c, {**arrays, "bias": jnp.asarray(bias, jnp.float32)},
                     {**kwargs, "mask": jnp.asarray(mask)}, d_out)
    assert_close(out, want_out, 1e-5, "output")
    assert_close(grads["bias"], want_grads["bias"].sum(axis=(1, 2), keepdims=True), 1e-5, "dbias")
    assert_close(grads["query"], want_grads["query"], 1e-5, "dquery")


def test_causal_row_blocks_cover_the_rows_evenly():
    from transformer_jax.attention.reference import causal_row_blocks

    assert causal_row_blocks(127) == [(0, 127)]
    assert causal_row_blocks(128) == [(0, 64), (64, 128)]
    assert causal_row_blocks(201) == [(0, 100), (100, 201)]
    assert causal_row_blocks(256) == [(0, 256)]


def test_fully_masked_rows_are_zero_with_finite_gradients():
    # Key length 0 for the second sequence, and segment ids that match nothing.
    c = Case(lengths=True)
    arrays, kwargs, d_out = make_inputs(c)
    kwargs["key_value_seq_lengths"] = jnp.array([4, 0], jnp.int32)
    kwargs["query_seq_lengths"] = jnp.array([5, 5], jnp.int32)
    for impl in IMPLEMENTATIONS:
        out, grads = run(impl, c, arrays, kwargs, d_out)
        assert np.all(np.asarray(out[1]) == 0), impl
        assert np.any(np.asarray(out[0]) != 0), impl
        for g in grads.values():
            assert np.all(np.isfinite(np.asarray(g))), impl


def test_dropout_keep_mask_is_fair_and_block_independent():
    seed = jax.random.bits(jax.random.key(3), (2,), jnp.uint32)
    rate = 0.25
    full = np.asarray(masks.dropout_keep(seed, jnp.arange(256), jnp.arange(256), rate))
    # 65536 Bernoulli(0.75) draws: standard deviation of the mean is 0.0017.
    assert abs(full.mean() - (1 - rate)) < 0.01
    assert abs(full.mean(axis=0).std() - np.sqrt(rate * (1 - rate) / 256)) < 0.01  # no striped columns
    block = np.asarray(masks.dropout_keep(seed, jnp.arange(40, 60), jnp.arange(100, 131), rate))
    np.testing.assert_array_equal(block, full[40:60, 100:131])
    other = np.asarray(masks.dropout_keep(seed + 1, jnp.arange(256), jnp.arange(256), rate))
    assert 0.5 < (other == full).mean() < 0.7  # about 0.75^2 + 0.25^2 = 0.625 for independent masks


def test_blockwise_dropout_independent_of_block_sizes():
    c = Case(dropout=0.4, q_len=9, kv_len=10)
    arrays, kwargs, d_out = make_inputs(c)
    outs = [run("blockwise", dataclasses.replace(c, block_sizes=bs), arrays, kwargs, d_out)[0]
            for bs in [(2, 3), (9, 10)]]
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-6)
