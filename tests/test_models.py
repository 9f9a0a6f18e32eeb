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
    cfg = get_config("tiny", num_layers=8, d_model=64, d_ff=256, scan_layers=True)
    params = nn.unbox(jax.jit(DecoderLM(cfg).init)(KEY, np.zeros((1, 4), np.int32))["params"])
    layers = params["blocks"]["layers"]
    residual = 0.02 / np.sqrt(2 * 8)
    # >= 32k samples each: the sample std is within a few percent of the true one.
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
