"""The interface between decoding algorithms and models: step functions and outputs.

The algorithms in `loop.py` and `beam.py` never see a model. They drive a step function

    step(cache, tokens) -> (logits, cache)

with `tokens` `[batch, 1]` int32 (the token just chosen for every row) and `logits`
`[batch, vocab]` float32 (the next-token logits for every row). `cache` is any pytree;
the step function owns its meaning (a KV cache, a token buffer, or the previous token
of a toy n-gram model in the tests). Beam search also needs `reorder_cache(cache,
rows)`, which gathers batch rows `rows` `[batch]` int32 of every cached tensor.
`model_steps.py` builds these functions for `DecoderLM` and `EncoderDecoder`.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

Cache = Any
StepFn = Callable[[Cache, jax.Array], tuple[jax.Array, Cache]]
ReorderFn = Callable[[Cache, jax.Array], Cache]


class GenerateOutput(NamedTuple):
    """What `generate` and the decoding loops return (only the new tokens, no prompt).

    tokens: `[batch, max_new_tokens]` int32 (`[batch, num_beams, max_new_tokens]` for
      all beams), the EOS token included, `pad_id` after it.
    lengths: `[batch]` int32 (`[batch, num_beams]`), new tokens per row, EOS included.
    scores: `[batch]` float32 (`[batch, num_beams]`). Greedy and sampling: the sum of the
      model's log-probabilities (before temperature / top-k / top-p) of the new tokens.
      Beam search: that sum divided by `lengths ** length_penalty`, best beam first.
    """

    tokens: jax.Array
    lengths: jax.Array
    scores: jax.Array


def gather_rows(cache: Cache, rows: jax.Array) -> Cache:
    """Default `ReorderFn`: gathers `rows` along the leading (batch) axis of every leaf."""
    return jax.tree.map(lambda leaf: leaf[rows], cache)
