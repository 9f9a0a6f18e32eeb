"""Multi-head attention (self or cross, GQA) with a KV cache for decoding.

The score/softmax/value core is `transformer_jax.attention.dot_product_attention`,
with `implementation=cfg.attention_impl`; this module adds the projections, rotary
positions, dropout and the cache. Parameters: kernels `query` [d_model, heads, head_dim],
`key` and `value` [d_model, kv_heads, head_dim], `out` [heads, head_dim, d_model] (and
their biases); with `cfg.fused_qkv` a self-attention holds query, key and value in one
`qkv` [d_model, 3, heads, head_dim], multiplied as one matmul.

KV cache (self-attention with `decode=True`): the "cache" collection holds
`cached_key` and `cached_value`, `[batch, cache_len, kv_heads, head_dim]` in cfg.dtype,
created (zero) by the first call, whose input length sets `cache_len` (see
`transformer_jax.models.init_cache`). The model passes each token's absolute position
`positions [b, t]` (row i starts at that row's cache position) and `valid [b, t]`
(False for the right-padding of a row in this call); a call writes the valid keys and
values at their positions and lets query j of row i attend to cache slots
<= positions[i, j]. Slots past a row's position may hold stale values from padding;
they are never attended and are overwritten before they are.
Cross-attention with `decode=True` caches `cross_key` / `cross_value`
[batch, src_len, kv_heads, head_dim]: they are projected from `inputs_kv` by a call in
which some row starts at position 0 (the prefill) and read back by every later call,
which then ignores `inputs_kv` (a `lax.cond`, so the projection is skipped).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.attention import dot_product_attention, select_implementation
from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers.matmul import matmul
from transformer_jax.layers.per_shard import attend_per_shard
from transformer_jax.layers.positional import apply_rotary


def split_qkv(params: Any) -> Any:
    """`params` with every fused `qkv` projection (kernel [..., d_model, 3, heads, head_dim],
    bias [..., 3, heads, head_dim]; a scanned stack adds a leading layer axis) replaced by
    separate `query`, `key` and `value` projections: the parameters of the same model with
    `fused_qkv=False`. Other leaves are kept as they are."""
    if not isinstance(params, Mapping):
        return params
    out = {k: split_qkv(v) for k, v in params.items() if k != "qkv"}
    if "qkv" in params:
        kernel, bias = params["qkv"]["kernel"], params["qkv"].get("bias")
        for s, name in enumerate(("query", "key", "value")):
            out[name] = {"kernel": kernel[..., s, :, :]}
            if bias is not None:
                out[name]["bias"] = bias[..., s, :, :]
    return out


def write_cache(cache: jax.Array, new: jax.Array, positions: jax.Array, valid: jax.Array) -> jax.Array:
    """Scatter `new[i, j]` into `cache[i, positions[i, j]]` where `valid[i, j]`.

    cache: [b, L, ...]; new: [b, t, ...]; positions: int [b, t]; valid: bool [b, t].
    Invalid entries and positions >= L are dropped (never clamped onto valid slots).
    """
    slots = jnp.where(valid, positions, cache.shape[1])
    rows = jnp.arange(cache.shape[0])[:, None]
    return cache.at[rows, slots].set(new.astype(cache.dtype), mode="drop")


class Projection(nn.Module):
    """`einsum(equation, x, kernel) + bias`, the kernel kept in its true shape.

    equation: "<batch><in>,<in><out>-><batch><out>" (e.g. "btd,dhk->bthk"): the kernel's
    leading axes are contracted with x's trailing ones. kernel: `shape`, float32, logical
    `axes`, normal(std); bias: the kernel dims that survive into the output. (Flax's
    DenseGeneral initialises a flattened 2-D kernel, which breaks the logical sharding
    constraint of a 3-D kernel under a mesh.)

    The product is computed as one 2-D matmul `[prod(batch), prod(in)] @ [prod(in),
    prod(out)]`: the same sums as the einsum, which XLA's CPU backend runs faster (a GPT
    MLP's forward+backward 1.4x faster than nn.Dense / einsum on one core, jax 0.10.2;
    see benchmarks/RESULTS.md "Training step vs nanoGPT"), by `layers.matmul`, which on CPU
    computes the weight gradient from a written-out transpose that YNNPACK can take.
    """

    equation: str
    shape: tuple[int, ...]
    axes: tuple[str, ...]
    use_bias: bool
    dtype: jnp.dtype
    std: float = init.INIT_STD

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x_spec, rest = self.equation.split(",")
        kernel_spec, out_spec = rest.split("->")
        n_in = sum(c in x_spec for c in kernel_spec)
        batch_spec = x_spec[: len(x_spec) - n_in]
        if (kernel_spec[:n_in] != x_spec[len(batch_spec):] or out_spec != batch_spec + kernel_spec[n_in:]
                or x.ndim != len(x_spec)):
            raise ValueError(f"Projection equation={self.equation!r} must read '<batch><in>,<in><out>->"
                             f"<batch><out>' for an input of rank {x.ndim}")
        kernel = self.param("kernel", init.normal(self.axes, self.std), self.shape, jnp.float32)
        batch_shape, out_shape = x.shape[: len(batch_spec)], self.shape[n_in:]
        fan_in = math.prod(self.shape[:n_in])
        y = matmul(x.astype(self.dtype).reshape(-1, fan_in),
                   kernel.astype(self.dtype).reshape(fan_in, math.prod(out_shape)))
        y = y.reshape(*batch_shape, *out_shape)
        if not self.use_bias:
            return y
        bias = self.param("bias", init.zeros(self.axes[n_in:]), out_shape, jnp.float32)
        return y + bias.astype(self.dtype)


class MultiHeadAttention(nn.Module):
    """Self-attention (`inputs_kv=None`) or cross-attention, `[b, t, d_model] -> [b, t, d_model]`.

    Attributes:
      cfg: the model config (heads, kv heads, bias, dtype, implementation, dropout).
      causal: mask future positions (self-attention only).
      out_std: init std of the output projection (scaled for residual stacks).
    """

    cfg: ModelConfig
    causal: bool = False
    out_std: float = init.INIT_STD

    @nn.compact
    def __call__(
        self,
        inputs_q: jax.Array,
        inputs_kv: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        valid: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
    ) -> jax.Array:
        """Attend from `inputs_q` [b, t, d_model] to `inputs_kv` [b, s, d_model] (or itself).

        mask: bool, broadcastable to [b, heads, t, s], True = attend (padding masks).
        positions: int [b, t], for rotary encodings and the caches.
        segment_ids: int [b, t], packed sequences attend within their segment.
        valid: bool [b, t], which tokens a decode call writes into the cache.
        """
        cfg = self.cfg
        is_self = inputs_kv is None
        kv_in = inputs_q if is_self else inputs_kv

        def project(heads: int, kind: str, name: str, x: jax.Array) -> jax.Array:
            return Projection(
                "btd,dhk->bthk", (cfg.d_model, heads, cfg.head_dim), ("embed", kind, "head_dim"),
                cfg.qkv_use_bias, cfg.compute_dtype, name=name,
            )(x)

        def project_kv(x: jax.Array) -> tuple[jax.Array, jax.Array]:
            return project(cfg.kv_heads, "kv_heads", "key", x), project(cfg.kv_heads, "kv_heads", "value", x)

        if is_self and cfg.fused_qkv:  # one [d, 3, heads, head_dim] kernel (GPT-2's c_attn)
            qkv = Projection(
                "btd,dshk->btshk", (cfg.d_model, 3, cfg.num_heads, cfg.head_dim),
                ("embed", None, "heads", "head_dim"), cfg.qkv_use_bias, cfg.compute_dtype, name="qkv",
            )(inputs_q)
            q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
        else:
            q = project(cfg.num_heads, "heads", "query", inputs_q)
            if decode and not is_self:
                k, v = self._cross_cache(kv_in, positions, project_kv)
            else:
                k, v = project_kv(kv_in)
        if is_self and cfg.pos_encoding == "rotary":
            q = apply_rotary(q, positions, cfg.rope_base)
            k = apply_rotary(k, positions, cfg.rope_base)

        is_causal = self.causal and is_self
        # cfg.sliding_window: a causal query sees itself and the window - 1 keys before it.
        window = cfg.sliding_window if is_causal else None
        if decode and is_self:
            k, v, mask = self._update_cache(k, v, positions, valid, window)
            is_causal, segment_ids, window = False, None, None  # the cache mask holds both rules

        dropout_rng = None
        if not deterministic and cfg.attention_dropout_rate > 0:
            dropout_rng = self.make_rng("dropout")
        options = dict(
            mask=mask, is_causal=is_causal, implementation=cfg.attention_impl, dropout_rng=dropout_rng,
            local_window_size=None if window is None else (window - 1, 0),
            dropout_rate=cfg.attention_dropout_rate, deterministic=dropout_rng is None,
        )
        segment_ids = segment_ids if is_self else None

        def attend(q, k, v, segment_ids):
            return dot_product_attention(q, k, v, segment_ids=segment_ids, **options)

        selection = select_implementation(q, k, v, segment_ids=segment_ids, **options)
        if selection.implementation == "pallas":  # an opaque kernel: split it by hand under a mesh
            out = attend_per_shard(attend, q, k, v, segment_ids)
        else:
            out = attend(q, k, v, segment_ids)
        out = nn.with_logical_constraint(out, ("batch", "length", "heads", None))
        return Projection(
            "bthk,hkd->btd", (cfg.num_heads, cfg.head_dim, cfg.d_model), ("heads", "head_dim", "embed"),
            cfg.use_bias, cfg.compute_dtype, self.out_std, name="out",
        )(out)

    def _cross_cache(self, encoded: jax.Array, positions: jax.Array, project_kv) -> tuple[jax.Array, jax.Array]:
        """Cross-attention keys/values while decoding: projected from `encoded` when a
        call starts at position 0 in any row (the prefill), read from the cache after."""
        shape = (*encoded.shape[:2], self.cfg.kv_heads, self.cfg.head_dim)
        dtype = self.cfg.compute_dtype
        self.variable("cache", "cross_key", jnp.zeros, shape, dtype)
        self.variable("cache", "cross_value", jnp.zeros, shape, dtype)
        if self.is_initializing():
            return project_kv(encoded)

        def fresh(module: nn.Module, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
            k, v = project_kv(encoded)
            module.variable("cache", "cross_key").value = k
            module.variable("cache", "cross_value").value = v
            return k, v

        def cached(module: nn.Module, encoded: jax.Array) -> tuple[jax.Array, jax.Array]:
            return module.variable("cache", "cross_key").value, module.variable("cache", "cross_value").value

        return nn.cond(jnp.any(positions[:, 0] == 0), fresh, cached, self, encoded)

    def _update_cache(
        self, k: jax.Array, v: jax.Array, positions: jax.Array, valid: jax.Array, window: int | None
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Write this call's keys/values; return the whole cache and its causal (and
        sliding-window) mask."""
        cached_key = self.variable("cache", "cached_key", jnp.zeros, k.shape, k.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, v.shape, v.dtype)
        cached_key.value = write_cache(cached_key.value, k, positions, valid)
        cached_value.value = write_cache(cached_value.value, v, positions, valid)
        slots = jnp.arange(cached_key.value.shape[1])
        mask = slots[None, None, :] <= positions[:, :, None]  # [b, t, cache_len]
        if window is not None:
            mask &= slots[None, None, :] > positions[:, :, None] - window
        return cached_key.value, cached_value.value, mask[:, None]
