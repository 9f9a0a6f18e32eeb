"""The architecture options added for pretrained models, against independent references.

(End to end they are also checked against transformers by tests/test_pretrained.py.)
"""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import DecoderLM, Encoder, generate, get_config
from transformer_jax.layers import sinusoidal_encoding
from transformer_jax.layers.feedforward import activation_fn

KEY = jax.random.key(0)


def test_split_sinusoids_match_the_formula():
    positions = np.array([[0, 3, 17]])
    got = np.asarray(sinusoidal_encoding(jnp.asarray(positions), 8, "split"))
    i = np.arange(4)
    angles = positions[..., None].astype(np.float64) / 10000.0 ** (2 * i / 8)
    np.testing.assert_allclose(got, np.concatenate([np.sin(angles), np.cos(angles)], -1), atol=1e-6)
    interleaved = np.asarray(sinusoidal_encoding(jnp.asarray(positions), 8))
    np.testing.assert_allclose(interleaved[..., 0::2], got[..., :4], atol=1e-6)  # same values, other order


def test_exact_gelu_and_silu_match_the_formulas():
    x = np.random.default_rng(0).normal(scale=3, size=50)
    exact = np.array([v * 0.5 * (1 + math.erf(v / math.sqrt(2))) for v in x])
    np.testing.assert_allclose(activation_fn("gelu_exact")(jnp.asarray(x, jnp.float32)), exact, atol=1e-5)
    assert np.abs(np.asarray(activation_fn("gelu")(jnp.asarray(x, jnp.float32))) - exact).max() > 1e-4
    np.testing.assert_allclose(activation_fn("silu")(jnp.asarray(x, jnp.float32)), x / (1 + np.exp(-x)), atol=1e-5)


def test_sliding_window_limits_what_each_position_sees():
    """2 layers with window 3: position p depends on tokens p-4 ... p only (brute force),
    and cached decoding (the cache's own mask) gives the tokens of the full forward."""
    cfg = get_config("tiny", sliding_window=3, pos_encoding="rotary", norm="rmsnorm", use_bias=False)
    model = DecoderLM(cfg)
    x = jax.random.randint(jax.random.key(1), (1, 10), 0, cfg.vocab_size)
    params = model.init(KEY, x)["params"]
    params = jax.tree.map(lambda p: p * 5 if p.ndim > 1 else p, params)  # large enough to matter
    apply = jax.jit(lambda t: model.apply({"params": params}, t))
    base = np.asarray(apply(x))
    changed = np.asarray(apply(x.at[0, 2].set((x[0, 2] + 1) % cfg.vocab_size)))
    moved = np.abs(changed - base).max(-1)[0]
    assert (moved[:2] == 0).all() and (moved[2:7] > 1e-4).all() and (moved[7:] == 0).all(), moved
    options = dict(max_new_tokens=6)
    cached = generate(model, params, np.asarray(x[:, :4]), **options)
    uncached = generate(model, params, np.asarray(x[:, :4]), use_cache=False, **options)
    np.testing.assert_array_equal(cached.tokens, uncached.tokens)


def test_token_types_and_embedding_norm():
    cfg = get_config("tiny", type_vocab_size=2, embedding_norm=True, activation="gelu_exact")
    model = Encoder(cfg)
    x = jnp.array([[1, 2, 3, 4]])
    params = model.init(KEY, x)["params"]
    types = jnp.array([[0, 0, 1, 1]])
    zero = model.apply({"params": params}, x)
    np.testing.assert_array_equal(zero, model.apply({"params": params}, x, token_type_ids=jnp.zeros_like(x)))
    assert not np.allclose(zero, model.apply({"params": params}, x, token_type_ids=types))
    with pytest.raises(ValueError, match="token_type_ids"):
        Encoder(get_config("tiny")).init(KEY, x, token_type_ids=types)


def test_suppressed_tokens_are_never_generated():
    """Greedy decoding with suppress_ids equals the argmax over the other tokens, step by
    step, of full forward passes (causal: the logits at slot p ignore the slots after it)."""
    cfg = get_config("tiny")
    model = DecoderLM(cfg)
    prompt, new = np.array([[3, 5, 7]]), 5
    params = model.init(KEY, prompt)["params"]
    apply = jax.jit(lambda t: model.apply({"params": params}, t))

    def reference(banned):
        seq = np.zeros((1, 3 + new), np.int32)
        seq[:, :3] = prompt
        for step in range(new):
            logits = np.array(apply(seq)[0, 2 + step])
            logits[list(banned)] = -np.inf
            seq[0, 3 + step] = int(np.argmax(logits))
        return seq[0, 3:]

    banned = sorted(set(reference([]).tolist()))  # what greedy would say without suppression
    out = generate(model, params, prompt, max_new_tokens=new, suppress_ids=banned)
    assert not set(np.asarray(out.tokens[0]).tolist()) & set(banned)
    np.testing.assert_array_equal(out.tokens[0], reference(banned))


@pytest.mark.parametrize(
    "field, value",
    [("type_vocab_size", -1), ("sliding_window", 0), ("qkv_bias", 1), ("sinusoidal_layout", "cos"),
     ("embedding_norm", "yes"), ("final_logits_bias", None), ("activation", "tanh")],
)
def test_new_config_fields_are_validated(field, value):
    with pytest.raises((ValueError, TypeError), match=field):
        dataclasses.replace(get_config("tiny"), **{field: value})


def test_hf_tokenizer_wrapper_on_a_byte_level_bpe(tmp_path):
    from transformer_jax.pretrained import HFTokenizer
    from transformer_jax.tokenizers import BPETokenizer

    trained = BPETokenizer.train("hello world, hello there\n" * 20, vocab_size=300)
    data = json.loads(trained.to_json())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] == "<eos>"]  # no pad, no bos
    tok = HFTokenizer(json.dumps(data), max_length=4)
    assert tok.pad_id == tok.eos_id >= 0 and tok.mask_id == -1
    ids = tok.encode("hello world, hello there")
    assert len(ids) > 4 and tok.decode(ids) == "hello world, hello there"
    assert [len(i) for i in tok.encode_batch(["hello world, hello there", "hi"])][0] == 4
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["model_max_length"] == 4
