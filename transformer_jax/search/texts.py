"""The argument check every sentence encoder's `encode(texts, batch_size)` shares.

Both the transformer `SentenceEncoder` and the word-vector `MeanWordEncoder` take the same
arguments, so they refuse bad ones with the same words."""
from __future__ import annotations

from typing import Sequence


def checked_texts(texts: Sequence[str], batch_size: int) -> list[str]:
    """`texts` as a list after checking it and `batch_size`.

    Raises TypeError for one str (not a list of them) or a non-str item, and ValueError for
    an empty list or a `batch_size` that is not a positive int.
    """
    if isinstance(texts, str):
        raise TypeError("texts must be a list of strings, not one str (wrap it: [text])")
    texts = list(texts)
    if not texts:
        raise ValueError("texts is empty: expected at least one text to encode")
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"texts[{i}] is a {type(text).__name__}, expected str")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected a positive int")
    return texts
