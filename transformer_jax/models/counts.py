"""Exact parameter counts (from shapes alone) and training FLOPs per token of the models."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.config import ModelConfig, _check_positive_int
from transformer_jax.models.decoder_lm import DecoderLM
from transformer_jax.models.encoder import Encoder
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.heads import MaskedLM

MODEL_KINDS = ("decoder_lm", "encoder", "masked_lm", "encoder_decoder")
_CLASSES = {"decoder_lm": DecoderLM, "encoder": Encoder, "masked_lm": MaskedLM,
            "encoder_decoder": EncoderDecoder}


def count_params(cfg: ModelConfig, model: str = "decoder_lm") -> int:
    """Exact number of parameters of the `model` kind built from `cfg` (nothing is allocated).

    `model` is one of MODEL_KINDS ("decoder_lm", "encoder", "masked_lm",
    "encoder_decoder"), not a module instance. Tied embeddings count once.
    """
    if model not in MODEL_KINDS:
        raise ValueError(f"model={model!r} is not one of {MODEL_KINDS} (pass the kind's name)")
    module = _CLASSES[model](cfg)
    tokens = jax.ShapeDtypeStruct((1, 1), jnp.int32)
    args = (tokens, tokens) if model == "encoder_decoder" else (tokens,)
    shapes = jax.eval_shape(module.init, jax.random.key(0), *args)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes["params"]))


def flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training FLOPs per token of a DecoderLM (forward + backward), for MFU.

        6 * (N + vocab_size * d_model) + 12 * num_layers * d_model * seq_len

    N = parameters excluding the token embedding, the learned position table and an
    untied lm head (those are lookups or counted once as the read-out matmul); the
    second term is the attention score and value matmuls (PaLM appendix B).
    """
    _check_positive_int("seq_len", seq_len)
    total = count_params(cfg, "decoder_lm")
    embeddings = cfg.vocab_size * cfg.d_model * (1 if cfg.tie_embeddings else 2)
    if cfg.pos_encoding == "learned":
        embeddings += cfg.max_len * cfg.d_model
    non_embedding = total - embeddings
    return 6 * (non_embedding + cfg.vocab_size * cfg.d_model) + 12 * cfg.num_layers * cfg.d_model * seq_len
