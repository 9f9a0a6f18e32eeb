"""Finite sets of examples for sequence-to-sequence and classification, and padded
batches drawn from them deterministically by ``(seed, step)``.

Text comes from a TSV file (``source<TAB>target`` or ``label<TAB>text``) or from a
built-in synthetic task that needs no download:

* seq2seq, ``reverse_pairs``: a random lowercase string and the same string reversed.
* classify, ``shuffle_examples``: windows of the corpus's own tokens, half of them
  with their tokens randomly permuted (label 1) and half left as they are (label 0).
  A shuffled window holds exactly the tokens of a real one, so token counts give
  nothing away: the classifier must judge order, which masked-LM pretraining on the
  same corpus teaches.

    # seq2seq, from a TSV file or the synthetic task
    rows = read_tsv(path) if path else reverse_pairs(10_000, seed=0)
    tok = build_tokenizer("char", "".join(src + tgt for src, tgt in rows))
    train, val = split_examples(encode_pairs(rows, tok))
    src, tgt_in, tgt_out, src_mask, tgt_mask = make_seq2seq_batch(
        train, seed=0, step=step, batch_size=32, src_len=64, tgt_len=64,
        pad_id=tok.pad_id, bos_id=tok.bos_id, eos_id=tok.eos_id)

    # classification, synthetic: draw train and val examples from the matching splits
    splits = prepare_tokens(text, tok, cache_dir)
    train = shuffle_examples(splits.train, 4096, seed=0, seq_len=128)
    val = shuffle_examples(splits.val, 512, seed=1, seq_len=128)
    tokens, padding_mask, labels = make_classify_batch(
        train, seed=0, step=step, batch_size=32, seq_len=128, pad_id=tok.pad_id)
"""
from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from transformer_jax.data.sampling import EXAMPLES, batch_rng, local_rows
from transformer_jax.tokenizers import Tokenizer

Pair = tuple[np.ndarray, np.ndarray]  # (source ids, target ids), int32 [n], [m]
Labelled = tuple[np.ndarray, int]  # (token ids int32 [n], class index)


def read_tsv(path: str | os.PathLike) -> list[tuple[str, str]]:
    """Rows of a two-column UTF-8 TSV file (blank lines skipped).

    Raises ValueError naming the path and line when a row does not hold exactly one tab.
    """
    if not os.path.isfile(path):
        raise ValueError(f"path must be an existing TSV file, got {str(path)!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            fields = line.split("\t")
            if len(fields) != 2:
                raise ValueError(
                    f"{str(path)!r} line {number}: expected 2 tab-separated fields, "
                    f"got {len(fields)}: {line[:60]!r}")
            rows.append((fields[0], fields[1]))
    if not rows:
        raise ValueError(f"TSV file {str(path)!r} holds no rows")
    return rows


def reverse_pairs(num_examples: int, *, seed: int, min_len: int = 1, max_len: int = 16,
                  alphabet: str = "abcdefghijklmnopqrstuvwxyz") -> list[tuple[str, str]]:
    """Synthetic seq2seq task: ``(s, s[::-1])`` for random strings ``s`` of ``alphabet``
    with lengths uniform in ``[min_len, max_len]``."""
    if not 1 <= min_len <= max_len:
        raise ValueError(f"need 1 <= min_len <= max_len, got min_len={min_len}, max_len={max_len}")
    rng = np.random.default_rng(seed)
    symbols = np.array(list(alphabet))
    lengths = rng.integers(min_len, max_len + 1, size=num_examples)
    sources = ["".join(rng.choice(symbols, size=n)) for n in lengths]
    return [(s, s[::-1]) for s in sources]


def shuffle_examples(tokens: np.ndarray, num_examples: int, *,
                     seed: int | np.random.Generator, seq_len: int) -> list[Labelled]:
    """Synthetic classification task: windows of ``tokens`` with lengths uniform in
    ``[seq_len // 2, seq_len]``; label 1 windows have their tokens permuted, label 0
    windows are unchanged. Labels alternate 0, 1, 0, ... so the classes are balanced.
    ``seed``: an int, or a Generator to draw from."""
    if len(tokens) < seq_len:
        raise ValueError(f"tokens holds {len(tokens)} tokens, fewer than seq_len={seq_len}")
    rng = np.random.default_rng(seed)
    examples = []
    for i in range(num_examples):
        length = int(rng.integers(max(1, seq_len // 2), seq_len + 1))
        start = int(rng.integers(0, len(tokens) - length + 1))
        window = np.asarray(tokens[start:start + length], dtype=np.int32)
        label = i % 2
        examples.append((rng.permutation(window) if label else window, label))
    return examples


def encode_pairs(rows: Sequence[tuple[str, str]], tokenizer: Tokenizer) -> list[Pair]:
    """Tokenise ``(source, target)`` text pairs (no specials added)."""
    return [(tokenizer.encode(src), tokenizer.encode(tgt)) for src, tgt in rows]


def encode_labelled(rows: Sequence[tuple[str, str]], tokenizer: Tokenizer,
                    label_names: Sequence[str] | None = None) -> tuple[list[Labelled], list[str]]:
    """Tokenise ``(label, text)`` rows; labels become indices into ``label_names``
    (by default the sorted distinct labels). Returns ``(examples, label_names)``."""
    label_names = sorted({label for label, _ in rows}) if label_names is None else list(label_names)
    index = {name: i for i, name in enumerate(label_names)}
    unknown = sorted({label for label, _ in rows} - index.keys())
    if unknown:
        raise ValueError(f"labels {unknown[:5]} are not in label_names={label_names}")
    return [(tokenizer.encode(text), index[label]) for label, text in rows], label_names


def split_examples(examples: Sequence, val_fraction: float = 0.1) -> tuple[list, list]:
    """The first ``1 - val_fraction`` of ``examples`` and the rest (nanoGPT-style split)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction!r}")
    n_train = int(len(examples) * (1.0 - val_fraction))
    if n_train == 0 or n_train == len(examples):
        raise ValueError(
            f"{len(examples)} examples are too few to split with val_fraction={val_fraction}")
    return list(examples[:n_train]), list(examples[n_train:])


def make_seq2seq_batch(pairs: Sequence[Pair], *, seed: int, step: int, batch_size: int,
                       src_len: int, tgt_len: int, pad_id: int, bos_id: int, eos_id: int,
                       process_index: int = 0, process_count: int = 1, rows: slice | None = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A padded batch of random pairs, determined by ``(seed, step)``.

    The decoder reads ``[bos] + target`` and predicts ``target + [eos]``; sources longer
    than ``src_len`` and targets longer than ``tgt_len - 1`` are cut (use
    ``seq2seq_lengths`` to size them). Returns this process's rows (see ``get_batch``):
    ``src`` int32 ``[b, src_len]``, ``tgt_in`` and ``tgt_out`` int32 ``[b, tgt_len]``,
    ``src_mask`` bool ``[b, src_len]`` and ``tgt_mask`` bool ``[b, tgt_len]``, True on
    real tokens; padding holds ``pad_id``.
    """
    chosen = _choose(pairs, seed, step, batch_size,
                     local_rows(batch_size, process_index, process_count, rows))
    src, src_mask = _pad([s for s, _ in chosen], src_len, pad_id, "src_len")
    tgt_in, tgt_mask = _pad([np.concatenate([[bos_id], t]) for _, t in chosen], tgt_len, pad_id,
                            "tgt_len")
    tgt_out, _ = _pad([np.concatenate([t, [eos_id]]) for _, t in chosen], tgt_len, pad_id,
                      "tgt_len")
    return src, tgt_in, tgt_out, src_mask, tgt_mask


def check_pairs(pairs: Sequence[Pair], *, max_src_len: int, max_tgt_len: int | None = None,
                source: str = "pairs") -> None:
    """Raise ValueError, before any training, unless every source is non-empty and at most
    ``max_src_len`` tokens (a source is never cut: the encoder must see all of it, at
    training and at generation alike) and, when ``max_tgt_len`` is given, every target is at
    most ``max_tgt_len - 1`` tokens (the decoder also reads bos / predicts eos; without it,
    longer targets are cut by ``make_seq2seq_batch``).

    ``source`` names the data in the message (e.g. the TSV path); rows are counted from 1
    in the order given (blank TSV lines are not rows). The message lists the first few
    offending rows and how many there are.
    """
    limits = (("max_src_len", max_src_len), ("max_tgt_len", max_tgt_len))
    for name, value in limits:
        if value is not None and (not isinstance(value, (int, np.integer)) or value < 1):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if len(pairs) == 0:
        raise ValueError(f"{source}: no (source, target) pairs")
    problems = []
    for row, (src, tgt) in enumerate(pairs, start=1):
        if len(src) == 0:
            problems.append(f"row {row}: empty source")
        elif len(src) > max_src_len:
            problems.append(f"row {row}: source of {len(src)} tokens > {max_src_len}")
        if max_tgt_len is not None and len(tgt) + 1 > max_tgt_len:
            problems.append(f"row {row}: target of {len(tgt)} tokens + eos > {max_tgt_len}")
    if problems:
        allowed = f"source <= {max_src_len}" + (
            "" if max_tgt_len is None else f", target <= {max_tgt_len - 1}")
        raise ValueError(
            f"{source}: {len(problems)} problem(s) in {len(pairs)} pairs ({'; '.join(problems[:3])}"
            f"{'; ...' if len(problems) > 3 else ''}): remove or shorten those rows, or allow "
            f"longer sequences ({allowed} tokens now)")


def seq2seq_lengths(pairs: Sequence[Pair]) -> tuple[int, int]:
    """The smallest ``(src_len, tgt_len)`` that hold every pair uncut (eos included)."""
    return max(len(s) for s, _ in pairs), max(len(t) for _, t in pairs) + 1


def make_classify_batch(examples: Sequence[Labelled], *, seed: int, step: int, batch_size: int,
                        seq_len: int, pad_id: int, cls_id: int | None = None,
                        process_index: int = 0, process_count: int = 1,
                        rows: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A padded batch of random labelled examples, determined by ``(seed, step)``.

    ``cls_id``, when given, is put before every text (BERT's [CLS] slot, for "first"
    pooling). Texts longer than ``seq_len`` are cut. Returns this process's rows (see
    ``get_batch``): ``tokens`` int32 ``[b, seq_len]``, ``padding_mask`` bool
    ``[b, seq_len]`` (True on real tokens) and ``labels`` int32 ``[b]``.
    """
    chosen = _choose(examples, seed, step, batch_size,
                     local_rows(batch_size, process_index, process_count, rows))
    prefix = np.array([] if cls_id is None else [cls_id], dtype=np.int32)
    tokens, padding_mask = _pad([np.concatenate([prefix, ids]) for ids, _ in chosen], seq_len,
                                pad_id, "seq_len")
    return tokens, padding_mask, np.array([label for _, label in chosen], dtype=np.int32)


def make_shuffle_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                       seq_len: int, pad_id: int, process_index: int = 0, process_count: int = 1,
                       rows: slice | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A batch of the synthetic shuffle task drawn fresh from ``tokens`` for ``(seed, step)``.

    Unlike a fixed list of ``shuffle_examples``, every step sees new windows, so a
    model cannot pass the task by memorising examples. Returns this process's rows
    (see ``get_batch``), laid out as ``make_classify_batch``'s.
    """
    examples = shuffle_examples(tokens, batch_size, seed=batch_rng(seed, step, EXAMPLES),
                                seq_len=seq_len)
    chosen = examples[local_rows(batch_size, process_index, process_count, rows)]
    ids, padding_mask = _pad([ids for ids, _ in chosen], seq_len, pad_id, "seq_len")
    return ids, padding_mask, np.array([label for _, label in chosen], dtype=np.int32)


def _choose(examples: Sequence, seed: int, step: int, batch_size: int, rows: slice) -> list:
    """``rows`` of a global batch drawn uniformly with replacement from ``examples``."""
    if len(examples) == 0:
        raise ValueError("examples must not be empty")
    picks = batch_rng(seed, step, EXAMPLES).integers(0, len(examples), size=batch_size)
    return [examples[i] for i in picks[rows]]


def _pad(sequences: Sequence[np.ndarray], length: int, pad_id: int, name: str
         ) -> tuple[np.ndarray, np.ndarray]:
    """Cut or pad each sequence to ``length``: ids int32 ``[n, length]`` and a bool mask."""
    if not isinstance(length, (int, np.integer)) or length < 1:
        raise ValueError(f"{name} must be a positive int, got {length!r}")
    ids = np.full((len(sequences), length), pad_id, dtype=np.int32)
    mask = np.zeros((len(sequences), length), dtype=bool)
    for row, seq in enumerate(sequences):
        n = min(len(seq), length)
        ids[row, :n] = seq[:n]
        mask[row, :n] = True
    return ids, mask
