"""``KeyedVectors``: trained word vectors with gensim's everyday queries (similarity,
most_similar, 3CosAdd analogies) and the word2vec text and binary formats.

    kv = KeyedVectors.load_word2vec_format("vectors.txt")
    kv.most_similar("king", k=5)            # [(word, cosine), ...]
    kv.analogy("king", "man", "woman")      # nearest to king - man + woman: [("queen", ...)]
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from transformer_jax.word_vectors.word2vec_format import load_word2vec, save_word2vec


class UnknownWordError(KeyError, ValueError):
    """A word that is not in the vocabulary (a KeyError, as in gensim, and a ValueError)."""

    def __str__(self) -> str:
        return str(self.args[0])


class KeyedVectors:
    """Words and their vectors.

    words: [V] distinct str; vectors: [V, d] float (stored float32);
    counts: optional [V] corpus counts (used by SIF weighting).
    """

    def __init__(self, words: Sequence[str], vectors: np.ndarray, counts: np.ndarray | None = None):
        vectors = np.asarray(vectors, dtype=np.float32)
        words = list(words)
        if vectors.ndim != 2 or vectors.shape[0] != len(words):
            raise ValueError(f"vectors of shape {vectors.shape}: expected [len(words)={len(words)}, d]")
        self.words = words
        self.vectors = vectors
        self.index = {w: i for i, w in enumerate(words)}
        if len(self.index) != len(words):
            raise ValueError("words must be distinct")
        self.counts = None if counts is None else np.asarray(counts, dtype=np.int64)
        norms = np.linalg.norm(vectors, axis=1, keepdims=True)
        self._unit = vectors / np.maximum(norms, np.finfo(np.float32).tiny)

    def __len__(self) -> int:
        return len(self.words)

    def __contains__(self, word: str) -> bool:
        return word in self.index

    def __getitem__(self, word: str) -> np.ndarray:
        return self.vectors[self._id(word)]

    @property
    def vector_size(self) -> int:
        return self.vectors.shape[1]

    def _id(self, word: str) -> int:
        if word not in self.index:
            raise UnknownWordError(f"word {word!r} is not in the vocabulary of {len(self)} words")
        return self.index[word]

    def similarity(self, a: str, b: str) -> float:
        """Cosine similarity of the vectors of ``a`` and ``b``."""
        return float(self._unit[self._id(a)] @ self._unit[self._id(b)])

    def most_similar(self, word: str, k: int = 10) -> list[tuple[str, float]]:
        """The ``k`` words of highest cosine similarity to ``word`` (itself excluded), best first."""
        return self._nearest(self._unit[self._id(word)], k, exclude=(word,))

    def analogy(self, a: str, b: str, c: str, k: int = 1) -> list[tuple[str, float]]:
        """3CosAdd: the ``k`` words nearest (cosine) to ``unit(a) - unit(b) + unit(c)``, the
        three query words excluded; ``analogy("king", "man", "woman")`` -> queen.
        (gensim's ``most_similar(positive=[a, c], negative=[b])``.)"""
        query = self._unit[self._id(a)] - self._unit[self._id(b)] + self._unit[self._id(c)]
        return self._nearest(query, k, exclude=(a, b, c))

    def _nearest(self, query: np.ndarray, k: int, exclude: Sequence[str]) -> list[tuple[str, float]]:
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int, got {k!r}")
        scores = self._unit @ (query / max(np.linalg.norm(query), np.finfo(np.float32).tiny))
        scores[[self.index[w] for w in exclude]] = -np.inf
        k = min(k, len(self) - len(set(exclude)))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.argsort(-scores[top], kind="stable")][:k]
        return [(self.words[i], float(scores[i])) for i in top]

    def save_word2vec_format(self, path: str | os.PathLike, *, binary: bool = False) -> None:
        """Write the word2vec text (or ``binary``) format, as gensim's method of that name."""
        save_word2vec(path, self.words, self.vectors, binary=binary)

    @classmethod
    def load_word2vec_format(cls, path: str | os.PathLike, *, binary: bool = False) -> KeyedVectors:
        """Read a word2vec text (or ``binary``) file, e.g. one gensim or word2vec.c wrote."""
        return cls(*load_word2vec(path, binary=binary))
