"""The corpus encoded once into memmaps, like the language-model data: word ids and, per
token, the index of its sentence (context windows never cross a sentence boundary).

    corpus = encode_corpus(sentences, vocab, cache_dir)   # EncodedCorpus(ids, sentence)
"""
from __future__ import annotations

import hashlib
import os
from typing import NamedTuple, Sequence

import numpy as np

from transformer_jax.data import token_dtype
from transformer_jax.word_vectors.vocabulary import Vocabulary


class EncodedCorpus(NamedTuple):
    """ids: [N] uint16/uint32 word ids (out-of-vocabulary words dropped);
    sentence: [N] uint32, the sentence each token belongs to (non-decreasing)."""

    ids: np.ndarray
    sentence: np.ndarray


def encode_corpus(sentences: Sequence[Sequence[str]], vocab: Vocabulary,
                  cache_dir: str | os.PathLike | None = None) -> EncodedCorpus:
    """Encode ``sentences`` with ``vocab``; with ``cache_dir``, into two read-only memmaps
    cached there by a hash of sentences and vocabulary (written atomically).

    Raises ValueError when no in-vocabulary word remains.
    """
    digest = None
    if cache_dir is not None:
        h = hashlib.sha256()
        for s in sentences:
            h.update("\x1f".join(s).encode("utf-8") + b"\x1e")
        h.update(b"\0" + "\x1f".join(vocab.words).encode("utf-8"))
        digest = h.hexdigest()[:24]
        paths = [os.path.join(cache_dir, f"words-{digest}.{name}.bin") for name in ("ids", "sentence")]
        dtypes = (token_dtype(len(vocab)), np.dtype(np.uint32))
        if all(os.path.isfile(p) for p in paths):
            return EncodedCorpus(*(np.memmap(p, dtype=d, mode="r") for p, d in zip(paths, dtypes)))
    encoded = [vocab.encode(s) for s in sentences]
    lengths = np.array([len(e) for e in encoded], dtype=np.int64)
    if lengths.sum() == 0:
        raise ValueError("the corpus holds no in-vocabulary word")
    ids = np.concatenate(encoded).astype(token_dtype(len(vocab)))
    nonempty = np.flatnonzero(lengths)
    sentence = np.repeat(np.arange(len(nonempty), dtype=np.uint32), lengths[nonempty])
    if cache_dir is None:
        return EncodedCorpus(ids, sentence)
    os.makedirs(cache_dir, exist_ok=True)
    for path, array in zip(paths, (ids, sentence)):
        tmp = f"{path}.{os.getpid()}.tmp"
        array.tofile(tmp)
        os.replace(tmp, path)  # atomic: a killed writer never leaves half a file
    return EncodedCorpus(*(np.memmap(p, dtype=d, mode="r") for p, d in zip(paths, dtypes)))
