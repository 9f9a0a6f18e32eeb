"""GloVe: co-occurrence counts against a brute-force count, the loss against its formula,
and the AdaGrad step against a float64 NumPy reference."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax.word_vectors import glove


def _brute_force(ids, sentence, v, window):
    x = np.zeros((v, v))
    for i in range(len(ids)):
        for j in range(i + 1, min(i + window + 1, len(ids))):
            if sentence[i] == sentence[j]:
                x[ids[i], ids[j]] += 1.0 / (j - i)
                x[ids[j], ids[i]] += 1.0 / (j - i)
    return x


def test_cooccurrence_matches_brute_force_and_splits_by_rows():
    rng = np.random.default_rng(0)
    v, window = 9, 3
    ids = rng.integers(0, v, 150)
    sentence = np.sort(rng.integers(0, 10, 150))
    expected = _brute_force(ids, sentence, v, window)
    c = glove.cooccurrence(ids, sentence, v, window=window)
    dense = np.zeros((v, v))
    dense[c.rows, c.cols] = c.counts
    np.testing.assert_allclose(dense, expected, rtol=1e-12)
    assert (c.counts > 0).all() and len(c.counts) == (expected > 0).sum()
    keys = c.rows.astype(np.int64) * v + c.cols
    assert (np.diff(keys) > 0).all()  # sorted by (row, col), no duplicates
    parts = [glove.cooccurrence(ids, sentence, v, window=window, rows=r) for r in ((0, 4), (4, 9))]
    assert np.concatenate([p.rows for p in parts]).tolist() == c.rows.tolist()
    np.testing.assert_allclose(np.concatenate([p.counts for p in parts]), c.counts)
    with pytest.raises(ValueError, match="window must be a positive int"):
        glove.cooccurrence(ids, sentence, v, window=0)


def _random_problem(seed, v=8, d=4, n=20):
    rng = np.random.default_rng(seed)
    params = {"w": rng.normal(size=(v, d)), "u": rng.normal(size=(v, d)),
              "b": rng.normal(size=v), "c": rng.normal(size=v)}
    rows, cols = rng.integers(0, v, n), rng.integers(0, v, n)
    counts = rng.uniform(0.2, 300.0, n)
    return params, rows, cols, counts


def test_glove_loss_matches_its_formula():
    params, rows, cols, counts = _random_problem(1)
    x_max = 100.0
    f = np.minimum(1.0, (counts / x_max) ** 0.75)
    diff = ((params["w"][rows] * params["u"][cols]).sum(1) + params["b"][rows] + params["c"][cols]
            - np.log(counts))
    expected = (f * diff ** 2).sum()
    got = glove.glove_loss(jax.tree.map(jnp.float32, params), jnp.asarray(rows), jnp.asarray(cols),
                           jnp.float32(counts), x_max=x_max)
    assert float(got) == pytest.approx(expected, rel=1e-5)


def test_adagrad_step_matches_numpy():
    params, rows, cols, counts = _random_problem(2)
    rng = np.random.default_rng(3)
    gradsq = {k: rng.uniform(1.0, 2.0, size=p.shape) for k, p in params.items()}
    mask = rng.random(len(rows)) < 0.8
    lr, x_max = 0.05, 10.0
    f = np.where(mask, np.minimum(1.0, (counts / x_max) ** 0.75), 0.0)
    diff = ((params["w"][rows] * params["u"][cols]).sum(1) + params["b"][rows] + params["c"][cols]
            - np.log(counts))
    grads = {k: np.zeros_like(p) for k, p in params.items()}
    for n in range(len(rows)):
        i, j, g = rows[n], cols[n], f[n] * diff[n]
        grads["w"][i] += g * params["u"][j]
        grads["u"][j] += g * params["w"][i]
        grads["b"][i] += g
        grads["c"][j] += g
    # AdaGrad divides by the accumulators from before the step; a row touched twice sums both.
    expected_params = {k: params[k] - lr * grads[k] / np.sqrt(gradsq[k]) for k in params}
    sq = {k: np.zeros_like(p) for k, p in params.items()}
    for n in range(len(rows)):
        i, j, g = rows[n], cols[n], f[n] * diff[n]
        sq["w"][i] += (g * params["u"][j]) ** 2
        sq["u"][j] += (g * params["w"][i]) ** 2
        sq["b"][i] += g ** 2
        sq["c"][j] += g ** 2
    f32 = lambda t: jax.tree.map(jnp.float32, t)  # noqa: E731
    new, new_sq, loss = jax.jit(glove.adagrad_update, static_argnames=("x_max",))(
        f32(params), f32(gradsq), jnp.asarray(rows), jnp.asarray(cols), jnp.float32(counts),
        jnp.asarray(mask), lr, x_max=x_max)
    assert float(loss) == pytest.approx((f * diff ** 2).sum(), rel=1e-5)
    for k in params:
        np.testing.assert_allclose(np.asarray(new[k]), expected_params[k], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(np.asarray(new_sq[k]), gradsq[k] + sq[k], rtol=1e-5)
