"""Normalisation layers chosen by `cfg.norm`."""
from __future__ import annotations

from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init


def make_norm(cfg: ModelConfig, name: str | None = None) -> nn.Module:
    """LayerNorm or RMSNorm over the last (`embed`) axis.

    Statistics are computed in float32 (Flax's default); the output has `cfg.dtype`.
    LayerNorm has a bias when `cfg.use_bias`; RMSNorm never has one.
    """
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(
            epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype,
            scale_init=init.ones(("embed",)), name=name,
        )
    return LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, use_bias=cfg.use_bias, name=name)


class LayerNorm(nn.Module):
    """(x - mean) / sqrt(var + epsilon) * scale (+ bias) over the last axis, `[..., d] -> [..., d]`.

    The parameters and forward arithmetic of `flax.linen.LayerNorm` ("scale", "bias": [d],
    float32, logical axis "embed"; statistics in float32 or wider, variance as
    mean(x^2) - mean(x)^2 clipped at 0; output in `dtype`). Differentiated through
    `layer_norm`'s closed-form derivative, which XLA's CPU backend runs in fewer passes than
    the autodiff of flax's statistics (benchmarks/RESULTS.md, "Third round").
    """

    epsilon: float
    dtype: jnp.dtype
    use_bias: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        d = x.shape[-1]
        scale = self.param("scale", init.ones(("embed",)), (d,), jnp.float32)
        stat = jnp.promote_types(x.dtype, jnp.float32)
        if self.use_bias:
            bias = self.param("bias", init.zeros(("embed",)), (d,), jnp.float32).astype(stat)
        else:
            bias = jnp.zeros((d,), stat)
        return layer_norm(x.astype(stat), scale.astype(stat), bias, self.epsilon).astype(self.dtype)


@partial(jax.custom_jvp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """Layer norm of `x [..., d]` over its last axis, with `scale`, `bias` [d] (one dtype).

    A `custom_jvp` (not a `custom_vjp`), so forward-mode differentiation keeps working; the
    reverse mode is JAX's transpose of the linear rule below:
    dx = r (u - mean(u) - x^ mean(u x^)) with u = g * scale, r = 1 / sqrt(var + eps) and
    x^ = (x - mean) r.
    """
    return _normalise(x, scale, bias, epsilon)[0]


def _normalise(x, scale, bias, epsilon):
    """(output, x^ = (x - mean) r, r * scale), in flax's order of operations."""
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.maximum(0.0, jnp.mean(x * x, axis=-1, keepdims=True) - mean * mean)
    inv_std = jax.lax.rsqrt(var + epsilon)
    centred = x - mean
    return centred * (inv_std * scale) + bias, centred * inv_std, inv_std * scale


@layer_norm.defjvp
def _layer_norm_jvp(epsilon, primals, tangents):
    x, scale, bias = primals
    t_x, t_scale, t_bias = tangents
    y, normed, gain = _normalise(x, scale, bias, epsilon)
    # d/dx of (x - mean) r: remove the tangent's mean and its component along x^
    t_normed = (t_x - jnp.mean(t_x, axis=-1, keepdims=True)
                - normed * jnp.mean(t_x * normed, axis=-1, keepdims=True))
    return y, t_normed * gain + normed * t_scale + t_bias
