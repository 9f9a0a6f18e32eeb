"""Layers against float64 NumPy references: positions, cache writes, MLP, norms, attention."""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.config import REMAT_POLICIES, get_config
from transformer_jax.layers import (
    FeedForward,
    MultiHeadAttention,
    apply_rotary,
    make_norm,
    padding_positions,
    segment_positions,
    sinusoidal_encoding,
    write_cache,
)
from transformer_jax.layers.blocks import REMAT_POLICY_FNS

LOGICAL_NAMES = {"embed", "vocab", "heads", "kv_heads", "head_dim", "mlp", "layers", None}


def init_params(module, seed, *args, scale=0.3, **kwargs):
    """Random params with the module's shapes, drawn from normal(scale) in NumPy: large
    enough that the comparisons below test something (the 0.02 init is nearly linear),
    and no per-leaf jax.random compilations."""
    shapes = nn.unbox(jax.eval_shape(module.init, jax.random.key(0), *args, **kwargs)["params"])
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (scale * rng.standard_normal(s.shape)).astype(np.float32), shapes)


def normal(seed, shape, loc=0.0):
    return (loc + np.random.default_rng(seed).standard_normal(shape)).astype(np.float32)


def np64(tree):
    return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def test_sinusoidal_matches_formula():
    rng = np.random.default_rng(0)
    positions = rng.integers(0, 100, size=(3, 7))
    features = 10
    expected = np.zeros((3, 7, features))
    for idx in np.ndindex(3, 7):
        p = positions[idx]
        for i in range(features // 2):
            expected[idx + (2 * i,)] = math.sin(p / 10000 ** (2 * i / features))
            expected[idx + (2 * i + 1,)] = math.cos(p / 10000 ** (2 * i / features))
    got = jax.jit(sinusoidal_encoding, static_argnums=1)(positions, features)
    assert got.dtype == jnp.float32 and got.shape == (3, 7, features)
    # float32 angles up to 100 rad: absolute error ~ 100 * 2**-24.
    np.testing.assert_allclose(got, expected, atol=1e-5)


def rotary_reference(x, positions, base=10000.0):
    """RoPE as a complex rotation of feature pairs (i, i + half)."""
    half = x.shape[-1] // 2
    theta = base ** (-np.arange(half) / half)
    z = x[..., :half] + 1j * x[..., half:]
    z = z * np.exp(1j * positions[:, :, None, None] * theta)
    return np.concatenate([z.real, z.imag], axis=-1)


def test_rotary_matches_complex_rotation_and_is_relative():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(2, 5, 3, 8))
    positions = rng.integers(0, 50, size=(2, 5))
    rotate = jax.jit(apply_rotary)
    got = rotate(x.astype(np.float32), positions)
    np.testing.assert_allclose(got, rotary_reference(x, positions), atol=2e-5)
    # <rot(q, m), rot(k, n)> depends only on m - n.
    q, k = rng.normal(size=(2, 1, 1, 1, 8))
    def score(m, n):
        rq = rotate(q.astype(np.float32), np.array([[m]]))
        rk = rotate(k.astype(np.float32), np.array([[n]]))
        return float(np.sum(np.asarray(rq) * np.asarray(rk)))
    assert score(7, 3) == pytest.approx(score(24, 20), abs=1e-5)
    assert score(7, 3) != pytest.approx(score(7, 4), abs=1e-3)


def test_segment_and_padding_positions_brute_force():
    rng = np.random.default_rng(2)
    segments = np.sort(rng.integers(0, 4, size=(3, 11)), axis=1)
    expected = np.zeros_like(segments)
    for b in range(3):
        for t in range(1, 11):
            expected[b, t] = expected[b, t - 1] + 1 if segments[b, t] == segments[b, t - 1] else 0
    np.testing.assert_array_equal(jax.jit(segment_positions)(segments), expected)

    mask = rng.random((3, 11)) < 0.6
    got = np.asarray(jax.jit(padding_positions)(mask))
    for b in range(3):
        np.testing.assert_array_equal(got[b][mask[b]], np.arange(mask[b].sum()))


def test_write_cache_scatters_valid_and_drops_the_rest():
    rng = np.random.default_rng(3)
    cache = rng.normal(size=(3, 6, 2)).astype(np.float32)
    new = rng.normal(size=(3, 4, 2)).astype(np.float32)
    starts = np.array([0, 3, 4])
    positions = starts[:, None] + np.arange(4)
    valid = np.arange(4)[None] < np.array([4, 2, 4])[:, None]
    expected = cache.copy()
    for b in range(3):
        for j in range(4):
            if valid[b, j] and positions[b, j] < 6:
                expected[b, positions[b, j]] = new[b, j]
    got = jax.jit(write_cache)(cache, new, positions, valid)
    # Row 2 overflows (positions 6, 7): dropped, not clamped onto slots 4, 5.
    np.testing.assert_array_equal(got, expected)


def gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


@pytest.mark.parametrize("activation", ["relu", "gelu", "swiglu"])
def test_feedforward_matches_numpy(activation):
    cfg = get_config("tiny", activation=activation)
    x = normal(4, (2, 3, cfg.d_model))
    module = FeedForward(cfg)
    params = init_params(module, 5, x)
    p, xn = np64(params), np.asarray(x, np.float64)
    hidden = xn @ p["wi"]["kernel"] + p["wi"]["bias"]
    if activation == "swiglu":
        gate = xn @ p["wg"]["kernel"] + p["wg"]["bias"]
        hidden = gate / (1 + np.exp(-gate)) * hidden
    else:
        hidden = np.maximum(hidden, 0) if activation == "relu" else gelu_tanh(hidden)
    expected = hidden @ p["wo"]["kernel"] + p["wo"]["bias"]
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_norms_match_numpy(norm):
    cfg = get_config("tiny", norm=norm, layer_norm_eps=1e-5)
    x = normal(6, (2, 3, cfg.d_model), loc=3.0)
    module = make_norm(cfg)
    params = np64(init_params(module, 7, x))
    xn = np.asarray(x, np.float64)
    if norm == "layernorm":
        centred = xn - xn.mean(-1, keepdims=True)
        expected = centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * params["scale"] + params["bias"]
    else:
        expected = xn / np.sqrt((xn**2).mean(-1, keepdims=True) + 1e-5) * params["scale"]
    np.testing.assert_allclose(jax.jit(module.apply)({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


def test_layer_norm_derivatives_match_float64_finite_differences():
    """LayerNorm's closed-form derivative (a custom_jvp): the full Jacobian in forward mode
    (jacfwd) and reverse mode (jacrev), with respect to the input, scale and bias, against
    central differences of a float64 NumPy layer norm."""
    cfg = get_config("tiny", norm="layernorm", layer_norm_eps=1e-5)
    x = normal(6, (2, 3, cfg.d_model), loc=3.0)
    module = make_norm(cfg)
    params = init_params(module, 7, x)

    def numpy_norm(x, scale, bias):
        centred = x - x.mean(-1, keepdims=True)
        return centred / np.sqrt((centred**2).mean(-1, keepdims=True) + 1e-5) * scale + bias

    flat = np.concatenate([np.ravel(x), params["scale"], params["bias"]]).astype(np.float64)
    sizes = np.cumsum([x.size, cfg.d_model])

    def f64(v):
        xs, scale, bias = np.split(v, sizes)
        return np.ravel(numpy_norm(xs.reshape(x.shape), scale, bias))

    h = 1e-6
    expected = np.stack([(f64(flat + h * e) - f64(flat - h * e)) / (2 * h) for e in np.eye(flat.size)], axis=1)

    def f32(v):
        xs, scale, bias = jnp.split(v, sizes)
        return jnp.ravel(module.apply({"params": {"scale": scale, "bias": bias}}, xs.reshape(x.shape)))

    v = jnp.asarray(flat, jnp.float32)
    for jacobian in (jax.jacfwd, jax.jacrev):
        np.testing.assert_allclose(jax.jit(jacobian(f32))(v), expected, rtol=1e-4, atol=2e-5, err_msg=str(jacobian))


@pytest.mark.parametrize("name", ["gelu", "gelu_exact"])
def test_gelu_derivatives_match_float64(name):
    """The GELUs' written-out derivatives (custom_jvp): first derivative in forward mode (jvp)
    and reverse mode (grad), and the second derivative (forward over reverse), against the
    float64 closed forms checked by central differences; the forward equals jax.nn.gelu's
    exactly."""
    from scipy.special import erf

    from transformer_jax.layers.feedforward import activation_fn

    x64 = np.concatenate([np.linspace(-9.0, 9.0, 721), normal(3, (500,), loc=0.0) * 2.5]).astype(np.float64)
    c = np.sqrt(2 / np.pi)
    if name == "gelu":
        f64 = lambda x: 0.5 * x * (1 + np.tanh(c * (x + 0.044715 * x**3)))
    else:
        f64 = lambda x: 0.5 * x * (1 + erf(x / np.sqrt(2)))
    h = 1e-5
    d1 = (f64(x64 + h) - f64(x64 - h)) / (2 * h)
    d2 = (f64(x64 + h) - 2 * f64(x64) + f64(x64 - h)) / h**2
    act = activation_fn(name)
    x = jnp.asarray(x64, jnp.float32)
    np.testing.assert_array_equal(act(x), jax.nn.gelu(x, approximate=name == "gelu"))
    np.testing.assert_allclose(act(x), f64(x64), rtol=1e-6, atol=1e-6)
    slope_fwd = jax.jvp(act, (x,), (jnp.ones_like(x),))[1]
    slope_rev = jax.grad(lambda v: jnp.sum(act(v)))(x)
    curvature = jax.jvp(jax.grad(lambda v: jnp.sum(act(v))), (x,), (jnp.ones_like(x),))[1]
    for got, want, tol in ((slope_fwd, d1, 2e-6), (slope_rev, d1, 2e-6), (curvature, d2, 2e-4)):
        np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


def attention_reference(p, xq, xkv, cfg, mask, rotary_positions=None):
    """Multi-head attention in float64: projections, GQA by repeating kv heads, softmax."""
    q = np.einsum("btd,dhk->bthk", xq, p["query"]["kernel"]) + p["query"]["bias"]
    k = np.einsum("bsd,dhk->bshk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
    v = np.einsum("bsd,dhk->bshk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
    if rotary_positions is not None:
        q, k = rotary_reference(q, rotary_positions), rotary_reference(k, rotary_positions)
    group = cfg.num_heads // cfg.kv_heads
    k, v = np.repeat(k, group, axis=2), np.repeat(v, group, axis=2)
    logits = np.einsum("bthk,bshk->bhts", q, k) / np.sqrt(cfg.head_dim)
    logits = np.where(mask, logits, -np.inf)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    out = np.einsum("bhts,bshk->bthk", probs, v)
    return np.einsum("bthk,hkd->btd", out, p["out"]["kernel"]) + p["out"]["bias"]


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_causal_gqa_self_attention_matches_numpy(pos_encoding):
    cfg = get_config("tiny", num_kv_heads=2, pos_encoding=pos_encoding)
    b, t = 2, 6
    x = normal(8, (b, t, cfg.d_model))
    positions = np.broadcast_to(np.arange(t), (b, t))
    module = MultiHeadAttention(cfg, causal=True)
    params = init_params(module, 9, x, positions=positions)
    got = jax.jit(module.apply)({"params": params}, x, positions=positions)
    causal = np.tril(np.ones((t, t), bool))[None, None]
    rotary = np.asarray(positions) if pos_encoding == "rotary" else None
    xn = np.asarray(x, np.float64)
    expected = attention_reference(np64(params), xn, xn, cfg, causal, rotary)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("pos_encoding", ["learned", "rotary"])
def test_fused_qkv_self_attention_matches_numpy(pos_encoding):
    """One [d, 3, heads, head_dim] kernel: slice s of it (and of its bias) is the query,
    key or value projection of the float64 reference, gradients included."""
    cfg = get_config("tiny", fused_qkv=True, pos_encoding=pos_encoding)
    b, t = 2, 6
    x = normal(14, (b, t, cfg.d_model))
    positions = np.broadcast_to(np.arange(t), (b, t))
    module = MultiHeadAttention(cfg, causal=True)
    params = init_params(module, 15, x, positions=positions)
    assert set(params) == {"qkv", "out"}
    assert params["qkv"]["kernel"].shape == (cfg.d_model, 3, cfg.num_heads, cfg.head_dim)
    assert params["qkv"]["bias"].shape == (3, cfg.num_heads, cfg.head_dim)

    def split(p):
        qkv = p["qkv"]
        names = ("query", "key", "value")
        return {**{n: {"kernel": qkv["kernel"][:, i], "bias": qkv["bias"][i]} for i, n in enumerate(names)},
                "out": p["out"]}

    causal = np.tril(np.ones((t, t), bool))[None, None]
    rotary = np.asarray(positions) if pos_encoding == "rotary" else None
    xn = np.asarray(x, np.float64)
    got = jax.jit(module.apply)({"params": params}, x, positions=positions)
    expected = attention_reference(split(np64(params)), xn, xn, cfg, causal, rotary)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)

    # The gradient of a scalar of the output, against float64 central differences along
    # a random direction of the fused kernel.
    direction = np.asarray(normal(17, params["qkv"]["kernel"].shape), np.float64)
    weights = np.asarray(normal(18, got.shape), np.float64)

    def f64(eps):
        p = np64(params)
        p["qkv"]["kernel"] = p["qkv"]["kernel"] + eps * direction
        return np.sum(attention_reference(split(p), xn, xn, cfg, causal, rotary) * weights)

    grad = jax.grad(lambda p: jnp.sum(module.apply({"params": p}, x, positions=positions) * weights))(params)
    h = 1e-5
    np.testing.assert_allclose(np.sum(np.asarray(grad["qkv"]["kernel"], np.float64) * direction),
                               (f64(h) - f64(-h)) / (2 * h), rtol=1e-4)


def test_fused_qkv_needs_one_key_value_head_per_query_head():
    with pytest.raises(ValueError, match=r"fused_qkv=True needs .* num_kv_heads=2 with num_heads=4"):
        get_config("tiny", fused_qkv=True, num_kv_heads=2)
    with pytest.raises(TypeError, match="fused_qkv=1 must be a bool"):
        get_config("tiny", fused_qkv=1)


def test_cross_attention_with_padding_mask_matches_numpy():
    cfg = get_config("tiny")
    b, t, s = 2, 3, 5
    xq = normal(10, (b, t, cfg.d_model))
    xkv = normal(11, (b, s, cfg.d_model))
    pad = np.array([[True] * 5, [True, True, False, True, False]])
    module = MultiHeadAttention(cfg)
    params = init_params(module, 12, xq, xkv)
    got = jax.jit(module.apply)({"params": params}, xq, xkv, mask=pad[:, None, None, :])
    expected = attention_reference(
        np64(params), np.asarray(xq, np.float64), np.asarray(xkv, np.float64), cfg,
        np.asarray(pad)[:, None, None, :],
    )
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_parameters_carry_logical_axis_names():
    cfg = get_config("tiny", activation="swiglu", num_kv_heads=2)
    x = jax.ShapeDtypeStruct((1, 2, cfg.d_model), jnp.float32)
    fused = MultiHeadAttention(get_config("tiny", fused_qkv=True))
    for module, args in [(MultiHeadAttention(cfg), (x,)), (fused, (x,)), (FeedForward(cfg), (x,)),
                         (make_norm(cfg), (x,))]:
        boxed = jax.eval_shape(module.init, jax.random.key(0), *args)["params"]
        leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
        assert leaves
        for leaf in leaves:
            assert isinstance(leaf, nn.LogicallyPartitioned)
            assert len(leaf.names) == len(leaf.value.shape) and set(leaf.names) <= LOGICAL_NAMES


def test_every_configurable_remat_policy_has_a_jax_policy():
    assert set(REMAT_POLICY_FNS) == set(REMAT_POLICIES) - {"none"}
    for name, policy in REMAT_POLICY_FNS.items():
        assert policy is None or callable(policy), name


def test_attention_initialises_under_a_mesh_with_logical_rules():
    """Every kernel keeps its true shape at init, so logical constraints apply to it."""
    cfg = get_config("tiny", num_kv_heads=2)
    auto = (jax.sharding.AxisType.Auto,) * 3
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=auto)
    rules = [("embed", "fsdp"), ("heads", "tensor"), ("kv_heads", "tensor"), ("head_dim", None)]
    x = normal(13, (2, 4, cfg.d_model))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        params = jax.jit(MultiHeadAttention(cfg).init)(jax.random.key(0), x)["params"]
    # (Flax's DenseGeneral raises here: its init constrains a flattened 2-D kernel.)
    query = params["query"]["kernel"]
    assert query.value.shape == (cfg.d_model, cfg.num_heads, cfg.head_dim)
    assert nn.get_partition_spec(params)["out"]["kernel"] == jax.sharding.PartitionSpec("heads", "head_dim", "embed")
