"""Beam search with a length penalty and per-beam EOS handling.

Each row keeps `num_beams` alive hypotheses (no EOS yet) and the `num_beams` best
finished ones. At every step the alive set becomes the best `num_beams` EOS-free
one-token extensions of the alive beams, while every beam's EOS extension competes
for the finished set. A hypothesis finishes when it emits EOS or reaches
`max_new_tokens`; its score is `log p(tokens) / length ** length_penalty` (length
counts the new tokens, EOS included). A row is done when no alive hypothesis can
still beat its worst finished one; the loop stops when every row is done.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.generation.interface import (
    Cache,
    GenerateOutput,
    ReorderFn,
    StepFn,
    gather_rows,
)


class _Beams(NamedTuple):
    alive_tokens: jax.Array  # [batch, beams, max_new_tokens] int32
    alive_log_probs: jax.Array  # [batch, beams] float32, descending
    finished_tokens: jax.Array  # [batch, beams, max_new_tokens] int32
    finished_lengths: jax.Array  # [batch, beams] int32
    finished_scores: jax.Array  # [batch, beams] float32, descending; -inf = empty slot
    parents: jax.Array  # [batch * beams] int32, cache row each alive beam continues
    length: jax.Array  # int32 scalar, tokens in every alive hypothesis


def _take(x: jax.Array, indices: jax.Array) -> jax.Array:
    """x[b, indices[b, j]] for x `[batch, n, ...]` and indices `[batch, m]`."""
    return jax.vmap(lambda row, idx: row[idx])(x, indices)


def _extend(
    beams: _Beams,
    logits: jax.Array,
    *,
    eos_id: int | None,
    max_new_tokens: int,
    length_penalty: jax.typing.ArrayLike,
) -> _Beams:
    """Extends every alive beam by one token; keeps the best alive and finished beams.

    Every beam's EOS extension competes for the finished set. The other extensions
    compete for the alive set; at the last step the alive winners finish as they are.
    """
    batch, num_beams, _ = beams.alive_tokens.shape
    vocab = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch, num_beams, vocab)
    extended = beams.alive_log_probs[..., None] + log_probs  # [batch, beams, vocab]
    length = beams.length + 1

    def append(parents, tokens):  # [batch, m] each -> [batch, m, max_new_tokens]
        return jax.lax.dynamic_update_slice_in_dim(
            _take(beams.alive_tokens, parents), tokens[..., None], beams.length, axis=2
        )

    continuing = extended if eos_id is None else extended.at[..., eos_id].set(-jnp.inf)
    alive_log_probs, flat = jax.lax.top_k(continuing.reshape(batch, -1), num_beams)
    parents, tokens = flat // vocab, (flat % vocab).astype(jnp.int32)
    alive_tokens = append(parents, tokens)

    penalty = jnp.asarray(length, jnp.float32) ** length_penalty
    truncated = jnp.where(length == max_new_tokens, alive_log_probs / penalty, -jnp.inf)
    pool_scores = [beams.finished_scores, truncated]
    pool_tokens = [beams.finished_tokens, alive_tokens]
    if eos_id is not None:
        pool_scores.append(extended[..., eos_id] / penalty)
        own = jnp.broadcast_to(jnp.arange(num_beams), (batch, num_beams))
        pool_tokens.append(append(own, jnp.full((batch, num_beams), eos_id, jnp.int32)))
    pool_lengths = jnp.full((batch, num_beams * len(pool_scores)), length, jnp.int32)
    pool_lengths = pool_lengths.at[:, :num_beams].set(beams.finished_lengths)

    finished_scores, best = jax.lax.top_k(jnp.concatenate(pool_scores, axis=1), num_beams)
    return _Beams(
        alive_tokens=alive_tokens,
        alive_log_probs=alive_log_probs,
        finished_tokens=_take(jnp.concatenate(pool_tokens, axis=1), best),
        finished_lengths=_take(pool_lengths, best),
        finished_scores=finished_scores,
        parents=(jnp.arange(batch)[:, None] * num_beams + parents).reshape(-1).astype(jnp.int32),
        length=length,
    )


def _all_rows_done(
    beams: _Beams, *, max_new_tokens: int, length_penalty: jax.typing.ArrayLike
) -> jax.Array:
    """True when no alive beam of any row can still enter that row's finished set.

    An alive log-probability s <= 0 only falls, and a hypothesis finishing at length L
    scores at most s / L ** length_penalty, largest at L = max_new_tokens when the
    penalty is positive and at the next length otherwise.
    """
    longest = jnp.float32(max_new_tokens) ** length_penalty
    shortest = (beams.length + 1).astype(jnp.float32) ** length_penalty
    best_reachable = beams.alive_log_probs[:, 0] / jnp.maximum(longest, shortest)
    return jnp.all(beams.finished_scores[:, -1] >= best_reachable)


def beam_search(
    step: StepFn,
    cache: Cache,
    logits: jax.Array,
    *,
    num_beams: int,
    max_new_tokens: int,
    eos_id: int | None = None,
    pad_id: int = 0,
    length_penalty: jax.typing.ArrayLike = 1.0,
    reorder_cache: ReorderFn = gather_rows,
) -> GenerateOutput:
    """Beam search over `step`, returning every row's beams best first.

    Args:
      step: the model's step function (see `interface.py`) on `batch * num_beams` rows,
        row `b * num_beams + j` being beam `j` of prompt `b`.
      cache: its state after each prompt, repeated `num_beams` times.
      logits: `[batch * num_beams, vocab]` float32, next-token logits after the prompts.
      num_beams: beams per prompt, >= 1 (static).
      max_new_tokens: the budget, >= 1 (static).
      eos_id: ends a hypothesis; `None`: every hypothesis has `max_new_tokens` tokens.
      pad_id: fills each hypothesis after its EOS.
      length_penalty: exponent of the length that divides the log-probability; 0 ranks
        by log-probability alone, larger values favour longer hypotheses. (With one
        beam the alive beam follows the greedy path, but an early EOS hypothesis kept
        in the finished set may win, so this is not greedy decoding.)
      reorder_cache: gathers cache rows when beams change parents.

    Returns:
      `GenerateOutput` with `tokens` `[batch, num_beams, max_new_tokens]`, `lengths`
      and `scores` `[batch, num_beams]`, sorted by score, best first. A score of `-inf`
      marks an empty slot (fewer distinct hypotheses than beams exist).
    """
    batch = logits.shape[0] // num_beams
    empty = jnp.full((batch, num_beams, max_new_tokens), pad_id, jnp.int32)
    # All beams start as copies of the prompt; only the first may expand at first.
    first_only = jnp.full((batch, num_beams), -jnp.inf).at[:, 0].set(0.0)
    beams = _Beams(
        alive_tokens=empty,
        alive_log_probs=first_only,
        finished_tokens=empty,
        finished_lengths=jnp.zeros((batch, num_beams), jnp.int32),
        finished_scores=jnp.full((batch, num_beams), -jnp.inf),
        parents=jnp.arange(batch * num_beams, dtype=jnp.int32),
        length=jnp.int32(0),
    )
    options = dict(eos_id=eos_id, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
    extend = lambda beams, logits: _extend(beams, logits, **options)

    def cond(state):
        beams, _ = state
        done = _all_rows_done(beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty)
        return (beams.length < max_new_tokens) & ~done

    def body(state):
        beams, cache = state
        cache = reorder_cache(cache, beams.parents)
        last = jax.lax.dynamic_slice_in_dim(beams.alive_tokens, beams.length - 1, 1, axis=2)
        logits, cache = step(cache, last.reshape(-1, 1))
        return extend(beams, logits), cache

    beams, _ = jax.lax.while_loop(cond, body, (extend(beams, logits), cache))
    return GenerateOutput(beams.finished_tokens, beams.finished_lengths, beams.finished_scores)
