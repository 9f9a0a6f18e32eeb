"""Llama, Mistral and Qwen2 (`*ForCausalLM`) <-> DecoderLM.

All three are pre-norm RMSNorm stacks with rotary positions, SwiGLU, grouped-query
attention, no biases (Qwen2: biases on query, key and value) and, by default, an
untied read-out. Hugging Face stores q/k projections already permuted for the
half-rotation ("rotate_half") rotary layout, which is our `apply_rotary` layout, so the
weights load unpermuted. Mistral's `sliding_window` is our `sliding_window`.
Rope scaling (`rope_scaling` / a non-default `rope_parameters.rope_type`) is not
implemented and is refused.
"""
from __future__ import annotations

import re

from transformer_jax.config import ModelConfig
from transformer_jax.pretrained.common import Entry, block_entries, get, same, unsupported

MODEL_TYPES = ("llama", "mistral", "qwen2")
TIED = ("lm_head.weight",)
IGNORED = re.compile(r"(model\.)?layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_NAMES = {
    "query": "self_attn.q_proj", "key": "self_attn.k_proj", "value": "self_attn.v_proj",
    "out": "self_attn.o_proj", "self_attn_norm": "input_layernorm",
    "wg": "mlp.gate_proj", "wi": "mlp.up_proj", "wo": "mlp.down_proj",
    "mlp_norm": "post_attention_layernorm",
}
_ARCH = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}


def rope_theta(hf: dict, t: str) -> float:
    """The rotary base, from `rope_theta` or transformers 5's `rope_parameters`."""
    params = hf.get("rope_parameters") or {}
    scaling = hf.get("rope_scaling")
    rope_type = params.get("rope_type", "default")
    if scaling:
        raise unsupported("rope_scaling", scaling, t, "None (plain rotary positions)")
    if rope_type != "default":
        raise unsupported("rope_parameters.rope_type", rope_type, t, "'default'")
    extra = sorted(set(params) - {"rope_type", "rope_theta"})
    if extra:
        raise unsupported("rope_parameters", params, t, "only rope_type 'default' and rope_theta")
    return float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))


def from_hf(hf: dict, sentence: bool) -> tuple[ModelConfig, str]:
    t = hf["model_type"]
    if sentence:
        raise ValueError(f"a sentence-transformers directory of a {t} model is not supported")
    if get(hf, "hidden_act", t, "silu") != "silu":
        raise unsupported("hidden_act", hf["hidden_act"], t, "'silu' (SwiGLU)")
    for option in ("attention_bias", "mlp_bias"):
        if hf.get(option, False):
            raise unsupported(option, True, t, "False")
    if hf.get("attention_dropout", 0.0):
        raise unsupported("attention_dropout", hf["attention_dropout"], t, "0.0")
    d, heads = get(hf, "hidden_size", t), get(hf, "num_attention_heads", t)
    if hf.get("head_dim") not in (None, d // heads):
        raise unsupported("head_dim", hf["head_dim"], t, f"hidden_size // num_attention_heads = {d // heads}")
    window = None
    if t == "mistral":
        window = hf.get("sliding_window")
    elif t == "qwen2" and hf.get("use_sliding_window", False):
        raise unsupported("use_sliding_window", True, t, "False")
    cfg = ModelConfig(
        vocab_size=get(hf, "vocab_size", t), max_len=get(hf, "max_position_embeddings", t),
        d_model=d, num_heads=heads, num_layers=get(hf, "num_hidden_layers", t),
        d_ff=get(hf, "intermediate_size", t),
        num_kv_heads=get(hf, "num_key_value_heads", t, heads),
        activation="swiglu", norm="rmsnorm", pos_encoding="rotary", rope_base=rope_theta(hf, t),
        use_bias=False, qkv_bias=True if t == "qwen2" else None,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        layer_norm_eps=float(get(hf, "rms_norm_eps", t, 1e-6)), sliding_window=window,
    )
    return cfg, "decoder_lm"


def model_type_of(cfg: ModelConfig) -> str:
    """The family member that holds `cfg`: qwen2 with q/k/v biases, mistral with a window."""
    if cfg.qkv_use_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def to_hf(cfg: ModelConfig, kind: str) -> dict:
    t = model_type_of(cfg)
    hf = {
        "model_type": t, "architectures": [_ARCH[t]], "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_len, "hidden_size": cfg.d_model,
        "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.kv_heads,
        "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.d_ff, "hidden_act": "silu",
        "rms_norm_eps": cfg.layer_norm_eps, "rope_theta": cfg.rope_base,
        "tie_word_embeddings": cfg.tie_embeddings, "head_dim": cfg.head_dim,
    }
    if t == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if t == "qwen2":
        hf["use_sliding_window"] = False
    return hf


def check_config(cfg: ModelConfig, kind: str) -> None:
    if kind != "decoder_lm":
        raise ValueError(f"a llama-family checkpoint holds a decoder_lm, got a {kind}")
    wanted = dict(norm="rmsnorm", norm_position="pre", pos_encoding="rotary", use_bias=False,
                  activation="swiglu", scale_embeddings=False, embedding_norm=False, type_vocab_size=0)
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{field}={getattr(cfg, field)!r} cannot be saved as a llama model (needs {value!r})")
    if cfg.qkv_use_bias and cfg.sliding_window is not None:
        raise ValueError("q/k/v biases with a sliding window have no Hugging Face family here")


def normalize_key(key: str, kind: str) -> str:
    return key if key.startswith(("model.", "lm_head.")) else "model." + key


def entries(cfg: ModelConfig, kind: str) -> list[Entry]:
    d = cfg.d_model
    out = [same("model.embed_tokens.weight", (cfg.vocab_size, d), ("embedder", "token", "embedding")),
           same("model.norm.weight", (d,), ("final_norm", "scale"))]
    if not cfg.tie_embeddings:
        out.append(Entry("lm_head.weight", (cfg.vocab_size, d), (("lm_head", "kernel"),),
                         lambda w: (w.T,), lambda x: x.T))
    for i in range(cfg.num_layers):
        out += block_entries(f"model.layers.{i}", ("blocks", f"layer_{i}"), cfg, _NAMES)
    return out
