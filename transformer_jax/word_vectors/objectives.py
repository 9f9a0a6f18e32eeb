"""The three word-vector objectives, each defined once: data preparation, initial state,
per-epoch inputs, the jit-compiled step (its batch a pure function of ``(seed, step)``) and
the final vectors. ``OBJECTIVES`` maps "cbow", "skipgram" and "glove" to them; the run
loop (``run.train_word_vectors``) drives any of them the same way:

    obj = OBJECTIVES[config.objective]
    prepared = obj.prepare(config, vocab, corpus, mesh)
    state = obj.init_state(config, prepared, mesh)
    step = obj.make_step(config, prepared, mesh)
    for s in range(start, prepared.total_steps):
        inputs = obj.epoch_inputs(config, prepared, s // prepared.steps_per_epoch)  # when it changes
        state, metrics = step(state, inputs)
    vectors = obj.vectors(state.params)[:len(vocab)]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from transformer_jax.training import TrainState
from transformer_jax.word_vectors import glove, sgns
from transformer_jax.word_vectors import sharding as wv_sharding
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.corpus import EncodedCorpus
from transformer_jax.word_vectors.vocabulary import Vocabulary

StepFn = Callable[[TrainState, Any], tuple[TrainState, dict]]


@dataclass
class Prepared:
    """What a run computes once from the corpus.

    vocab: the vocabulary; rows: table rows (len(vocab) padded for the mesh);
    steps_per_epoch, total_steps; words_per_step: corpus words (in-vocabulary, before
    subsampling) one step stands for, for words/s; arrays: device arrays the steps read.
    """

    vocab: Vocabulary
    rows: int
    steps_per_epoch: int
    total_steps: int
    words_per_step: float
    arrays: dict


def _jit_step(step: Callable, state_example: TrainState, mesh: Mesh | None) -> StepFn:
    if mesh is None:
        return jax.jit(step, donate_argnums=0)
    shardings = wv_sharding.state_shardings(state_example, mesh)
    return jax.jit(step, donate_argnums=0, out_shardings=(shardings, None))


def _place(state: TrainState, mesh: Mesh | None) -> TrainState:
    if mesh is None:
        return state
    return jax.device_put(state, wv_sharding.state_shardings(state, mesh))


class Word2Vec:
    """Skip-gram (``cbow=False``) or CBOW with negative sampling, word2vec's SGD."""

    def __init__(self, cbow: bool):
        self.cbow = cbow
        self.name = "cbow" if cbow else "skipgram"

    def prepare(self, config: WordVectorConfig, vocab: Vocabulary, corpus: EncodedCorpus,
                mesh: Mesh | None = None) -> Prepared:
        keep = vocab.keep_probabilities(config.sample)
        ids = np.asarray(corpus.ids)
        expected_kept = float(keep[ids].sum())
        steps_per_epoch = max(1, math.ceil(expected_kept / config.batch_size))
        arrays = {"ids": jnp.asarray(ids, jnp.int32), "sentence": jnp.asarray(corpus.sentence, jnp.int32),
                  "keep": jnp.asarray(keep, jnp.float32),
                  "noise_cdf": sgns.noise_cdf(vocab.noise_distribution())}
        return Prepared(vocab, wv_sharding.padded_rows(len(vocab), mesh), steps_per_epoch,
                        steps_per_epoch * config.epochs, len(ids) / steps_per_epoch, arrays)

    def init_state(self, config: WordVectorConfig, prepared: Prepared, mesh: Mesh | None = None) -> TrainState:
        key = jax.random.PRNGKey(config.seed)
        params = sgns.init_tables(key, prepared.rows, config.dimension)
        # word2vec's optimizer state is its current learning rate.
        opt_state = {"learning_rate": jnp.float32(config.lr)}
        return _place(TrainState(step=jnp.int32(0), params=params, opt_state=opt_state, rng=key), mesh)

    def epoch_inputs(self, config: WordVectorConfig, prepared: Prepared, epoch: int) -> sgns.EpochData:
        a = prepared.arrays
        return sgns.epoch_data(a["ids"], a["sentence"], a["keep"], config.seed, epoch)

    def make_step(self, config: WordVectorConfig, prepared: Prepared, mesh: Mesh | None = None) -> StepFn:
        cdf, spe, total = prepared.arrays["noise_cdf"], prepared.steps_per_epoch, prepared.total_steps
        alpha, min_alpha = config.lr, config.min_learning_rate
        batch_sharding = None if mesh is None else wv_sharding.batch_sharding(mesh)

        def step(state: TrainState, data: sgns.EpochData):
            batch = sgns.make_batch(data, cdf, config.seed, state.step, state.step % spe,
                                    batch_size=config.batch_size, window=config.window,
                                    negatives=config.negatives, cbow=self.cbow,
                                    shared_negatives=config.shared_negatives)
            if batch_sharding is not None:
                batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
            lr = sgns.linear_decay(state.step, total, alpha, min_alpha)
            params, loss, pairs = sgns.sgd_update(state.params, batch, lr, cbow=self.cbow,
                                                  row_rule=config.row_update)
            new = TrainState(step=state.step + 1, params=params,
                             opt_state={"learning_rate": lr.astype(jnp.float32)}, rng=state.rng)
            return new, {"loss_sum": loss, "pairs": pairs.astype(jnp.float32), "learning_rate": lr}

        return _jit_step(step, jax.eval_shape(lambda: self.init_state(config, prepared)), mesh)

    def vectors(self, params: dict) -> np.ndarray:
        """The input vectors, as word2vec saves them: [rows, d] float32."""
        return np.asarray(params["input"])


class GloVe:
    """GloVe: AdaGrad on the weighted least squares of log co-occurrence counts."""

    name = "glove"

    def prepare(self, config: WordVectorConfig, vocab: Vocabulary, corpus: EncodedCorpus,
                mesh: Mesh | None = None) -> Prepared:
        cooc = glove.cooccurrence(corpus.ids, corpus.sentence, len(vocab), window=config.window)
        if len(cooc.counts) == 0:
            raise ValueError("the corpus has no pair of in-vocabulary words within the window "
                             "in one sentence: GloVe has nothing to fit")
        steps_per_epoch = max(1, math.ceil(len(cooc.counts) / config.batch_size))
        arrays = {"rows": jnp.asarray(cooc.rows), "cols": jnp.asarray(cooc.cols),
                  "counts": jnp.asarray(cooc.counts, jnp.float32)}
        return Prepared(vocab, wv_sharding.padded_rows(len(vocab), mesh), steps_per_epoch,
                        steps_per_epoch * config.epochs, len(corpus.ids) / steps_per_epoch, arrays)

    def init_state(self, config: WordVectorConfig, prepared: Prepared, mesh: Mesh | None = None) -> TrainState:
        key = jax.random.PRNGKey(config.seed)
        params, gradsq = glove.init_glove(key, prepared.rows, config.dimension)
        return _place(TrainState(step=jnp.int32(0), params=params, opt_state=gradsq, rng=key), mesh)

    def epoch_inputs(self, config: WordVectorConfig, prepared: Prepared, epoch: int) -> jax.Array:
        return glove.epoch_order(len(prepared.arrays["counts"]), config.seed, epoch)

    def make_step(self, config: WordVectorConfig, prepared: Prepared, mesh: Mesh | None = None) -> StepFn:
        a, spe, b = prepared.arrays, prepared.steps_per_epoch, config.batch_size
        nnz = a["counts"].shape[0]
        batch_sharding = None if mesh is None else wv_sharding.batch_sharding(mesh)

        def step(state: TrainState, order: jax.Array):
            slot = (state.step % spe) * b + jnp.arange(b)
            entry = order[slot % nnz]
            # the last step of an epoch wraps around: count each entry once per epoch
            valid = slot < nnz
            rows, cols, counts = a["rows"][entry], a["cols"][entry], a["counts"][entry]
            if batch_sharding is not None:
                rows, cols, counts, valid = jax.lax.with_sharding_constraint(
                    (rows, cols, counts, valid), batch_sharding)
            params, gradsq, loss = glove.adagrad_update(
                state.params, state.opt_state, rows, cols, counts, valid, config.lr,
                x_max=config.x_max, power=config.power)
            new = TrainState(step=state.step + 1, params=params, opt_state=gradsq, rng=state.rng)
            return new, {"loss_sum": loss, "pairs": valid.sum().astype(jnp.float32),
                         "learning_rate": jnp.float32(config.lr)}

        return _jit_step(step, jax.eval_shape(lambda: self.init_state(config, prepared)), mesh)

    def vectors(self, params: dict) -> np.ndarray:
        """``w + u``, GloVe's final vectors: [rows, d] float32."""
        return np.asarray(params["w"]) + np.asarray(params["u"])


OBJECTIVES: dict[str, Word2Vec | GloVe] = {
    "cbow": Word2Vec(cbow=True), "skipgram": Word2Vec(cbow=False), "glove": GloVe()}
