"""Model configuration: one frozen dataclass and named presets.

`ModelConfig` validates itself in `__post_init__`, so a bad value fails at construction
and `dataclasses.replace(cfg, ...)` re-validates. Presets come from `get_config(name,
**overrides)`; `list_presets()` names them.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import numpy as np

from transformer_jax.attention.arguments import IMPLEMENTATIONS

ACTIVATIONS = ("relu", "gelu", "gelu_exact", "silu", "swiglu")
SINUSOIDAL_LAYOUTS = ("interleaved", "split")
NORMS = ("layernorm", "rmsnorm")
NORM_POSITIONS = ("pre", "post")
POS_ENCODINGS = ("learned", "sinusoidal", "rotary")
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = (None, *IMPLEMENTATIONS)  # None = automatic selection
# Names of jax.checkpoint_policies (plus "none": no remat, "full": save nothing).
REMAT_POLICIES = (
    "none",
    "full",
    "dots",
    "dots_with_no_batch_dims",
    "everything_saveable",
)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of every model in `transformer_jax.models`.

    Sizes: `d_model` is split into `num_heads` heads of `d_model // num_heads`;
    `num_kv_heads` (None = `num_heads`) key/value heads give grouped-query attention.
    `num_layers` is the depth of a DecoderLM or Encoder, and of the encoder of an
    EncoderDecoder, whose decoder has `num_decoder_layers` (None = `num_layers`).
    `max_len` bounds the learned position table; sinusoidal and rotary positions
    have no table, `max_len` is then only the default cache/context length.

    `dtype` is the compute dtype; parameters are always float32, and logits float32.
    `attention_impl` picks the `transformer_jax.attention` implementation (None = auto).
    `scan_layers` runs the stack under `nn.scan` (params get a leading "layers" axis);
    `remat_policy` rematerialises each block: "none", "full" or a
    `jax.checkpoint_policies` name from REMAT_POLICIES.
    `scale_embeddings` multiplies token embeddings by sqrt(d_model) (original transformer).
    `rope_base` is the rotary wavelength base; `layer_norm_eps` the norms' epsilon.
    Dropout: `dropout_rate` on embeddings and residual branches, `attention_dropout_rate`
    on attention probabilities.

    Options of pretrained architectures (the defaults leave every model unchanged):
    `activation` "gelu" is GPT-2's tanh approximation, "gelu_exact" the erf form (BERT),
    "silu" x*sigmoid(x) (Marian's "swish"), "swiglu" the gated form (Llama).
    `embedding_norm` normalises token+position(+type) embeddings (BERT);
    `type_vocab_size` > 0 adds token-type (segment) embeddings, fed by `token_type_ids`
    (BERT); `qkv_bias` (None = `use_bias`) overrides the bias of the query, key and value
    projections alone (Qwen2: True with use_bias False); `sliding_window` lets a causal
    query see itself and the `sliding_window - 1` keys before it (Mistral);
    `sinusoidal_layout` "interleaved" (sin, cos alternating, the paper) or "split"
    (all sines, then all cosines: Marian); `final_logits_bias` adds a learned bias to an
    EncoderDecoder's logits (Marian).
    `fused_qkv` keeps a self-attention's query, key and value projections in one
    parameter `qkv` (kernel `[d_model, 3, heads, head_dim]`, bias `[3, heads, head_dim]`)
    multiplied as one matmul, instead of three parameters `query`, `key`, `value`: the
    layout of GPT-2's `c_attn`, which then loads as a view of the checkpoint's bytes.
    Same model either way (same sums, same initial distribution); it needs
    `num_kv_heads` None or `num_heads`, and cross-attention keeps separate projections.
    """

    vocab_size: int
    max_len: int
    d_model: int
    num_heads: int
    num_layers: int
    d_ff: int
    num_kv_heads: int | None = None
    num_decoder_layers: int | None = None
    activation: str = "gelu"
    norm: str = "layernorm"
    norm_position: str = "pre"
    pos_encoding: str = "learned"
    rope_base: float = 10000.0
    use_bias: bool = True
    tie_embeddings: bool = True
    scale_embeddings: bool = False
    dropout_rate: float = 0.0
    attention_dropout_rate: float = 0.0
    attention_impl: str | None = None
    dtype: str = "float32"
    scan_layers: bool = False
    remat_policy: str = "none"
    layer_norm_eps: float = 1e-5
    embedding_norm: bool = False
    type_vocab_size: int = 0
    qkv_bias: bool | None = None
    sliding_window: int | None = None
    sinusoidal_layout: str = "interleaved"
    final_logits_bias: bool = False
    fused_qkv: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "max_len", "d_model", "num_heads", "num_layers", "d_ff"):
            _check_positive_int(name, getattr(self, name))
        for name in ("num_kv_heads", "num_decoder_layers", "sliding_window"):
            if getattr(self, name) is not None:
                _check_positive_int(name, getattr(self, name))
        if self.d_model % self.num_heads:
            raise ValueError(
                f"d_model={self.d_model} must be divisible by num_heads={self.num_heads}"
            )
        if self.num_heads % self.kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must divide num_heads={self.num_heads}"
            )
        if self.pos_encoding == "rotary" and self.head_dim % 2:
            raise ValueError(f"pos_encoding='rotary' needs an even head_dim, got {self.head_dim}")
        if self.pos_encoding == "sinusoidal" and self.d_model % 2:
            raise ValueError(f"pos_encoding='sinusoidal' needs an even d_model, got {self.d_model}")
        for name, choices in (
            ("activation", ACTIVATIONS),
            ("norm", NORMS),
            ("norm_position", NORM_POSITIONS),
            ("pos_encoding", POS_ENCODINGS),
            ("dtype", DTYPES),
            ("attention_impl", ATTENTION_IMPLS),
            ("remat_policy", REMAT_POLICIES),
            ("sinusoidal_layout", SINUSOIDAL_LAYOUTS),
        ):
            if getattr(self, name) not in choices:
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {choices}")
        for name in ("dropout_rate", "attention_dropout_rate"):
            rate = getattr(self, name)
            if not isinstance(rate, (int, float)) or isinstance(rate, bool) or not 0 <= rate < 1:
                raise ValueError(f"{name}={rate!r} must be a number in [0, 1)")
        for name in ("layer_norm_eps", "rope_base"):
            value = getattr(self, name)
            # `not 0 < value < inf` also rejects NaN, which every comparison fails
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value < float("inf"):
                raise ValueError(f"{name}={value!r} must be a positive finite number")
        for name in ("use_bias", "tie_embeddings", "scale_embeddings", "scan_layers",
                     "embedding_norm", "final_logits_bias", "fused_qkv"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name}={getattr(self, name)!r} must be a bool")
        if self.qkv_bias is not None and not isinstance(self.qkv_bias, bool):
            raise TypeError(f"qkv_bias={self.qkv_bias!r} must be a bool or None")
        if self.fused_qkv and self.kv_heads != self.num_heads:
            raise ValueError(f"fused_qkv=True needs as many key/value heads as query heads, got "
                             f"num_kv_heads={self.num_kv_heads} with num_heads={self.num_heads}")
        if (not isinstance(self.type_vocab_size, (int, np.integer)) or isinstance(self.type_vocab_size, bool)
                or self.type_vocab_size < 0):
            raise ValueError(f"type_vocab_size={self.type_vocab_size!r} must be a non-negative integer")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def kv_heads(self) -> int:
        """Number of key/value heads (`num_kv_heads`, or `num_heads` when None)."""
        return self.num_heads if self.num_kv_heads is None else self.num_kv_heads

    @property
    def qkv_use_bias(self) -> bool:
        """Whether the query, key and value projections have a bias (`qkv_bias`, or `use_bias`)."""
        return self.use_bias if self.qkv_bias is None else self.qkv_bias

    @property
    def decoder_layers(self) -> int:
        """Depth of an EncoderDecoder's decoder."""
        return self.num_layers if self.num_decoder_layers is None else self.num_decoder_layers

    @property
    def compute_dtype(self) -> jnp.dtype:
        return jnp.dtype(self.dtype)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe dict of all fields (inverse of `from_dict`)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        """Build (and validate) a config from `to_dict()` output; unknown keys are an error."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; expected a subset of {sorted(known)}")
        return cls(**d)


def _check_positive_int(name: str, value: Any) -> None:
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name}={value!r} must be a positive integer")


# Every preset but "tiny" multiplies query, key and value as one matmul (`fused_qkv`, as
# GPT-2 and nanoGPT do); "tiny" keeps the three kernels apart, the layout of Llama, BERT
# and Marian files.
_PRESETS: dict[str, dict[str, Any]] = {
    # For tests: every code path at toy size (GQA, rotary and swiglu are overrides).
    "tiny": dict(vocab_size=61, max_len=16, d_model=32, num_heads=4, num_layers=2, d_ff=64),
    # nanoGPT's Shakespeare character model; set vocab_size to the tokenizer's size.
    "char-small": dict(
        vocab_size=256, max_len=256, d_model=384, num_heads=6, num_layers=6, d_ff=1536,
        dropout_rate=0.2, fused_qkv=True,
    ),
    # GPT-2 124M (dropout 0, as nanoGPT trains it; the original used 0.1).
    "gpt2-small": dict(
        vocab_size=50257, max_len=1024, d_model=768, num_heads=12, num_layers=12, d_ff=3072, fused_qkv=True,
    ),
    "gpt2-medium": dict(
        vocab_size=50257, max_len=1024, d_model=1024, num_heads=16, num_layers=24, d_ff=4096, fused_qkv=True,
    ),
    # BERT-base sizes, post-norm; no token-type embeddings or embedding LayerNorm.
    "bert-base": dict(
        vocab_size=30522, max_len=512, d_model=768, num_heads=12, num_layers=12, d_ff=3072,
        norm_position="post", dropout_rate=0.1, attention_dropout_rate=0.1,
        layer_norm_eps=1e-12, fused_qkv=True,
    ),
    # "Attention is all you need", base model: shared source/target vocabulary.
    "transformer-base": dict(
        vocab_size=37000, max_len=512, d_model=512, num_heads=8, num_layers=6,
        num_decoder_layers=6, d_ff=2048, activation="relu", norm_position="post",
        pos_encoding="sinusoidal", scale_embeddings=True, dropout_rate=0.1, layer_norm_eps=1e-6,
        fused_qkv=True,
    ),
}


def list_presets() -> list[str]:
    """Names accepted by `get_config`."""
    return list(_PRESETS)


def get_config(name: str, **overrides: Any) -> ModelConfig:
    """The preset `name` with fields replaced by `overrides` (validated as a whole).

    A preset's `fused_qkv` yields to grouped-query attention: overriding `num_kv_heads`
    below `num_heads` without naming `fused_qkv` gives separate query/key/value kernels.
    """
    if name not in _PRESETS:
        raise ValueError(f"name={name!r} is not a preset; expected one of {list_presets()}")
    fields = {**_PRESETS[name], **overrides}
    if "fused_qkv" not in overrides and fields.get("num_kv_heads") not in (None, fields["num_heads"]):
        fields["fused_qkv"] = False
    return ModelConfig(**fields)


def field_defaults() -> dict[str, Any]:
    """Every ModelConfig field that has a default, with it: what a config recorded before
    the field existed was built with (see `transformer_jax.run.out_dir`)."""
    return {f.name: f.default for f in dataclasses.fields(ModelConfig)
            if f.default is not dataclasses.MISSING}
