"""Generation beyond a DecoderLM's context: sliding windows over `generate`.

`generate` refuses a prompt plus new tokens longer than the model's context
(`cfg.max_len`). `generate_windowed` continues past it: each call's prompt is the last
half-context of everything so far, so the model always sees the most recent text.
`generate_text` does the same on text, through a tokenizer.
"""
from __future__ import annotations

from typing import Any, Sequence

import chex
import jax
import numpy as np

from transformer_jax.generation.api import generate


def generate_windowed(model: Any, params: Any, prompt: Sequence[int], max_new_tokens: int, *,
                      strategy: str = "sample", temperature: float = 0.8,
                      top_k: int | None = None, top_p: float | None = None, num_beams: int = 4,
                      eos_id: int | None = None, seed: int = 0) -> list[int]:
    """Up to `max_new_tokens` token ids continuing `prompt` (a 1-D sequence of ids).

    The window is half the model's context (`model.cfg.max_len // 2`) tokens wide;
    each call generates `max_len - width + 1` tokens after it, so prompt plus new tokens
    always fit. Every window is passed right-padded to that one width with the same
    options, so `generate` compiles once. Generation stops early at `eos_id` (which is
    not returned). Seeded: the same seed gives the same tokens.

    Args:
      model: a DecoderLM (anything with `.cfg.max_len` that `generate` continues).
      params: its parameters.
      prompt: token ids, at least one.
      max_new_tokens: >= 1.
      strategy, temperature, top_k, top_p, num_beams: as for `generate` (the sampling
        options apply to "sample" only).
      eos_id: stop at this token.
      seed: the sampling seed.

    Returns:
      The new token ids (a list of at most `max_new_tokens` ints).
    """
    ids = [int(i) for i in np.asarray(prompt).reshape(-1)]
    if not ids:
        raise ValueError("prompt is empty: expected at least one token id")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected a positive integer")
    width = max(1, model.cfg.max_len // 2)
    options = dict(strategy=strategy, num_beams=num_beams, eos_id=eos_id,
                   max_new_tokens=model.cfg.max_len - width + 1)
    if strategy == "sample":
        options.update(temperature=temperature, top_k=top_k, top_p=top_p)
    key, new = jax.random.PRNGKey(seed), []
    while len(new) < max_new_tokens:
        window = (ids + new)[-width:]
        padded = np.zeros((1, width), np.int32)
        padded[0, :len(window)] = window
        key, step_key = jax.random.split(key)
        if strategy == "sample":
            options["rng"] = step_key
        out = generate(model, params, padded, prompt_lengths=np.array([len(window)], np.int32),
                       **options)
        chex.assert_shape(out.tokens, (1, options["max_new_tokens"]))
        n = int(np.asarray(out.lengths).reshape(-1)[0])
        tokens = [int(t) for t in np.asarray(out.tokens)[0, :n]]
        if eos_id is not None and eos_id in tokens:
            new += tokens[:tokens.index(eos_id)]
            break
        new += tokens
    return new[:max_new_tokens]


def generate_text(model: Any, params: Any, tokenizer: Any, prompt: str, max_new_tokens: int,
                  **options: Any) -> str:
    """The text a DecoderLM writes after `prompt` (the prompt itself is not included):
    `generate_windowed` on `tokenizer.encode(prompt)`, stopping at the tokenizer's
    end-of-sequence token. `options`: those of `generate_windowed` (strategy,
    temperature, top_k, top_p, num_beams, seed)."""
    ids = [int(i) for i in tokenizer.encode(prompt)]
    if not ids:
        raise ValueError(f"prompt={prompt!r} encodes to no tokens")
    options.setdefault("eos_id", getattr(tokenizer, "eos_id", None))
    return tokenizer.decode(generate_windowed(model, params, ids, max_new_tokens, **options))
