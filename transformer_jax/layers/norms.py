"""Normalisation layers chosen by `cfg.norm`."""
from __future__ import annotations

import flax.linen as nn

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
    return nn.LayerNorm(
        epsilon=cfg.layer_norm_eps, dtype=cfg.compute_dtype, use_bias=cfg.use_bias,
        scale_init=init.ones(("embed",)), bias_init=init.zeros(("embed",)), name=name,
    )
