"""dot_product_attention's interface: jax.nn and Flax compatibility, transformations,
argument errors, implementation selection, block skipping and compiled memory."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.attention import dot_product_attention, flax_attention_fn, masks, select_implementation
from transformer_jax.attention.dispatch import REFERENCE_MAX_SCORES
from transformer_jax.attention.pallas_tuning import BlockSizes


def normal(seed, shape, dtype=jnp.float32):
    return jax.random.normal(jax.random.key(seed), shape, dtype)


def qkv(b=2, t=5, s=7, n=4, kv=2, d=8, seed=0):
    return normal(seed, (b, t, n, d)), normal(seed + 1, (b, s, kv, d)), normal(seed + 2, (b, s, kv, d))


@pytest.mark.parametrize(
    "t, s, kwargs",
    [
        (5, 7, {"is_causal": True}),
        (7, 5, {"is_causal": True}),
        (6, 9, {"local_window_size": (2, 1)}),
        (9, 6, {"local_window_size": 1, "is_causal": True}),
        (5, 7, {"query_seq_lengths": [5, 2], "key_value_seq_lengths": [3, 0], "is_causal": True}),
        (5, 7, {"bias": "bias", "mask": "mask"}),
    ],
)
def test_agrees_with_jax_nn_xla(t, s, kwargs):
    """Same semantics as jax.nn for q_len != kv_len; xla's empty rows zeroed like ours."""
    q, k, v = qkv(t=t, s=s)
    kwargs = dict(kwargs)
    if kwargs.get("bias") == "bias":
        kwargs["bias"] = normal(5, (1, 4, t, s))
        kwargs["mask"] = jax.random.bernoulli(jax.random.key(6), 0.6, (2, 1, t, s))
    for name in ("query_seq_lengths", "key_value_seq_lengths"):
        if name in kwargs:
            kwargs[name] = jnp.asarray(kwargs[name], jnp.int32)
    d_out = normal(7, q.shape)

    def out_and_grads(implementation):
        def loss(q, k, v):
            out = dot_product_attention(q, k, v, **kwargs, implementation=implementation)
            return jnp.sum(out * d_out), out

        return jax.jit(jax.grad(loss, argnums=(0, 1, 2), has_aux=True))(q, k, v)

    want_grads, out_xla = out_and_grads("xla")
    for impl in ("reference", "blockwise"):
        got_grads, out = out_and_grads(impl)
        np.testing.assert_allclose(out, out_xla, rtol=1e-5, atol=1e-5, err_msg=impl)
        for got, want in zip(got_grads, want_grads):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=impl)
    if "key_value_seq_lengths" in kwargs:  # kv length 0: every row of sequence 1 is empty
        assert np.all(np.asarray(out_xla[1]) == 0)


def test_jit_vmap_and_unbatched_inputs():
    q, k, v = qkv(b=3, t=6, s=6)
    batched = dot_product_attention(q, k, v, is_causal=True, implementation="blockwise", block_sizes=4)
    per_example = jax.jit(jax.vmap(lambda q, k, v: dot_product_attention(
        q, k, v, is_causal=True, implementation="blockwise", block_sizes=4)))(q, k, v)
    np.testing.assert_allclose(per_example, batched, rtol=1e-6, atol=1e-6)
    unbatched = dot_product_attention(q[1], k[1], v[1], is_causal=True, implementation="reference")
    np.testing.assert_allclose(unbatched, batched[1], rtol=1e-5, atol=1e-6)


def test_grad_through_vmap_matches_batched():
    q, k, v = qkv(b=2, t=6, s=6)

    def loss(q, k, v):
        return jnp.sum(jnp.sin(dot_product_attention(q, k, v, implementation="blockwise", block_sizes=(2, 4))))

    per_example = jax.vmap(jax.grad(loss, argnums=(0, 1, 2)))(q[:, None], k[:, None], v[:, None])
    batched = jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
    for got, want in zip(per_example, batched):
        np.testing.assert_allclose(got[:, 0], want, rtol=1e-5, atol=1e-6)


def test_flax_attention_fn_matches_flax_default():
    x = normal(0, (2, 6, 16))
    mask = nn.make_causal_mask(jnp.ones((2, 6)))
    ours = nn.MultiHeadDotProductAttention(num_heads=4, attention_fn=flax_attention_fn)
    theirs = nn.MultiHeadDotProductAttention(num_heads=4)
    params = theirs.init(jax.random.key(1), x, mask=mask)
    np.testing.assert_allclose(ours.apply(params, x, mask=mask), theirs.apply(params, x, mask=mask),
                               rtol=1e-5, atol=1e-6)


def test_flax_attention_dropout():
    x = normal(0, (2, 6, 16))
    module = nn.MultiHeadDotProductAttention(num_heads=2, dropout_rate=0.5, attention_fn=dot_product_attention)
    params = module.init(jax.random.key(1), x, deterministic=True)
    clean = module.apply(params, x, deterministic=True)
    noisy = [module.apply(params, x, deterministic=False, rngs={"dropout": jax.random.key(s)}) for s in (2, 2, 3)]
    assert np.all(np.isfinite(np.asarray(noisy[0])))
    np.testing.assert_array_equal(noisy[0], noisy[1])  # same key, same mask
    assert not np.allclose(noisy[0], noisy[2]) and not np.allclose(noisy[0], clean)


def test_deterministic_true_or_none_without_rate_means_no_dropout():
    q, k, v = qkv()
    plain = dot_product_attention(q, k, v)
    for deterministic, rate in ((True, 0.5), (None, 0.0), (False, 0.0)):
        out = dot_product_attention(q, k, v, dropout_rate=rate, dropout_rng=jax.random.key(0),
                                    deterministic=deterministic)
        np.testing.assert_array_equal(out, plain)


def test_dtype_argument_casts_inputs():
    q, k, v = qkv()
    out = dot_product_attention(q, k, v, dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16


Q, K, V = qkv()
BAD_CALLS = {
    "rank": (dict(key=K[0]), ValueError, "query, key and value"),
    "batch": (dict(key=K[:1], value=V[:1]), ValueError, "batch"),
    "head_dim": (dict(key=K[..., :4], value=V[..., :4]), ValueError, "head_dim"),
    "value shape": (dict(value=V[:, :3]), ValueError, "value"),
    "dtype": (dict(key=K.astype(jnp.bfloat16), value=V.astype(jnp.bfloat16)), ValueError, "dtype"),
    "int dtype": (dict(query=Q.astype(jnp.int32)), TypeError, "query"),
    "kv heads": (dict(key=K[:, :, :1].repeat(3, 2), value=V[:, :, :1].repeat(3, 2)), ValueError, "divide"),
    "block 0": (dict(block_sizes=0, implementation="blockwise"), ValueError, "block_sizes"),
    "block pair": (dict(block_sizes=(4, -1)), ValueError, "block_sizes"),
    "block type": (dict(block_sizes=2.5), TypeError, "block_sizes"),
    "pallas tiling elsewhere": (dict(block_sizes=BlockSizes(), implementation="blockwise"), ValueError,
                                "implementation='pallas'"),
    "pallas tiling auto": (dict(block_sizes=BlockSizes()), ValueError, "implementation='pallas'"),
    "implementation": (dict(implementation="flash"), ValueError, "implementation"),
    "cudnn on cpu": (dict(implementation="cudnn"), ValueError, "cudnn"),
    "pallas on cpu": (dict(implementation="pallas"), ValueError, "pallas"),
    "xla segments": (dict(implementation="xla", segment_ids=(jnp.zeros((2, 5), int), jnp.zeros((2, 7), int))),
                     ValueError, "segment_ids"),
    "xla dropout": (dict(implementation="xla", dropout_rate=0.1, deterministic=False,
                         dropout_rng=jax.random.key(0)), ValueError, "dropout"),
    "bias shape": (dict(bias=jnp.ones((2, 3, 5, 7))), ValueError, "bias"),
    "segments length": (dict(segment_ids=jnp.zeros((2, 5), int)), ValueError, "segment_ids"),
    "seq lengths": (dict(query_seq_lengths=jnp.ones((3,), jnp.int32)), ValueError, "query_seq_lengths"),
    "window": (dict(local_window_size=(-1, 2)), ValueError, "local_window_size"),
    "soft cap": (dict(logits_soft_cap=0.0), ValueError, "logits_soft_cap"),
    "dropout rate": (dict(dropout_rate=1.0), ValueError, "dropout_rate"),
    "dropout rng": (dict(dropout_rate=0.1, deterministic=False), ValueError, "dropout_rng"),
    "deterministic": (dict(dropout_rate=0.1, deterministic=None), ValueError, "deterministic"),
    "float mask": (dict(mask=jnp.ones((5, 7))), TypeError, "mask must be boolean"),
    "scale vector": (dict(scale=jnp.ones(2)), TypeError, "scale"),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_arguments_raise_at_trace_time(name):
    overrides, error, words = BAD_CALLS[name]
    args = {"query": Q, "key": K, "value": V, **overrides}
    arrays = {n: x for n, x in args.items() if isinstance(x, jax.Array)}
    static = {n: x for n, x in args.items() if n not in arrays}
    with pytest.raises(error, match=words):  # while tracing: nothing is compiled
        jax.eval_shape(lambda a: dot_product_attention(**a, **static), arrays)
    with pytest.raises(error, match=words):  # the inspection function agrees
        select_implementation(**args)


def test_selection_rules_on_cpu():
    def spec(*shape):
        return jax.ShapeDtypeStruct(shape, jnp.float32)

    small = select_implementation(spec(1, 64, 4, 64), spec(1, 64, 4, 64), spec(1, 64, 4, 64))
    assert small.implementation == "reference" and str(64 * 64) in small.reason
    side = int(np.sqrt(REFERENCE_MAX_SCORES)) * 2
    big = select_implementation(spec(1, side, 1, 64), spec(1, side, 1, 64), spec(1, side, 1, 64))
    assert big.implementation == "blockwise"
    decode = select_implementation(spec(8, 1, 4, 64), spec(8, 4096, 4, 64), spec(8, 4096, 4, 64),
                                   mask=jnp.ones((8, 1, 1, 4096), bool))
    assert decode.implementation == "reference"
    named = select_implementation(spec(1, 8, 1, 8), spec(1, 8, 1, 8), spec(1, 8, 1, 8), implementation="xla")
    assert named == ("xla", "requested by the caller")


@pytest.mark.parametrize("is_causal, window", [(True, None), (False, (5, 2)), (True, (7, 3)), (False, None)])
@pytest.mark.parametrize("t, s, bq, bk", [(13, 13, 4, 3), (10, 17, 3, 5), (17, 6, 5, 2)])
def test_block_ranges_are_exactly_the_visible_blocks(is_causal, window, t, s, bq, bk):
    """Brute force: a block is in the loop range iff it holds a pair the mask allows."""
    seq = masks.SequenceInfo()
    allowed = masks.allowed(jnp.arange(t), jnp.arange(s), seq, None, is_causal=is_causal, window=window)
    allowed = np.ones((t, s), bool) if allowed is None else np.asarray(allowed)
    nq, nk = -(-t // bq), -(-s // bk)
    visible = np.array([[allowed[i * bq:(i + 1) * bq, j * bk:(j + 1) * bk].any() for j in range(nk)]
                        for i in range(nq)])
    for i in range(nq):
        lo, hi = masks.key_block_range(i, bq, bk, t, s, is_causal=is_causal, window=window)
        assert np.array_equal(np.arange(nk)[visible[i]], np.arange(int(lo), int(hi)))
    for j in range(nk):
        lo, hi = masks.query_block_range(j, bq, bk, t, s, is_causal=is_causal, window=window)
        assert np.array_equal(np.arange(nq)[visible[:, j]], np.arange(int(lo), int(hi)))


def test_causal_visits_about_half_the_blocks():
    n, block = 4096, 256
    nb = n // block
    visited = sum(int(hi) - int(lo) for lo, hi in (
        masks.key_block_range(i, block, block, n, n, is_causal=True, window=None) for i in range(nb)))
    assert visited == nb * (nb + 1) // 2  # lower triangle incl. diagonal: 136 of 256


def _temp_bytes(implementation, n, d=64):
    """Temporary bytes of compiled forward+backward, batch 1, one head."""
    x = jax.ShapeDtypeStruct((1, n, 1, d), jnp.float32)

    def loss(q, k, v):
        return jnp.sum(dot_product_attention(q, k, v, implementation=implementation))

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(x, x, x).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_blockwise_memory_is_linear():
    reference = _temp_bytes("reference", 16384)
    blockwise = _temp_bytes("blockwise", 16384)
    doubled = _temp_bytes("blockwise", 32768)
    assert blockwise * 50 <= reference, (blockwise, reference)
    assert doubled <= 2 * blockwise * 1.1, (blockwise, doubled)


def test_xla_needs_no_more_temporary_memory_than_jax_nn():
    """Compiled temp bytes of implementation="xla" vs jax.nn itself: equal without a dense
    mask (no log-sum-exp is asked for); with one, only the [B, T] row flags on top."""
    q = jax.ShapeDtypeStruct((2, 256, 4, 64), jnp.float32)
    mask = jax.ShapeDtypeStruct((2, 1, 256, 256), jnp.bool_)

    def temp(f, *args):
        return jax.jit(f).lower(*args).compile().memory_analysis().temp_size_in_bytes

    for kwargs in ({}, {"is_causal": True}):
        ours = temp(lambda q, k, v: dot_product_attention(q, k, v, implementation="xla", **kwargs), q, q, q)
        assert ours <= temp(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, **kwargs), q, q, q), kwargs
    ours = temp(lambda q, k, v, m: dot_product_attention(q, k, v, mask=m, implementation="xla"), q, q, q, mask)
    theirs = temp(lambda q, k, v, m: jax.nn.dot_product_attention(q, k, v, mask=m), q, q, q, mask)
    assert ours <= theirs + 2 * 256
