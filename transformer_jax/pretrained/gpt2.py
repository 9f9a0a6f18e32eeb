"""GPT-2 (`model_type` "gpt2", GPT2LMHeadModel) <-> DecoderLM.

GPT-2 keeps its projections in `Conv1D` layers, whose weights are already [in, out];
`attn.c_attn` holds query, key and value side by side ([d, 3d]): a model loaded from it
gets `fused_qkv=True`, whose kernel [d, 3, heads, head_dim] is a reshape of those bytes
(so it loads without a copy); a model with separate query/key/value kernels is saved
(and loaded) by splitting and joining the columns. The read-out is tied to `wte` unless
`tie_word_embeddings` is false.
Activation "gelu_new" is the tanh GELU, our "gelu".
"""
from __future__ import annotations

import re

import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.pretrained.common import (
    ACTIVATIONS_TO_HF, Entry, activation, get, same, unsupported)

MODEL_TYPES = ("gpt2",)
PREFIX = "transformer."
# Causal-mask buffers of old checkpoints: no weights.
TIED = ("lm_head.weight",)
IGNORED = re.compile(r"(transformer\.)?h\.\d+\.attn\.(masked_)?bias$")


def from_hf(hf: dict, sentence: bool) -> tuple[ModelConfig, str]:
    t = "gpt2"
    if hf.get("embd_pdrop", 0.0) != hf.get("resid_pdrop", 0.0):
        raise unsupported("embd_pdrop", hf["embd_pdrop"], t, f"equal to resid_pdrop={hf.get('resid_pdrop')}")
    for option, ok in (("add_cross_attention", False), ("scale_attn_by_inverse_layer_idx", False),
                       ("scale_attn_weights", True)):
        if hf.get(option, ok) != ok:
            raise unsupported(option, hf[option], t, f"{option}={ok}")
    if sentence:
        raise ValueError("a sentence-transformers directory of a gpt2 model is not supported")
    d = get(hf, "n_embd", t)
    cfg = ModelConfig(
        vocab_size=get(hf, "vocab_size", t), max_len=get(hf, "n_positions", t), d_model=d,
        num_heads=get(hf, "n_head", t), num_layers=get(hf, "n_layer", t),
        d_ff=get(hf, "n_inner", t, 4 * d),
        activation=activation(get(hf, "activation_function", t, "gelu_new"), "activation_function", t),
        layer_norm_eps=float(get(hf, "layer_norm_epsilon", t, 1e-5)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout_rate=float(hf.get("resid_pdrop", 0.0)),
        attention_dropout_rate=float(hf.get("attn_pdrop", 0.0)), fused_qkv=True,
    )
    return cfg, "decoder_lm"


def to_hf(cfg: ModelConfig, kind: str) -> dict:
    return {
        "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": cfg.vocab_size,
        "n_positions": cfg.max_len, "n_embd": cfg.d_model, "n_head": cfg.num_heads,
        "n_layer": cfg.num_layers, "n_inner": cfg.d_ff,
        "activation_function": ACTIVATIONS_TO_HF[cfg.activation],
        "layer_norm_epsilon": cfg.layer_norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
        "resid_pdrop": cfg.dropout_rate, "embd_pdrop": cfg.dropout_rate,
        "attn_pdrop": cfg.attention_dropout_rate,
    }


def check_config(cfg: ModelConfig, kind: str) -> None:
    """Raise ValueError unless `cfg` is something GPT-2's format can hold."""
    wanted = dict(norm="layernorm", norm_position="pre", pos_encoding="learned", use_bias=True,
                  qkv_bias=None, num_kv_heads=None, scale_embeddings=False, embedding_norm=False,
                  type_vocab_size=0, sliding_window=None)
    _check(cfg, kind, "decoder_lm", wanted, "gpt2")
    if cfg.activation == "swiglu":
        raise ValueError("activation='swiglu' has no GPT-2 form; save it as a llama model")


def _check(cfg: ModelConfig, kind: str, want_kind: str, wanted: dict, name: str) -> None:
    if kind != want_kind:
        raise ValueError(f"a {name} checkpoint holds a {want_kind}, got a {kind}")
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{field}={getattr(cfg, field)!r} cannot be saved as a {name} model (needs {value!r})")


def normalize_key(key: str, kind: str) -> str:
    return key if key.startswith(PREFIX) or key.startswith("lm_head.") else PREFIX + key


def entries(cfg: ModelConfig, kind: str) -> list[Entry]:
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    p = PREFIX
    out = [same(f"{p}wte.weight", (cfg.vocab_size, d), ("embedder", "token", "embedding")),
           same(f"{p}wpe.weight", (cfg.max_len, d), ("embedder", "position", "embedding")),
           same(f"{p}ln_f.weight", (d,), ("final_norm", "scale")),
           same(f"{p}ln_f.bias", (d,), ("final_norm", "bias"))]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (cfg.vocab_size, d), (("lm_head", "kernel"),),
                         lambda w: (w.T,), lambda x: x.T))
    for i in range(cfg.num_layers):
        hf, ours = f"{p}h.{i}", ("blocks", f"layer_{i}")
        att = (*ours, "self_attn")
        out += _c_attn(f"{hf}.attn.c_attn", att, cfg)
        out += [
            Entry(f"{hf}.attn.c_proj.weight", (d, d), ((*att, "out", "kernel"),),
                  lambda w: (w.reshape(h, k, d),), lambda x: x.reshape(h * k, d)),
            same(f"{hf}.attn.c_proj.bias", (d,), (*att, "out", "bias")),
            same(f"{hf}.mlp.c_fc.weight", (d, cfg.d_ff), (*ours, "mlp", "wi", "kernel")),
            same(f"{hf}.mlp.c_fc.bias", (cfg.d_ff,), (*ours, "mlp", "wi", "bias")),
            same(f"{hf}.mlp.c_proj.weight", (cfg.d_ff, d), (*ours, "mlp", "wo", "kernel")),
            same(f"{hf}.mlp.c_proj.bias", (d,), (*ours, "mlp", "wo", "bias")),
        ]
        for n, part in (("ln_1", "self_attn_norm"), ("ln_2", "mlp_norm")):
            out += [same(f"{hf}.{n}.weight", (d,), (*ours, part, "scale")),
                    same(f"{hf}.{n}.bias", (d,), (*ours, part, "bias"))]
    return out


def _c_attn(key: str, att: tuple[str, ...], cfg: ModelConfig) -> list[Entry]:
    """`c_attn`'s weight [d, 3d] and bias [3d] <-> our fused `qkv` (a reshape) or our
    separate query/key/value kernels [d, heads, head_dim] and biases [heads, head_dim]."""
    d, h, k = cfg.d_model, cfg.num_heads, cfg.head_dim
    if cfg.fused_qkv:
        return [Entry(f"{key}.weight", (d, 3 * d), ((*att, "qkv", "kernel"),),
                      lambda w: (w.reshape(d, 3, h, k),), lambda x: x.reshape(d, 3 * d)),
                Entry(f"{key}.bias", (3 * d,), ((*att, "qkv", "bias"),),
                      lambda b: (b.reshape(3, h, k),), lambda x: x.reshape(-1))]
    names = ("query", "key", "value")
    return [Entry(f"{key}.weight", (d, 3 * d), tuple((*att, n, "kernel") for n in names),
                  lambda w: tuple(x.reshape(d, h, k) for x in np.split(w, 3, axis=1)),
                  lambda *xs: np.concatenate([x.reshape(d, h * k) for x in xs], axis=1)),
            Entry(f"{key}.bias", (3 * d,), tuple((*att, n, "bias") for n in names),
                  lambda b: tuple(x.reshape(h, k) for x in np.split(b, 3)),
                  lambda *xs: np.concatenate([x.reshape(-1) for x in xs]))]
