"""Host-side data in NumPy: corpora, cached token memmaps and deterministic batches.

* ``corpora``: ``load_text`` ("stdlib", "shakespeare", a file or a folder).
* ``lm``: ``prepare_tokens`` -> ``TokenSplits``; ``get_batch`` (causal LM),
  ``mask_tokens`` / ``get_mlm_batch`` (masked LM).
* ``examples``: seq2seq and classification examples (TSV or synthetic) and their batches.
* ``sampling``: the ``(seed, step)`` -> Generator rule and per-process row slices.

Every batch function is a pure function of ``(seed, step)`` and the data: the global
batch is the same for any ``process_count``, and each process gets its own rows.
"""
from transformer_jax.data.corpora import (STDLIB_MODULES, load_text, shakespeare_text,
                                          stdlib_text)
from transformer_jax.data.examples import (check_pairs, encode_labelled, encode_pairs, make_classify_batch,
                                           make_seq2seq_batch, make_shuffle_batch, read_tsv,
                                           reverse_pairs,
                                           seq2seq_lengths, shuffle_examples, split_examples)
from transformer_jax.data.lm import (TokenSplits, get_batch, get_mlm_batch, mask_tokens,
                                     prepare_tokens, token_dtype, validate_seq_len)

__all__ = [
    "STDLIB_MODULES", "TokenSplits", "check_pairs", "encode_labelled", "encode_pairs", "get_batch",
    "get_mlm_batch", "load_text", "make_classify_batch", "make_seq2seq_batch", "mask_tokens",
    "prepare_tokens", "read_tsv", "reverse_pairs", "seq2seq_lengths", "shakespeare_text",
    "make_shuffle_batch", "shuffle_examples", "split_examples", "stdlib_text", "token_dtype", "validate_seq_len",
]
