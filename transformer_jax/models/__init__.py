"""The model family: DecoderLM (GPT), Encoder (+ MLM / classifier heads, pooling), EncoderDecoder."""
from transformer_jax.models.cache import init_cache
from transformer_jax.models.checks import check_tokens
from transformer_jax.models.decoder_lm import DecoderLM

__all__ = ["DecoderLM", "check_tokens", "init_cache"]
