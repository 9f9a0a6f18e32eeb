"""Position-wise feed-forward network: ReLU, GELU (tanh or exact), SiLU or SwiGLU."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers.attention import Projection


def activation_fn(name: str):
    """The elementwise activation called `name` (one of config.ACTIVATIONS but "swiglu")."""
    return {
        "relu": nn.relu,
        "gelu": gelu_tanh,
        "gelu_exact": gelu_erf,
        "silu": nn.silu,
    }[name]


# The two GELUs compute jax.nn.gelu's forward (the same operations, so the same float
# rounding) and carry their derivative as a `custom_jvp` (forward mode keeps working; reverse
# mode is JAX's transpose of the rule). The derivative is written with a different special
# function from the forward's (the logistic function for the tanh form, erf for the erfc
# form), so XLA cannot share that intermediate between forward and backward: autodiff of the
# forward kept the tanh (or erfc) array alive for the backward beside the pre-activation and
# the output, three [b, t, d_ff] arrays per layer and two passes over them; with the rule the
# forward is one pass and the backward recomputes the slope from the pre-activation inside
# its own pass. One array fewer per layer matters on CPU, where every fresh page of XLA's
# per-step temp buffer costs a page fault (benchmarks/RESULTS.md, "Fourth round").


@jax.custom_jvp
def gelu_tanh(x: jax.Array) -> jax.Array:
    """GPT-2's GELU, x * 0.5 (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, any shape."""
    c = np.sqrt(2 / np.pi).astype(x.dtype)
    return x * (0.5 * (1.0 + jnp.tanh(c * (x + 0.044715 * (x ** 3)))))


@gelu_tanh.defjvp
def _gelu_tanh_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    c2 = (2 * np.sqrt(2 / np.pi)).astype(x.dtype)
    cdf = jax.nn.sigmoid(c2 * (x + 0.044715 * (x ** 3)))  # = 0.5 (1 + tanh(u)), u = c2 / 2 (...)
    # d/dx [x cdf] = cdf + x cdf (1 - cdf) 2c (1 + 3 * 0.044715 x^2)
    slope = cdf + (x * cdf) * (1.0 - cdf) * (c2 * (1.0 + 0.134145 * (x * x)))
    return gelu_tanh(x), slope * t


@jax.custom_jvp
def gelu_erf(x: jax.Array) -> jax.Array:
    """The exact GELU, x * Phi(x) = 0.5 x erfc(-x / sqrt(2)), elementwise, any shape."""
    return 0.5 * x * jax.lax.erfc(-x * np.sqrt(0.5).astype(x.dtype))


@gelu_erf.defjvp
def _gelu_erf_jvp(primals, tangents):
    (x,), (t,) = primals, tangents
    cdf = 0.5 * (1.0 + jax.lax.erf(x * np.sqrt(0.5).astype(x.dtype)))  # Phi(x)
    # d/dx [x Phi(x)] = Phi(x) + x phi(x), phi(x) = exp(-x^2 / 2) / sqrt(2 pi)
    slope = cdf + x * (np.sqrt(0.5 / np.pi).astype(x.dtype) * jnp.exp(-0.5 * (x * x)))
    return gelu_erf(x), slope * t


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
