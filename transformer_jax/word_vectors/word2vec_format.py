"""The word2vec file formats (Mikolov's word2vec.c, read and written by gensim).

Text: a header ``"<count> <dim>\\n"``, then one line per word: the word and its ``dim``
values separated by single spaces. Binary: the same header, then per word the word's
UTF-8 bytes, one space, ``dim`` little-endian float32 and (as word2vec.c writes it) a
newline; readers skip whitespace before a word, so files without the newline read too.
Files are written atomically (temporary name, then rename).
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np


def save_word2vec(path: str | os.PathLike, words: Sequence[str], vectors: np.ndarray, *,
                  binary: bool = False) -> None:
    """Write ``words`` and ``vectors`` ([V, d] float) to ``path`` in the word2vec format.

    Raises ValueError for a word that is empty or contains whitespace (the format cannot
    hold it) or for mismatched shapes.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    if vectors.ndim != 2 or vectors.shape[0] != len(words):
        raise ValueError(f"vectors of shape {vectors.shape}: expected [{len(words)}, d]")
    for w in words:
        if not isinstance(w, str) or not w or any(ch.isspace() for ch in w):
            raise ValueError(f"word {w!r}: the word2vec format needs non-empty words without whitespace")
    path = os.fspath(path)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "wb") as f:
        f.write(f"{vectors.shape[0]} {vectors.shape[1]}\n".encode())
        little = vectors.astype("<f4")
        for word, row in zip(words, little):
            if binary:
                f.write(word.encode("utf-8") + b" " + row.tobytes() + b"\n")
            else:  # str of a float32 is its shortest exact decimal
                f.write((word + " " + " ".join(map(str, row)) + "\n").encode("utf-8"))
    os.replace(tmp, path)


def load_word2vec(path: str | os.PathLike, *, binary: bool = False) -> tuple[list[str], np.ndarray]:
    """Read a word2vec text or binary file: (words [V], vectors [V, d] float32).

    Raises ValueError naming the file and the offending entry for a malformed file.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    end = data.find(b"\n")
    try:
        count, dim = (int(x) for x in data[:end].split())
    except ValueError:
        raise ValueError(f"{path}: the header {data[:end][:60]!r} is not '<count> <dim>'") from None
    words, vectors = [], np.empty((count, dim), dtype=np.float32)
    pos = end + 1
    if binary:
        size = 4 * dim
        for i in range(count):
            while pos < len(data) and data[pos:pos + 1].isspace():
                pos += 1
            space = data.find(b" ", pos)
            if space < 0 or space + 1 + size > len(data):
                raise ValueError(f"{path}: truncated at word {i} of {count}")
            words.append(data[pos:space].decode("utf-8"))
            vectors[i] = np.frombuffer(data, dtype="<f4", count=dim, offset=space + 1)
            pos = space + 1 + size
    else:
        lines = data[pos:].decode("utf-8").splitlines()
        lines = [line for line in lines if line.strip()]
        if len(lines) != count:
            raise ValueError(f"{path}: the header announces {count} words, the file holds {len(lines)}")
        for i, line in enumerate(lines):
            parts = line.rstrip().split(" ")
            if len(parts) != dim + 1:
                raise ValueError(f"{path}: line {i + 2} holds {len(parts) - 1} values, expected {dim}")
            words.append(parts[0])
            vectors[i] = np.array(parts[1:], dtype=np.float32)
    return words, vectors
