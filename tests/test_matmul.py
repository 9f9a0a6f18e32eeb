"""layers.matmul: values and derivatives (reverse, forward, second order, vmap) against float64
NumPy on fresh random inputs, and the compiled weight gradient's orientation on CPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.matmul import MAX_TRANSPOSED_BYTES, matmul, rewrites_gradient

# (n, in, out): two kernels with fan_in >= 4 fan_out (rewritten on CPU), then three others
SHAPES = [(48, 32, 8), (40, 36, 9), (48, 8, 32), (24, 12, 30), (16, 10, 10)]


def draw(seed, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


@pytest.mark.parametrize("n,fan_in,fan_out", SHAPES)
def test_value_and_gradients_match_float64(n, fan_in, fan_out):
    x, w, g = draw(n + fan_in, (n, fan_in), (fan_in, fan_out), (n, fan_out))
    y, vjp = jax.vjp(matmul, x, w)
    dx, dw = vjp(g)
    x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
    np.testing.assert_allclose(y, x64 @ w64, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx, g64 @ w64.T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x64.T @ g64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,fan_in,fan_out", SHAPES[:2])
def test_forward_mode_and_second_order(n, fan_in, fan_out):
    x, w, tx, tw, v = draw(7, (n, fan_in), (fan_in, fan_out), (n, fan_in), (fan_in, fan_out), (fan_in, fan_out))
    y, ty = jax.jvp(matmul, (x, w), (tx, tw))
    x64, w64 = x.astype(np.float64), w.astype(np.float64)
    np.testing.assert_allclose(ty, tx.astype(np.float64) @ w64 + x64 @ tw.astype(np.float64), rtol=1e-5, atol=1e-5)

    # Hessian-vector product of sum(tanh(x w)) in w: H v = x^T (tanh'' (x w) * (x v))
    def loss(w):
        return jnp.sum(jnp.tanh(matmul(x, w)))

    hvp = jax.jvp(jax.grad(loss), (w,), (v,))[1]
    t = np.tanh(x64 @ w64)
    expected = x64.T @ (-2 * t * (1 - t ** 2) * (x64 @ v.astype(np.float64)))
    np.testing.assert_allclose(hvp, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(jax.jacfwd(loss)(w), jax.jacrev(loss)(w), rtol=1e-5, atol=1e-5)


def test_vmap_over_inputs():
    xs, w, g = draw(3, (5, 20, 24), (24, 4), (5, 20, 4))
    dws = jax.vmap(lambda x, g: jax.vjp(lambda w: matmul(x, w), w)[1](g)[0])(xs, g)
    expected = np.einsum("bni,bno->bio", xs.astype(np.float64), g.astype(np.float64))
    np.testing.assert_allclose(dws, expected, rtol=1e-5, atol=1e-5)


def test_frozen_weight_and_frozen_input():
    x, w, g = draw(5, (32, 30), (30, 6), (32, 6))
    dx = jax.grad(lambda x: jnp.vdot(matmul(x, w), g))(x)
    dw = jax.grad(lambda w: jnp.vdot(matmul(x, w), g))(w)
    np.testing.assert_allclose(dx, g.astype(np.float64) @ w.astype(np.float64).T, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dw, x.astype(np.float64).T @ g.astype(np.float64), rtol=1e-5, atol=1e-5)


def test_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"x \[n, in\] and w \[in, out\].*\(4, 3\).*\(5, 2\)"):
        matmul(jnp.zeros((4, 3)), jnp.zeros((5, 2)))
    with pytest.raises(ValueError, match="matmul expects"):
        matmul(jnp.zeros((2, 4, 3)), jnp.zeros((3, 2)))


def test_which_products_are_rewritten():
    def rewritten(n, fan_in, fan_out, dtype=jnp.float32):
        return rewrites_gradient(jax.ShapeDtypeStruct((n, fan_in), dtype), jax.ShapeDtypeStruct((fan_in, fan_out), dtype))

    assert rewritten(4096, 512, 128) and rewritten(1024, 1536, 384) and rewritten(8, 400, 100)
    assert not rewritten(4096, 128, 512) and not rewritten(4096, 128, 384) and not rewritten(8, 399, 100)
    rows = MAX_TRANSPOSED_BYTES // (4 * 384)  # dy^T [384, rows] float32 at the limit
    assert rewritten(rows, 1536, 384) and not rewritten(rows + 1, 1536, 384)
    assert rewritten(2 * rows, 1536, 384, jnp.bfloat16)


def _dot_lhs_contracting(compiled_text: str) -> list[str]:
    return re.findall(r"\bdot\(.*?lhs_contracting_dims=\{(\d+)\}", compiled_text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="the rewrite is for XLA's CPU backend")
def test_wide_weight_gradient_contracts_row_major_on_cpu():
    """The compiled weight gradient of a wide kernel holds no dot contracting its left
    operand's leading axis (the form XLA's CPU backend sends to Eigen's generic dot);
    jnp.matmul's own gradient does, so the check can tell the two apart."""
    x, w = jnp.ones((256, 512)), jnp.ones((512, 128))

    def grad_text(mm):
        return jax.jit(jax.grad(lambda w: jnp.sum(mm(x, w) ** 2))).lower(w).compile().as_text()

    assert "0" in _dot_lhs_contracting(grad_text(jnp.matmul))
    ours = _dot_lhs_contracting(grad_text(matmul))
    assert ours and "0" not in ours
