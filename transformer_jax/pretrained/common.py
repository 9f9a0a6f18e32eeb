"""What the family modules share: a table entry, the weight transforms, config reading.

A family module (gpt2, bert, llama, marian) maps a Hugging Face `config.json` to a
`ModelConfig` and a model kind and back, and lists `Entry`s: one checkpoint tensor, the
parameter paths it fills and the transforms each way. Transforms are NumPy functions
of arrays, so one tensor at a time goes through them.

PyTorch's `nn.Linear` stores `weight [out, in]` (y = x Wᵀ); our kernels are `[in, out]`
and the attention projections keep their heads apart: query/key/value `[d_model,
heads, head_dim]`, output `[heads, head_dim, d_model]`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import numpy as np

Path = tuple[str, ...]


class Entry(NamedTuple):
    """One checkpoint tensor `key` of shape `shape` <-> our parameters at `paths`.

    load: the tensor -> a tuple of arrays, one per path. save: those arrays -> the tensor.
    """

    key: str
    shape: tuple[int, ...]
    paths: tuple[Path, ...]
    load: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    save: Callable[..., np.ndarray]


def same(key: str, shape: tuple[int, ...], path: Path) -> Entry:
    """A tensor stored as we store it (embeddings, norms, biases)."""
    return Entry(key, tuple(shape), (path,), lambda x: (x,), lambda x: x)


def linear(key: str, d_in: int, d_out: int, path: Path) -> Entry:
    """An `nn.Linear` weight [out, in] <-> our Dense kernel [in, out]."""
    return Entry(key, (d_out, d_in), (path,), lambda w: (w.T,), lambda k: k.T)


def heads_in(key: str, d_model: int, heads: int, head_dim: int, path: Path) -> Entry:
    """A query/key/value weight [heads*head_dim, d_model] <-> kernel [d_model, heads, head_dim]."""
    return Entry(
        key, (heads * head_dim, d_model), (path,),
        lambda w: (w.T.reshape(d_model, heads, head_dim),),
        lambda k: k.reshape(d_model, heads * head_dim).T,
    )


def heads_bias(key: str, heads: int, head_dim: int, path: Path) -> Entry:
    """A query/key/value bias [heads*head_dim] <-> [heads, head_dim]."""
    return Entry(key, (heads * head_dim,), (path,), lambda b: (b.reshape(heads, head_dim),),
                 lambda b: b.reshape(-1))


def heads_out(key: str, d_model: int, heads: int, head_dim: int, path: Path) -> Entry:
    """An output-projection weight [d_model, heads*head_dim] <-> kernel [heads, head_dim, d_model]."""
    return Entry(
        key, (d_model, heads * head_dim), (path,),
        lambda w: (w.T.reshape(heads, head_dim, d_model),),
        lambda k: k.reshape(heads * head_dim, d_model).T,
    )


def unsupported(option: str, value: Any, model_type: str, expected: str) -> ValueError:
    return ValueError(
        f"config.json of a {model_type!r} model sets {option}={value!r}, which transformer_jax "
        f"does not implement (supported: {expected}); loading it would give a different model")


def get(hf: dict, key: str, model_type: str, default: Any = ...) -> Any:
    """`hf[key]`, or `default`, or a ValueError naming the missing key."""
    if key in hf and hf[key] is not None:
        return hf[key]
    if default is ...:
        raise ValueError(f"config.json of a {model_type!r} model lacks {key!r}")
    return default


ACTIVATIONS_FROM_HF = {"gelu_new": "gelu", "gelu_pytorch_tanh": "gelu", "gelu": "gelu_exact",
                       "relu": "relu", "silu": "silu", "swish": "silu"}
ACTIVATIONS_TO_HF = {"gelu": "gelu_new", "gelu_exact": "gelu", "relu": "relu", "silu": "silu"}


def activation(name: str, option: str, model_type: str) -> str:
    if name not in ACTIVATIONS_FROM_HF:
        raise unsupported(option, name, model_type, str(sorted(ACTIVATIONS_FROM_HF)))
    return ACTIVATIONS_FROM_HF[name]


def block_entries(prefix: str, ours: Path, cfg, names: dict[str, str], *, cross: bool = False,
                  norms_have_bias: bool = True) -> list[Entry]:
    """The entries of one transformer block with separate q/k/v Linear layers.

    names maps our parts (query, key, value, out, self_attn_norm, cross_*, wi, wg, wo,
    mlp_norm) to the checkpoint's names under `prefix` (a missing name: no such part).
    """
    d, h, hk, k = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.head_dim
    out: list[Entry] = []

    def attention(part: str, prefix_ours: Path) -> None:
        for ours_name, heads in (("query", h), ("key", hk), ("value", hk)):
            key = f"{prefix}.{names[f'{part}{ours_name}']}"
            out.append(heads_in(f"{key}.weight", d, heads, k, (*prefix_ours, ours_name, "kernel")))
            if cfg.qkv_use_bias:
                out.append(heads_bias(f"{key}.bias", heads, k, (*prefix_ours, ours_name, "bias")))
        key = f"{prefix}.{names[f'{part}out']}"
        out.append(heads_out(f"{key}.weight", d, h, k, (*prefix_ours, "out", "kernel")))
        if cfg.use_bias:
            out.append(same(f"{key}.bias", (d,), (*prefix_ours, "out", "bias")))

    def norm(part: str) -> None:
        key = f"{prefix}.{names[part]}"
        out.append(same(f"{key}.weight", (d,), (*ours, part, "scale")))
        if norms_have_bias and cfg.norm == "layernorm" and cfg.use_bias:
            out.append(same(f"{key}.bias", (d,), (*ours, part, "bias")))

    attention("", (*ours, "self_attn"))
    norm("self_attn_norm")
    if cross:
        attention("cross_", (*ours, "cross_attn"))
        norm("cross_attn_norm")
    mlp = [("wi", d, cfg.d_ff), ("wo", cfg.d_ff, d)]
    if cfg.activation == "swiglu":
        mlp.insert(0, ("wg", d, cfg.d_ff))
    for part, d_in, d_out in mlp:
        key = f"{prefix}.{names[part]}"
        out.append(linear(f"{key}.weight", d_in, d_out, (*ours, "mlp", part, "kernel")))
        if cfg.use_bias:
            out.append(same(f"{key}.bias", (d_out,), (*ours, "mlp", part, "bias")))
    norm("mlp_norm")
    return out
