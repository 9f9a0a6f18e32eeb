"""Word vectors: word2vec (CBOW and skip-gram with negative sampling) and GloVe, trained
with jit-compiled batches (tables optionally split over a mesh); the word2vec file formats;
word-vector sentence embeddings.

* ``vocabulary``: ``tokenize``, ``build_vocabulary`` -> ``Vocabulary`` (subsampling, noise).
* ``corpus``: ``encode_corpus`` -> memmapped word ids and sentence indices.
* ``sgns``: skip-gram / CBOW batches, losses and the SGD step.
* ``glove``: co-occurrence counts, the GloVe loss and the AdaGrad step.
* ``config``: ``WordVectorConfig``; ``objectives``: ``OBJECTIVES`` (cbow, skipgram, glove).
* ``run``: ``train_word_vectors(config, out_dir)``, ``load_word_vectors(out_dir)``.
* ``keyed_vectors``: ``KeyedVectors``; ``word2vec_format``: the text and binary files.
* ``sentence``: ``WordVectorEncoder`` (``.encode(texts, batch_size=...)``).
"""
from transformer_jax.word_vectors.config import WordVectorConfig
from transformer_jax.word_vectors.corpus import EncodedCorpus, encode_corpus
from transformer_jax.word_vectors.keyed_vectors import KeyedVectors, UnknownWordError
from transformer_jax.word_vectors.objectives import OBJECTIVES
from transformer_jax.word_vectors.run import load_word_vectors, train_word_vectors
from transformer_jax.word_vectors.sentence import WordVectorEncoder
from transformer_jax.word_vectors.vocabulary import Vocabulary, build_vocabulary, tokenize
from transformer_jax.word_vectors.word2vec_format import load_word2vec, save_word2vec

__all__ = [
    "EncodedCorpus", "KeyedVectors", "OBJECTIVES", "UnknownWordError", "Vocabulary",
    "WordVectorConfig", "WordVectorEncoder", "build_vocabulary", "encode_corpus",
    "load_word2vec", "load_word_vectors", "save_word2vec", "tokenize", "train_word_vectors",
]
