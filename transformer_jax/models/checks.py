"""Input validation shared by the models and the entry points that see concrete data."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig


def check_tokens(tokens, cfg: ModelConfig, name: str = "tokens") -> None:
    """Raise ValueError unless concrete `tokens` [batch, length] are valid inputs for `cfg`.

    Checks: 2-D integer array, ids in [0, vocab_size), and length <= max_len when
    positions are learned. Meant for training, generation and the CLI, before jit.
    Inside jit the models cannot see values: out-of-range ids are clamped into
    [0, vocab_size) by `jnp.take(..., mode="clip")`, silently. (Lengths are static, so the
    models themselves reject sequences longer than a learned table at trace time.)
    """
    check_token_shape(tokens, cfg, name)
    values = np.asarray(tokens)
    if values.size and (values.min() < 0 or values.max() >= cfg.vocab_size):
        raise ValueError(
            f"{name} ids must lie in [0, {cfg.vocab_size}), got min {values.min()} max {values.max()}"
        )


def check_token_shape(tokens: jax.Array, cfg: ModelConfig, name: str) -> None:
    """Trace-time check: int [batch, length], length within a learned position table."""
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise ValueError(
            f"{name} must be an integer array [batch, length], got {tokens.dtype} {tuple(tokens.shape)}"
        )
    if cfg.pos_encoding == "learned" and tokens.shape[1] > cfg.max_len:
        raise ValueError(
            f"{name} has length {tokens.shape[1]} > max_len={cfg.max_len} of the learned position table"
        )


def check_padding_mask(mask: jax.Array | None, tokens: jax.Array, name: str) -> None:
    """Trace-time check: a padding mask is bool with the shape of its tokens."""
    if mask is None:
        return
    if mask.shape != tokens.shape or mask.dtype != jnp.bool_:
        raise ValueError(
            f"{name} must be bool {tuple(tokens.shape)} (True = real token), "
            f"got {mask.dtype} {tuple(mask.shape)}"
        )


def check_decode_lengths(lengths: jax.Array | None, tokens: jax.Array) -> None:
    """Trace-time check: decode_lengths is int [batch]."""
    if lengths is None:
        return
    if lengths.shape != tokens.shape[:1] or not jnp.issubdtype(lengths.dtype, jnp.integer):
        raise ValueError(
            f"decode_lengths must be an integer array [{tokens.shape[0]}], "
            f"got {lengths.dtype} {tuple(lengths.shape)}"
        )
