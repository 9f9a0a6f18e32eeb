"""Token embedding with a tied read-out, an untied read-out, and the model input embedder."""
from __future__ import annotations

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers.norms import make_norm
from transformer_jax.layers.positional import LearnedPositions, sinusoidal_encoding


class TokenEmbedding(nn.Module):
    """Embedding table `[vocab_size, features]` (logical axes vocab, embed).

    `__call__(tokens int [...]) -> [..., features]` in `dtype`; ids outside
    [0, vocab_size) are clamped by `jnp.take` (validate with `models.check_tokens`).
    `attend(h [..., features]) -> float32 [..., vocab_size]` is the tied read-out h·Eᵀ,
    multiplied in h.dtype with float32 accumulation.
    """

    vocab_size: int
    features: int
    dtype: jnp.dtype = jnp.float32

    def setup(self) -> None:
        self.embedding = self.param(
            "embedding", init.normal(("vocab", "embed")), (self.vocab_size, self.features), jnp.float32
        )

    def __call__(self, tokens: jax.Array) -> jax.Array:
        # Under a mesh, gather the table's embed (fsdp) shards first, as FSDP does for every
        # weight, and look up rows from the vocab (tensor) shards: the partitioner then
        # gives the rows straight to their batch shards. Gathering from the table as stored
        # makes it move the result from embed-split to batch-split, which it can only do by
        # replicating it in full (XLA's "involuntary full rematerialization").
        table = nn.with_logical_constraint(self.embedding, ("vocab", None))
        return jnp.take(table, tokens, axis=0, mode="clip").astype(self.dtype)

    def attend(self, h: jax.Array) -> jax.Array:
        table = self.embedding.astype(h.dtype)
        return jnp.einsum("...d,vd->...v", h, table, preferred_element_type=jnp.float32)


class Embedder(nn.Module):
    """Token + positional (+ token-type) embedding, optional norm, then dropout:
    `[b, t] -> [b, t, d_model]` (cfg.dtype).

    Positions (int [b, t]) are given by the model (they depend on packing and the KV
    cache). Rotary models add nothing here: their positions act inside attention.
    With `cfg.type_vocab_size > 0`, `token_type_ids` (int [b, t], default all 0) select
    rows of a second table `token_type`; with `cfg.embedding_norm` the sum is normalised
    (submodule `norm`) before dropout, as in BERT.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.token = TokenEmbedding(cfg.vocab_size, cfg.d_model, cfg.compute_dtype)
        if cfg.pos_encoding == "learned":
            self.position = LearnedPositions(cfg.max_len, cfg.d_model, cfg.compute_dtype)
        if cfg.type_vocab_size:
            self.token_type = TokenEmbedding(cfg.type_vocab_size, cfg.d_model, cfg.compute_dtype)
        if cfg.embedding_norm:
            self.norm = make_norm(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def __call__(
        self, tokens: jax.Array, positions: jax.Array, *, token_type_ids: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        cfg = self.cfg
        if token_type_ids is not None and not cfg.type_vocab_size:
            raise ValueError("token_type_ids needs a model with cfg.type_vocab_size > 0")
        x = self.token(tokens)
        if cfg.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
        if cfg.pos_encoding == "learned":
            x = x + self.position(positions)
        elif cfg.pos_encoding == "sinusoidal":
            x = x + sinusoidal_encoding(positions, cfg.d_model, cfg.sinusoidal_layout).astype(x.dtype)
        if cfg.type_vocab_size:
            if token_type_ids is None:
                token_type_ids = jnp.zeros_like(tokens)
            elif token_type_ids.shape != tokens.shape or not jnp.issubdtype(token_type_ids.dtype, jnp.integer):
                raise ValueError(
                    f"token_type_ids must be an integer array of the tokens' shape {tuple(tokens.shape)}, "
                    f"got {token_type_ids.dtype} {tuple(token_type_ids.shape)}"
                )
            x = x + self.token_type(token_type_ids)
        if cfg.embedding_norm:
            x = self.norm(x)
        x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
        return self.dropout(x, deterministic=deterministic)

    def attend(self, h: jax.Array) -> jax.Array:
        """Tied read-out: float32 logits [..., vocab_size]."""
        return self.token.attend(h)


class LMHead(nn.Module):
    """Untied read-out `[..., d_model] -> float32 [..., vocab_size]` (no bias), multiplied in
    h.dtype with float32 accumulation."""

    cfg: ModelConfig

    @nn.compact
    def __call__(self, h: jax.Array) -> jax.Array:
        kernel = self.param(
            "kernel", init.normal(("embed", "vocab")), (self.cfg.d_model, self.cfg.vocab_size), jnp.float32
        )
        return jnp.einsum("...d,dv->...v", h, kernel.astype(h.dtype), preferred_element_type=jnp.float32)
