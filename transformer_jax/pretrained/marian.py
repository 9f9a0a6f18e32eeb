"""Marian (`model_type` "marian", MarianMTModel) <-> EncoderDecoder.

Marian is the original post-norm transformer: shared source/target/read-out embeddings
scaled by sqrt(d_model), sinusoidal positions laid out as all sines then all cosines
(`sinusoidal_layout="split"`; the tables are computed, not loaded), "swish" (SiLU)
activation in the opus-mt models, LayerNorm eps 1e-5, and `final_logits_bias`.
Generation starts from `decoder_start_token_id` (the pad id) and Hugging Face forbids
the pad token (`generate(..., suppress_ids=[pad_id])`).
"""
from __future__ import annotations

import re

from transformer_jax.config import ModelConfig
from transformer_jax.pretrained.common import (
    ACTIVATIONS_TO_HF, Entry, activation, block_entries, get, same, unsupported)

MODEL_TYPES = ("marian",)
TIED = ("lm_head.weight", "model.encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight")
IGNORED = re.compile(r"model\.(encoder|decoder)\.embed_positions\.weight$")
_NAMES = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
    "out": "self_attn.out_proj", "self_attn_norm": "self_attn_layer_norm",
    "cross_query": "encoder_attn.q_proj", "cross_key": "encoder_attn.k_proj",
    "cross_value": "encoder_attn.v_proj", "cross_out": "encoder_attn.out_proj",
    "cross_attn_norm": "encoder_attn_layer_norm",
    "wi": "fc1", "wo": "fc2", "mlp_norm": "final_layer_norm",
}


def from_hf(hf: dict, sentence: bool) -> tuple[ModelConfig, str]:
    t = "marian"
    if sentence:
        raise ValueError("a sentence-transformers directory of a marian model is not supported")
    pairs = (("encoder_attention_heads", "decoder_attention_heads"), ("encoder_ffn_dim", "decoder_ffn_dim"))
    for a, b in pairs:
        if get(hf, a, t) != get(hf, b, t):
            raise unsupported(b, hf[b], t, f"equal to {a}={hf[a]}")
    vocab = get(hf, "vocab_size", t)
    if hf.get("decoder_vocab_size") not in (None, vocab):
        raise unsupported("decoder_vocab_size", hf["decoder_vocab_size"], t, f"vocab_size={vocab}")
    if not hf.get("share_encoder_decoder_embeddings", True):
        raise unsupported("share_encoder_decoder_embeddings", False, t, "True")
    if not hf.get("tie_word_embeddings", True):
        raise unsupported("tie_word_embeddings", False, t, "True")
    if hf.get("normalize_before", False) or hf.get("normalize_embedding", False):
        raise unsupported("normalize_before", True, t, "False (post-norm)")
    cfg = ModelConfig(
        vocab_size=vocab, max_len=get(hf, "max_position_embeddings", t), d_model=get(hf, "d_model", t),
        num_heads=get(hf, "encoder_attention_heads", t), num_layers=get(hf, "encoder_layers", t),
        num_decoder_layers=get(hf, "decoder_layers", t), d_ff=get(hf, "encoder_ffn_dim", t),
        activation=activation(get(hf, "activation_function", t, "swish"), "activation_function", t),
        norm_position="post", pos_encoding="sinusoidal", sinusoidal_layout="split",
        scale_embeddings=bool(hf.get("scale_embedding", False)), layer_norm_eps=1e-5,
        final_logits_bias=True, tie_embeddings=True, dropout_rate=float(hf.get("dropout", 0.0)),
        attention_dropout_rate=float(hf.get("attention_dropout", 0.0)),
    )
    return cfg, "encoder_decoder"


def to_hf(cfg: ModelConfig, kind: str) -> dict:
    return {
        "model_type": "marian", "architectures": ["MarianMTModel"], "vocab_size": cfg.vocab_size,
        "decoder_vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_len,
        "d_model": cfg.d_model, "encoder_attention_heads": cfg.num_heads,
        "decoder_attention_heads": cfg.num_heads, "encoder_layers": cfg.num_layers,
        "decoder_layers": cfg.decoder_layers, "encoder_ffn_dim": cfg.d_ff, "decoder_ffn_dim": cfg.d_ff,
        "activation_function": "swish" if cfg.activation == "silu" else ACTIVATIONS_TO_HF[cfg.activation],
        "scale_embedding": cfg.scale_embeddings, "share_encoder_decoder_embeddings": True,
        "tie_word_embeddings": True, "dropout": cfg.dropout_rate,
        "attention_dropout": cfg.attention_dropout_rate, "is_encoder_decoder": True,
    }


def check_config(cfg: ModelConfig, kind: str) -> None:
    if kind != "encoder_decoder":
        raise ValueError(f"a marian checkpoint holds an encoder_decoder, got a {kind}")
    wanted = dict(norm="layernorm", norm_position="post", pos_encoding="sinusoidal",
                  sinusoidal_layout="split", use_bias=True, qkv_bias=None, num_kv_heads=None,
                  embedding_norm=False, type_vocab_size=0, tie_embeddings=True, final_logits_bias=True,
                  layer_norm_eps=1e-5, sliding_window=None)
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{field}={getattr(cfg, field)!r} cannot be saved as a marian model (needs {value!r})")
    if cfg.activation == "swiglu":
        raise ValueError("activation='swiglu' has no marian form")


def normalize_key(key: str, kind: str) -> str:
    return key if key.startswith(("model.", "lm_head.", "final_logits_bias")) else "model." + key


def entries(cfg: ModelConfig, kind: str) -> list[Entry]:
    v = cfg.vocab_size
    out = [same("model.shared.weight", (v, cfg.d_model), ("embedder", "token", "embedding")),
           Entry("final_logits_bias", (1, v), (("final_logits_bias",),),
                 lambda b: (b.reshape(v),), lambda b: b.reshape(1, v))]
    for i in range(cfg.num_layers):
        out += block_entries(f"model.encoder.layers.{i}", ("encoder", f"layer_{i}"), cfg, _NAMES)
    for i in range(cfg.decoder_layers):
        out += block_entries(f"model.decoder.layers.{i}", ("decoder", f"layer_{i}"), cfg, _NAMES, cross=True)
    return out


def generation_options(hf: dict) -> dict:
    """`generate`'s options to decode as transformers decodes a Marian model with config.json `hf`:
    bos_id = decoder_start_token_id (else the pad id, Marian's start), eos_id, pad_id, and
    suppress_ids = the pad id plus every single-token entry of `bad_words_ids` (the opus-mt
    configs list [[pad_id]]; transformers never generates pad)."""
    t = "marian"
    pad = int(get(hf, "pad_token_id", t))
    suppress = {pad} | {int(w[0]) for w in hf.get("bad_words_ids") or () if isinstance(w, list) and len(w) == 1}
    eos = hf.get("eos_token_id")
    return {"bos_id": int(get(hf, "decoder_start_token_id", t, pad)), "pad_id": pad,
            "eos_id": None if eos is None else int(eos[0] if isinstance(eos, list) else eos),
            "suppress_ids": tuple(sorted(suppress))}
