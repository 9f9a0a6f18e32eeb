"""layers.matmul: x @ kernel, its weight gradient in Eigen's faster orientation on CPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.matmul import matmul, transposes_weight_gradient

# (n, fan_in, fan_out): transposed on CPU, a tie left as written, wide fan_out
SHAPES = [(96, 64, 16), (40, 24, 16), (48, 16, 64)]


@pytest.mark.parametrize("n, fan_in, fan_out", SHAPES)
def test_value_and_both_autodiff_modes_match_float64_numpy(n, fan_in, fan_out):
    rng = np.random.default_rng(n + fan_in + fan_out)
    x, w, dy, tx, tw = (rng.standard_normal(s).astype(np.float32) for s in
                        [(n, fan_in), (fan_in, fan_out), (n, fan_out), (n, fan_in), (fan_in, fan_out)])
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    y, vjp = jax.vjp(jax.jit(matmul), x, w)
    dx, dw = vjp(dy)
    _, ty = jax.jvp(matmul, (x, w), (tx, tw))
    tol = dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(n, fan_in)))
    np.testing.assert_allclose(y, x64 @ w64, **tol)
    np.testing.assert_allclose(dx, dy64 @ w64.T, **tol)
    np.testing.assert_allclose(dw, x64.T @ dy64, **tol)
    np.testing.assert_allclose(ty, tx.astype(np.float64) @ w64 + x64 @ tw.astype(np.float64), **tol)


def test_the_rule_is_the_measured_region():
    assert transposes_weight_gradient(512, 128)  # a small GPT's MLP output kernel
    assert transposes_weight_gradient(896, 224)
    assert not transposes_weight_gradient(128, 512)  # already the faster orientation
    assert not transposes_weight_gradient(192, 128)  # a tie
    assert not transposes_weight_gradient(1536, 384)  # wide: the written orientation is faster


def _weight_gradient_dot(fan_in: int, fan_out: int) -> str:
    """The CPU-compiled dot that computes the kernel's gradient, as HLO text."""
    x, w, dy = jnp.ones((256, fan_in)), jnp.ones((fan_in, fan_out)), jnp.ones((256, fan_out))
    grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: matmul(x, w), w)[1](dy)[0])
    dots = [line for line in grad.lower(x, w, dy).compile().as_text().splitlines() if " dot(" in line]
    assert len(dots) == 1, dots
    return dots[0]


def test_cpu_computes_the_transposed_product_where_the_rule_says():
    # the result's physical layout: [fan_out, fan_in] row-major is layout {0,1} of [fan_in, fan_out]
    transposed = _weight_gradient_dot(512, 128)
    assert re.search(r"f32\[512,128\]\{0,1\} dot\(|f32\[128,512\]\{1,0\} dot\(", transposed), transposed
    as_written = _weight_gradient_dot(128, 512)
    assert "f32[128,512]{1,0} dot(" in as_written, as_written


def test_other_platforms_get_the_plain_product():
    x, w = jnp.ones((8, 64)), jnp.ones((64, 16))
    for platform, barriers in (("cpu", 1), ("cuda", 0), ("tpu", 0)):
        text = jax.jit(matmul).trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert text.count("optimization_barrier") == barriers, platform


@pytest.mark.parametrize("x_shape, w_shape", [((4, 8, 3), (3, 5)), ((4, 3), (4, 5)), ((4, 3), (3,))])
def test_bad_shapes_are_named(x_shape, w_shape):
    with pytest.raises(ValueError, match=r"matmul takes x \[n, fan_in\] and kernel \[fan_in, fan_out\]"):
        matmul(jnp.ones(x_shape), jnp.ones(w_shape))
