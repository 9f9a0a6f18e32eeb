"""Transformer building blocks (Flax Linen): embeddings, positions, attention, MLP, norms, blocks."""
from transformer_jax.layers.attention import MultiHeadAttention, Projection, write_cache
from transformer_jax.layers.blocks import Block, BlockStack
from transformer_jax.layers.embeddings import Embedder, LMHead, TokenEmbedding
from transformer_jax.layers.feedforward import FeedForward
from transformer_jax.layers.norms import make_norm
from transformer_jax.layers.per_shard import attend_per_shard
from transformer_jax.layers.positional import (
    LearnedPositions,
    apply_rotary,
    padding_positions,
    segment_positions,
    sinusoidal_encoding,
)

__all__ = [
    "Block",
    "BlockStack",
    "Embedder",
    "FeedForward",
    "LMHead",
    "LearnedPositions",
    "MultiHeadAttention",
    "Projection",
    "TokenEmbedding",
    "apply_rotary",
    "attend_per_shard",
    "make_norm",
    "padding_positions",
    "segment_positions",
    "sinusoidal_encoding",
    "write_cache",
]
