"""Sentence embeddings from word vectors: the mean of a text's word vectors, optionally
SIF-weighted (Arora, Liang & Ma, 2017: weight ``a / (a + p(w))``, then the common
component removed), behind the same ``encode`` as ``transformer_jax.search.SentenceEncoder``
so the two can be compared on one task.

    encoder = WordVectorEncoder(KeyedVectors.load_word2vec_format("run/vectors.txt"))
    embeddings = encoder.encode(["a text", "another"], batch_size=256)   # [2, d] float32
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from transformer_jax.search.texts import checked_texts
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors
from transformer_jax.word_vectors.vocabulary import _WORD


class WordVectorEncoder:
    """Texts -> float32 ``[n, d]``: the (SIF-)weighted mean of the vectors of their known words.

    vectors: the word vectors. lowercase: lower-case texts first (as the vocabulary was built).
    sif: SIF's ``a`` (e.g. 1e-3) to weight word ``w`` by ``a / (a + p(w))``, ``p`` from
    ``vectors.counts``; None = plain mean. normalize: L2-normalise each embedding.
    A text without a known word embeds to zeros.
    """

    def __init__(self, vectors: KeyedVectors, *, lowercase: bool = True, sif: float | None = None,
                 normalize: bool = False):
        if sif is not None:
            if not isinstance(sif, (int, float)) or not sif > 0:
                raise ValueError(f"sif must be a positive float (SIF's a, e.g. 1e-3) or None, got {sif!r}")
            if vectors.counts is None:
                raise ValueError("sif weighting needs word counts: build the KeyedVectors with counts")
        self.vectors, self.lowercase, self.sif, self.normalize = vectors, lowercase, sif, bool(normalize)
        if sif is None:
            self.weights = np.ones(len(vectors), dtype=np.float32)
        else:
            p = vectors.counts / vectors.counts.sum()
            self.weights = (sif / (sif + p)).astype(np.float32)
        self.common_component: np.ndarray | None = None

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return self.vectors.vector_size

    def fit_common_component(self, texts: Sequence[str]) -> WordVectorEncoder:
        """SIF's second step: find the first principal direction of the embeddings of
        ``texts``; later ``encode`` calls remove each embedding's projection on it."""
        self.common_component = None
        x = self.encode(texts, batch_size=max(1, len(texts)))
        _, _, vt = np.linalg.svd(x.astype(np.float64), full_matrices=False)
        self.common_component = vt[0].astype(np.float32)
        return self

    def encode(self, texts: Sequence[str], batch_size: int = 32, *,
               show_progress: bool | None = None) -> np.ndarray:
        """Embed ``texts``: float32 ``[len(texts), d]`` in the order given (independent of
        ``batch_size``, which only bounds the work per chunk). ``show_progress`` is accepted
        for interface parity; encoding is a NumPy reduction and shows no bar."""
        texts = checked_texts(texts, batch_size)
        index = self.vectors.index
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for start in range(0, len(texts), batch_size):
            for row, text in enumerate(texts[start:start + batch_size], start):
                words = _WORD.findall(text.lower() if self.lowercase else text)
                ids = np.array([index[w] for w in words if w in index], dtype=np.int64)
                if len(ids):
                    out[row] = (self.weights[ids, None] * self.vectors.vectors[ids]).sum(0) / len(ids)
        if self.common_component is not None:
            u = self.common_component
            out -= np.outer(out @ u, u)
        if self.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), np.finfo(np.float32).tiny)
        return out
