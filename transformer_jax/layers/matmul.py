"""The 2-D product behind every projection, `x @ kernel`, with a weight gradient that XLA's
CPU backend can hand to YNNPACK.

Autodiff turns `x @ kernel` into the weight gradient `x^T dy`, a product that contracts the
leading (token) axis of both operands. XLA's CPU backend gives YNNPACK only products whose
left operand contracts its trailing axis, so it runs this one on Eigen's generic dot: at a
small GPT's MLP shapes (4,096 tokens, 128 <-> 512) 9.4 ms a product in the training step,
against 7.3 ms for YNNPACK's `[narrow, n] @ [n, wide]` (one core, jax 0.10.2, AVX2;
benchmarks/RESULTS.md, "Eleventh round").

So where one fan of the kernel is at least twice the other, `matmul` on CPU writes the
narrower operand out transposed, x^T [fan_in, n] or dy^T [fan_out, n], and computes the
weight gradient from it as a product YNNPACK takes. The copy reads and writes one
[n, narrow] array; where the fans are closer, the copy would cost about what it saves, and
the product is left as written.

Keeping the copy a copy takes two things. XLA folds a transpose into the product's dimension
numbers, which an `optimization_barrier` prevents. And XLA's CPU fusion would otherwise fuse
the transpose with whatever computed its operand (a layer norm, say) and recompute that in
the transposed order, 8x slower than copying it (RESULTS, "Eighth round"): it never fuses a
concatenate along the minor axis with its producers or consumers, so the operand is first
concatenated with one of its own columns and the transpose reads that materialised array.

It is a `custom_jvp` whose tangent is the same product written so that its transpose is the
one above: forward mode, `vmap` and higher derivatives keep working, and the sums are the
same (float32 rounding may differ in the last bits). `lax.platform_dependent` keeps it to the
CPU: other backends get the plain product.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

# one fan at least this many times the other: where the written-out transpose was measured
# faster in the training step (RESULTS, "Eleventh round")
MIN_FAN_RATIO = 2
# XLA's CPU fusion leaves a minor-axis concatenate unfused only from 128 elements wide
# (jax 0.10.2; newer XLA from 64 bytes), and the copy adds one column: below this narrow
# fan the transpose would fuse the operand's producer again, so the product stays as written
MIN_NARROW_FAN = 127

_NO_BATCH = ((), ())


def writes_out(fan_in: int, fan_out: int) -> str | None:
    """Which operand `matmul` writes out transposed on CPU for a [fan_in, fan_out] kernel:
    "x", "dy", or None (the product as written)."""
    if min(fan_in, fan_out) < MIN_NARROW_FAN:
        return None
    if fan_out >= MIN_FAN_RATIO * fan_in:
        return "x"
    if fan_in >= MIN_FAN_RATIO * fan_out:
        return "dy"
    return None


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """`x @ kernel`: x [n, fan_in], kernel [fan_in, fan_out] -> [n, fan_out]."""
    if x.ndim != 2 or kernel.ndim != 2 or x.shape[1] != kernel.shape[0]:
        raise ValueError(f"matmul takes x [n, fan_in] and kernel [fan_in, fan_out], "
                         f"got x {x.shape} and kernel {kernel.shape}")
    side = writes_out(*kernel.shape)
    if side is None:
        return x @ kernel
    cpu = _written_out_x if side == "x" else _written_out_dy
    return lax.platform_dependent(x, kernel, cpu=cpu, default=jnp.matmul)


def _copy_transposed(a: jax.Array) -> jax.Array:
    """a [n, k] -> a^T [k, n], computed as a copy of `a` as it stands (see the docstring)."""
    unfusable = jnp.concatenate([a, a[:, :1]], axis=1)
    return lax.optimization_barrier(unfusable.T[: a.shape[1]])


def _with_weight_term(weight_term):
    """`x @ kernel` whose tangent's kernel term, `x @ dkernel`, is `weight_term(x, dkernel)`:
    the same product written so that JAX's transpose of it is the gradient we want."""

    @jax.custom_jvp
    def product(x: jax.Array, kernel: jax.Array) -> jax.Array:
        return x @ kernel

    @product.defjvp
    def _jvp(primals, tangents):
        (x, kernel), (dx, dkernel) = primals, tangents
        return x @ kernel, dx @ kernel + weight_term(x, dkernel)

    return product


def _from_x_transposed(x: jax.Array, dkernel: jax.Array) -> jax.Array:
    """x @ dkernel, contracted from a copied x^T [fan_in, n] (a residual of the forward
    pass): its transpose is x^T @ dy, [fan_in, n] @ [n, fan_out]."""
    return lax.dot_general(_copy_transposed(x), dkernel, (((0,), (0,)), _NO_BATCH))


def _to_dy_transposed(x: jax.Array, dkernel: jax.Array) -> jax.Array:
    """x @ dkernel as (dkernel^T x^T)^T, written in the reverse of the order that its
    transpose runs: dy^T is copied (concatenate, transpose, slice), then dy^T @ x,
    [fan_out, n] @ [n, fan_in], then that small result is transposed. The barriers keep XLA
    from folding either transpose into the product."""
    fan_out = dkernel.shape[1]
    product = lax.dot_general(lax.optimization_barrier(dkernel.T), x, (((1,), (1,)), _NO_BATCH))
    padded = jnp.pad(lax.optimization_barrier(product), ((0, 1), (0, 0)))  # [fan_out + 1, n]
    term, zero = lax.split(padded.T, [fan_out, 1], axis=1)
    # adding the zero column makes the transpose concatenate dy with a column of its own,
    # not with zeros (which XLA would turn into a fusible pad)
    return term + jnp.pad(zero, ((0, 0), (0, fan_out - 1)))


_written_out_x = _with_weight_term(_from_x_transposed)
_written_out_dy = _with_weight_term(_to_dy_transposed)
