"""Position-wise feed-forward network: ReLU, GELU (tanh or exact), SiLU or SwiGLU."""
from __future__ import annotations

import flax.linen as nn
import jax

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers.attention import Projection


def activation_fn(name: str):
    """The elementwise activation called `name` (one of config.ACTIVATIONS but "swiglu")."""
    return {
        "relu": nn.relu,
        "gelu": lambda x: nn.gelu(x, approximate=True),
        "gelu_exact": lambda x: nn.gelu(x, approximate=False),
        "silu": nn.silu,
    }[name]


class FeedForward(nn.Module):
    """`[batch, length, d_model] -> [batch, length, d_model]` in `cfg.dtype`.

    relu/gelu/gelu_exact/silu: act(x W1 + b1) W2 + b2. swiglu: (silu(x Wg) * (x W1)) W2
    (Shazeer 2020). "gelu" is the tanh approximation (GPT-2's "gelu_new"); "gelu_exact"
    is x * Phi(x) with the erf (BERT's "gelu").
    `out_std` is the init std of the output (residual) projection.
    """

    cfg: ModelConfig
    out_std: float = init.INIT_STD

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg

        def dense(fan_in: int, features: int, axes: tuple[str, str], std: float, name: str) -> Projection:
            # Projection (one 2-D matmul) rather than nn.Dense: same params and sums, faster on CPU
            return Projection("btd,df->btf", (fan_in, features), axes, cfg.use_bias, cfg.compute_dtype,
                              std, name=name)

        hidden = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), init.INIT_STD, "wi")(x)
        if cfg.activation == "swiglu":
            gate = dense(cfg.d_model, cfg.d_ff, ("embed", "mlp"), init.INIT_STD, "wg")(x)
            hidden = nn.silu(gate) * hidden
        else:
            hidden = activation_fn(cfg.activation)(hidden)
        hidden = nn.with_logical_constraint(hidden, ("batch", "length", "mlp"))
        return dense(cfg.d_ff, cfg.d_model, ("mlp", "embed"), self.out_std, "wo")(hidden)
