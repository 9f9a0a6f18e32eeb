"""Task heads on the Encoder: masked-language modelling and sequence classification.

Both keep the encoder under the submodule name `encoder`, so a MaskedLM checkpoint's
`params["encoder"]` loads into a SequenceClassifier unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from transformer_jax.config import ModelConfig
from transformer_jax.layers import initializers as init
from transformer_jax.layers import LMHead, make_norm
from transformer_jax.models.encoder import POOLING, Encoder, pool


class MaskedLM(nn.Module):
    """Encoder + MLM head: dense, GELU, norm, read-out (tied to the token table when
    `cfg.tie_embeddings`) plus a per-token output bias, as in BERT. The head's GELU is
    the exact (erf) form when `cfg.activation == "gelu_exact"`, else the tanh form.
    """

    cfg: ModelConfig

    def setup(self) -> None:
        cfg = self.cfg
        self.encoder = Encoder(cfg)
        self.transform = nn.Dense(
            cfg.d_model, dtype=cfg.compute_dtype, kernel_init=init.normal(("embed", "mlp")),
            bias_init=init.zeros(("mlp",)),
        )
        self.transform_norm = make_norm(cfg)
        if not cfg.tie_embeddings:
            self.lm_head = LMHead(cfg)
        self.output_bias = self.param("output_bias", init.zeros(("vocab",)), (cfg.vocab_size,), jnp.float32)

    def __call__(
        self, tokens: jax.Array, *, padding_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, deterministic: bool = True,
    ) -> jax.Array:
        """tokens int [b, t], padding_mask bool [b, t] -> float32 logits [b, t, vocab_size].

        token_type_ids: int [b, t] (needs cfg.type_vocab_size > 0)."""
        h = self.encoder(tokens, padding_mask=padding_mask, token_type_ids=token_type_ids,
                         deterministic=deterministic)
        exact = self.cfg.activation == "gelu_exact"
        h = self.transform_norm(nn.gelu(self.transform(h), approximate=not exact))
        logits = self.encoder.embedder.attend(h) if self.cfg.tie_embeddings else self.lm_head(h)
        return nn.with_logical_constraint(logits + self.output_bias, ("batch", "length", "vocab"))


class SequenceClassifier(nn.Module):
    """Encoder, padding-aware pooling ("first", "mean" or "max"), optional pooler,
    dropout, linear classifier.

    `pooler=True` passes the pooled vector through dense + tanh (submodule `pooler`),
    as BERT's sequence classification does on the first token (its [CLS]).
    """

    cfg: ModelConfig
    num_classes: int
    pooling: str = "first"
    pooler: bool = False

    def setup(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes <= 0:
            raise ValueError(f"num_classes={self.num_classes!r} must be a positive int")
        if self.pooling not in POOLING:
            raise ValueError(f"pooling={self.pooling!r} is not one of {POOLING}")
        self.encoder = Encoder(self.cfg)
        if self.pooler:
            self.pooler_dense = nn.Dense(
                self.cfg.d_model, dtype=jnp.float32, kernel_init=init.normal(("embed", "mlp")),
                bias_init=init.zeros(("mlp",)), name="pooler",
            )
        self.dropout = nn.Dropout(self.cfg.dropout_rate)
        self.classifier = nn.Dense(
            self.num_classes, dtype=jnp.float32, kernel_init=init.normal(("embed", None)),
            bias_init=init.zeros((None,)),
        )

    def __call__(
        self, tokens: jax.Array, *, padding_mask: jax.Array | None = None,
        token_type_ids: jax.Array | None = None, deterministic: bool = True,
    ) -> jax.Array:
        """tokens int [b, t], padding_mask bool [b, t] -> float32 logits [b, num_classes].

        token_type_ids: int [b, t] (needs cfg.type_vocab_size > 0)."""
        h = self.encoder(tokens, padding_mask=padding_mask, token_type_ids=token_type_ids,
                         deterministic=deterministic)
        pooled = pool(h, padding_mask, self.pooling)
        if self.pooler:
            pooled = jnp.tanh(self.pooler_dense(pooled))
        return self.classifier(self.dropout(pooled, deterministic=deterministic))
