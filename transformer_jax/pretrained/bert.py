"""BERT (`model_type` "bert": BertModel -> Encoder, BertForMaskedLM -> MaskedLM,
BertForSequenceClassification -> SequenceClassifier with `pooling="first", pooler=True`).

BERT is post-norm with an embedding LayerNorm over word + position + token-type
embeddings, and "gelu" is the exact (erf) GELU. The MLM head (`cls.predictions`) is
dense, GELU, LayerNorm, the tied read-out and a bias. A sentence-transformers directory
(all-MiniLM-L6-v2) is a BertModel whose keys have no "bert." prefix. The pooler
(`pooler.dense`, used by BertForSequenceClassification) is not part of an Encoder or a
MaskedLM and is skipped there; a classifier uses it.
"""
from __future__ import annotations

import re

from transformer_jax.config import ModelConfig
from transformer_jax.pretrained.common import (
    ACTIVATIONS_TO_HF, Entry, activation, block_entries, get, linear, same, unsupported)

MODEL_TYPES = ("bert",)
TIED = ("cls.predictions.decoder.weight",)
IGNORED = re.compile(r"(bert\.)?(embeddings\.position_ids|pooler\.dense\.(weight|bias))$"
                     r"|cls\.seq_relationship\..*|cls\.predictions\.decoder\.bias$")
_NAMES = {
    "query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
    "out": "attention.output.dense", "self_attn_norm": "attention.output.LayerNorm",
    "wi": "intermediate.dense", "wo": "output.dense", "mlp_norm": "output.LayerNorm",
}


def from_hf(hf: dict, sentence: bool) -> tuple[ModelConfig, str]:
    t = "bert"
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise unsupported("position_embedding_type", hf["position_embedding_type"], t, "'absolute'")
    if hf.get("is_decoder", False) or hf.get("add_cross_attention", False):
        raise unsupported("is_decoder", True, t, "an encoder")
    archs = hf.get("architectures") or ["BertModel"]
    if sentence or "BertModel" in archs:
        kind = "encoder"
    elif any(a in ("BertForMaskedLM", "BertForPreTraining") for a in archs):
        kind = "masked_lm"
    elif "BertForSequenceClassification" in archs:
        kind = "classifier"
    else:
        raise ValueError(
            f"config.json names the architectures {archs}; transformer_jax loads BertModel "
            "(as an Encoder), BertForMaskedLM / BertForPreTraining (as a MaskedLM) and "
            "BertForSequenceClassification (as a SequenceClassifier)")
    cfg = ModelConfig(
        vocab_size=get(hf, "vocab_size", t), max_len=get(hf, "max_position_embeddings", t),
        d_model=get(hf, "hidden_size", t), num_heads=get(hf, "num_attention_heads", t),
        num_layers=get(hf, "num_hidden_layers", t), d_ff=get(hf, "intermediate_size", t),
        activation=activation(get(hf, "hidden_act", t, "gelu"), "hidden_act", t),
        norm_position="post", layer_norm_eps=float(get(hf, "layer_norm_eps", t, 1e-12)),
        embedding_norm=True, type_vocab_size=int(get(hf, "type_vocab_size", t, 2)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dropout_rate=float(hf.get("hidden_dropout_prob", 0.0)),
        attention_dropout_rate=float(hf.get("attention_probs_dropout_prob", 0.0)),
    )
    return cfg, kind


def num_labels(hf: dict) -> int:
    """Classes of a BertForSequenceClassification config (id2label, else num_labels, else 2)."""
    labels = hf.get("id2label")
    return len(labels) if labels else int(hf.get("num_labels", 2))


def to_hf(cfg: ModelConfig, kind: str, num_classes: int | None = None) -> dict:
    arch = {"masked_lm": "BertForMaskedLM", "encoder": "BertModel",
            "classifier": "BertForSequenceClassification"}[kind]
    labels = {} if num_classes is None else {
        "id2label": {str(i): f"LABEL_{i}" for i in range(num_classes)},
        "label2id": {f"LABEL_{i}": i for i in range(num_classes)}}
    return {
        **labels, "model_type": "bert",
        "architectures": [arch],
        "vocab_size": cfg.vocab_size, "max_position_embeddings": cfg.max_len,
        "hidden_size": cfg.d_model, "num_attention_heads": cfg.num_heads,
        "num_hidden_layers": cfg.num_layers, "intermediate_size": cfg.d_ff,
        "hidden_act": ACTIVATIONS_TO_HF[cfg.activation], "layer_norm_eps": cfg.layer_norm_eps,
        "type_vocab_size": cfg.type_vocab_size, "tie_word_embeddings": cfg.tie_embeddings,
        "hidden_dropout_prob": cfg.dropout_rate,
        "attention_probs_dropout_prob": cfg.attention_dropout_rate,
        "position_embedding_type": "absolute",
    }


def check_config(cfg: ModelConfig, kind: str) -> None:
    if kind not in ("encoder", "masked_lm", "classifier"):
        raise ValueError(f"a bert checkpoint holds an encoder, masked_lm or classifier, got a {kind}")
    wanted = dict(norm="layernorm", norm_position="post", pos_encoding="learned", use_bias=True,
                  qkv_bias=None, num_kv_heads=None, scale_embeddings=False, embedding_norm=True,
                  sliding_window=None)
    for field, value in wanted.items():
        if getattr(cfg, field) != value:
            raise ValueError(f"{field}={getattr(cfg, field)!r} cannot be saved as a bert model (needs {value!r})")
    if cfg.type_vocab_size < 1 or cfg.activation == "swiglu":
        raise ValueError("a bert model needs type_vocab_size >= 1 and an activation other than swiglu")
    if kind == "masked_lm" and cfg.activation not in ("gelu", "gelu_exact"):
        raise ValueError(f"our MaskedLM head uses a GELU: activation={cfg.activation!r} has no bert form")


def normalize_key(key: str, kind: str) -> str:
    if kind == "encoder":
        return key[len("bert."):] if key.startswith("bert.") else key
    return key if key.startswith(("bert.", "cls.", "classifier.")) else "bert." + key


def entries(cfg: ModelConfig, kind: str, num_classes: int | None = None) -> list[Entry]:
    d = cfg.d_model
    base, ours = ("", ()) if kind == "encoder" else ("bert.", ("encoder",))
    emb = (*ours, "embedder")
    out = [
        same(f"{base}embeddings.word_embeddings.weight", (cfg.vocab_size, d), (*emb, "token", "embedding")),
        same(f"{base}embeddings.position_embeddings.weight", (cfg.max_len, d), (*emb, "position", "embedding")),
        same(f"{base}embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, d),
             (*emb, "token_type", "embedding")),
        same(f"{base}embeddings.LayerNorm.weight", (d,), (*emb, "norm", "scale")),
        same(f"{base}embeddings.LayerNorm.bias", (d,), (*emb, "norm", "bias")),
    ]
    for i in range(cfg.num_layers):
        out += block_entries(f"{base}encoder.layer.{i}", (*ours, "blocks", f"layer_{i}"), cfg, _NAMES)
    if kind == "classifier":
        out += [
            linear("bert.pooler.dense.weight", d, d, ("pooler", "kernel")),
            same("bert.pooler.dense.bias", (d,), ("pooler", "bias")),
            linear("classifier.weight", d, num_classes, ("classifier", "kernel")),
            same("classifier.bias", (num_classes,), ("classifier", "bias")),
        ]
    if kind == "masked_lm":
        head = "cls.predictions"
        out += [
            linear(f"{head}.transform.dense.weight", d, d, ("transform", "kernel")),
            same(f"{head}.transform.dense.bias", (d,), ("transform", "bias")),
            same(f"{head}.transform.LayerNorm.weight", (d,), ("transform_norm", "scale")),
            same(f"{head}.transform.LayerNorm.bias", (d,), ("transform_norm", "bias")),
            same(f"{head}.bias", (cfg.vocab_size,), ("output_bias",)),
        ]
        if not cfg.tie_embeddings:
            out.append(Entry(f"{head}.decoder.weight", (cfg.vocab_size, d), (("lm_head", "kernel"),),
                             lambda w: (w.T,), lambda x: x.T))
    return out
