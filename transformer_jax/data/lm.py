"""Language-model data: a corpus tokenised once into a cached memmap, random windows
(causal LM) and BERT masking (masked LM).

    splits = prepare_tokens(text, tokenizer, cache_dir)        # TokenSplits(train, val)
    x, y = get_batch(splits.train, seed=0, step=step, batch_size=64, seq_len=256)
    ids, labels, weights = get_mlm_batch(splits.train, seed=0, step=step, batch_size=64,
                                         seq_len=128, tokenizer=tokenizer)
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from typing import NamedTuple, Sequence

import numpy as np

from transformer_jax.data.sampling import MASKING, WINDOWS, batch_rng, local_rows
from transformer_jax.tokenizers import Tokenizer


class TokenSplits(NamedTuple):
    """Read-only token memmaps: ``train`` is the first part of the corpus, ``val`` the rest."""

    train: np.memmap
    val: np.memmap


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def prepare_tokens(text: str, tokenizer: Tokenizer, cache_dir: str | os.PathLike,
                   val_fraction: float = 0.1) -> TokenSplits:
    """Tokenise ``text`` once (cached in ``cache_dir`` by a hash of text and tokenizer) and
    split it nanoGPT-style: the first ``1 - val_fraction`` of the tokens train, the rest validate.

    Returns uint16 (uint32 for vocabularies over 65536) memmaps ``[n_train]`` and ``[n_val]``.
    Raises ValueError when the tokenizer cannot encode the text or a split would be empty.
    """
    if not isinstance(text, str) or not text:
        raise ValueError(f"text must be a non-empty str, got {text!r:.40}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in [0, 1), got {val_fraction!r}")
    dtype = token_dtype(tokenizer.vocab_size)
    key = hashlib.sha256(text.encode("utf-8") + b"\0"
                         + tokenizer.fingerprint().encode()).hexdigest()[:24]
    path = os.path.join(cache_dir, f"tokens-{key}.{dtype.name}.bin")
    problem = _cache_problem(path)
    if problem is not None:
        if problem != "missing":
            warnings.warn(f"token cache {path} {problem}: rebuilding it", stacklevel=2)
        _write_cache(path, tokenizer.encode(text).astype(dtype))
    tokens = np.memmap(path, dtype=dtype, mode="r")
    n_train = int(len(tokens) * (1.0 - val_fraction))
    if n_train == 0 or (val_fraction > 0 and n_train == len(tokens)):
        raise ValueError(
            f"text of {len(tokens)} tokens is too short to split with val_fraction={val_fraction}")
    return TokenSplits(train=tokens[:n_train], val=tokens[n_train:])


# Caches up to this size are hashed on every load; larger ones are checked by size only.
CACHE_HASH_LIMIT_BYTES = 256 << 20


def _cache_record(path: str) -> str:
    return path[:-len(".bin")] + ".json"


def _sha256_of(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_cache(path: str, ids: np.ndarray) -> None:
    """The token file, then beside it its size and SHA-256 (each written to a temporary name
    and renamed: concurrent or killed writers never leave half a file)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.{os.getpid()}.tmp"
    ids.tofile(tmp)
    record = {"bytes": os.path.getsize(tmp), "sha256": _sha256_of(tmp)}
    os.replace(tmp, path)
    tmp = f"{_cache_record(path)}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(record, f)
    os.replace(tmp, _cache_record(path))


def _cache_problem(path: str) -> str | None:
    """None if the cached token file matches the size (and, up to CACHE_HASH_LIMIT_BYTES, the
    SHA-256) recorded beside it when it was written; else what is wrong with it."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with open(_cache_record(path)) as f:
            record = json.load(f)
        expected, digest = int(record["bytes"]), record["sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return "has no readable size record beside it (written by an older version, or cut short)"
    size = os.path.getsize(path)
    if size != expected:
        return f"is truncated or damaged ({size} bytes, {expected} recorded when it was written)"
    if size <= CACHE_HASH_LIMIT_BYTES and _sha256_of(path) != digest:
        return "is damaged (its SHA-256 differs from the one recorded when it was written)"
    return None


def validate_seq_len(tokens: np.ndarray, seq_len: int, *, name: str = "tokens") -> None:
    """Raise ValueError unless ``tokens`` holds at least one window of ``seq_len + 1``."""
    if not isinstance(seq_len, (int, np.integer)) or seq_len < 1:
        raise ValueError(f"seq_len must be a positive int, got {seq_len!r}")
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{name} holds {len(tokens)} tokens, fewer than seq_len + 1 = {seq_len + 1}: "
            f"use a longer corpus or a shorter seq_len")


def get_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
              process_index: int = 0, process_count: int = 1,
              rows: slice | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Random windows of ``tokens`` for next-token prediction, determined by ``(seed, step)``.

    ``batch_size`` is the global batch; this process gets rows
    ``[process_index * b_local, (process_index + 1) * b_local)`` with
    ``b_local = batch_size // process_count``, or the slice ``rows`` when given
    (e.g. ``sharding.process_batch_slice(mesh, batch_size)``).
    Returns ``(inputs, targets)``, int32 ``[b_local, seq_len]``; ``targets`` is ``inputs``
    shifted one token left.
    """
    validate_seq_len(tokens, seq_len)
    rows = local_rows(batch_size, process_index, process_count, rows)
    starts = batch_rng(seed, step, WINDOWS).integers(0, len(tokens) - seq_len, size=batch_size)
    windows = np.asarray(tokens[starts[rows, None] + np.arange(seq_len + 1)], dtype=np.int32)
    return windows[:, :-1], windows[:, 1:]


def mask_tokens(tokens: np.ndarray, *, rng: np.random.Generator | int, mask_id: int,
                vocab_size: int, special_ids: Sequence[int] = (), mask_prob: float = 0.15
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """BERT masking: each non-special token is chosen with probability ``mask_prob``; a
    chosen token becomes ``mask_id`` 80% of the time, a uniformly random non-special id
    10%, and stays unchanged 10%.

    tokens: integer ids, any shape. Returns ``(inputs, labels, weights)`` of that shape:
    int32 corrupted ids, int32 original ids (the targets), float32 1.0 where chosen.
    """
    tokens = np.asarray(tokens)
    if not 0.0 < mask_prob <= 1.0:
        raise ValueError(f"mask_prob must lie in (0, 1], got {mask_prob!r}")
    if not 0 <= mask_id < vocab_size:
        raise ValueError(f"mask_id must lie in [0, vocab_size={vocab_size}), got {mask_id!r}")
    rng = np.random.default_rng(rng) if not isinstance(rng, np.random.Generator) else rng
    ordinary = np.setdiff1d(np.arange(vocab_size), np.asarray(special_ids, dtype=np.int64))
    chosen = (rng.random(tokens.shape) < mask_prob) & ~np.isin(tokens, special_ids)
    action = rng.random(tokens.shape)
    random_ids = rng.choice(ordinary, size=tokens.shape)
    inputs = np.where(chosen & (action < 0.8), mask_id, tokens)
    inputs = np.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs.astype(np.int32), tokens.astype(np.int32), chosen.astype(np.float32)


def get_mlm_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int, seq_len: int,
                  tokenizer: Tokenizer, mask_prob: float = 0.15, process_index: int = 0,
                  process_count: int = 1, rows: slice | None = None
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random windows of ``tokens`` masked by ``mask_tokens``, determined by ``(seed, step)``.

    Returns ``(inputs, labels, weights)`` ``[b_local, seq_len]`` (int32, int32, float32),
    this process's rows of the global batch (see ``get_batch``).
    """
    windows, _ = get_batch(tokens, seed=seed, step=step, batch_size=batch_size, seq_len=seq_len)
    masked = mask_tokens(windows, rng=batch_rng(seed, step, MASKING), mask_id=tokenizer.mask_id,
                         vocab_size=tokenizer.vocab_size, special_ids=tokenizer.special_ids,
                         mask_prob=mask_prob)
    rows = local_rows(batch_size, process_index, process_count, rows)
    return tuple(a[rows] for a in masked)
