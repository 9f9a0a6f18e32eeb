"""Checks on `generate`'s inputs, run on concrete values before anything compiles."""
from __future__ import annotations

import numbers
from typing import Any

import jax
import numpy as np

STRATEGIES = ("greedy", "sample", "beam")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def prepare_prompts(
    prompts: Any, prompt_lengths: Any, *, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded int32 prompts `[batch, t]` and their lengths int32 `[batch]`.

    `prompts` is a list of token-id sequences (padded here, then `prompt_lengths` must
    be None) or an integer array `[batch, t]` whose row b holds its prompt in the first
    `prompt_lengths[b]` entries (default: all t); padding entries are set to 0. The
    width t is kept (it is a static shape of the compiled loop). Raises
    ValueError/TypeError for an empty batch, an empty prompt, lengths out of range, or
    ids outside [0, vocab_size) (padding is not checked).
    """
    if isinstance(prompts, (list, tuple)):
        if prompt_lengths is not None:
            raise ValueError("prompt_lengths must be None when prompts is a list of lists")
        rows = [np.asarray(p) for p in prompts]
        for row in rows:
            if row.ndim != 1 or (row.size and not np.issubdtype(row.dtype, np.integer)):
                raise TypeError(
                    "prompts given as a list must hold 1-D sequences of int token ids, got an "
                    f"element of dtype {row.dtype}, shape {row.shape}"
                )
        lengths = np.array([len(row) for row in rows], np.int64)
        array = np.zeros((len(rows), max(lengths, default=0)), np.int64)
        for i, row in enumerate(rows):
            array[i, : len(row)] = row
    else:
        array = np.asarray(prompts)
        if array.ndim != 2 or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(
                "prompts must be an integer array [batch, length] or a list of lists of "
                f"ints, got {type(prompts).__name__} of dtype {array.dtype}, shape {array.shape}"
            )
        if prompt_lengths is None:
            lengths = np.full(array.shape[:1], array.shape[1], np.int64)
        else:
            lengths = np.asarray(prompt_lengths)
            if lengths.shape != array.shape[:1] or not np.issubdtype(lengths.dtype, np.integer):
                raise ValueError(
                    f"prompt_lengths must be integers of shape ({array.shape[0]},), got "
                    f"dtype {lengths.dtype}, shape {lengths.shape}"
                )
    if array.shape[0] == 0:
        raise ValueError("prompts is an empty batch: expected at least one prompt")
    if lengths.min() < 1 or lengths.max() > array.shape[1]:
        raise ValueError(
            f"prompt lengths must lie in [1, {array.shape[1]}] (no empty prompts), got "
            f"min {lengths.min()}, max {lengths.max()}"
        )
    real = np.arange(array.shape[1])[None, :] < lengths[:, None]
    ids = array[real]
    if ids.min() < 0 or ids.max() >= vocab_size:
        raise ValueError(
            f"prompt token ids must lie in [0, {vocab_size}) (the model's vocab_size), got "
            f"min {ids.min()}, max {ids.max()}"
        )
    return np.where(real, array, 0).astype(np.int32), lengths.astype(np.int32)


def check_options(
    *,
    strategy: str,
    max_new_tokens: Any,
    temperature: Any,
    top_k: Any,
    top_p: Any,
    num_beams: Any,
    length_penalty: Any,
    eos_id: Any,
    pad_id: Any,
    bos_id: Any,
    rng: Any,
    vocab_size: int,
    encoder_decoder: bool,
) -> None:
    """Raises ValueError/TypeError naming the first bad option of `generate`.

    Every given value is checked, also those the strategy ignores.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy={strategy!r}: expected one of {STRATEGIES}")
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens!r}: expected an int >= 1")
    if not _is_real(temperature) or not temperature > 0:
        raise ValueError(f"temperature={temperature!r}: expected a number > 0")
    if top_k is not None and (not _is_int(top_k) or top_k < 1):
        raise ValueError(f"top_k={top_k!r}: expected None or an int >= 1")
    if top_p is not None and (not _is_real(top_p) or not 0 < top_p <= 1):
        raise ValueError(f"top_p={top_p!r}: expected None or a number in (0, 1]")
    if not _is_int(num_beams) or num_beams < 1:
        raise ValueError(f"num_beams={num_beams!r}: expected an int >= 1")
    if not _is_real(length_penalty) or not np.isfinite(length_penalty):
        raise ValueError(f"length_penalty={length_penalty!r}: expected a finite number")
    if eos_id is not None and (not _is_int(eos_id) or not 0 <= eos_id < vocab_size):
        raise ValueError(f"eos_id={eos_id!r}: expected None or an int in [0, {vocab_size})")
    if not _is_int(pad_id):
        raise ValueError(f"pad_id={pad_id!r}: expected an int")
    if encoder_decoder and (not _is_int(bos_id) or not 0 <= bos_id < vocab_size):
        raise ValueError(
            f"bos_id={bos_id!r}: an EncoderDecoder needs the decoder's start token, an int "
            f"in [0, {vocab_size})"
        )
    if rng is not None and not (_is_int(rng) or isinstance(rng, jax.Array)):
        raise TypeError(f"rng must be a jax.random.key or an int seed, got {type(rng).__name__}")
    if strategy == "sample" and rng is None:
        raise ValueError("strategy='sample' needs rng: a jax.random.key or an int seed")


def check_context(needed: int, max_len: int, what: str) -> None:
    """Raises ValueError when `needed` positions exceed the model's context `max_len`."""
    if needed > max_len:
        raise ValueError(f"{what} needs {needed} positions, more than the model's max_len={max_len}")

