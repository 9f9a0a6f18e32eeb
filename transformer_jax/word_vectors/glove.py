"""GloVe: the co-occurrence matrix built once (sparse, NumPy) and AdaGrad on the weighted
least-squares loss ``J = sum_ij f(X_ij) (w_i . u_j + b_i + c_j - log X_ij)^2`` with
``f(x) = min(1, (x / x_max)^0.75)``, as Pennington et al. (2014) and glove.c; the final
vectors are ``w + u``.

    cooc = cooccurrence(corpus.ids, corpus.sentence, len(vocab), window=10)
    # Cooccurrence(rows, cols, counts): [nnz] int32, int32, float64, sorted by (row, col)
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

_EPOCH_STREAM = 2


class Cooccurrence(NamedTuple):
    """A sparse co-occurrence matrix: entries ``X[rows[n], cols[n]] = counts[n] > 0``,
    sorted by (row, col); rows, cols [nnz] int32, counts [nnz] float64."""

    rows: np.ndarray
    cols: np.ndarray
    counts: np.ndarray


def cooccurrence(ids: np.ndarray, sentence: np.ndarray, vocab_size: int, *, window: int,
                 rows: tuple[int, int] | None = None) -> Cooccurrence:
    """Distance-weighted, symmetric co-occurrence counts, as glove.c: every pair of words
    ``d <= window`` apart in the same sentence adds ``1/d`` to ``X[a, b]`` and to ``X[b, a]``.

    ids, sentence: [N] the encoded corpus. ``rows = (start, stop)`` keeps only the rows in
    that range, so each process of a mesh can build its own block of rows.
    """
    if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
        raise ValueError(f"window must be a positive int, got {window!r}")
    ids = np.asarray(ids, dtype=np.int64)
    sentence = np.asarray(sentence)
    start, stop = (0, vocab_size) if rows is None else rows
    if not 0 <= start < stop <= vocab_size:
        raise ValueError(f"rows must be a range (start, stop) within [0, {vocab_size}], got {rows!r}")
    keys, weights = [], []
    for d in range(1, window + 1):
        if d >= len(ids):
            break
        a, b = ids[:-d], ids[d:]
        same = sentence[:-d] == sentence[d:]
        a, b = a[same], b[same]
        for r, c in ((a, b), (b, a)):
            inside = (r >= start) & (r < stop)
            k, w = _reduce(r[inside] * vocab_size + c[inside], np.full(inside.sum(), 1.0 / d))
            keys.append(k)
            weights.append(w)
    if not keys:
        return Cooccurrence(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0))
    k, w = _reduce(np.concatenate(keys), np.concatenate(weights))
    return Cooccurrence((k // vocab_size).astype(np.int32), (k % vocab_size).astype(np.int32), w)


def _reduce(keys: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sum ``weights`` per distinct key: (sorted distinct keys, their sums)."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse, weights=weights, minlength=len(unique))


def weighting(x: jax.Array, x_max: float, power: float = 0.75) -> jax.Array:
    """GloVe's ``f(x) = min(1, (x / x_max)^power)``."""
    return jnp.minimum(1.0, (x / x_max) ** power)


def glove_loss(params: dict, rows: jax.Array, cols: jax.Array, counts: jax.Array, *,
               x_max: float, power: float = 0.75) -> jax.Array:
    """``sum_n f(X_n) (w_{rows[n]} . u_{cols[n]} + b_{rows[n]} + c_{cols[n]} - log X_n)^2``.

    params: {"w": [V, d], "u": [V, d], "b": [V], "c": [V]}; rows, cols: [n] int; counts: [n] > 0.
    """
    diff = (jnp.einsum("nd,nd->n", params["w"][rows], params["u"][cols])
            + params["b"][rows] + params["c"][cols] - jnp.log(counts))
    return (weighting(counts, x_max, power) * diff ** 2).sum()


def init_glove(key: jax.Array, vocab_size: int, dimension: int) -> tuple[dict, dict]:
    """glove.c's start: every parameter U(-0.5/d, 0.5/d), AdaGrad accumulators 1.
    Returns (params, gradsq) with params {"w", "u": [V, d]; "b", "c": [V]} float32."""
    keys = jax.random.split(key, 4)
    shapes = {"w": (vocab_size, dimension), "u": (vocab_size, dimension),
              "b": (vocab_size,), "c": (vocab_size,)}
    params = {name: (jax.random.uniform(k, shape, jnp.float32) - 0.5) / dimension
              for k, (name, shape) in zip(keys, shapes.items())}
    return params, jax.tree.map(jnp.ones_like, params)


def adagrad_update(params: dict, gradsq: dict, rows: jax.Array, cols: jax.Array,
                   counts: jax.Array, weight_mask: jax.Array, lr: float, *, x_max: float,
                   power: float = 0.75) -> tuple[dict, dict, jax.Array]:
    """One AdaGrad step on the batch's half loss ``J / 2`` (glove.c's gradient), rows of
    ``weight_mask`` False contributing nothing: each touched row moves by
    ``-lr * g / sqrt(G)`` with ``G`` its accumulated squared gradient before the step,
    then ``G += g^2`` (gradients of repeated rows summed).

    rows, cols: [n] int32; counts: [n] float32 > 0; weight_mask: [n] bool.
    Returns (params, gradsq, summed loss J of the batch).
    """
    gathered = {"w": params["w"][rows], "u": params["u"][cols],
                "b": params["b"][rows], "c": params["c"][cols]}
    f = jnp.where(weight_mask, weighting(counts, x_max, power), 0.0)

    def half_loss(g):
        diff = jnp.einsum("nd,nd->n", g["w"], g["u"]) + g["b"] + g["c"] - jnp.log(counts)
        return 0.5 * (f * diff ** 2).sum()

    value, grads = jax.value_and_grad(half_loss)(gathered)
    index = {"w": rows, "u": cols, "b": rows, "c": cols}
    new_params, new_gradsq = {}, {}
    for name, g in grads.items():
        i = index[name]
        new_params[name] = params[name].at[i].add(-lr * g / jnp.sqrt(gradsq[name][i]))
        new_gradsq[name] = gradsq[name].at[i].add(g * g)
    return new_params, new_gradsq, 2.0 * value


def epoch_order(nnz: int, seed: int, epoch: int) -> jax.Array:
    """A random permutation of the ``nnz`` entries for ``epoch``: [nnz] int32, pure in (seed, epoch)."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EPOCH_STREAM), epoch)
    return jax.random.permutation(key, nnz).astype(jnp.int32)
