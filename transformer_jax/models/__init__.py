"""The model family: DecoderLM (GPT), Encoder (+ MLM / classifier heads, pooling), EncoderDecoder.

Flax Linen modules; parameters live in the "params" collection, dropout draws from the
"dropout" rng stream, KV caches live in the "cache" collection (see `init_cache`).
"""
from transformer_jax.models.cache import init_cache
from transformer_jax.models.checks import check_tokens
from transformer_jax.models.counts import MODEL_KINDS, count_params, flops_per_token
from transformer_jax.models.decoder_lm import DecoderLM
from transformer_jax.models.encoder import Encoder, pool
from transformer_jax.models.encoder_decoder import EncoderDecoder
from transformer_jax.models.heads import MaskedLM, SequenceClassifier

__all__ = [
    "DecoderLM",
    "Encoder",
    "EncoderDecoder",
    "MaskedLM",
    "SequenceClassifier",
    "MODEL_KINDS",
    "check_tokens",
    "count_params",
    "flops_per_token",
    "init_cache",
    "pool",
]
