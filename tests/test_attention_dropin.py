"""dot_product_attention as a drop-in: the behaviours jax's own tests check of
jax.nn.dot_product_attention (jax-v0.10.2 tests/nn_test.py, its dot-product-attention
cases) and flax's tests/linen/linen_attention_test.py checks of attention_fn, written here
as our own parametrised tests, run for every implementation that serves the call.

The yardsticks are jax.nn.dot_product_attention itself (independent of our reference and
blockwise code), flax's own attention_fn, and a float64 NumPy attention below. Shapes are
smaller than jax's (the behaviours do not depend on them); the one deliberate difference,
zeros on rows with nothing to attend to, never arises in jax's cases.
"""
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import pop

from transformer_jax.attention import dot_product_attention, flax_attention_fn

IMPLS = ("reference", "blockwise", "xla")
B, T, S, N, H = 2, 32, 40, 4, 16


def normal(key, shape, dtype=jnp.float32):
    return jax.random.normal(key, shape, dtype)


def numpy_attention(q, k, v, bias=None, keep=None, scale=None):
    """float64 (complex128) textbook attention on [B, T, N, d] / [B, S, N, d] with a bool
    keep [B|1, N|1, T, S]; rows with no key give 0. Returns (out, lse [B, T, N])."""
    q, k, v = (np.asarray(x).astype(np.complex128 if np.iscomplexobj(x) else np.float64) for x in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    logits = np.real(np.einsum("btnd,bsnd->bnts", q, k)) * scale
    if bias is not None:
        logits = logits + np.asarray(bias, np.float64)
    keep = np.ones(logits.shape, bool) if keep is None else np.broadcast_to(np.asarray(keep), logits.shape)
    masked = np.where(keep, logits, -np.inf)
    row_max = np.max(masked, -1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0)
    e = np.where(keep, np.exp(masked - row_max), 0)
    total = e.sum(-1, keepdims=True)
    probs = e / np.where(total == 0, 1, total)
    lse = np.where(total[..., 0] > 0, np.log(np.where(total[..., 0] > 0, total[..., 0], 1)) + row_max[..., 0], -np.inf)
    return np.einsum("bnts,bsnd->btnd", probs, v), lse.transpose(0, 2, 1)


# --- jax tests/nn_test.py: testDotProductAttention (dtype x group x vmap, with and without
# the residual). Each group and vmap of jax's product appears once per implementation; only
# bfloat16, since jax.nn's own float16 path asks for F16_F16_F32 dots, which the CPU refuses.
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("group, dtype, use_vmap", [(1, jnp.bfloat16, False), (2, jnp.bfloat16, True),
                                                    (4, jnp.bfloat16, True)])
def test_jax_gqa_outputs_gradients_and_residual(impl, group, dtype, use_vmap):
    keys = jax.random.split(jax.random.key(group), 5)
    q = normal(keys[0], (B, T, N, H), dtype)
    k = normal(keys[1], (B, S, N // group, H), dtype)
    v = normal(keys[2], (B, S, N // group, H), dtype)
    grad = normal(keys[3], (B, T, N, H), dtype)
    lse_grad = normal(keys[4], (B, T, N), dtype)

    @jax.jit
    def both(q, k, v):
        k_ref, v_ref = jnp.repeat(k, group, axis=2), jnp.repeat(v, group, axis=2)
        results = []
        for residual in (False, True):
            ref = partial(jax.nn.dot_product_attention, return_residual=residual)
            ans = partial(dot_product_attention, implementation=impl, return_residual=residual)
            if use_vmap:
                ans = jax.vmap(ans, in_axes=(0, 0, 0, None, None), out_axes=0)
            cot = (grad, lse_grad) if residual else grad
            out_ref, vjp_ref = jax.vjp(ref, q, k_ref, v_ref, None, None)
            out_ans, vjp_ans = jax.vjp(ans, q, k, v, None, None)
            dq_ref, dk_ref, dv_ref = vjp_ref(cot)[:3]
            fold = lambda d: d.reshape(B, S, N // group, group, H).sum(axis=3)  # noqa: E731
            results.append(((out_ans, vjp_ans(cot)[:3]), (out_ref, (dq_ref, fold(dk_ref), fold(dv_ref)))))
        return results

    for ours, theirs in both(q, k, v):
        for got, want in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
            assert got.dtype == want.dtype and got.shape == want.shape
            np.testing.assert_allclose(np.float32(got), np.float32(want), atol=0.01, rtol=0.01)


# --- testDotProductAttentionMask -------------------------------------------------------
MASK_MODES = ["bias", "causal", "padding", "custom", ("causal", "padding"), ("custom", "padding"),
              ("bias", "causal"), ("causal", "sliding_window")]


@pytest.mark.parametrize("mask_mode", MASK_MODES, ids=str)
def test_jax_mask_modes(mask_mode):
    mask_mode = (mask_mode,) if isinstance(mask_mode, str) else mask_mode
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 5)
    q, k, v = (normal(keys[i], (B, T, N, H), dtype) for i in range(3))
    grad = normal(keys[3], (B, T, N, H), dtype)
    bias = normal(keys[4], (1, N, T, T), dtype) if "bias" in mask_mode else None
    mask = jnp.tril(jnp.ones((T, T), bool))[None, None] if "custom" in mask_mode else None
    is_causal = "causal" in mask_mode
    lengths = (jnp.array([T // 2, T // 4], jnp.int32), jnp.array([T // 4, T // 2], jnp.int32)) \
        if "padding" in mask_mode else (None, None)
    window = ((3, 2) if is_causal else (3, 0)) if "sliding_window" in mask_mode else None

    def run(fn, q, k, v, b):
        return fn(q, k, v, b, mask, is_causal=is_causal, query_seq_lengths=lengths[0],
                  key_value_seq_lengths=lengths[1], local_window_size=window)

    @jax.jit
    def out_and_grads(q, k, v, bias):
        results = {}
        for impl in ("jax",) + IMPLS:
            fn = jax.nn.dot_product_attention if impl == "jax" else partial(dot_product_attention, implementation=impl)
            out, vjp = jax.vjp(partial(run, fn), q, k, v, bias)
            results[impl] = (out, *vjp(grad))
        return results

    results = out_and_grads(q, k, v, bias)
    tolerances = (0.01, 0.02, 0.02, 0.01, 0.02)  # jax's: out, dq, dk, dv, dbias
    for impl in IMPLS:
        for got, want, tol in zip(results[impl], results["jax"], tolerances):
            if want is not None:
                np.testing.assert_allclose(np.float32(got), np.float32(want), atol=tol, rtol=tol, err_msg=impl)


# --- testDotProductAttentionFloat64MaskDebugInfs ---------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_jax_float64_mask_under_debug_infs(impl):
    with jax.enable_x64(True), jax.debug_infs(True):
        t, s, kv, n, h = 5, 7, 3, 6, 11
        mask = jnp.arange(s) <= s // 2
        zeros = partial(jnp.zeros, dtype=jnp.float64)
        out = dot_product_attention(zeros((t, n, h)), zeros((s, kv, h)), zeros((s, kv, h)), mask=mask,
                                    implementation=impl)
        out.block_until_ready()
        assert out.dtype == jnp.float64 and out.shape == (t, n, h)
        np.testing.assert_array_equal(out, 0.0)


# --- testDotProductAttentionBiasGradient -----------------------------------------------
@pytest.mark.parametrize("batch_size, use_vmap", [(1, False), (1, True), (4, False), (4, True)])
def test_jax_bias_gradient(batch_size, use_vmap):
    dtype = jnp.bfloat16
    keys = jax.random.split(jax.random.key(0), 2)
    x = normal(keys[0], (batch_size, T, N, H), dtype)
    bias = normal(keys[1], (batch_size, N, T, T), dtype)
    mask = jnp.ones((1, 1, T), jnp.bool_)

    @jax.jit
    def out_and_bias_grads(x, bias, mask):
        results = {}
        for impl in ("jax",) + IMPLS:
            fn = jax.nn.dot_product_attention if impl == "jax" else partial(dot_product_attention, implementation=impl)
            attention = lambda x, bias, mask: fn(x, x, x, bias, mask, is_causal=False)  # noqa: E731
            if use_vmap:
                attention = jax.vmap(attention, in_axes=(0, 0, None))
            out, vjp = jax.vjp(attention, x, bias, mask)
            results[impl] = (out, vjp(x)[1])
        return results

    results = out_and_bias_grads(x, bias, mask)
    for impl in IMPLS:
        (out, d_bias), (out_ref, d_bias_ref) = results[impl], results["jax"]
        np.testing.assert_allclose(np.float32(out), np.float32(out_ref), atol=0.02, rtol=0.02, err_msg=impl)
        np.testing.assert_allclose(np.float32(d_bias), np.float32(d_bias_ref), atol=0.1, rtol=0.1, err_msg=impl)


# --- testDotProductAttention_localWindowSizeWithoutMask ---------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_jax_local_window_without_mask(impl):
    keys = jax.random.split(jax.random.key(0), 3)
    q, k, v = (normal(key, (B, T, N, H)) for key in keys)
    large = dot_product_attention(q, k, v, local_window_size=(32, 32), implementation=impl)
    small = dot_product_attention(q, k, v, local_window_size=(1, 1), implementation=impl)
    assert not jnp.allclose(large, small)
    np.testing.assert_allclose(small, jax.nn.dot_product_attention(q, k, v, local_window_size=(1, 1)),
                               atol=1e-5, rtol=1e-5)


# --- the points of issue 16 beyond jax's own cases --------------------------------------
def test_bf16_bias_gradient_accumulates_in_float32():
    """A bias broadcast over batch and heads: its bf16 gradient is no worse than jax's."""
    keys = jax.random.split(jax.random.key(3), 4)
    q, k, v = (normal(key, (8, 64, 4, 16)) for key in keys[:3])
    bias = normal(keys[3], (1, 1, 64, 64))

    def d_bias(fn, dtype):
        cast = lambda x: x.astype(dtype)  # noqa: E731
        return jax.jit(jax.grad(lambda b: jnp.sum(fn(cast(q), cast(k), cast(v), b).astype(jnp.float32) ** 2)))(
            cast(bias)).astype(jnp.float32)

    exact = np.asarray(d_bias(partial(dot_product_attention, implementation="reference"), jnp.float32))
    jax_error = np.abs(np.asarray(d_bias(jax.nn.dot_product_attention, jnp.bfloat16)) - exact).max()
    for impl in IMPLS:
        ours = np.asarray(d_bias(partial(dot_product_attention, implementation=impl), jnp.bfloat16))
        assert np.abs(ours - exact).max() <= 1.5 * jax_error, impl


def test_empty_rows_are_defined_by_boolean_masks_not_by_bias_values():
    """flax's additive mask value finfo.min in the bias: a row whose bias is finfo.min on
    every key still has keys, so it gets the mean of the values (as jax) in every
    implementation; a row the boolean mask empties gets zeros."""
    keys = jax.random.split(jax.random.key(4), 3)
    q, k, v = (normal(key, (1, 6, 2, 8)) for key in keys)
    bias = jnp.zeros((1, 1, 6, 6)).at[..., 0, :].set(jnp.finfo(jnp.float32).min)
    mask = jnp.ones((1, 1, 6, 6), bool).at[..., 1, :].set(False)
    jax_out = jax.nn.dot_product_attention(q, k, v, bias)
    for impl in IMPLS:
        out = dot_product_attention(q, k, v, bias, mask, implementation=impl)
        np.testing.assert_allclose(out[0, 0], v[0].mean(0), atol=1e-5, err_msg=impl)
        np.testing.assert_array_equal(out[0, 1], 0.0)
        np.testing.assert_allclose(out[0, 2:], jax_out[0, 2:], atol=1e-5, rtol=1e-5, err_msg=impl)
        out, lse = dot_product_attention(q, k, v, bias, mask, implementation=impl, return_residual=True)
        assert lse.shape == (1, 6, 2) and np.all(np.isfinite(lse))
        assert np.all(np.asarray(lse[0, 1]) == jnp.finfo(jnp.float32).min), impl


@pytest.mark.parametrize("impl", IMPLS)
def test_several_batch_dims_and_lower_rank_operands(impl):
    keys = jax.random.split(jax.random.key(5), 5)
    q = normal(keys[0], (2, 3, 5, 4, 8))
    k, v = normal(keys[1], (2, 3, 7, 2, 8)), normal(keys[2], (2, 3, 7, 2, 8))
    mask = jax.random.bernoulli(keys[3], 0.7, (2, 1, 1, 5, 7))  # batch dims partly broadcast
    lengths = jnp.array([[7, 3, 0], [1, 7, 5]], jnp.int32)
    attention = jax.jit(partial(dot_product_attention, implementation=impl))
    out = attention(q, k, v, mask=mask, key_value_seq_lengths=lengths)
    flat = attention(q.reshape(6, 5, 4, 8), k.reshape(6, 7, 2, 8), v.reshape(6, 7, 2, 8),
                                 mask=jnp.broadcast_to(mask, (2, 3, 1, 5, 7)).reshape(6, 1, 5, 7),
                                 key_value_seq_lengths=lengths.reshape(6))
    assert out.shape == q.shape
    np.testing.assert_allclose(out.reshape(flat.shape), flat, atol=1e-6)
    keep = jnp.broadcast_to(mask, (2, 3, 1, 5, 7)).reshape(6, 1, 5, 7) & (
        jnp.arange(7) < lengths.reshape(6, 1, 1, 1))
    want, _ = numpy_attention(q.reshape(6, 5, 4, 8), jnp.repeat(k.reshape(6, 7, 2, 8), 2, 2),
                              jnp.repeat(v.reshape(6, 7, 2, 8), 2, 2), keep=keep)
    np.testing.assert_allclose(flat, want, atol=1e-5)
    # jax.nn's rule: a 3-D query with 4-D key/value of batch 1 gives a 3-D result
    out3 = jax.jit(partial(dot_product_attention, is_causal=1, implementation=impl))(q[0, 0], k[:1, 0], v[:1, 0])
    np.testing.assert_allclose(out3, jax.nn.dot_product_attention(q[0, 0], k[:1, 0], v[:1, 0], is_causal=1),
                               atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_as_numpy_jnp_and_traced_scalar(impl):
    keys = jax.random.split(jax.random.key(6), 3)
    q, k, v = (normal(key, (2, 5, 2, 8)) for key in keys)
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3)
    for scale in (np.float32(0.3), jnp.float32(0.3), np.float64(0.3)):
        np.testing.assert_allclose(dot_product_attention(q, k, v, scale=scale, implementation=impl), want, atol=1e-6)

    def loss(fn, scale):
        return jnp.sum(jnp.sin(fn(q, k, v, scale=scale)))

    ours = jax.jit(jax.value_and_grad(partial(loss, partial(dot_product_attention, implementation=impl))))(0.3)
    theirs = jax.jit(jax.value_and_grad(partial(loss, jax.nn.dot_product_attention)))(0.3)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_empty_shapes_give_empty_or_zero_results_like_jax():
    x = partial(jnp.ones, dtype=jnp.float32)
    for q_shape, kv_shape in (((2, 0, 4, 8), (2, 5, 2, 8)), ((2, 3, 4, 0), (2, 5, 2, 0)),
                              ((0, 3, 4, 8), (0, 5, 2, 8)), ((2, 3, 4, 8), (2, 0, 2, 8))):
        want_shape = jax.nn.dot_product_attention(x(q_shape), x(kv_shape), x(kv_shape)).shape
        for impl in IMPLS + (None,):
            out = dot_product_attention(x(q_shape), x(kv_shape), x(kv_shape), implementation=impl)
            assert out.shape == want_shape == q_shape and out.dtype == jnp.float32
            np.testing.assert_array_equal(out, 0.0)  # kv_len 0: every row has nothing to attend to


@pytest.mark.parametrize("impl", ["reference", "xla", None])
def test_complex64_matches_numpy(impl):
    rng = np.random.default_rng(7)
    q, k, v = (rng.normal(size=(2, 5, 2, 4)) + 1j * rng.normal(size=(2, 5, 2, 4)) for _ in range(3))
    q, k, v = (jnp.asarray(x, jnp.complex64) for x in (q, k, v))
    out = dot_product_attention(q, k, v, is_causal=True, implementation=impl)
    want, _ = numpy_attention(q, k, v, keep=np.tril(np.ones((5, 5), bool)))
    assert out.dtype == jnp.complex64
    np.testing.assert_allclose(out, want, atol=1e-5)


@pytest.mark.parametrize("impl", ["blockwise", "pallas"])
def test_complex64_refused_clearly_by_the_kernels(impl):
    q = jnp.ones((1, 4, 1, 64), jnp.complex64)
    with pytest.raises(ValueError, match="complex"):
        dot_product_attention(q, q, q, implementation=impl)


@pytest.mark.parametrize("impl", ["reference", "blockwise", "xla"])
def test_float64_is_computed_in_float64(impl):
    with jax.enable_x64(True):
        rng = np.random.default_rng(8)
        q, k, v = (jnp.asarray(rng.normal(size=(2, 9, 2, 8))) for _ in range(3))
        bias = jnp.asarray(rng.normal(size=(1, 2, 9, 9)))
        keep = np.tril(np.ones((9, 9), bool))
        out, lse = dot_product_attention(q, k, v, bias, is_causal=True, implementation=impl, block_sizes=4,
                                         return_residual=True) if impl == "blockwise" else \
            dot_product_attention(q, k, v, bias, is_causal=True, implementation=impl, return_residual=True)
        want, want_lse = numpy_attention(q, k, v, bias, keep)
        assert out.dtype == lse.dtype == jnp.float64
        # jax.nn (so "xla") takes its softmax in float32 whatever the input: float32 accuracy
        tol = 1e-6 if impl == "xla" else 1e-12
        np.testing.assert_allclose(out, want, rtol=tol, atol=tol)
        np.testing.assert_allclose(lse, want_lse, rtol=tol, atol=tol)


def test_x64_blockwise_bias_and_pallas_interpret_keep_the_input_dtype():
    from transformer_jax.attention import pallas_gpu

    with jax.enable_x64(True):
        keys = jax.random.split(jax.random.key(9), 4)
        q, k, v = (normal(key, (1, 16, 2, 64)) for key in keys[:3])
        bias = normal(keys[3], (1, 2, 16, 16))
        want = numpy_attention(q, k, v, bias)[0]
        f = lambda q, b: dot_product_attention(q, k, v, b, implementation="blockwise", block_sizes=8)  # noqa: E731
        out, (dq, db) = f(q, bias), jax.grad(lambda q, b: f(q, b).sum(), argnums=(0, 1))(q, bias)
        assert out.dtype == dq.dtype == db.dtype == jnp.float32
        np.testing.assert_allclose(out, want, atol=1e-5)
        kw = dict(scale=0.125, is_causal=True, query_seq_lengths=jnp.asarray([11]), key_value_seq_lengths=None,
                  segment_ids=None, local_window_size=None, logits_soft_cap=None, block_sizes=(16, 16), interpret=True)
        out = pallas_gpu.attention(q, k, v, **kw)
        keep = np.tril(np.ones((16, 16), bool)) & (np.arange(16) < 11)[:, None]
        assert out.dtype == jnp.float32
        np.testing.assert_allclose(out, numpy_attention(q, k, v, keep=keep)[0], atol=1e-5)


def test_float_masks_and_negative_lengths_are_rejected():
    q = jnp.ones((2, 3, 1, 4))
    with pytest.raises(TypeError, match="mask must be boolean"):
        dot_product_attention(q, q, q, mask=jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="key_value_seq_lengths must be >= 0"):
        dot_product_attention(q, q, q, key_value_seq_lengths=jnp.array([2, -1], jnp.int32))


FLAGS = {"x64": jax.enable_x64, "debug_infs": jax.debug_infs, "debug_nans": jax.debug_nans}


@pytest.mark.parametrize("flag", list(FLAGS))
def test_identical_under_x64_debug_infs_and_debug_nans(flag):
    """Outputs, residuals and gradients of masked calls with empty rows, bias, lengths and
    windows are the same with the flag on (outside jit: every op is checked)."""
    keys = jax.random.split(jax.random.key(10), 5)
    q, k, v = (normal(key, (2, 6, 2, 8)) for key in keys[:3])
    bias = normal(keys[3], (1, 2, 6, 6))
    mask = jax.random.bernoulli(keys[4], 0.6, (2, 1, 6, 6)).at[0, 0, 2].set(False)
    kw = dict(is_causal=True, key_value_seq_lengths=jnp.array([6, 0], jnp.int32), local_window_size=(3, 1),
              return_residual=True)

    def results():
        out = {}
        for impl in IMPLS:  # auto picks the reference at this size
            f = partial(dot_product_attention, implementation=impl, **kw)
            out[str(impl)] = (f(q, k, v, bias, mask), jax.grad(lambda q, b: f(q, k, v, b, mask)[0].sum(),
                                                          argnums=(0, 1))(q, bias))
        return out

    if flag == "x64":  # dtypes are what x64 changes; the debug flags need op-by-op execution
        results = jax.jit(results)

    plain = results()
    with FLAGS[flag](True):
        flagged = results()
    for impl in plain:
        for got, want in zip(jax.tree.leaves(flagged[impl]), jax.tree.leaves(plain[impl])):
            assert got.dtype == want.dtype, impl
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{impl} {flag}")


# --- flax tests/linen/linen_attention_test.py, every module with our attention_fn --------
def mha(**kwargs):
    base = dict(num_heads=8, qkv_features=16, kernel_init=nn.initializers.ones,
                bias_init=nn.initializers.zeros, deterministic=False, attention_fn=flax_attention_fn)
    return nn.MultiHeadDotProductAttention(**{**base, **kwargs})


@pytest.mark.parametrize("shape, dtype", [((4, 6, 5), jnp.float32), ((4, 6, 5), jnp.complex64),
                                          ((4, 2, 3, 5), jnp.float32)])
def test_flax_self_attention_shape_and_dtype(shape, dtype):
    x = jnp.ones(shape, dtype)
    y, variables = mha().init_with_output(jax.random.key(0), x)
    assert y.shape == x.shape and y.dtype == dtype
    if dtype == jnp.float32:
        np.testing.assert_allclose(y, mha(attention_fn=nn.dot_product_attention).apply(variables, x), atol=1e-5)


def test_flax_dropout_with_several_batch_dims_and_explicit_rngs():
    x = jnp.ones((4, 2, 3, 5))
    module = mha(dropout_rate=0.5, kernel_init=nn.initializers.lecun_normal())
    rngs = {"params": jax.random.key(1), "dropout": jax.random.key(2)}
    variables = module.init(rngs, x)
    a = module.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    b = module.apply(variables, x, rngs={"dropout": jax.random.key(2)})
    c = module.apply(variables, x, rngs={"dropout": jax.random.key(3)})
    d = module.apply(variables, x, dropout_rng=jax.random.key(3))
    e = module.apply(variables, x, dropout_rng=jax.random.key(3))
    assert a.shape == x.shape and (a == b).all() and not (a == c).all() and (d == e).all() and not (c == d).all()
    quiet = module.clone(dropout_rate=0.0, deterministic=True)
    np.testing.assert_array_equal(quiet.apply(variables, x, rngs={"dropout": jax.random.key(4)}),
                                  quiet.apply(variables, x, rngs={"dropout": jax.random.key(5)}))


@pytest.mark.parametrize("spatial_shape, attn_dims", [((5,), (1,)), ((6, 5), (2,))])
def test_flax_decoding_matches_full_attention(spatial_shape, attn_dims):
    from flax import jax_utils

    bs, num_heads, features = 2, 3, 4
    key1, key2 = jax.random.split(jax.random.key(0))
    inputs = jax.random.normal(key1, (bs, *spatial_shape, num_heads * features))
    module = mha(num_heads=num_heads, qkv_features=num_heads * features, precision=jax.lax.Precision.HIGHEST,
                 kernel_init=nn.initializers.lecun_normal(), decode=False)
    decode_module = module.clone(decode=True)
    initial_vars = decode_module.init(key2, inputs)
    state, params = pop(initial_vars, "params")
    causal_mask = nn.make_causal_mask(jnp.ones((bs, *spatial_shape)))
    y_ref = jax.jit(lambda x, m: module.apply(initial_vars, x, mask=m))(inputs, causal_mask)
    y_flax = module.clone(attention_fn=nn.dot_product_attention).apply(initial_vars, inputs, mask=causal_mask)
    np.testing.assert_allclose(y_ref, y_flax, atol=1e-5)

    def body_fn(state, x):
        y, state = decode_module.apply({"params": params, **state}, x, mutable=["cache"])
        return state, y

    _, y = jax_utils.scan_in_dim(body_fn, state, inputs, axis=attn_dims, keepdims=True)
    np.testing.assert_allclose(y_ref, y, atol=1e-5)


def test_flax_autoregressive_receptive_field():
    length = 10
    inputs = jax.random.normal(jax.random.key(2), (1, length, 1))
    module = mha(num_heads=1, qkv_features=None, kernel_init=nn.initializers.ones)
    variables = module.init(jax.random.key(1), inputs)
    causal_mask = nn.make_causal_mask(jnp.ones((1, length)))
    grad_fn = jax.jit(jax.grad(lambda x, pos: module.apply(variables, x, mask=causal_mask)[0, pos].sum()))
    for i in range(length):
        deps = np.any(np.abs(np.asarray(grad_fn(inputs, i)[0])) > 1e-5, axis=-1)
        assert deps[: i + 1].all() and not deps[i + 1:].any(), i


def test_flax_sow_attention_weights():
    x = jnp.ones((4, 6, 5))

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, sow_weights=False):
            x = mha()(x, sow_weights=sow_weights)
            x = mha()(x)
            return mha()(x, sow_weights=sow_weights)

    variables = Model().init(jax.random.key(0), x)
    _, inter = Model().apply(variables, x, mutable=["intermediates"], sow_weights=True)
    weights = inter["intermediates"]["MultiHeadDotProductAttention_0"]["attention_weights"][0]
    assert weights.shape == (4, 8, 6, 6)
    assert "MultiHeadDotProductAttention_1" not in inter["intermediates"]
    assert inter["intermediates"]["MultiHeadDotProductAttention_2"]["attention_weights"][0].shape == (4, 8, 6, 6)
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    _, inter = Model().apply(variables, x, mutable=["intermediates"], sow_weights=False)
    assert "intermediates" not in inter


@pytest.mark.parametrize("force_fp32, weights_dtype", [(True, jnp.float32), (False, jnp.bfloat16)])
def test_flax_mixed_precision_sown_weights(force_fp32, weights_dtype):
    x = jax.random.uniform(jax.random.key(0), (2, 4))
    module = mha(num_heads=2, qkv_features=4, kernel_init=nn.initializers.lecun_normal(),
                 force_fp32_for_softmax=force_fp32, dtype=jnp.bfloat16)
    variables = module.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, x)
    _, updated = module.apply(variables, x, mutable=["intermediates"], sow_weights=True)
    assert updated["intermediates"]["attention_weights"][0].dtype == weights_dtype


def test_flax_autoregressive_decode_with_x64():
    with jax.enable_x64(True):
        x = jnp.ones((1, 4, 4))
        module = nn.MultiHeadDotProductAttention(num_heads=2, qkv_features=4, decode=True,
                                                 attention_fn=flax_attention_fn)
        variables = module.init(jax.random.PRNGKey(0), x, x, x)
        params, cache = variables["params"], variables["cache"]
        for step in range(2):
            y, updates = module.apply({"params": params, "cache": cache}, x[:, step:step + 1], mutable=["cache"])
            cache = updates["cache"]
            assert y.shape == (1, 1, 4) and y.dtype == x.dtype
