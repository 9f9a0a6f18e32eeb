"""Step functions for the models: prefill the prompt once, then one token per call.

`decoder_lm_steps` and `encoder_decoder_steps` bind a model, its parameters and a batch
of inputs into a `Steps`: the step function of `interface.py`, its state after the
prompt, the first next-token logits, and how to reorder the state's rows (beam search).

Two states are offered. With the KV cache (`use_cache=True`) each step feeds one token
through the model. Without it the state is a token buffer and every step recomputes a
full forward pass over it: the same results at quadratic cost, kept as the reference
for tests and for the cache speed-up in `benchmarks/generate.py`.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.generation.interface import Cache, ReorderFn, StepFn, gather_rows
from transformer_jax import models
from transformer_jax.models import init_cache

Params = Any


class Steps(NamedTuple):
    """A model bound to its inputs, ready for a decoding loop.

    step: `StepFn`. cache: its state after the prompts. logits: `[batch, vocab]`
    float32, next-token logits after each prompt. reorder: a `ReorderFn` for `cache`.
    """

    step: StepFn
    cache: Cache
    logits: jax.Array
    reorder: ReorderFn


def kv_cache_reorder(model: nn.Module) -> ReorderFn:
    """Gathers batch rows of a model's KV cache (batch is axis 1 of scanned layers)."""

    def batch_axis(path) -> int:
        scanned = model.cfg.scan_layers and any(getattr(k, "key", None) == "layers" for k in path)
        return 1 if scanned else 0

    def reorder(cache: Cache, rows: jax.Array) -> Cache:
        return jax.tree_util.tree_map_with_path(
            lambda path, leaf: jnp.take(leaf, rows, axis=batch_axis(path)), cache
        )

    return reorder


def _last_valid(logits: jax.Array, lengths: jax.Array) -> jax.Array:
    """logits[b, lengths[b] - 1] for logits `[batch, t, vocab]`."""
    return jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]


def _copies(batch: int, num_copies: int) -> jax.Array:
    """Row indices repeating each of `batch` rows `num_copies` times in a row."""
    return jnp.repeat(jnp.arange(batch), num_copies)


def _buffer_steps(forward, prompts: jax.Array, lengths: jax.Array, cache_len: int) -> Steps:
    """Uncached decoding: the state is (token buffer `[batch, cache_len]`, next slot)."""
    buffer = jnp.zeros((prompts.shape[0], cache_len), jnp.int32)
    buffer = jax.lax.dynamic_update_slice(buffer, prompts.astype(jnp.int32), (0, 0))

    def step(state, tokens):
        buffer, free = state  # free: [batch], each row's first empty slot
        buffer = buffer.at[jnp.arange(buffer.shape[0]), free].set(tokens[:, 0])
        return _last_valid(forward(buffer), free + 1), (buffer, free + 1)

    return Steps(step, (buffer, lengths), _last_valid(forward(buffer), lengths), gather_rows)


def decoder_lm_steps(
    model: models.DecoderLM,
    params: Params,
    prompts: jax.Array,
    lengths: jax.Array,
    *,
    cache_len: int,
    num_copies: int = 1,
    use_cache: bool = True,
) -> Steps:
    """Steps of a `DecoderLM` continuing right-padded `prompts`.

    prompts: int32 `[batch, t]`, row b's first `lengths[b]` (int32 `[batch]`, >= 1)
    tokens are its prompt. cache_len: positions the state holds (>= t; the prompt plus
    every token fed back). num_copies: each row is repeated this many times in the
    result (beams), after a single prefill.
    """
    rows = _copies(prompts.shape[0], num_copies)
    if not use_cache:
        forward = lambda tokens: model.apply({"params": params}, tokens)  # noqa: E731
        return _buffer_steps(forward, prompts[rows], lengths[rows], cache_len)

    def apply(cache, tokens, tokens_lengths=None):
        logits, state = model.apply(
            {"params": params, "cache": cache}, tokens,
            decode=True, decode_lengths=tokens_lengths, mutable=["cache"],
        )
        return logits, state["cache"]

    def step(cache, tokens):
        logits, cache = apply(cache, tokens)
        return logits[:, 0], cache

    reorder = kv_cache_reorder(model)
    logits, cache = apply(init_cache(model, prompts.shape[0], cache_len), prompts, lengths)
    return Steps(step, reorder(cache, rows), _last_valid(logits, lengths)[rows], reorder)


def encoder_decoder_steps(
    model: models.EncoderDecoder,
    params: Params,
    sources: jax.Array,
    lengths: jax.Array,
    *,
    start_id: int,
    cache_len: int,
    num_copies: int = 1,
    use_cache: bool = True,
) -> Steps:
    """Steps of an `EncoderDecoder` translating right-padded `sources`.

    sources: int32 `[batch, s]`, row b's first `lengths[b]` tokens are real. The
    sources are encoded once; every step's decoder cross-attends to that output. The
    decoder starts from `start_id`. cache_len: decoder positions held (>= the number
    of tokens fed: the start token and every generated token fed back). num_copies:
    each row is repeated this many times in the result (beams).
    """
    padding_mask = jnp.arange(sources.shape[1])[None, :] < lengths[:, None]
    encoded = model.apply(
        {"params": params}, sources, src_padding_mask=padding_mask, method=models.EncoderDecoder.encode
    )
    rows = _copies(sources.shape[0], num_copies)
    encoded, padding_mask = encoded[rows], padding_mask[rows]
    start = jnp.full((rows.shape[0], 1), start_id, jnp.int32)
    ones = jnp.ones((rows.shape[0],), jnp.int32)

    def apply(variables, tokens, **decode_args):
        return model.apply(
            variables, encoded, tokens, src_padding_mask=padding_mask,
            method=models.EncoderDecoder.decode, **decode_args,
        )

    if not use_cache:
        forward = lambda tokens: apply({"params": params}, tokens)  # noqa: E731
        return _buffer_steps(forward, start, ones, cache_len)

    def step(cache, tokens):
        logits, state = apply({"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"])
        return logits[:, 0], state["cache"]

    cache = init_cache(model, rows.shape[0], cache_len, src_len=sources.shape[1])
    logits, cache = step(cache, start)
    return Steps(step, cache, logits, kv_cache_reorder(model))
