"""SentenceEncoder: texts -> float32 sentence embeddings [n, d] with a trained or pretrained encoder.

    encoder = SentenceEncoder.load("all-MiniLM-L6-v2")   # a sentence-transformers/HF directory,
    vectors = encoder.encode(["a sentence", "another"])   # or a run directory of train.py

Texts are tokenised, sorted by length and cut into batches; each batch is padded to
the smallest of a few length buckets (and its rows to a power of two), so a corpus
of mixed lengths compiles a handful of shapes. The model's pooling (mean, first
token or max, over real tokens only) and optional L2 normalisation run inside the
same jitted function. Padding never changes a result: the embeddings do not depend
on the batch size or the bucket (up to float rounding).

A text longer than the model's context is truncated (its first tokens are kept,
and the tokenizer's closing special tokens, e.g. BERT's [SEP], as Hugging Face's
truncation does), with a warning that counts the truncated texts.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import warnings
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.models import Encoder, MaskedLM, SequenceClassifier
from transformer_jax.models.encoder import POOLING
from transformer_jax.pretrained import Pooling, from_pretrained
from transformer_jax.search.index import ModelStamp
from transformer_jax.search.texts import checked_texts

# Length buckets: powers of two and 1.5x powers of two, capped at the model's context.
DEFAULT_BUCKETS = (8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 1536, 2048)
PROGRESS_MIN_TEXTS = 1000  # show a progress bar (when not told) from this many texts


class SentenceEncoder:
    """An encoder model with its tokenizer and pooling: `encode(texts) -> [n, d]`.

    Args:
      model: a Flax module; `model.apply({"params": params}, tokens, padding_mask=mask)`
        gives hidden states [b, t, d] (the package's `Encoder`).
      params: its parameters.
      tokenizer: `encode_batch(texts) -> list of int id arrays` (special tokens added as
        the model expects) and `pad_id`.
      pooling: "mean", "first" (the first token, BERT's [CLS]) or "max", over real tokens.
      normalize: L2-normalise the pooled vectors (sentence-transformers' Normalize module).
      max_length: the most tokens per text (the model's context); longer texts are truncated.
      name: shown in messages and stored in indexes; `path` is where it was loaded from.
      buckets: padded lengths a batch may take (max_length is always one).
    """

    def __init__(self, model: Any, params: Any, tokenizer: Any, *, pooling: str = "mean",
                 normalize: bool = False, max_length: int, name: str, path: str | None = None,
                 buckets: Sequence[int] = DEFAULT_BUCKETS):
        if pooling not in POOLING:
            raise ValueError(f"pooling={pooling!r}: expected one of {POOLING}")
        if not (isinstance(max_length, int) and max_length >= 1):
            raise ValueError(f"max_length={max_length!r}: expected a positive int")
        if not all(isinstance(b, int) and b >= 1 for b in buckets):
            raise ValueError(f"buckets={buckets!r}: expected positive ints")
        for attribute in ("encode_batch", "pad_id"):
            if not hasattr(tokenizer, attribute):
                raise TypeError(f"tokenizer {type(tokenizer).__name__} has no {attribute!r}")
        self.model, self.params, self.tokenizer = _for_inference(model), params, tokenizer
        self.pooling, self.normalize, self.max_length = pooling, bool(normalize), max_length
        self._pool = Pooling(pooling, bool(normalize))
        self.name, self.path = name, path
        self.buckets = tuple(sorted({b for b in buckets if b < max_length} | {max_length}))
        self._added, self._closing = _special_counts(tokenizer)
        self._hash: str | None = None
        self._embed = jax.jit(self._counted_embed_batch)
        self.traces = 0  # how many shapes were compiled (for tests and benchmarks)

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | os.PathLike, **kwargs: Any) -> SentenceEncoder:
        """From a Hugging Face / sentence-transformers directory (via `from_pretrained`) or a
        run directory of `train.py --objective mlm|classify`. kwargs go to the constructor
        (e.g. `buckets`)."""
        path = os.fspath(path)
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no model directory at {path!r}")
        if is_run_directory(path):
            model, params, tokenizer, cfg, pooling = load_run_encoder(path)
            max_length = cfg.max_len
            normalize = False
            name = os.path.basename(os.path.normpath(path))
        else:
            pretrained = from_pretrained(path)
            model, params = encoder_of(pretrained.model, pretrained.params, path)
            tokenizer = pretrained.tokenizer
            if tokenizer is None:
                raise ValueError(f"{path!r} has no tokenizer (tokenizer.json): cannot encode texts")
            pooling_info = getattr(pretrained, "pooling", None)
            pooling = None if pooling_info is None else pooling_info.mode
            normalize = bool(pooling_info is not None and pooling_info.normalize)
            max_length = int(getattr(tokenizer, "max_length", None) or pretrained.config.max_len)
            name = os.path.basename(os.path.normpath(path))
        if pooling is None:
            warnings.warn(f"{path!r} records no pooling: using mean pooling over the tokens",
                          stacklevel=2)
            pooling = "mean"
        kwargs = {"pooling": pooling, "normalize": normalize, "max_length": max_length,
                  "name": name, "path": os.path.abspath(path), **kwargs}
        return cls(model, params, tokenizer, **kwargs)

    # ------------------------------------------------------------------ identity

    @property
    def weights_sha256(self) -> str:
        """A hash of every parameter (path, dtype, shape, bytes): the model's identity."""
        if self._hash is None:
            digest = hashlib.sha256()
            leaves = jax.tree_util.tree_leaves_with_path(self.params)
            for key, leaf in sorted(leaves, key=lambda kv: jax.tree_util.keystr(kv[0])):
                leaf = np.asarray(leaf)
                digest.update(f"{jax.tree_util.keystr(key)}:{leaf.dtype}:{leaf.shape};".encode())
                digest.update(np.ascontiguousarray(leaf).tobytes())
            digest.update(f"pooling={self.pooling};normalize={self.normalize}".encode())
            self._hash = digest.hexdigest()
        return self._hash

    @property
    def stamp(self) -> ModelStamp:
        """What an index records about this encoder (name, weights hash, path)."""
        return ModelStamp(self.name, self.weights_sha256, self.path)

    @property
    def dim(self) -> int:
        """Embedding width d."""
        return int(jax.eval_shape(self._embed_batch, self.params, jnp.zeros((1, 1), jnp.int32),
                                  jnp.ones((1, 1), bool)).shape[1])

    # ------------------------------------------------------------------ encoding

    def encode(self, texts: Sequence[str], batch_size: int = 32, *,
               show_progress: bool | None = None) -> np.ndarray:
        """Embed `texts`: float32 [len(texts), d], in the order given.

        batch_size: texts per forward pass (results do not depend on it).
        show_progress: a tqdm bar on stderr (default: from PROGRESS_MIN_TEXTS texts on).
        Raises ValueError for an empty list or a text that tokenises to nothing.
        """
        texts = checked_texts(texts, batch_size)
        ids = self._tokenize(texts)
        order = np.argsort([-len(x) for x in ids], kind="stable")  # longest first, as sentence-transformers
        batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
        if show_progress is None:
            show_progress = len(texts) >= PROGRESS_MIN_TEXTS
        # Every batch is dispatched before any result is read back, so padding the next
        # batch on the host overlaps the device's work on this one.
        pending = []
        for rows in _progress(batches, show_progress, len(texts), batch_size):
            tokens, mask = self._pad([ids[r] for r in rows], batch_size)
            pending.append((rows, self._embed(self.params, tokens, mask)))
        out = np.empty((len(texts), pending[0][1].shape[1]), np.float32)
        for rows, vectors in pending:
            out[rows] = np.asarray(vectors)[: len(rows)]
        return out

    def _tokenize(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids per text, truncated to max_length (closing specials kept), with a warning."""
        ids = [np.asarray(x, np.int32).reshape(-1) for x in self.tokenizer.encode_batch(texts)]
        empty = [i for i, x in enumerate(ids) if x.size == 0]
        if empty:
            raise ValueError(f"texts[{empty[0]}] = {texts[empty[0]]!r:.60} gives no tokens "
                             f"({len(empty)} text(s) do): nothing to embed")
        long = []
        keep = self.max_length - self._closing
        for i, x in enumerate(ids):
            if x.size > self.max_length:
                ids[i] = np.concatenate([x[:keep], x[x.size - self._closing:]])
                long.append(i)
            elif x.size == self.max_length and self._cut_by_tokenizer(texts[i]):
                long.append(i)
        if long:
            warnings.warn(
                f"{len(long)} of {len(texts)} texts are longer than the model's context of "
                f"{self.max_length} tokens (e.g. texts[{long[0]}]); they were truncated to their "
                f"first {self.max_length} tokens", stacklevel=3)
        return ids

    def _cut_by_tokenizer(self, text: str) -> bool:
        """Whether a tokenizer that truncates by itself (Hugging Face's, at max_length) cut
        `text`: its ids without specials, untruncated, plus the specials exceed max_length."""
        encode = getattr(self.tokenizer, "encode", None)
        return encode is not None and len(encode(text)) + self._added > self.max_length

    def _pad(self, rows: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        """int32 tokens and bool mask [rows', bucket]: rows' a power of two (<= batch_size,
        or the batch size), bucket the smallest bucket that fits the longest row."""
        longest = max(x.size for x in rows)
        length = next(b for b in self.buckets if b >= longest)
        count = min(batch_size, 1 << (len(rows) - 1).bit_length())
        tokens = np.full((count, length), self.tokenizer.pad_id, np.int32)
        mask = np.zeros((count, length), bool)
        mask[len(rows):, 0] = True  # filler rows: one token each, their output is dropped
        for i, x in enumerate(rows):
            tokens[i, : x.size] = x
            mask[i, : x.size] = True
        return tokens, mask

    def _counted_embed_batch(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        self.traces += 1  # runs once per compiled shape
        return self._embed_batch(params, tokens, mask)

    def _embed_batch(self, params: Any, tokens: jax.Array, mask: jax.Array) -> jax.Array:
        """tokens int32 [b, t], mask bool [b, t] -> float32 [b, d]: forward, pool, normalise."""
        hidden = self.model.apply({"params": params}, tokens, padding_mask=mask)
        return self._pool(hidden, mask)


def _for_inference(model: Any) -> Any:
    """`model` with jax.nn's attention ("xla") on CPU where the config leaves the choice to
    the automatic rule. That rule was tuned on CPU for training (forward and backward);
    encoding is forward only, and there one fused XLA attention was faster than the
    blockwise loop the rule picks from 128 x 128 scores (MiniLM, 32 texts x 256 tokens,
    2-core CPU: benchmarks/RESULTS.md). Other backends keep the rule (cuDNN on GPU)."""
    cfg = getattr(model, "cfg", None)
    if (jax.default_backend() != "cpu" or not dataclasses.is_dataclass(cfg)
            or getattr(cfg, "attention_impl", "set") is not None):
        return model
    return model.clone(cfg=dataclasses.replace(cfg, attention_impl="xla"))


# ---------------------------------------------------------------------- sources


def is_run_directory(path: str) -> bool:
    """True for a train.py run directory (config.json with "model" and "train" sections)."""
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return False
    with open(config) as f:
        data = json.load(f)
    return isinstance(data, dict) and "model" in data and "train" in data


def load_run_encoder(run_dir: str) -> tuple[Any, Any, Any, Any, str | None]:
    """(Encoder, its params, tokenizer with encode_batch, ModelConfig, pooling or None) of a
    train.py run of an encoder objective, from its best (else latest) checkpoint
    (`transformer_jax.load_run`)."""
    from transformer_jax.run import load_run

    run = load_run(run_dir)
    objective = run.config.objective
    if objective not in ("mlm", "classify"):
        raise ValueError(f"{run_dir!r} is a {objective!r} run: a sentence encoder needs an encoder "
                         "run (--objective mlm or classify)")
    # A classify run pooled as it was trained; an mlm run never pooled.
    pooling = run.config.pooling if objective == "classify" else None
    model, params = encoder_of(run.model, run.params, run_dir)
    return model, params, PlainTokenizer(run.tokenizer), run.model_config, pooling


def encoder_of(model: Any, params: Any, source: str) -> tuple[Any, Any]:
    """(Encoder, its params) inside `model`: the model itself, or the `encoder` of a head
    (MaskedLM, SequenceClassifier). Anything else (a decoder) is a ValueError."""
    if isinstance(model, Encoder):
        return model, params
    if isinstance(model, (MaskedLM, SequenceClassifier)):
        return Encoder(model.cfg), params["encoder"]
    raise ValueError(f"{source!r} holds a {type(model).__name__}, not an encoder: a sentence "
                     "encoder needs a bidirectional Encoder (BERT-style) model")


class PlainTokenizer:
    """A package tokenizer seen through `encode_batch` (no special tokens: runs train without)."""

    added_specials = closing_specials = 0

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.pad_id = tokenizer.pad_id

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.tokenizer.encode(text) for text in texts]


def _special_counts(tokenizer: Any) -> tuple[int, int]:
    """(special ids added to a text, how many of them come after it): BERT (2, 1) for
    [CLS] ... [SEP]. Found from the encodings of "" and "a": "" gives the specials alone,
    and what follows its common prefix with "a"'s comes after the text. A tokenizer may
    state both as int attributes `added_specials` and `closing_specials`."""
    stated = getattr(tokenizer, "added_specials", None), getattr(tokenizer, "closing_specials", None)
    if all(isinstance(n, int) for n in stated):
        return stated
    empty, one = (list(np.asarray(x).reshape(-1)) for x in tokenizer.encode_batch(["", "a"]))
    prefix = 0
    while prefix < min(len(empty), len(one)) and empty[prefix] == one[prefix]:
        prefix += 1
    return len(empty), len(empty) - prefix


def _progress(batches: list, show: bool, total: int, batch_size: int) -> Any:
    if not show:
        return batches
    from tqdm import tqdm

    def rows():
        with tqdm(total=total, unit="text", file=sys.stderr, dynamic_ncols=True) as bar:
            for rows in batches:
                yield rows
                bar.update(len(rows))
    return rows()
