"""Words of a corpus: tokenisation, the vocabulary (min_count), Mikolov subsampling and
the unigram^0.75 noise distribution of negative sampling.

    sentences = tokenize(text, lowercase=True)      # list of lists of words
    vocab = build_vocabulary(sentences, min_count=5)
    keep = vocab.keep_probabilities(sample=1e-3)    # [V] float64
    noise = vocab.noise_distribution()              # [V] float64, sums to 1
"""
from __future__ import annotations

import collections
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

# A word: letters/digits, possibly joined by an apostrophe or a hyphen ("don't", "merriam-webst").
_WORD = re.compile(r"[^\W_]+(?:['’\-][^\W_]+)*")

# word2vec (and gensim) cut sentences longer than this into pieces.
MAX_SENTENCE_LENGTH = 10_000


def tokenize(text: str, *, lowercase: bool = True,
             max_sentence_length: int = MAX_SENTENCE_LENGTH) -> list[list[str]]:
    """Sentences of words: one sentence per line (longer lines cut every
    ``max_sentence_length`` words, as word2vec does), empty lines dropped.

    Raises ValueError when ``text`` is not a str or holds no word.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    if not isinstance(max_sentence_length, int) or max_sentence_length < 1:
        raise ValueError(f"max_sentence_length must be a positive int, got {max_sentence_length!r}")
    if lowercase:
        text = text.lower()
    sentences = []
    for line in text.split("\n"):
        words = _WORD.findall(line)
        for start in range(0, len(words), max_sentence_length):
            sentences.append(words[start:start + max_sentence_length])
    if not sentences:
        raise ValueError("the corpus is empty: it holds no word (text of "
                         f"{len(text)} characters)")
    return sentences


@dataclass(frozen=True)
class Vocabulary:
    """Words sorted by descending count (ties by word), with their corpus counts.

    words: [V] str; counts: [V] int64, each >= the min_count that built it.
    """

    words: tuple[str, ...]
    counts: np.ndarray
    index: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        counts = np.asarray(self.counts, dtype=np.int64)
        if counts.shape != (len(self.words),):
            raise ValueError(f"counts of shape {counts.shape} do not match {len(self.words)} words")
        object.__setattr__(self, "counts", counts)
        object.__setattr__(self, "index", {w: i for i, w in enumerate(self.words)})
        if len(self.index) != len(self.words):
            raise ValueError("words must be distinct")

    def __len__(self) -> int:
        return len(self.words)

    @property
    def total(self) -> int:
        """Number of in-vocabulary tokens of the corpus."""
        return int(self.counts.sum())

    def keep_probabilities(self, sample: float) -> np.ndarray:
        """Mikolov's subsampling as in word2vec.c and gensim: a word of count ``c`` is kept
        with probability ``min(1, (sqrt(c / t) + 1) * t / c)``, ``t = sample * total``.

        ``sample`` = 0 disables subsampling (all ones). Returns [V] float64.
        """
        if not isinstance(sample, (int, float)) or not 0 <= sample < 1:
            raise ValueError(f"sample must be a float in [0, 1), got {sample!r}")
        if sample == 0:
            return np.ones(len(self), dtype=np.float64)
        threshold = sample * self.total
        c = self.counts.astype(np.float64)
        return np.minimum(1.0, (np.sqrt(c / threshold) + 1.0) * threshold / c)

    def noise_distribution(self, power: float = 0.75) -> np.ndarray:
        """Negative-sampling noise: ``count ** power``, normalised. Returns [V] float64."""
        weights = self.counts.astype(np.float64) ** power
        return weights / weights.sum()

    def encode(self, words: Iterable[str]) -> np.ndarray:
        """Ids of the in-vocabulary words of ``words`` (others dropped, as word2vec does): [n] int32."""
        index = self.index
        return np.fromiter((index[w] for w in words if w in index), dtype=np.int32)


def build_vocabulary(sentences: Sequence[Sequence[str]], *, min_count: int = 5) -> Vocabulary:
    """The words occurring at least ``min_count`` times in ``sentences``.

    Raises ValueError for an empty corpus or when ``min_count`` leaves no word.
    """
    if not isinstance(min_count, (int, np.integer)) or isinstance(min_count, bool) or min_count < 1:
        raise ValueError(f"min_count must be a positive int, got {min_count!r}")
    counter = collections.Counter(w for sentence in sentences for w in sentence)
    if not counter:
        raise ValueError("the corpus is empty: it holds no word")
    kept = sorted(((c, w) for w, c in counter.items() if c >= min_count), key=lambda cw: (-cw[0], cw[1]))
    if not kept:
        raise ValueError(
            f"min_count={min_count} leaves an empty vocabulary: the most frequent of the corpus's "
            f"{len(counter)} distinct words occurs {max(counter.values())} times; lower min_count")
    return Vocabulary(words=tuple(w for _, w in kept), counts=np.array([c for c, _ in kept]))
