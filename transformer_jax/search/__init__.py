"""Sentence embeddings and semantic search: encode texts with a trained or pretrained
encoder (`SentenceEncoder`), index the vectors and find the nearest (`VectorIndex`)."""
from transformer_jax.search.encoder import SentenceEncoder
from transformer_jax.search.index import ModelStamp, VectorIndex

__all__ = ["ModelStamp", "SentenceEncoder", "VectorIndex"]
