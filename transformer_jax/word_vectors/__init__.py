"""Word vectors: word2vec (CBOW and skip-gram with negative sampling) and GloVe, trained
with jit-compiled batches; the word2vec file formats; word-vector sentence embeddings.

* ``vocabulary``: ``tokenize``, ``build_vocabulary`` -> ``Vocabulary`` (subsampling, noise).
* ``corpus``: ``encode_corpus`` -> memmapped word ids and sentence indices.
* ``sgns``: skip-gram / CBOW batches, losses and the SGD step.
* ``glove``: co-occurrence counts, the GloVe loss and the AdaGrad step.
"""
from transformer_jax.word_vectors.corpus import EncodedCorpus, encode_corpus
from transformer_jax.word_vectors.vocabulary import Vocabulary, build_vocabulary, tokenize

__all__ = ["EncodedCorpus", "Vocabulary", "build_vocabulary", "encode_corpus", "tokenize"]
