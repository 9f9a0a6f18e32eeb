"""DecoderLM: the GPT-style causal language model."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import BlockStack, Embedder, LMHead, make_norm, segment_positions
from transformer_jax.models.cache import CachePosition
from transformer_jax.models.checks import check_token_shape


class DecoderLM(nn.Module):
    """Token + position embedding, `num_layers` causal blocks, final norm, logits.

    `DecoderLM(cfg).init(rng, tokens)` / `.apply(variables, tokens)`; dropout (when
    `deterministic=False`) draws from the "dropout" rng stream. The final norm exists
    with pre-norm blocks only (post-norm blocks end normalised).

    Token ids are not range-checked inside jit (out-of-range ids are clamped); check
    concrete batches with `transformer_jax.models.check_tokens` first.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.embedder = Embedder(cfg)
        self.cache_position = CachePosition()
        self.blocks = BlockStack(cfg, cfg.num_layers, causal=True)
        if cfg.norm_position == "pre":
            self.final_norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        decode_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits, float32 [b, t, vocab_size].

        tokens: int [b, t]. segment_ids: int [b, t] for packed sequences (tokens attend
        within their segment, positions restart at each segment). decode=True: one step
        of KV-cache decoding (see `transformer_jax.models.cache`); decode_lengths: int
        [b], valid tokens per row in this call (default t).
        """
        check_token_shape(tokens, self.cfg, "tokens")
        if segment_ids is not None:
            if decode:
                raise ValueError("segment_ids is not supported with decode=True")
            if segment_ids.shape != tokens.shape:
                raise ValueError(
                    f"segment_ids must have the shape of tokens {tuple(tokens.shape)}, "
                    f"got {tuple(segment_ids.shape)}"
                )
        if not decode and decode_lengths is not None:
            raise ValueError("decode_lengths is only used with decode=True")  # checked by CachePosition

        valid = None
        if decode:
            positions, valid = self.cache_position(tokens, decode_lengths)
        elif segment_ids is not None:
            positions = segment_positions(segment_ids)
        else:
            positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)

        x = self.embedder(tokens, positions, deterministic=deterministic)
        x = self.blocks(
            x, positions=positions, segment_ids=segment_ids, valid=valid,
            deterministic=deterministic, decode=decode,
        )
        if self.cfg.norm_position == "pre":
            x = self.final_norm(x)
        logits = self.embedder.attend(x) if self.cfg.tie_embeddings else self.lm_head(x)
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
