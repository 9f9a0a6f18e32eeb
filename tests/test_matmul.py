"""layers.matmul: x @ kernel, its weight gradient from a written-out transpose on CPU."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.layers.matmul import matmul, writes_out

# (n, fan_in, fan_out): x written out, dy written out, left as written (fans within 2x;
# narrow fan under 128)
SHAPES = [(96, 128, 256), (96, 384, 128), (40, 24, 16), (40, 64, 16)]


def _arrays(seed: int, *shapes):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def _tol(*dims):
    return dict(rtol=1e-5, atol=1e-5 * np.sqrt(max(dims)))


@pytest.mark.parametrize("n, fan_in, fan_out", SHAPES)
def test_value_and_both_autodiff_modes_match_float64_numpy(n, fan_in, fan_out):
    x, w, dy, tx, tw = _arrays(n + fan_in + fan_out, (n, fan_in), (fan_in, fan_out), (n, fan_out),
                               (n, fan_in), (fan_in, fan_out))
    x64, w64, dy64 = (a.astype(np.float64) for a in (x, w, dy))
    y, vjp = jax.vjp(jax.jit(matmul), x, w)
    dx, dw = vjp(dy)
    _, ty = jax.jvp(matmul, (x, w), (tx, tw))
    tol = _tol(n, fan_in)
    np.testing.assert_allclose(y, x64 @ w64, **tol)
    np.testing.assert_allclose(dx, dy64 @ w64.T, **tol)
    np.testing.assert_allclose(dw, x64.T @ dy64, **tol)
    np.testing.assert_allclose(ty, tx.astype(np.float64) @ w64 + x64 @ tw.astype(np.float64), **tol)


@pytest.mark.parametrize("n, fan_in, fan_out", SHAPES[:2])
def test_vmap_of_the_gradient_matches_float64_numpy(n, fan_in, fan_out):
    xs, w, dys = _arrays(7, (3, n, fan_in), (fan_in, fan_out), (3, n, fan_out))
    grads = jax.jit(jax.vmap(lambda x, dy: jax.vjp(matmul, x, w)[1](dy), in_axes=(0, 0)))(xs, dys)
    for b in range(3):
        x64, dy64 = xs[b].astype(np.float64), dys[b].astype(np.float64)
        np.testing.assert_allclose(grads[0][b], dy64 @ w.astype(np.float64).T, **_tol(n, fan_in))
        np.testing.assert_allclose(grads[1][b], x64.T @ dy64, **_tol(n, fan_in))


@pytest.mark.parametrize("n, fan_in, fan_out", SHAPES[:2])
def test_hessian_vector_product_matches_float64_numpy(n, fan_in, fan_out):
    # f(w) = sum(sin(x w)): grad = x^T cos(x w); its derivative along v = -x^T (sin(x w) * x v)
    x, w, v = _arrays(11, (n, fan_in), (fan_in, fan_out), (fan_in, fan_out))
    grad = jax.grad(lambda w: jnp.sum(jnp.sin(matmul(x, w))))
    _, hvp = jax.jit(lambda w, v: jax.jvp(grad, (w,), (v,)))(w, v)
    x64, w64, v64 = (a.astype(np.float64) for a in (x, w, v))
    expected = -x64.T @ (np.sin(x64 @ w64) * (x64 @ v64))
    np.testing.assert_allclose(hvp, expected, rtol=1e-4, atol=1e-4 * np.sqrt(n * fan_in))


def test_the_rule_is_the_measured_region():
    assert writes_out(128, 512) == "x"  # a small GPT's MLP input kernel
    assert writes_out(128, 384) == "x"  # its fused q/k/v kernel
    assert writes_out(512, 128) == "dy"  # its MLP output kernel
    assert writes_out(1536, 384) == "dy"
    assert writes_out(128, 128) is None  # the attention output kernel
    assert writes_out(192, 128) is None and writes_out(128, 192) is None  # fans within 2x
    assert writes_out(64, 256) is None and writes_out(126, 512) is None  # the concatenate would fuse


def _compiled_weight_gradient(produce, fan_in: int, fan_out: int) -> str:
    """CPU-compiled HLO text of the kernel's gradient, x [256, fan_in] and dy [256, fan_out]
    each the result of `produce` on an input."""
    x0, w, dy0 = jnp.ones((256, fan_in)), jnp.ones((fan_in, fan_out)), jnp.ones((256, fan_out))
    grad = jax.jit(lambda x0, w, dy0: jax.vjp(lambda w: matmul(produce(x0), w), w)[1](produce(dy0))[0])
    return grad.lower(x0, w, dy0).compile().as_text()


def _dots(hlo: str) -> list[str]:
    return [line for line in hlo.splitlines() if " dot(" in line]


def _fusions_holding(hlo: str, op: str) -> list[str]:
    """The fusion instructions whose fused computation holds an `op`, as HLO lines."""
    bodies = re.finditer(r"^(%[\w.\-]+) \(.*?^}", hlo, re.S | re.M)
    holding = {m.group(1) for m in bodies if f" {op}(" in m.group(0)}
    return [line for line in hlo.splitlines()
            if (m := re.search(r" fusion\(.*calls=(%[\w.\-]+)", line)) and m.group(1) in holding]


@pytest.mark.parametrize("fan_in, fan_out", [(128, 256), (384, 128)])
def test_cpu_weight_gradient_is_a_product_of_a_copied_transpose(fan_in, fan_out):
    # x and dy come out of layer norms, as in a transformer block: the transpose must copy
    # the concatenated operand, not fuse the normalisation and recompute it in transposed order
    hlo = _compiled_weight_gradient(lambda x0: jax.nn.standardize(x0, axis=-1), fan_in, fan_out)
    dots = _dots(hlo)
    assert dots and all("lhs_contracting_dims={1}" in d and "rhs_contracting_dims={0}" in d for d in dots), dots
    transposes = _fusions_holding(hlo, "transpose")
    narrow = min(fan_in, fan_out)
    copies = [t for t in transposes if f"f32[{narrow},256]" in t]
    assert len(copies) == 1, transposes
    assert re.search(r"fusion\(%concatenate[\w.]*\)", copies[0]), copies[0]


def test_cpu_leaves_close_fans_as_written():
    hlo = _compiled_weight_gradient(lambda x0: x0, 192, 128)
    assert "concatenate" not in hlo
    assert [d for d in _dots(hlo) if "lhs_contracting_dims={0}" in d], _dots(hlo)


def test_other_platforms_get_the_plain_product():
    x, w, dy = jnp.ones((8, 128)), jnp.ones((128, 256)), jnp.ones((8, 256))
    fwd_and_bwd = jax.jit(lambda x, w: jax.vjp(matmul, x, w)[1](dy))
    for platform, written_out in (("cpu", True), ("cuda", False), ("tpu", False)):
        text = fwd_and_bwd.trace(x, w).lower(lowering_platforms=(platform,)).as_text()
        assert ("optimization_barrier" in text) == written_out, platform
        assert ("concatenate" in text) == written_out, platform


@pytest.mark.parametrize("x_shape, w_shape", [((4, 8, 3), (3, 5)), ((4, 3), (4, 5)), ((4, 3), (3,))])
def test_bad_shapes_are_named(x_shape, w_shape):
    with pytest.raises(ValueError, match=r"matmul takes x \[n, fan_in\] and kernel \[fan_in, fan_out\]"):
        matmul(jnp.ones(x_shape), jnp.ones(w_shape))
