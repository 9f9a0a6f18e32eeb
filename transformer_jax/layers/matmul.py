"""The 2-D product behind every projection, `x @ kernel`, with its weight gradient in
the orientation that XLA's CPU backend computes faster.

Autodiff turns `x @ kernel` into the weight gradient `x^T dy`, a product that contracts
the leading (token) axis of both operands. XLA's CPU backend cannot hand such a product to
YNNPACK and runs it on Eigen's generic dot, whose speed depends on which axis of the
[fan_in, fan_out] result leads. Measured over a grid of shapes on one core (jax 0.10.2,
AVX2; benchmarks/RESULTS.md, "Tenth round"): when fan_out is under 256 and at most half
of fan_in, computing the transposed result `dy^T x` [fan_out, fan_in] and transposing it
was 10-45% faster in every measured shape but one ([1024, 192] at 4,096 tokens, 5% slower;
a `small` GPT's MLP output kernel, [512, 128]: 10.9 -> 9.2 ms at 4,096 tokens); elsewhere
the two orientations trade places or tie, and the product is left as written.

The other orientation comes from writing the forward as `x @ (kernel^T)^T` with the inner
transpose behind `optimization_barrier`, so that XLA cannot fold the two transposes away
before autodiff's transpose rule has produced `dy^T x`. It is the same sum in another
order (float32 rounding may differ in the last bit), forward- and reverse-mode autodiff are
unchanged, and `lax.platform_dependent` keeps it to the CPU: other backends get the plain
product.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

# fan_out below this, and fan_in at least TRANSPOSE_MIN_RATIO times it: the measured region
# where the transposed weight gradient is faster on Eigen (see the module docstring).
TRANSPOSE_MAX_FAN_OUT = 256
TRANSPOSE_MIN_RATIO = 2


def transposes_weight_gradient(fan_in: int, fan_out: int) -> bool:
    """Whether `matmul` computes a [fan_in, fan_out] kernel's gradient as `(dy^T x)^T` on CPU."""
    return fan_out < TRANSPOSE_MAX_FAN_OUT and fan_in >= TRANSPOSE_MIN_RATIO * fan_out


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel`: x [n, fan_in], kernel [fan_in, fan_out] -> [n, fan_out]."""
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"matmul takes x [n, fan_in] and kernel [fan_in, fan_out], "
                         f"got x {x.shape} and kernel {kernel.shape}")
    if not transposes_weight_gradient(*kernel.shape):
        return x @ kernel
    return jax.lax.platform_dependent(x, kernel, cpu=_via_transposed_kernel, default=jnp.matmul)


def _via_transposed_kernel(x: jax.Array, kernel: jax.Array) -> jax.Array:
    return x @ jax.lax.optimization_barrier(kernel.T).T
