"""word2vec with negative sampling: skip-gram and CBOW, as large jit-compiled batches.

Batches are built on the device from the encoded corpus, as pure functions of
``(seed, step)``: each epoch subsamples the corpus (Mikolov) with a key folded from
``(seed, epoch)`` and visits the kept words as centres in a random order; step ``k`` of the
epoch takes centres ``k * B ... (k + 1) * B - 1`` of that order, a dynamic window
``r ~ U{1..window}`` per centre (as word2vec), contexts within ``r`` kept words of the
same sentence, and ``negatives`` noise words per positive from unigram^0.75.

Training is word2vec's plain SGD on the summed negative-sampling loss, with the learning
rate decaying linearly from ``alpha`` to ``min_alpha``; every row's update is the sum of
its gradients in the batch (sparse scatter-add, no per-word loop). Skip-gram predicts
each context word from the centre's input vector; CBOW predicts the centre from the mean
of the context words' input vectors (gensim's ``cbow_mean=1``).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# Streams of jax.random.fold_in(key(seed), ...): epoch draws and step draws never collide.
_EPOCH_STREAM, _STEP_STREAM = 0, 1


class EpochData(NamedTuple):
    """One epoch's subsampled corpus on the device.

    stream: [N] int32 kept word ids in text order (entries >= n_kept are padding);
    sentence: [N] int32 their sentence indices (-1 on padding);
    order: [N] int32, whose first n_kept entries are a random permutation of [0, n_kept);
    n_kept: int32 scalar.
    """

    stream: jax.Array
    sentence: jax.Array
    order: jax.Array
    n_kept: jax.Array


class Batch(NamedTuple):
    """centre: [B] int32; context: [B, 2W] int32 with context_mask [B, 2W] bool;
    negatives: [B, 2W, K] (skip-gram), [B, K] (CBOW, or skip-gram with shared negatives)
    int32; negative_mask: [B, 2W, K] ([B, K] for CBOW) bool (False where the noise word equals the word it is a negative for, or the pair is masked)."""

    centre: jax.Array
    context: jax.Array
    context_mask: jax.Array
    negatives: jax.Array
    negative_mask: jax.Array


def epoch_data(ids: jax.Array, sentence: jax.Array, keep_prob: jax.Array, seed: int,
               epoch: int) -> EpochData:
    """Subsample the corpus for ``epoch``: word ``w`` kept with probability ``keep_prob[w]``.

    ids, sentence: [N] int (the encoded corpus); keep_prob: [V] float32. Pure in (seed, epoch).
    """
    return _epoch_data(jnp.asarray(ids, jnp.int32), jnp.asarray(sentence, jnp.int32),
                       jnp.asarray(keep_prob, jnp.float32),
                       jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _EPOCH_STREAM), epoch))


@jax.jit
def _epoch_data(ids, sentence, keep_prob, key):
    n = ids.shape[0]
    k_keep, k_order = jax.random.split(key)
    keep = jax.random.uniform(k_keep, (n,)) < keep_prob[ids]
    n_kept = keep.sum(dtype=jnp.int32)
    (positions,) = jnp.nonzero(keep, size=n, fill_value=0)
    real = jnp.arange(n) < n_kept
    stream = jnp.where(real, ids[positions], 0)
    sent = jnp.where(real, sentence[positions], -1)
    order = jnp.argsort(jnp.where(real, jax.random.uniform(k_order, (n,)), 2.0)).astype(jnp.int32)
    return EpochData(stream, sent, order, n_kept)


def make_batch(data: EpochData, noise_cdf: jax.Array, seed: int | jax.Array, step: int | jax.Array,
               step_in_epoch: int | jax.Array, *, batch_size: int, window: int, negatives: int,
               cbow: bool, shared_negatives: bool = False) -> Batch:
    """The batch of ``step`` (``step_in_epoch`` within its epoch), a pure function of
    ``(seed, step)`` and the epoch's data. noise_cdf: [V] float32, the cumulative noise
    distribution (last entry 1). ``shared_negatives`` (skip-gram): draw ``negatives`` noise
    words per centre, shared by its context pairs ([B, K], masks still [B, 2W, K]), instead
    of per pair: about 2W/(1 + 1/K) times less memory traffic. Traceable: call it inside jit."""
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), _STEP_STREAM), step)
    k_window, k_noise = jax.random.split(key)
    n = jnp.maximum(data.n_kept, 1)
    slot = (step_in_epoch * batch_size + jnp.arange(batch_size)) % n
    pos = data.order[slot]
    centre = data.stream[pos]
    reach = jax.random.randint(k_window, (batch_size, 1), 1, window + 1)
    offsets = jnp.concatenate([jnp.arange(-window, 0), jnp.arange(1, window + 1)])
    ctx_pos = pos[:, None] + offsets[None, :]
    inside = (ctx_pos >= 0) & (ctx_pos < data.n_kept)
    ctx_pos = jnp.clip(ctx_pos, 0, data.stream.shape[0] - 1)
    context_mask = (inside & (jnp.abs(offsets)[None, :] <= reach)
                    & (data.sentence[ctx_pos] == data.sentence[pos][:, None])
                    & (data.n_kept > 0))
    context = data.stream[ctx_pos]
    shape = (batch_size, negatives) if cbow or shared_negatives else (batch_size, 2 * window, negatives)
    u = jax.random.uniform(k_noise, shape)
    noise = jnp.minimum(jnp.searchsorted(noise_cdf, u, side="right", method="scan_unrolled"), noise_cdf.shape[0] - 1)
    noise = noise.astype(jnp.int32)
    if cbow:
        negative_mask = (noise != centre[:, None]) & context_mask.any(axis=1, keepdims=True)
    else:
        per_pair = noise[:, None, :] if shared_negatives else noise
        negative_mask = (per_pair != context[..., None]) & context_mask[..., None]
    return Batch(centre, context, context_mask, noise, negative_mask)


def linear_decay(step: jax.Array, total_steps: int, alpha: float, min_alpha: float) -> jax.Array:
    """word2vec's learning rate: ``alpha`` at step 0 falling linearly to ``min_alpha`` at
    ``total_steps``."""
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    return alpha - (alpha - min_alpha) * progress


ROW_RULES = ("implicit", "sum", "mean")


def sgd_update(params: dict, batch: Batch, lr: jax.Array, *, cbow: bool,
               row_rule: str = "implicit") -> tuple[dict, jax.Array, jax.Array]:
    """One step of word2vec's SGD on ``batch``: gather the rows, compute every term's
    gradient, scatter the updates into the tables.

    The gradients are word2vec's (and gensim's): skip-gram's are those of the summed loss;
    CBOW's context words each receive the FULL error vector of ``h`` (word2vec.c and gensim
    with ``cbow_mean=1`` add ``neu1e`` to every context word, dividing by the count only
    for ``cbow_mean=0``), not the 1/count share autodiff of the mean would give.

    How the terms of one row add up (``row_rule``):

    - "sum": plain summed SGD, ``-lr * sum_i g_i``. word2vec applies the terms one by one;
      a row hit ``n`` times in a batch (frequent words: thousands of times in a large
      batch) then moves ``n`` steps computed at the old point and overshoots once
      ``lr * n * h > 2`` (``h`` its curvature): large batches diverge.
    - "implicit" (default): ``-lr * sum_i g_i / (1 + lr * H)`` with
      ``H = sum_i s'(x_i) |b_i|^2`` the trace of the Gauss-Newton curvature of the row's
      terms (``x_i = a . b_i`` a term's score, ``s'`` the sigmoid's derivative). That is
      the implicit (proximal) SGD step of the row's quadratic model, with the trace as an
      upper bound of its largest eigenvalue: where ``lr * H`` is small (rare words, small
      batches) it is word2vec's summed update to first order; for a row hit many times it
      contracts the error by ``1 / (1 + lr * H)`` instead of overshooting, so the result
      depends little on the batch size.
    - "mean": ``-lr * mean_i g_i`` per row (one step per row and batch; rows hit often
      learn more slowly as the batch grows).

    An entry's row ``>= V`` (a masked CBOW context slot) is skipped.

    params: {"input": [V, d], "output": [V, d]} float32. Returns
    ``(new_params, summed_loss, number_of_positive_pairs)``.
    """
    if row_rule not in ROW_RULES:
        raise ValueError(f"row_rule={row_rule!r}: expected one of {ROW_RULES}")
    w_in, w_out = params["input"], params["output"]
    v = w_in.shape[0]
    value, pairs, updates = (_cbow_terms if cbow else _skipgram_terms)(w_in, w_out, batch)
    new = {}
    for name, table in (("input", w_in), ("output", w_out)):
        entries = updates[name]
        if row_rule != "sum":
            # curvature (implicit) or number of word2vec updates (mean) of each entry, summed per row
            per_row = jnp.zeros((v,), table.dtype)
            for rows, _, curvature, hits in entries:
                per_row = per_row.at[rows.reshape(-1)].add(
                    (curvature if row_rule == "implicit" else hits).reshape(-1), mode="drop")
        for rows, grads, _, _ in entries:
            rows, grads = rows.reshape(-1), grads.reshape(-1, grads.shape[-1])
            if row_rule == "sum":
                step = -lr * grads
            else:
                r = per_row[rows]  # an entry past the table reads a clamped row: dropped below
                scale = 1.0 / (1.0 + lr * r) if row_rule == "implicit" else 1.0 / jnp.maximum(r, 1.0)
                step = (-lr * scale)[:, None] * grads
            table = table.at[rows].add(step, mode="drop")
        new[name] = table
    return new, value, pairs


def _sigmoid_terms(scores: jax.Array, label: float, mask: jax.Array):
    """For scores ``x`` of terms ``-log s(x)`` (label 1) or ``-log s(-x)`` (label 0), masked:
    (summed loss, dL/dx, d2L/dx2), the last two zero where ``mask`` is False."""
    s = jax.nn.sigmoid(scores)
    loss = -jnp.where(mask, jax.nn.log_sigmoid(scores if label else -scores), 0.0).sum()
    return loss, jnp.where(mask, s - label, 0.0), jnp.where(mask, s * (1.0 - s), 0.0)


def _sq(x: jax.Array) -> jax.Array:
    return (x * x).sum(-1)


def _skipgram_terms(w_in, w_out, batch: Batch):
    """Skip-gram's loss, pair count and per-table update entries
    ``(rows, gradients, curvature, number_of_updates)``."""
    cmask, nmask = batch.context_mask, batch.negative_mask
    # positives and negatives gathered (and scattered) separately: no [.., K+1, d] copies
    v, u_pos, u_neg = w_in[batch.centre], w_out[batch.context], w_out[batch.negatives]
    shared = u_neg.ndim == 3
    # broadcast-multiply-sum: XLA:CPU runs these [B, C] / [B, K] row dots faster than as
    # einsum; the per-pair [B, C, K, d] ones as dots, which do not write v out C*K times
    pos = (v[:, None, :] * u_pos).sum(-1)                                   # [B, C]
    neg = ((v[:, None, :] * u_neg).sum(-1)[:, None, :] if shared
           else jnp.einsum("bckd,bd->bck", u_neg, v))                       # [B, C, K]
    l_pos, e_pos, c_pos = _sigmoid_terms(pos, 1.0, cmask)
    l_neg, e_neg, c_neg = _sigmoid_terms(neg, 0.0, nmask)
    v_sq = _sq(v)
    if shared:  # one noise row per (centre, k), hit by the centre's C pairs
        e_n, c_n, n_n = e_neg.sum(1), c_neg.sum(1), nmask.sum(1)
        g_v = (e_pos[..., None] * u_pos).sum(1) + (e_n[..., None] * u_neg).sum(1)
        h_v = (c_pos * _sq(u_pos)).sum(1) + (c_n * _sq(u_neg)).sum(1)
        g_neg = e_n[..., None] * v[:, None, :]
    else:
        e_n, c_n, n_n = e_neg, c_neg, nmask
        g_v = (e_pos[..., None] * u_pos).sum(1) + jnp.einsum("bck,bckd->bd", e_neg, u_neg)
        h_v = (c_pos * _sq(u_pos)).sum(1) + (c_neg * _sq(u_neg)).sum((1, 2))
        g_neg = e_n[..., None] * v[:, None, None, :]
    updates_in = (batch.centre, g_v, h_v, (cmask.sum(1) + nmask.sum((1, 2))).astype(v.dtype))
    out_pos = (batch.context, e_pos[..., None] * v[:, None, :], c_pos * v_sq[:, None], cmask.astype(v.dtype))
    out_neg = (batch.negatives, g_neg, c_n * (v_sq[:, None] if shared else v_sq[:, None, None]),
               n_n.astype(v.dtype))
    return l_pos + l_neg, cmask.sum(), {"input": [updates_in], "output": [out_pos, out_neg]}


def _cbow_terms(w_in, w_out, batch: Batch):
    """CBOW's loss, pair count and per-table update entries (as ``_skipgram_terms``):
    ``h`` the mean of the valid context input vectors; every valid context word receives
    the full gradient of ``h`` (word2vec's rule, see ``sgd_update``)."""
    cmask, nmask = batch.context_mask, batch.negative_mask
    # masked context slots point past the table: gathered as zeros, their updates dropped
    # (no [B, 2W, d] mask multiplies, and no scatter work for them)
    ctx_rows = jnp.where(cmask, batch.context, w_in.shape[0])
    x_ctx = w_in.at[ctx_rows].get(mode="fill", fill_value=0)
    u_c, u_neg = w_out[batch.centre], w_out[batch.negatives]
    count = cmask.sum(1)
    has = count > 0
    h = x_ctx.sum(1) / jnp.maximum(count, 1)[:, None].astype(x_ctx.dtype)
    pos = (h * u_c).sum(-1)                                                 # [B]
    neg = (h[:, None, :] * u_neg).sum(-1)                                   # [B, K]
    l_pos, e_pos, c_pos = _sigmoid_terms(pos, 1.0, has)
    l_neg, e_neg, c_neg = _sigmoid_terms(neg, 0.0, nmask)
    # word2vec's neu1e / -alpha. As a dot, XLA:CPU computes it once; as multiply-and-sum it
    # fused the sum into the [B, 2W, d] update below and redid it for every context slot
    g_h = e_pos[:, None] * u_c + jnp.einsum("bk,bkd->bd", e_neg, u_neg)
    h_h = c_pos * _sq(u_c) + (c_neg * _sq(u_neg)).sum(1)
    shape = cmask.shape
    updates_in = (ctx_rows, jnp.broadcast_to(g_h[:, None, :], (*shape, g_h.shape[-1])),
                  jnp.broadcast_to(h_h[:, None], shape), jnp.ones(shape, h.dtype))
    h_sq = _sq(h)
    out_pos = (batch.centre, e_pos[:, None] * h, c_pos * h_sq, has.astype(h.dtype))
    out_neg = (batch.negatives, e_neg[..., None] * h[:, None, :], c_neg * h_sq[:, None], nmask.astype(h.dtype))
    return l_pos + l_neg, has.sum(), {"input": [updates_in], "output": [out_pos, out_neg]}


def init_tables(key: jax.Array, vocab_size: int, dimension: int) -> dict:
    """word2vec's initialisation: input vectors U(-0.5/d, 0.5/d), output vectors zero.
    Returns {"input": [V, d], "output": [V, d]} float32."""
    w_in = (jax.random.uniform(key, (vocab_size, dimension), jnp.float32) - 0.5) / dimension
    return {"input": w_in, "output": jnp.zeros((vocab_size, dimension), jnp.float32)}


def noise_cdf(noise: np.ndarray) -> jax.Array:
    """The cumulative distribution of ``noise`` ([V] probabilities) as float32, last entry 1."""
    cdf = np.cumsum(np.asarray(noise, dtype=np.float64))
    cdf /= cdf[-1]
    return jnp.asarray(cdf, jnp.float32)
