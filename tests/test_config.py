"""ModelConfig validation, presets, serialisation, parameter and FLOP counts."""
import dataclasses
import json

import pytest

from transformer_jax.config import ModelConfig, get_config, list_presets
from transformer_jax.models import count_params, flops_per_token

REQUIRED_PRESETS = ["tiny", "char-small", "gpt2-small", "gpt2-medium", "bert-base", "transformer-base"]


def test_presets_listed_and_valid():
    assert set(REQUIRED_PRESETS) <= set(list_presets())
    for name in list_presets():
        assert isinstance(get_config(name), ModelConfig)


def test_preset_sizes_from_the_issue():
    gpt2 = get_config("gpt2-small")
    assert (gpt2.num_layers, gpt2.num_heads, gpt2.d_model, gpt2.max_len, gpt2.vocab_size) == (12, 12, 768, 1024, 50257)
    assert gpt2.tie_embeddings and gpt2.use_bias and gpt2.pos_encoding == "learned"
    char = get_config("char-small")
    assert (char.num_layers, char.num_heads, char.d_model, char.max_len) == (6, 6, 384, 256)
    base = get_config("transformer-base")
    assert (base.num_layers, base.decoder_layers, base.d_model, base.num_heads, base.d_ff) == (6, 6, 512, 8, 2048)
    assert (base.pos_encoding, base.norm_position, base.activation) == ("sinusoidal", "post", "relu")


def test_get_config_overrides_and_unknown_name():
    cfg = get_config("tiny", num_kv_heads=2, dtype="bfloat16")
    assert cfg.kv_heads == 2 and cfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match="gpt5"):
        get_config("gpt5")


@pytest.mark.parametrize(
    "field, value",
    [
        ("vocab_size", 0),
        ("max_len", -3),
        ("d_model", 30),  # not divisible by 4 heads
        ("num_heads", 0),
        ("num_layers", 2.5),
        ("d_ff", True),
        ("num_kv_heads", 3),  # does not divide 4 heads
        ("num_decoder_layers", 0),
        ("activation", "tanh"),
        ("norm", "batchnorm"),
        ("norm_position", "sandwich"),
        ("pos_encoding", "alibi"),
        ("dtype", "float64"),
        ("attention_impl", "flash"),
        ("remat_policy", "sometimes"),
        ("dropout_rate", 1.0),
        ("attention_dropout_rate", -0.1),
        ("layer_norm_eps", 0.0),
        ("rope_base", -1.0),
    ],
)
def test_validation_names_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        get_config("tiny", **{field: value})


def test_bool_fields_type_checked():
    with pytest.raises(TypeError, match="scan_layers"):
        get_config("tiny", scan_layers="yes")


def test_rotary_needs_even_head_dim():
    with pytest.raises(ValueError, match="head_dim"):
        get_config("tiny", d_model=36, num_heads=4, pos_encoding="rotary")  # head_dim 9


def test_replace_revalidates_and_config_is_frozen():
    cfg = get_config("tiny")
    with pytest.raises(ValueError, match="num_heads"):
        dataclasses.replace(cfg, num_heads=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_model = 64


def test_dict_roundtrip_through_json():
    for name in list_presets():
        cfg = get_config(name, attention_impl="blockwise")
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="colour"):
        ModelConfig.from_dict({**get_config("tiny").to_dict(), "colour": "red"})


def analytic_decoder_params(cfg: ModelConfig) -> int:
    """Parameter count of a DecoderLM written out by hand (independent of the modules)."""
    d, f, hd = cfg.d_model, cfg.d_ff, cfg.head_dim
    b = int(cfg.use_bias)
    norm = d * (2 if cfg.norm == "layernorm" and cfg.use_bias else 1)
    q_out = 2 * (d * d + b * d)
    kv = 2 * (d * cfg.kv_heads * hd + b * cfg.kv_heads * hd)
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * f + b * (f * (2 if cfg.activation == "swiglu" else 1) + d)
    layer = q_out + kv + mlp + 2 * norm
    embed = cfg.vocab_size * d * (1 if cfg.tie_embeddings else 2)
    pos = cfg.max_len * d if cfg.pos_encoding == "learned" else 0
    final = norm if cfg.norm_position == "pre" else 0
    return cfg.num_layers * layer + embed + pos + final


def test_gpt2_parameter_counts():
    assert count_params(get_config("gpt2-small")) == 124_439_808
    assert analytic_decoder_params(get_config("gpt2-small")) == 124_439_808
    assert count_params(get_config("gpt2-medium")) == 354_823_168


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        dict(num_kv_heads=2, activation="swiglu", norm="rmsnorm", use_bias=False, pos_encoding="rotary"),
        dict(tie_embeddings=False, norm_position="post", pos_encoding="sinusoidal", activation="relu"),
        dict(scan_layers=True, num_layers=3, num_kv_heads=1),
    ],
)
def test_count_params_matches_analytic(overrides):
    cfg = get_config("tiny", **overrides)
    assert count_params(cfg) == analytic_decoder_params(cfg)


def test_encoder_family_counts():
    cfg = get_config("tiny")
    d, v = cfg.d_model, cfg.vocab_size
    encoder = count_params(cfg, "encoder")
    # The encoder has the decoder LM's layers; the MLM head adds dense + norm + output bias.
    assert encoder == analytic_decoder_params(cfg)
    assert count_params(cfg, "masked_lm") == encoder + (d * d + d) + 2 * d + v
    # Encoder-decoder: decoder layers add cross-attention (4 projections + a norm).
    cross = 4 * (d * d + d) + 2 * d
    pos = cfg.max_len * d
    expected = 2 * (encoder - v * d - pos - 2 * d) + cfg.num_layers * cross + v * d + pos + 2 * 2 * d
    assert count_params(cfg, "encoder_decoder") == expected
    with pytest.raises(ValueError, match="model"):
        count_params(cfg, "gpt")


def test_flops_per_token_formula():
    cfg = get_config("gpt2-small")
    non_embedding = 124_439_808 - 50257 * 768 - 1024 * 768
    expected = 6 * (non_embedding + 50257 * 768) + 12 * 12 * 768 * 1024
    assert flops_per_token(cfg, 1024) == expected
    # The attention term grows linearly with the sequence length.
    assert flops_per_token(cfg, 2048) - flops_per_token(cfg, 1024) == 12 * 12 * 768 * 1024
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(cfg, 0)


@pytest.mark.parametrize("field", ["rope_base", "layer_norm_eps", "dropout_rate", "attention_dropout_rate"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_values_are_rejected_up_front(field, value):
    with pytest.raises(ValueError, match=f"{field}={value!r}"):
        get_config("tiny", **{field: value})
    saved = json.loads(json.dumps({**get_config("tiny").to_dict(), field: value}))  # JSON spells NaN
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_dict(saved)


def test_presets_fuse_q_k_v_unless_grouped_query_attention_is_asked_for():
    assert get_config("gpt2-small").fused_qkv and not get_config("tiny").fused_qkv
    assert not get_config("gpt2-small", num_kv_heads=4).fused_qkv  # the preset's choice yields
    assert get_config("gpt2-small", num_kv_heads=12).fused_qkv  # as many kv heads as heads: still fused
    with pytest.raises(ValueError, match="fused_qkv=True needs"):
        get_config("gpt2-small", num_kv_heads=4, fused_qkv=True)  # asked for both: an error
