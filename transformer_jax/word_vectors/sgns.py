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


def skipgram_loss(centre_in: jax.Array, context_out: jax.Array, negative_out: jax.Array,
                  context_mask: jax.Array, negative_mask: jax.Array) -> jax.Array:
    """Summed skip-gram negative-sampling loss
    ``sum_pairs -log s(v_c . u_o) - sum_k log s(-v_c . u_k)`` (s = sigmoid).

    centre_in: [B, d]; context_out: [B, C, d]; negative_out: [B, C, K, d] (K noise words
    per pair, as word2vec) or [B, K, d] (one set of K shared by the centre's C pairs);
    context_mask: [B, C] bool; negative_mask: [B, C, K] bool. Returns a float32 scalar.
    """
    # broadcast-multiply-sum: XLA:CPU runs these batched row dots far faster than as einsum
    pos = (centre_in[:, None, :] * context_out).sum(-1)
    if negative_out.ndim == 3:  # shared: [B, K] scores, the same for every pair of a centre
        neg = (centre_in[:, None, :] * negative_out).sum(-1)[:, None, :]
    else:
        neg = (centre_in[:, None, None, :] * negative_out).sum(-1)
    return -(jnp.where(context_mask, jax.nn.log_sigmoid(pos), 0.0).sum()
             + jnp.where(negative_mask, jax.nn.log_sigmoid(-neg), 0.0).sum())


def cbow_loss(context_in: jax.Array, context_mask: jax.Array, centre_out: jax.Array,
              negative_out: jax.Array, negative_mask: jax.Array) -> jax.Array:
    """Summed CBOW negative-sampling loss: ``h`` = mean of the valid context input vectors,
    ``-log s(h . u_c) - sum_k log s(-h . u_k)``; rows without context count nothing.

    context_in: [B, C, d]; context_mask: [B, C] bool; centre_out: [B, d];
    negative_out: [B, K, d]; negative_mask: [B, K] bool. Returns a float32 scalar.
    """
    count = context_mask.sum(axis=1)
    h = (context_mask[..., None].astype(context_in.dtype) * context_in).sum(1)
    h = h / jnp.maximum(count, 1)[:, None].astype(h.dtype)
    pos = (h * centre_out).sum(-1)
    neg = (h[:, None, :] * negative_out).sum(-1)
    return -(jnp.where(count > 0, jax.nn.log_sigmoid(pos), 0.0).sum()
             + jnp.where(negative_mask, jax.nn.log_sigmoid(-neg), 0.0).sum())


def linear_decay(step: jax.Array, total_steps: int, alpha: float, min_alpha: float) -> jax.Array:
    """word2vec's learning rate: ``alpha`` at step 0 falling linearly to ``min_alpha`` at
    ``total_steps``."""
    progress = jnp.minimum(step / max(total_steps, 1), 1.0)
    return alpha - (alpha - min_alpha) * progress


def sgd_update(params: dict, batch: Batch, lr: jax.Array, *, cbow: bool) -> tuple[dict, jax.Array, jax.Array]:
    """One SGD step on the summed loss of ``batch``: gather the rows, differentiate,
    scatter-add ``-lr * grad`` into the tables.

    params: {"input": [V, d], "output": [V, d]} float32. Returns
    ``(new_params, summed_loss, number_of_positive_pairs)``.
    """
    w_in, w_out = params["input"], params["output"]
    # positives and negatives gathered (and scattered) separately: no [.., K+1, d] copies
    if cbow:
        rows_in, rows_pos = batch.context, batch.centre

        def loss(x_in, x_pos, x_neg):
            return cbow_loss(x_in, batch.context_mask, x_pos, x_neg, batch.negative_mask)
        pairs = batch.context_mask.any(axis=1).sum()
    else:
        rows_in, rows_pos = batch.centre, batch.context

        def loss(x_in, x_pos, x_neg):
            return skipgram_loss(x_in, x_pos, x_neg, batch.context_mask, batch.negative_mask)
        pairs = batch.context_mask.sum()
    rows_neg = batch.negatives
    value, (g_in, g_pos, g_neg) = jax.value_and_grad(loss, argnums=(0, 1, 2))(
        w_in[rows_in], w_out[rows_pos], w_out[rows_neg])
    d = w_in.shape[1]
    w_out = w_out.at[rows_pos.reshape(-1)].add(-lr * g_pos.reshape(-1, d))
    w_out = w_out.at[rows_neg.reshape(-1)].add(-lr * g_neg.reshape(-1, d))
    new = {"input": w_in.at[rows_in.reshape(-1)].add(-lr * g_in.reshape(-1, d)), "output": w_out}
    return new, value, pairs


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
