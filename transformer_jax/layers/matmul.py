"""`x @ w` for a projection, with a weight gradient XLA's CPU backend runs on its fast kernel.

The weight gradient of `y = x @ w` (x [n, in], w [in, out]) is `x^T dy`, a product that
contracts the leading axis of both operands. XLA's CPU backend hands such a product to
Eigen's generic dot: its YNNPACK kernels take only a left operand that contracts its last
axis. At a small GPT's MLP output projection ([4096, 512]^T [4096, 128]) that dot ran at
~47 GFLOP/s on one core, where YNNPACK ran the layer's other products at ~75.

For a kernel whose fan_in is at least `WIDE_RATIO` times its fan_out (a transformer
MLP's output projection), with at most `MAX_TRANSPOSED_BYTES` of output cotangent (a small
model's step: at `char-small`'s 24 MiB per layer the extra buffer cost more than the faster
product saved), the weight gradient here is `(dy^T x)^T`: a written-out
transpose of the output cotangent dy (the narrower operand), a row-major product YNNPACK
takes, then a transpose of the small [out, in] result. Optimization barriers keep XLA from
folding either transpose back into the dot. x is never the one transposed: at the MLP's
input projection it is a layer norm's output, which XLA then recomputed in the transposed
order (2.6 ms against 0.33 ms for a plain copy at [4096, 128]); nor the wider dy there
(no gain in the whole step). See benchmarks/RESULTS.md, "Eighth round".

Only the tangent is rewritten (a `custom_jvp`; reverse mode is JAX's transpose of the rule),
so `jax.jvp`, `jax.jacfwd`, `vmap` and Hessian-vector products work as with `jnp.matmul`;
the forward product is `jnp.matmul(x, w)` itself. The sums are the same, only their order
(so float rounding) may differ. Only on the CPU backend: GPU and TPU matmul kernels read
transposed operands at no cost, where the copy would be pure overhead.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero

# fan_in / fan_out from which a kernel's gradient is rewritten: measured at 4 (GPT MLPs).
WIDE_RATIO = 4
# The largest written-out dy^T: 2 MiB (`small`, [4096, 128]) gained, 24 MiB (`char-small`,
# [16384, 384]) lost 4% of the step though the product alone gained 5%.
MAX_TRANSPOSED_BYTES = 8 << 20


def _weight_term(x: jax.Array, dw: jax.Array) -> jax.Array:
    """`x @ dw` written as `(dw^T x^T)^T` behind barriers, so that its transpose (the
    weight gradient from the cotangent dy [n, out]) is `(barrier(dy^T) @ x)^T`: a
    row-major product, then a transpose of the [out, in] result. optimization_barrier
    transposes to itself, so each barrier here sits in the gradient too."""
    return lax.optimization_barrier(jnp.matmul(lax.optimization_barrier(dw.T), x.T)).T


@jax.custom_jvp
def _matmul_wide(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.matmul(x, w)


def _matmul_wide_jvp(primals, tangents):
    (x, w), (dx, dw) = primals, tangents
    terms = []
    if not isinstance(dx, SymbolicZero):
        terms.append(jnp.matmul(dx, w))
    if not isinstance(dw, SymbolicZero):
        terms.append(_weight_term(x, dw))
    y = jnp.matmul(x, w)
    return y, sum(terms[1:], terms[0]) if terms else jnp.zeros_like(y)


_matmul_wide.defjvp(_matmul_wide_jvp, symbolic_zeros=True)


def rewrites_gradient(x: jax.ShapeDtypeStruct, w: jax.ShapeDtypeStruct) -> bool:
    """Whether `matmul(x, w)` on CPU computes its weight gradient from a written-out dy^T:
    w's fan_in at least WIDE_RATIO x its fan_out (so dy [n, out] is the narrower operand)
    and dy^T at most MAX_TRANSPOSED_BYTES."""
    (n, _), (fan_in, fan_out) = x.shape, w.shape
    dy_bytes = n * fan_out * jnp.result_type(x.dtype, w.dtype).itemsize
    return fan_in >= WIDE_RATIO * fan_out and dy_bytes <= MAX_TRANSPOSED_BYTES


def matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """`x @ w`, x [n, in], w [in, out] -> [n, out]; differentiable as `jnp.matmul`.

    On the CPU backend, where `rewrites_gradient(x, w)` (a wide kernel, a small n), its
    weight gradient comes from a written-out transpose of the output cotangent (see the
    module docstring); otherwise, and on other backends, this is `jnp.matmul` itself.
    """
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise ValueError(f"matmul expects x [n, in] and w [in, out], got x {x.shape} and w {w.shape}")
    if jax.default_backend() != "cpu" or not rewrites_gradient(x, w):
        return jnp.matmul(x, w)
    return _matmul_wide(x, w)
