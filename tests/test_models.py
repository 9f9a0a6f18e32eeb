"""Model-level properties: shapes/dtypes, causality, KV-cache decoding, padding invariance,
pooling, packing, attention implementations, scan/remat equivalence, bad input.

Inputs and weights are NumPy-random (no per-leaf jax.random compilations); every model
call is jitted and shapes are reused so that each test compiles only a few programs.
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.config import get_config, list_presets
from transformer_jax.models import (
    DecoderLM,
    Encoder,
    EncoderDecoder,
    MaskedLM,
    SequenceClassifier,
    check_tokens,
    init_cache,
    pool,
)

KEY = jax.random.key(0)
TINY = get_config("tiny")


def random_params(model, seed, *args, scale=0.1, **kwargs):
    """Unboxed params of `model` drawn from normal(scale) in NumPy (the 0.02 init makes
    the logits nearly constant, so comparisons would test little)."""
    shapes = nn.unbox(jax.eval_shape(model.init, KEY, *args, **kwargs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def tokens(seed, shape, vocab=TINY.vocab_size):
    return np.random.default_rng(seed).integers(0, vocab, shape).astype(np.int32)


def restack(params):
    """Plain-stack params {..., blocks: {layer_0, layer_1, ...}} -> the scanned layout."""
    def convert(tree):
        if not isinstance(tree, dict):
            return tree
        layers = sorted((k for k in tree if k.startswith("layer_")), key=lambda k: int(k[6:]))
        if layers:
            return {"layers": jax.tree.map(lambda *xs: np.stack(xs), *[tree[k] for k in layers])}
        return {k: convert(v) for k, v in tree.items()}
    return convert(params)


# ---------------------------------------------------------------- shapes and dtypes


@pytest.mark.parametrize("name", list_presets())
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_preset_output_shapes_and_dtypes(name, dtype):
    cfg = get_config(name, dtype=dtype, scan_layers=True)  # scanned: cheap to trace
    src = jax.ShapeDtypeStruct((2, 8), jnp.int32)
    tgt = jax.ShapeDtypeStruct((2, 5), jnp.int32)
    if name == "bert-base":
        cases = [(MaskedLM(cfg), (src,), (2, 8, cfg.vocab_size)), (SequenceClassifier(cfg, 3), (src,), (2, 3)),
                 (Encoder(cfg), (src,), (2, 8, cfg.d_model))]
    elif name == "transformer-base":
        cases = [(EncoderDecoder(cfg), (src, tgt), (2, 5, cfg.vocab_size))]
    else:
        cases = [(DecoderLM(cfg), (src,), (2, 8, cfg.vocab_size))]
    for model, args, shape in cases:
        variables = jax.eval_shape(model.init, KEY, *args)
        assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(variables)), "params must be float32"
        out = jax.eval_shape(model.apply, variables, *args)
        expected_dtype = cfg.compute_dtype if isinstance(model, Encoder) else jnp.float32
        assert (out.shape, out.dtype) == (shape, expected_dtype), type(model).__name__


def test_encoder_decoder_methods_shapes():
    model = EncoderDecoder(TINY)
    src, tgt = jax.ShapeDtypeStruct((3, 7), jnp.int32), jax.ShapeDtypeStruct((3, 4), jnp.int32)
    variables = jax.eval_shape(model.init, KEY, src, tgt)
    encoded = jax.eval_shape(functools.partial(model.apply, method=EncoderDecoder.encode), variables, src)
    assert encoded.shape == (3, 7, TINY.d_model)
    logits = jax.eval_shape(functools.partial(model.apply, method=EncoderDecoder.decode), variables, encoded, tgt)
    assert (logits.shape, logits.dtype) == ((3, 4, TINY.vocab_size), jnp.float32)


def test_gpt2_init_scales_residual_projections():
    cfg = get_config("tiny", num_layers=8, scan_layers=True)
    key = jax.random.key(0, impl="rbg")  # compiles in half the time of threefry on CPU
    params = nn.unbox(jax.jit(DecoderLM(cfg).init)(key, np.zeros((1, 4), np.int32))["params"])
    layers = params["blocks"]["layers"]
    residual = 0.02 / np.sqrt(2 * 8)
    # >= 8k samples each: a sample std within 5% of the true one is > 5 sigma away from failing.
    assert np.std(layers["mlp"]["wo"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert np.std(layers["self_attn"]["out"]["kernel"]) == pytest.approx(residual, rel=0.05)
    assert np.std(layers["mlp"]["wi"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert np.std(layers["self_attn"]["query"]["kernel"]) == pytest.approx(0.02, rel=0.05)
    assert not np.any(layers["mlp"]["wi"]["bias"])
    # Layers draw different weights (split "params" rng under scan).
    assert not np.allclose(layers["mlp"]["wi"]["kernel"][0], layers["mlp"]["wi"]["kernel"][1])


# ---------------------------------------------------------------- DecoderLM


@pytest.fixture(scope="module")
def lm():
    model = DecoderLM(TINY)
    params = random_params(model, 1, np.zeros((1, 1), np.int32))
    return model, params, jax.jit(lambda p, x: model.apply({"params": p}, x))


def test_causality(lm):
    model, params, forward = lm
    rng = np.random.default_rng(2)
    base = tokens(3, (2, 12))
    out = np.asarray(forward(params, base))
    for cut in rng.choice(11, size=3, replace=False):
        changed = base.copy()
        changed[:, cut + 1:] = tokens(int(cut) + 10, (2, 11 - cut))
        new = np.asarray(forward(params, changed))
        np.testing.assert_array_equal(new[:, : cut + 1], out[:, : cut + 1])
        assert not np.allclose(new[:, cut + 1:], out[:, cut + 1:])


def test_bfloat16_compute_keeps_float32_params_and_logits(lm):
    _, params, forward = lm
    model = DecoderLM(get_config("tiny", dtype="bfloat16"))
    x = tokens(26, (2, 12))
    logits = jax.jit(lambda p, x: model.apply({"params": p}, x))(params, x)
    reference = np.asarray(forward(params, x))
    assert logits.dtype == jnp.float32
    # bf16 rounds to 2**-9 relative per op; through two blocks (measured: 0.5%) the logits
    # stay within 2% of their float32 range.
    scale = np.abs(reference).max()
    assert np.abs(np.asarray(logits) - reference).max() <= 0.02 * scale
    assert not np.allclose(logits, reference, rtol=0, atol=1e-6 * scale)  # really ran in bf16


def test_packed_segments_equal_separate_sequences(lm):
    model, params, forward = lm
    a, b = tokens(4, (1, 5)), tokens(5, (1, 7))
    packed = np.concatenate([a, b], axis=1)
    segments = np.array([[1] * 5 + [2] * 7], np.int32)
    got = jax.jit(lambda p, x, s: model.apply({"params": p}, x, segment_ids=s))(params, packed, segments)
    # Causal: right padding to the packed length does not change the real positions.
    alone_a = forward(params, np.pad(a, ((0, 0), (0, 7))))[:, :5]
    alone_b = forward(params, np.pad(b, ((0, 0), (0, 5))))[:, :7]
    alone = np.concatenate([alone_a, alone_b], axis=1)
    np.testing.assert_allclose(got, alone, atol=1e-5)


def test_dropout_uses_the_dropout_stream(lm):
    model, params, forward = lm
    cfg = get_config("tiny", dropout_rate=0.3, attention_dropout_rate=0.2)
    train = DecoderLM(cfg)
    step = jax.jit(lambda p, x, r: train.apply({"params": p}, x, deterministic=False, rngs={"dropout": r}))
    x = tokens(6, (2, 12))
    first, again = step(params, x, jax.random.key(1)), step(params, x, jax.random.key(1))
    other = step(params, x, jax.random.key(2))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert not np.allclose(first, forward(params, x))
    with pytest.raises(Exception, match="dropout"):
        train.apply({"params": params}, x, deterministic=False)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(pos_encoding="rotary", num_kv_heads=2, activation="swiglu", norm="rmsnorm", scan_layers=True),
        dict(pos_encoding="sinusoidal", norm_position="post", tie_embeddings=False, num_kv_heads=1),
        dict(fused_qkv=True, pos_encoding="rotary", scan_layers=True),
    ],
)
def test_cached_decoding_matches_full_forward(overrides):
    cfg = get_config("tiny", **overrides)
    model = DecoderLM(cfg)
    b, prompt_len, total = 3, 6, 12
    seq = tokens(7, (b, total))
    params = random_params(model, 8, seq[:, :1])
    full = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x))(params, seq))

    @jax.jit
    def step(cache, x, lengths):
        logits, state = model.apply(
            {"params": params, "cache": cache}, x, decode=True, decode_lengths=lengths, mutable=["cache"]
        )
        return logits, state["cache"]

    lengths = np.array([6, 2, 4], np.int32)
    prompt = np.where(np.arange(prompt_len) < lengths[:, None], seq[:, :prompt_len], 0).astype(np.int32)
    cache = init_cache(model, b, cfg.max_len)
    logits, cache = step(cache, prompt, lengths)
    errors = [np.abs(logits[i, : lengths[i]] - full[i, : lengths[i]]).max() for i in range(b)]
    for s in range(total - prompt_len):
        positions = lengths + s
        logits, cache = step(cache, seq[np.arange(b), positions][:, None], np.ones(b, np.int32))
        errors.append(np.abs(logits[:, 0] - full[np.arange(b), positions]).max())
    assert np.abs(full).max() > 0.1  # the comparison is not between near-zero logits
    assert max(errors) <= 1e-5
    np.testing.assert_array_equal(cache["cache_position"]["index"], lengths + total - prompt_len)


def test_decode_requires_a_cache_and_valid_lengths(lm):
    model, params, _ = lm
    x = jax.ShapeDtypeStruct((2, 3), jnp.int32)
    with pytest.raises(ValueError, match="cache"):
        jax.eval_shape(lambda p, x: model.apply({"params": p}, x, decode=True, mutable=["cache"]), params, x)
    cache = init_cache(model, 2, 16)
    bad = jax.ShapeDtypeStruct((3,), jnp.int32)
    with pytest.raises(ValueError, match="decode_lengths"):
        jax.eval_shape(
            lambda c, x, n: model.apply({"params": params, "cache": c}, x, decode=True, decode_lengths=n,
                                        mutable=["cache"]), cache, x, bad)
    with pytest.raises(ValueError, match="max_len"):
        init_cache(model, 2, TINY.max_len + 1)  # past the learned position table


# ---------------------------------------------------------------- scan and remat


def lm_loss(model, params, x):
    return jnp.mean(jax.nn.log_softmax(model.apply({"params": params}, x))[..., 0])


@pytest.fixture(scope="module")
def plain_loss_and_grad(lm):
    model, params, _ = lm
    x = tokens(9, (2, 12))
    return x, jax.jit(jax.value_and_grad(functools.partial(lm_loss, model)))(params, x)


@pytest.mark.parametrize(
    "overrides", [dict(scan_layers=True), dict(remat_policy="full"), dict(scan_layers=True, remat_policy="dots")]
)
def test_scan_and_remat_equal_the_plain_stack(lm, plain_loss_and_grad, overrides):
    _, params, _ = lm
    x, (plain_loss, plain_grad) = plain_loss_and_grad
    scanned = overrides.get("scan_layers", False)
    variant = DecoderLM(get_config("tiny", **overrides))
    loss, grad = jax.jit(jax.value_and_grad(functools.partial(lm_loss, variant)))(
        restack(params) if scanned else params, x
    )
    np.testing.assert_allclose(loss, plain_loss, rtol=1e-6)
    expected = restack(plain_grad) if scanned else plain_grad
    jax.tree.map(lambda g, e: np.testing.assert_allclose(g, e, rtol=1e-4, atol=1e-7), grad, expected)


# ---------------------------------------------------------------- encoder family


def insert_padding(real, seed, extra):
    """Scatter `extra` padding slots (garbage ids) among the real tokens of each row.

    Returns the padded tokens [b, t + extra], the padding mask and, per row, the indices
    of the real tokens in the padded sequence (in order).
    """
    rng = np.random.default_rng(seed)
    b, t = real.shape
    padded = rng.integers(0, TINY.vocab_size, (b, t + extra)).astype(np.int32)
    mask = np.zeros((b, t + extra), bool)
    where = np.stack([np.sort(rng.choice(t + extra, t, replace=False)) for _ in range(b)])
    for i in range(b):
        padded[i, where[i]] = real[i]
        mask[i, where[i]] = True
    return padded, mask, where


@pytest.fixture(scope="module")
def encoder():
    model = Encoder(TINY)
    params = random_params(model, 11, np.zeros((1, 1), np.int32))
    apply = jax.jit(lambda p, x, m: model.apply({"params": p}, x, padding_mask=m))
    return model, params, apply


def test_padding_never_changes_real_encoder_outputs(encoder):
    _, params, apply = encoder
    real = tokens(12, (3, 6))
    unpadded = np.asarray(apply(params, real, np.ones_like(real, bool)))
    padded, mask, where = insert_padding(real, 13, extra=4)
    out = np.asarray(apply(params, padded, mask))
    for i in range(3):
        np.testing.assert_allclose(out[i, where[i]], unpadded[i], atol=2e-5)
    # ...and pooling ignores the padding slots.
    for method in ("mean", "first"):
        np.testing.assert_allclose(
            pool(out, mask, method), pool(unpadded, None, method), atol=2e-5
        )


def test_pool_matches_numpy_and_ignores_padding_values():
    rng = np.random.default_rng(14)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array([[1, 1, 0, 1, 0], [0, 0, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
    hidden[~mask] = np.nan  # whatever sits at padding slots must not leak into the result
    pooled_mean = jax.jit(pool, static_argnums=2)(hidden, mask, "mean")
    pooled_first = jax.jit(pool, static_argnums=2)(hidden, mask, "first")
    pooled_max = jax.jit(pool, static_argnums=2)(hidden, mask, "max")
    for i in range(3):
        np.testing.assert_allclose(pooled_mean[i], hidden[i][mask[i]].mean(0), rtol=1e-6)
        np.testing.assert_array_equal(pooled_first[i], hidden[i][mask[i]][0])
        np.testing.assert_array_equal(pooled_max[i], hidden[i][mask[i]].max(0))
    assert pooled_mean.dtype == jnp.float32
    with pytest.raises(ValueError, match="method"):
        pool(hidden, mask, "median")
    with pytest.raises(ValueError, match="padding_mask"):
        pool(hidden, mask[:, :4], "mean")


def test_masked_lm_checkpoint_loads_into_classifier():
    x = tokens(15, (2, 6))
    mask = np.ones((2, 6), bool)
    mlm = MaskedLM(TINY)
    mlm_params = random_params(mlm, 16, x)
    clf = SequenceClassifier(TINY, num_classes=3, pooling="mean")
    clf_shapes = nn.unbox(jax.eval_shape(clf.init, KEY, x)["params"])
    assert jax.tree.structure(clf_shapes["encoder"]) == jax.tree.structure(mlm_params["encoder"])
    head = random_params(clf, 17, x)["classifier"]
    params = {"encoder": mlm_params["encoder"], "classifier": head}
    logits = jax.jit(lambda p: clf.apply({"params": p}, x, padding_mask=mask))(params)
    assert logits.shape == (2, 3) and logits.dtype == jnp.float32
    # The classifier is a linear map of the mean-pooled encoder output.
    hidden = jax.jit(Encoder(TINY).apply)({"params": mlm_params["encoder"]}, x)
    expected = np.asarray(hidden, np.float64).mean(1) @ head["kernel"] + head["bias"]
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="pooling"):
        jax.eval_shape(SequenceClassifier(TINY, 3, pooling="median").init, KEY, x)


# ---------------------------------------------------------------- encoder-decoder


@pytest.fixture(scope="module")
def seq2seq():
    model = EncoderDecoder(TINY)
    params = random_params(model, 18, np.zeros((1, 1), np.int32), np.zeros((1, 1), np.int32))
    return model, params


def test_cross_attention_ignores_source_padding(seq2seq):
    model, params = seq2seq
    apply = jax.jit(lambda p, s, t, m: model.apply({"params": p}, s, t, src_padding_mask=m))
    src, tgt = tokens(19, (3, 6)), tokens(20, (3, 5))
    unpadded = apply(params, src, tgt, np.ones_like(src, bool))
    padded, mask, _ = insert_padding(src, 21, extra=3)
    np.testing.assert_allclose(apply(params, padded, tgt, mask), unpadded, atol=2e-5)


@pytest.mark.parametrize("overrides", [{}, dict(scan_layers=True, remat_policy="full")])
def test_encoder_decoder_cached_decoding_matches_full_forward(seq2seq, overrides):
    _, plain_params = seq2seq
    model = EncoderDecoder(get_config("tiny", **overrides))
    params = restack(plain_params) if overrides else plain_params
    b, total = 2, 7
    src, tgt = tokens(22, (b, 6)), tokens(23, (b, total))
    src_mask = np.array([[True] * 6, [True] * 4 + [False] * 2])
    full = np.asarray(jax.jit(lambda p: model.apply({"params": p}, src, tgt, src_padding_mask=src_mask))(params))
    encoded = jax.jit(lambda p: model.apply({"params": p}, src, src_padding_mask=src_mask,
                                            method=EncoderDecoder.encode))(params)

    @jax.jit
    def step(cache, encoded, x, lengths):
        logits, state = model.apply(
            {"params": params, "cache": cache}, encoded, x, src_padding_mask=src_mask, decode=True,
            decode_lengths=lengths, mutable=["cache"], method=EncoderDecoder.decode,
        )
        return logits, state["cache"]

    lengths = np.array([3, 1], np.int32)
    prompt = np.where(np.arange(3) < lengths[:, None], tgt[:, :3], 0).astype(np.int32)
    cache = init_cache(model, b, TINY.max_len, src_len=6)
    logits, cache = step(cache, encoded, prompt, lengths)
    errors = [np.abs(logits[i, : lengths[i]] - full[i, : lengths[i]]).max() for i in range(b)]
    # The prefill cached the cross-attention keys/values: later steps ignore `encoded`.
    ignored = np.zeros_like(encoded)
    for s in range(3):
        positions = lengths + s
        logits, cache = step(cache, ignored, tgt[np.arange(b), positions][:, None], np.ones(b, np.int32))
        errors.append(np.abs(logits[:, 0] - full[np.arange(b), positions]).max())
    assert np.abs(full).max() > 0.1
    assert max(errors) <= 1e-5


@pytest.fixture(scope="module")
def seq2seq_by_implementation(seq2seq):
    """Logits of the seq2seq model per attention implementation, on one padded batch:
    bidirectional self-attention with padding (encoder), causal (decoder), cross with
    padding. ("cudnn" and "pallas" need a GPU and are covered by the attention tests.)"""
    _, params = seq2seq
    src, tgt = tokens(24, (2, 9)), tokens(25, (2, 7))
    src_mask = np.array([[True] * 9, [True] * 5 + [False] * 4])

    @functools.cache
    def run(impl):
        m = EncoderDecoder(get_config("tiny", attention_impl=impl))
        return np.asarray(jax.jit(lambda p: m.apply({"params": p}, src, tgt, src_padding_mask=src_mask))(params))

    return run


@pytest.mark.parametrize("implementation", ["blockwise", "xla"])
def test_attention_implementations_give_the_same_model_outputs(seq2seq_by_implementation, implementation):
    run = seq2seq_by_implementation
    reference = run("reference")
    assert np.abs(reference).max() > 0.1
    np.testing.assert_allclose(run(implementation), reference, atol=2e-5)


def test_bad_inputs_raise_at_trace_time(seq2seq):
    model, params = seq2seq
    spec = lambda *shape, dtype=jnp.int32: jax.ShapeDtypeStruct(shape, dtype)  # noqa: E731
    decode = functools.partial(model.apply, {"params": params}, method=EncoderDecoder.decode)
    with pytest.raises(ValueError, match="encoded"):  # batch mismatch
        jax.eval_shape(decode, spec(3, 6, TINY.d_model, dtype=jnp.float32), spec(2, 4))
    with pytest.raises(ValueError, match="src_padding_mask"):
        jax.eval_shape(lambda e, t, m: decode(e, t, src_padding_mask=m),
                       spec(2, 6, TINY.d_model, dtype=jnp.float32), spec(2, 4), spec(2, 5, dtype=jnp.bool_))
    with pytest.raises(ValueError, match="src_padding_mask"):
        jax.eval_shape(lambda s, t, m: model.apply({"params": params}, s, t, src_padding_mask=m),
                       spec(2, 6), spec(2, 4), spec(2, 6))  # int, not bool
    with pytest.raises(ValueError, match="padding_mask"):
        jax.eval_shape(lambda x, m: Encoder(TINY).apply({"params": params}, x, padding_mask=m),
                       spec(2, 6), spec(6, dtype=jnp.bool_))
    with pytest.raises(ValueError, match="tokens"):
        jax.eval_shape(lambda x: DecoderLM(TINY).apply({"params": params}, x), spec(2, 6, dtype=jnp.float32))
    with pytest.raises(ValueError, match="max_len"):
        jax.eval_shape(lambda x: DecoderLM(TINY).apply({"params": params}, x), spec(2, TINY.max_len + 1))
    with pytest.raises(ValueError, match="segment_ids"):
        jax.eval_shape(lambda x, s: DecoderLM(TINY).apply({"params": params}, x, segment_ids=s),
                       spec(2, 6), spec(2, 5))


def test_check_tokens():
    check_tokens(np.array([[0, TINY.vocab_size - 1]]), TINY)  # valid: no error
    with pytest.raises(ValueError, match="ids"):
        check_tokens(np.array([[0, TINY.vocab_size]]), TINY)
    with pytest.raises(ValueError, match="prompt"):
        check_tokens(np.array([[-1, 3]]), TINY, "prompt")
    with pytest.raises(ValueError, match="max_len"):
        check_tokens(np.zeros((1, TINY.max_len + 1), np.int32), TINY)
    check_tokens(np.zeros((1, TINY.max_len + 1), np.int32), get_config("tiny", pos_encoding="rotary"))
    with pytest.raises(ValueError, match="integer"):
        check_tokens(np.zeros((2, 3), np.float32), TINY)
