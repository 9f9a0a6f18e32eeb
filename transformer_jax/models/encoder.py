"""Encoder (BERT-style bidirectional stack) and padding-aware pooling."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import BlockStack, Embedder, make_norm, padding_positions
from transformer_jax.models.checks import check_padding_mask, check_token_shape

POOLING = ("mean", "first", "max")


def token_positions(tokens: jax.Array, padding_mask: jax.Array | None) -> jax.Array:
    """int32 [b, t]: 0, 1, ... over real tokens (padding does not shift them)."""
    if padding_mask is None:
        return jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    return padding_positions(padding_mask)


def attention_mask(padding_mask: jax.Array | None) -> jax.Array | None:
    """[b, t] token mask -> [b, 1, 1, t] key mask for attention (True = attend)."""
    return None if padding_mask is None else padding_mask[:, None, None, :]


class Encoder(nn.Module):
    """Embedding, `num_layers` bidirectional blocks, final norm (pre-norm only).

    Padding tokens (padding_mask False) are never attended to and do not shift the
    positions of real tokens, so real tokens' outputs do not depend on padding.
    Submodule `embedder` carries the token table (heads use it for tied read-outs).
    """

    cfg: ModelConfig

    def setup(self) -> None:
        self.embedder = Embedder(self.cfg)
        self.blocks = BlockStack(self.cfg, self.cfg.num_layers)
        if self.cfg.norm_position == "pre":
            self.final_norm = make_norm(self.cfg)

    def __call__(
        self, tokens: jax.Array, *, padding_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, deterministic: bool = True,
    ) -> jax.Array:
        """tokens int [b, t]; padding_mask bool [b, t] (True = real token) -> [b, t, d_model] in cfg.dtype.

        token_type_ids: int [b, t] segment ids (needs cfg.type_vocab_size > 0; default 0).
        Outputs at padding positions are meaningless.
        """
        check_token_shape(tokens, self.cfg, "tokens")
        check_padding_mask(padding_mask, tokens, "padding_mask")
        positions = token_positions(tokens, padding_mask)
        x = self.embedder(tokens, positions, token_type_ids=token_type_ids, deterministic=deterministic)
        x = self.blocks(x, self_mask=attention_mask(padding_mask), positions=positions,
                        deterministic=deterministic)
        return self.final_norm(x) if self.cfg.norm_position == "pre" else x


def pool(hidden: jax.Array, padding_mask: jax.Array | None = None, method: str = "mean") -> jax.Array:
    """Sentence embeddings float32 [b, d] from hidden states [b, t, d].

    method "mean": average over real tokens (padding_mask True; all tokens if None);
    "first": the first real token (BERT's [CLS] slot, wherever left padding puts it);
    "max": the elementwise maximum over real tokens.
    A row without real tokens gives zeros ("mean"), its slot 0 ("first") or -inf ("max").
    """
    if method not in POOLING:
        raise ValueError(f"method={method!r} is not one of {POOLING}")
    if hidden.ndim != 3:
        raise ValueError(f"hidden must be [batch, length, features], got shape {tuple(hidden.shape)}")
    if padding_mask is not None and (padding_mask.shape != hidden.shape[:2] or padding_mask.dtype != jnp.bool_):
        raise ValueError(
            f"padding_mask must be bool {tuple(hidden.shape[:2])}, got {padding_mask.dtype} {tuple(padding_mask.shape)}"
        )
    hidden = hidden.astype(jnp.float32)
    if padding_mask is None:
        return {"mean": lambda: hidden.mean(axis=1), "first": lambda: hidden[:, 0],
                "max": lambda: hidden.max(axis=1)}[method]()
    if method == "max":
        return jnp.where(padding_mask[..., None], hidden, -jnp.inf).max(axis=1)
    if method == "first":
        first = jnp.argmax(padding_mask, axis=1)
        return jnp.take_along_axis(hidden, first[:, None, None], axis=1)[:, 0]
    # where(), not a product: outputs at padding slots may be anything, even inf/NaN.
    total = jnp.where(padding_mask[..., None], hidden, 0.0).sum(axis=1)
    count = padding_mask.sum(axis=1, keepdims=True)
    return total / jnp.maximum(count, 1)
