"""Word-vector runs end to end: learned vectors separate a planted structure, an
interrupted run resumes bit-identically, and bad settings fail clearly."""
import os

import numpy as np
import pytest

from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors
from transformer_jax.word_vectors.run import load_word_vectors, train_word_vectors


def planted_corpus(seed=0, sentences=1500):
    """Two groups of words, each seen only among its own group's context words."""
    rng = np.random.default_rng(seed)
    lines = []
    for _ in range(sentences):
        g = "ab"[rng.integers(2)]
        words = [f"{g}{rng.integers(6)}" if i % 2 == 0 else f"c{g}{rng.integers(6)}" for i in range(8)]
        lines.append(" ".join(words))
    return "\n".join(lines) + "\n"


def _separation(kv: KeyedVectors) -> float:
    """Mean cosine within the planted groups minus mean cosine across them."""
    a = [f"a{i}" for i in range(6)]
    b = [f"b{i}" for i in range(6)]
    within = [kv.similarity(x, y) for g in (a, b) for x in g for y in g if x < y]
    across = [kv.similarity(x, y) for x in a for y in b]
    return float(np.mean(within) - np.mean(across))


@pytest.mark.parametrize("objective", ["skipgram", "cbow", "glove"])
def test_learned_vectors_separate_the_planted_groups(tmp_path, objective):
    glove = objective == "glove"  # ~290 co-occurrence entries: many small AdaGrad steps
    cfg = WordVectorConfig(objective=objective, dimension=16, window=2, negatives=3, min_count=1,
                           sample=0.0, epochs=150 if glove else 4, batch_size=64 if glove else 256,
                           learning_rate=0.05, log_every=10)
    kv = train_word_vectors(cfg, tmp_path, text=planted_corpus(), progress=False)
    assert _separation(kv) > 0.5
    back = load_word_vectors(tmp_path)
    assert back.words == kv.words
    np.testing.assert_array_equal(back.vectors, kv.vectors)
    np.testing.assert_array_equal(back.counts, kv.counts)
    assert os.path.isfile(tmp_path / "metrics.jsonl") and os.path.isfile(tmp_path / "vocab.txt")


@pytest.mark.parametrize("objective", ["skipgram", "glove"])
def test_interrupted_run_resumes_bit_identically(tmp_path, objective):
    cfg = WordVectorConfig(objective=objective, dimension=8, window=2, negatives=2, min_count=1,
                           epochs=2, batch_size=128 if objective == "skipgram" else 32,
                           log_every=5, checkpoint_every=1000)
    text = planted_corpus(1, 300)
    whole = train_word_vectors(cfg, tmp_path / "whole", text=text, progress=False)
    part = train_word_vectors(cfg, tmp_path / "split", text=text, max_steps=7, progress=False)
    assert not os.path.exists(tmp_path / "split" / "vectors.txt")
    assert not np.array_equal(part.vectors, whole.vectors)
    resumed = train_word_vectors(cfg, tmp_path / "split", text=text, progress=False)
    np.testing.assert_array_equal(resumed.vectors, whole.vectors)
    assert ((tmp_path / "split" / "vectors.txt").read_bytes()
            == (tmp_path / "whole" / "vectors.txt").read_bytes())
    with pytest.raises(ValueError, match=r"different configuration \(fields \['seed'\]"):
        train_word_vectors(WordVectorConfig(**{**cfg.to_dict(), "seed": 1}), tmp_path / "split",
                           text=text, progress=False)


@pytest.mark.parametrize("field,value,match", [
    ("window", 0, "window=0: expected a positive int"),
    ("negatives", 0, "negatives=0: expected a positive int"),
    ("objective", "fasttext", "objective='fasttext'"),
    ("sample", 1.5, r"sample=1.5"),
])
def test_bad_settings_are_refused(field, value, match):
    with pytest.raises(ValueError, match=match):
        WordVectorConfig(**{field: value})


def test_empty_corpus_and_emptied_vocabulary_are_refused(tmp_path):
    with pytest.raises(ValueError, match="corpus is empty"):
        train_word_vectors(WordVectorConfig(), tmp_path / "a", text="  \n\n", progress=False)
    with pytest.raises(ValueError, match="min_count=5 leaves an empty vocabulary"):
        train_word_vectors(WordVectorConfig(min_count=5), tmp_path / "b", text="one two two\n",
                           progress=False)
