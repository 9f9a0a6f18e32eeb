"""Greedy and sampled decoding: one token per row per step, until EOS or the budget.

The loop is a `lax.while_loop` that stops as soon as every row has emitted EOS, so a
batch that finishes early costs no further model calls.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from transformer_jax.generation.interface import Cache, GenerateOutput, StepFn
from transformer_jax.generation.processors import process_logits

# select(logits [batch, vocab] float32, step index int32 scalar) -> tokens [batch] int32
SelectFn = Callable[[jax.Array, jax.Array], jax.Array]


def greedy_select(logits: jax.Array, index: jax.Array) -> jax.Array:
    """The most likely token of every row of `logits` `[batch, vocab]`; `[batch]` int32."""
    del index  # greedy choice does not depend on the step
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)


def sampling_select(
    rng: jax.Array,
    *,
    temperature: jax.typing.ArrayLike = 1.0,
    top_k: jax.typing.ArrayLike | None = None,
    top_p: jax.typing.ArrayLike | None = None,
) -> SelectFn:
    """A `SelectFn` sampling from softmax(logits / temperature) after top-k / top-p.

    Step `index` draws with `fold_in(rng, index)`, so a run is reproducible given `rng`
    (for a fixed batch: rows share each step's key).
    """

    def select(logits: jax.Array, index: jax.Array) -> jax.Array:
        logits = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
        return jax.random.categorical(jax.random.fold_in(rng, index), logits).astype(jnp.int32)

    return select


def decode(
    step: StepFn,
    cache: Cache,
    logits: jax.Array,
    select: SelectFn,
    *,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
) -> GenerateOutput:
    """Generates up to `max_new_tokens` tokens per row, choosing each with `select`.

    Args:
      step: the model's step function (see `interface.py`).
      cache: its state after the prompt (prefill).
      logits: `[batch, vocab]` float32, the next-token logits after each row's prompt.
      select: chooses one token per row from logits, e.g. `greedy_select`.
      max_new_tokens: the budget, >= 1 (static).
      eos_id: a row stops after emitting it; `None` generates exactly `max_new_tokens`.
      pad_id: fills each row after its EOS.

    Returns:
      `GenerateOutput` with `tokens` `[batch, max_new_tokens]`, `lengths` and `scores`
      `[batch]`. `step` runs `lengths.max() - 1` times.
    """
    batch = logits.shape[0]

    def choose(logits, index, done):
        token = jnp.where(done, pad_id, select(logits, index))
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), token[:, None], axis=-1)[:, 0]
        finished = done if eos_id is None else done | (token == eos_id)
        return token, jnp.where(done, 0.0, log_prob), finished

    def cond(state):
        _, _, _, done, _, index = state
        return (index < max_new_tokens) & ~jnp.all(done)

    def body(state):
        tokens, lengths, scores, done, cache, index = state
        logits, cache = step(cache, jax.lax.dynamic_slice_in_dim(tokens, index - 1, 1, axis=1))
        token, log_prob, finished = choose(logits, index, done)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], index, axis=1)
        return tokens, lengths + ~done, scores + log_prob, finished, cache, index + 1

    token, log_prob, done = choose(logits, jnp.int32(0), jnp.zeros((batch,), bool))
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(token)
    lengths = jnp.ones((batch,), jnp.int32)
    state = (tokens, lengths, log_prob, done, cache, jnp.int32(1))
    tokens, lengths, scores, *_ = jax.lax.while_loop(cond, body, state)
    return GenerateOutput(tokens, lengths, scores)
