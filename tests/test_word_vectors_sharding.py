"""Embedding tables split over a mesh of the 8 virtual CPU devices: sharded steps give
the unsharded result, and the vocabulary is padded to equal shards."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from transformer_jax.sharding import make_mesh
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.corpus import encode_corpus
from transformer_jax.word_vectors.objectives import OBJECTIVES
from transformer_jax.word_vectors.run import train_word_vectors
from transformer_jax.word_vectors.sharding import padded_rows
from transformer_jax.word_vectors.vocabulary import build_vocabulary, tokenize


def _corpus(v=24, n=3000, seed=0):
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in rng.zipf(1.3, n) % v]
    text = "\n".join(" ".join(words[i:i + 10]) for i in range(0, n, 10))
    sentences = tokenize(text)
    vocab = build_vocabulary(sentences, min_count=1)
    return vocab, encode_corpus(sentences, vocab)


def _run(objective, cfg, vocab, corpus, mesh, steps):
    prepared = objective.prepare(cfg, vocab, corpus, mesh)
    state = objective.init_state(cfg, prepared, mesh)
    step = objective.make_step(cfg, prepared, mesh)
    inputs = objective.epoch_inputs(cfg, prepared, 0)
    losses = []
    for _ in range(steps):
        state, metrics = step(state, inputs)
        losses.append(float(metrics["loss_sum"]))
    return state, losses


@pytest.mark.parametrize("name", ["skipgram", "glove"])
def test_sharded_steps_equal_unsharded(name):
    vocab, corpus = _corpus()
    assert len(vocab) % 4 == 0  # same table rows with and without the mesh
    cfg = WordVectorConfig(objective=name, dimension=8, window=2, negatives=2, min_count=1,
                           batch_size=64, epochs=1)
    mesh = make_mesh("fsdp=2,tensor=4")
    sharded, sharded_losses = _run(OBJECTIVES[name], cfg, vocab, corpus, mesh, steps=3)
    plain, plain_losses = _run(OBJECTIVES[name], cfg, vocab, corpus, None, steps=3)
    first = "input" if name == "skipgram" else "w"
    assert sharded.params[first].sharding.spec == PartitionSpec("tensor", "fsdp")
    assert len(sharded.params[first].sharding.device_set) == 8
    np.testing.assert_allclose(sharded_losses, plain_losses, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(sharded.params), jax.tree.leaves(plain.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-7)


def test_vocabulary_rows_are_padded_to_the_vocab_shards():
    mesh = make_mesh("data=2,tensor=4")
    assert padded_rows(21, mesh) == 24 and padded_rows(24, mesh) == 24 and padded_rows(21, None) == 21


def test_a_whole_run_on_a_mesh_matches_the_run_on_one_device(tmp_path):
    """The run loop over the mesh (several epochs, a checkpoint, resume) gives the
    one-device vectors."""
    text = "\n".join(" ".join(f"w{i}" for i in np.random.default_rng(s).integers(0, 24, 10))
                     for s in range(300))
    cfg = WordVectorConfig(objective="cbow", dimension=8, window=2, negatives=2, min_count=1,
                           batch_size=256, epochs=3)
    mesh = make_mesh("fsdp=2,tensor=4")
    train_word_vectors(cfg, tmp_path / "mesh", text=text, mesh=mesh, max_steps=4, progress=False)
    sharded = train_word_vectors(cfg, tmp_path / "mesh", text=text, mesh=mesh, progress=False)
    plain = train_word_vectors(cfg, tmp_path / "plain", text=text, progress=False)
    assert sharded.words == plain.words and len(plain) % 4 == 0
    np.testing.assert_allclose(sharded.vectors, plain.vectors, rtol=1e-4, atol=1e-6)
