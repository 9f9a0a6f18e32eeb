"""EncoderDecoder: the original transformer (encoder, decoder with cross-attention)."""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers import BlockStack, Embedder, LMHead, make_norm
from transformer_jax.models.cache import CachePosition
from transformer_jax.models.checks import check_padding_mask, check_token_shape
from transformer_jax.models.encoder import attention_mask, token_positions


class EncoderDecoder(nn.Module):
    """Encoder over `src`, causal decoder over `tgt` attending to the encoding.

    `cfg.num_layers` encoder and `cfg.decoder_layers` decoder blocks. With
    `cfg.tie_embeddings` one embedder (token table and positions) serves source,
    target and the read-out, as in the paper's shared vocabulary; otherwise source and
    target have their own and the read-out is a separate `lm_head`.
    For decoding, run `encode` once, then `decode` with a KV cache (see
    `transformer_jax.models.cache`): `model.apply(v, encoded, tgt, decode=True, ...,
    method=EncoderDecoder.decode, mutable=["cache"])`.
    `cfg.final_logits_bias` adds a learned bias `final_logits_bias` [vocab] to the logits.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        if cfg.tie_embeddings:
            self.embedder = Embedder(cfg)
        else:
            self.src_embedder = Embedder(cfg)
            self.tgt_embedder = Embedder(cfg)
            self.lm_head = LMHead(cfg)
        self.encoder = BlockStack(cfg, cfg.num_layers)
        self.decoder = BlockStack(cfg, cfg.decoder_layers, causal=True, cross=True)
        if cfg.norm_position == "pre":
            self.encoder_norm = make_norm(cfg)
            self.decoder_norm = make_norm(cfg)
        self.cache_position = CachePosition()
        if cfg.final_logits_bias:
            self.logits_bias = self.param(
                "final_logits_bias", init.zeros(("vocab",)), (cfg.vocab_size,), jnp.float32)

    def __call__(
        self,
        src: jax.Array,
        tgt: jax.Array,
        *,
        src_padding_mask: jax.Array | None = None,
        deterministic: bool = True,
    ) -> jax.Array:
        """src int [b, s], tgt int [b, t] (teacher forcing) -> float32 logits [b, t, vocab_size].

        src_padding_mask: bool [b, s], True = real token; padding is never attended to.
        """
        encoded = self.encode(src, src_padding_mask=src_padding_mask, deterministic=deterministic)
        return self.decode(encoded, tgt, src_padding_mask=src_padding_mask, deterministic=deterministic)

    def encode(
        self, src: jax.Array, *, src_padding_mask: jax.Array | None = None, deterministic: bool = True
    ) -> jax.Array:
        """src int [b, s] -> encoding [b, s, d_model] in cfg.dtype (meaningless at padding)."""
        check_token_shape(src, self.cfg, "src")
        check_padding_mask(src_padding_mask, src, "src_padding_mask")
        positions = token_positions(src, src_padding_mask)
        embedder = self.embedder if self.cfg.tie_embeddings else self.src_embedder
        x = embedder(src, positions, deterministic=deterministic)
        x = self.encoder(x, self_mask=attention_mask(src_padding_mask), positions=positions,
                         deterministic=deterministic)
        return self.encoder_norm(x) if self.cfg.norm_position == "pre" else x

    def decode(
        self,
        encoded: jax.Array,
        tgt: jax.Array,
        *,
        src_padding_mask: jax.Array | None = None,
        deterministic: bool = True,
        decode: bool = False,
        decode_lengths: jax.Array | None = None,
    ) -> jax.Array:
        """encoded [b, s, d_model], tgt int [b, t] -> float32 logits [b, t, vocab_size].

        decode=True: KV-cache step as in DecoderLM (decode_lengths int [b]). The
        cross-attention keys and values are projected from `encoded` on the first call
        (position 0) and cached; later calls ignore `encoded` (pass the same array).
        """
        cfg = self.cfg
        check_token_shape(tgt, cfg, "tgt")
        if encoded.ndim != 3 or encoded.shape[0] != tgt.shape[0] or encoded.shape[2] != cfg.d_model:
            raise ValueError(
                f"encoded must be [batch={tgt.shape[0]}, src_len, d_model={cfg.d_model}] to match "
                f"tgt {tuple(tgt.shape)}, got {tuple(encoded.shape)}"
            )
        src_shape = jax.ShapeDtypeStruct(encoded.shape[:2], jnp.int32)  # the source tokens' shape
        check_padding_mask(src_padding_mask, src_shape, "src_padding_mask")
        if not decode and decode_lengths is not None:
            raise ValueError("decode_lengths is only used with decode=True")  # checked by CachePosition

        valid = None
        if decode:
            positions, valid = self.cache_position(tgt, decode_lengths)
        else:
            positions = token_positions(tgt, None)
        embedder = self.embedder if cfg.tie_embeddings else self.tgt_embedder
        x = embedder(tgt, positions, deterministic=deterministic)
        x = self.decoder(
            x, encoded.astype(cfg.compute_dtype), cross_mask=attention_mask(src_padding_mask),
            positions=positions, valid=valid, deterministic=deterministic, decode=decode,
        )
        if cfg.norm_position == "pre":
            x = self.decoder_norm(x)
        logits = embedder.attend(x) if cfg.tie_embeddings else self.lm_head(x)
        if cfg.final_logits_bias:
            logits = logits + self.logits_bias
        return nn.with_logical_constraint(logits, ("batch", "length", "vocab"))
