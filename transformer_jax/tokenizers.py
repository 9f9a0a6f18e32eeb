"""Tokenizers: character-level, byte-level (UTF-8) and byte-level BPE.

Every tokenizer maps text to an int32 id array and back, and reserves four special
ids, ``pad_id``, ``bos_id``, ``eos_id`` and ``mask_id``. For the char and byte
tokenizers (and a BPE trained here) the specials come after the ordinary symbols,
so a char tokenizer's ordinary ids are simply its sorted characters. ``decode``
drops special ids.

A tokenizer is saved as ``<directory>/tokenizer.json``: Hugging Face's format for
BPE, a small JSON object under the key ``"transformer_jax"`` for char and byte.

    tok = build_tokenizer("char", text)
    ids = tok.encode(text)             # np.int32 [n]
    tok.save(out_dir); tok = load_tokenizer(out_dir)
"""
from __future__ import annotations

import abc
import hashlib
import json
import os
import re
from typing import Sequence

import numpy as np

from transformer_jax.run_dir import read_json, write_atomic

SPECIAL_TOKENS = ("<pad>", "<bos>", "<eos>", "<mask>")
TOKENIZER_FILE = "tokenizer.json"
_OWN_FORMAT_KEY = "transformer_jax"
# Long texts are BPE-encoded in pieces of about this many characters, in parallel
# (tokenizers' encode_batch runs on all cores); see BPETokenizer.encode.
PARALLEL_CHUNK_CHARS = 1 << 20
# A newline between two non-space characters: GPT-2's byte-level pre-tokenizer regex
# always makes that newline a pre-token of its own, so cutting right after it changes no
# token (with whitespace beside it, a cut could change how a whitespace run is split).
_SAFE_CUT = re.compile(r"\S\n(?=\S)")


class Tokenizer(abc.ABC):
    """Text <-> int32 ids, with special ids ``pad_id``, ``bos_id``, ``eos_id``, ``mask_id``."""

    pad_id: int
    bos_id: int
    eos_id: int
    mask_id: int

    @property
    @abc.abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, specials included; every id lies in ``[0, vocab_size)``."""

    @abc.abstractmethod
    def encode(self, text: str) -> np.ndarray:
        """Encode ``text`` into int32 ids ``[n]`` (no specials added).

        Raises ValueError when the text holds symbols the tokenizer cannot encode.
        """

    @abc.abstractmethod
    def _decode_ordinary(self, ids: np.ndarray) -> str:
        """Decode int ids that are all ordinary (non-special)."""

    @abc.abstractmethod
    def to_json(self) -> str:
        """The tokenizer as the text of its ``tokenizer.json``."""

    @property
    def special_ids(self) -> tuple[int, int, int, int]:
        """``(pad_id, bos_id, eos_id, mask_id)``."""
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id)

    def decode(self, ids: Sequence[int] | np.ndarray) -> str:
        """Decode ids ``[n]`` (any integer dtype) into text, dropping special ids."""
        ids = np.asarray(ids)
        if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
            raise ValueError(
                f"ids must be a 1-D sequence of integers, got shape {ids.shape} dtype {ids.dtype}")
        bad = ids[(ids < 0) | (ids >= self.vocab_size)]
        if bad.size:
            raise ValueError(
                f"ids must lie in [0, {self.vocab_size}), got {bad[:5].tolist()}")
        ids = ids.astype(np.int64)  # also gives an empty list a usable index dtype
        return self._decode_ordinary(ids[~np.isin(ids, self.special_ids)])

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``<directory>/tokenizer.json`` (creating the directory); return its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, TOKENIZER_FILE)
        write_atomic(path, self.to_json())  # a run killed meanwhile keeps the old file whole
        return path

    def fingerprint(self) -> str:
        """A hex digest that changes whenever the id mapping changes (for caches)."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def _set_specials_after(self, num_ordinary: int) -> None:
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = range(num_ordinary, num_ordinary + 4)


class CharTokenizer(Tokenizer):
    """One id per character: ids ``0..len(chars)-1`` are the sorted characters."""

    def __init__(self, chars: Sequence[str]):
        chars = sorted(set(chars))
        if not chars or any(len(c) != 1 for c in chars):
            raise ValueError(
                f"chars must be a non-empty collection of single characters, got {chars[:10]!r}")
        self.chars = "".join(chars)
        # Code points sorted ascending (the order of Python's str sort), for searchsorted.
        self._code_points = _code_points(self.chars)
        self._set_specials_after(len(chars))

    @classmethod
    def train(cls, text: str) -> CharTokenizer:
        """The tokenizer whose symbols are the distinct characters of ``text``."""
        if not isinstance(text, str) or not text:
            raise ValueError(
                f"text must be a non-empty str to train a char tokenizer, got {text!r:.40}")
        return cls(np.unique(_code_points(text)).view("<U1").tolist())

    @property
    def vocab_size(self) -> int:
        return len(self.chars) + 4

    def encode(self, text: str) -> np.ndarray:
        _check_text(text)
        points = _code_points(text)
        ids = np.searchsorted(self._code_points, points)
        known = self._code_points[np.minimum(ids, len(self.chars) - 1)] == points
        if not known.all():
            unseen = np.unique(points[~known]).view("<U1").tolist()
            raise ValueError(
                f"text holds {len(unseen)} character(s) unknown to this char tokenizer "
                f"(e.g. {unseen[:8]!r}); train the tokenizer on this text or use 'byte' or 'bpe'")
        return ids.astype(np.int32)

    def _decode_ordinary(self, ids: np.ndarray) -> str:
        return self._code_points[ids].astype("<u4").tobytes().decode("utf-32-le")

    def to_json(self) -> str:
        return json.dumps({_OWN_FORMAT_KEY: {"kind": "char", "chars": list(self.chars)}},
                          ensure_ascii=False)


class ByteTokenizer(Tokenizer):
    """The 256 UTF-8 byte values as ids ``0..255``, then the specials."""

    def __init__(self) -> None:
        self._set_specials_after(256)

    @property
    def vocab_size(self) -> int:
        return 260

    def encode(self, text: str) -> np.ndarray:
        _check_text(text)
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def _decode_ordinary(self, ids: np.ndarray) -> str:
        # A sampled id sequence can split a multi-byte character: show U+FFFD, don't fail.
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({_OWN_FORMAT_KEY: {"kind": "byte"}})


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) backed by a Hugging Face ``tokenizers.Tokenizer``.

    Special tokens are looked up by the names in ``SPECIAL_TOKENS`` (and a few common
    aliases for files made elsewhere); missing ones are appended to the vocabulary.
    Special-token text inside the input is encoded as ordinary text, never as a special.
    """

    _ALIASES = {
        "<pad>": ("<pad>", "[PAD]", "<|pad|>"),
        "<bos>": ("<bos>", "<s>", "[CLS]", "<|startoftext|>", "<|endoftext|>"),
        "<eos>": ("<eos>", "</s>", "[SEP]", "<|endoftext|>"),
        "<mask>": ("<mask>", "[MASK]"),
    }

    def __init__(self, hf_tokenizer):
        from tokenizers import AddedToken

        self._hf = hf_tokenizer
        ids = []
        for name, aliases in self._ALIASES.items():
            found = [i for i in map(hf_tokenizer.token_to_id, aliases) if i is not None]
            if not found:
                hf_tokenizer.add_special_tokens([AddedToken(name, special=True, normalized=False)])
                found = [hf_tokenizer.token_to_id(name)]
            ids.append(found[0])
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = ids
        hf_tokenizer.encode_special_tokens = True  # runtime flag, not stored in the file
        # Cutting at _SAFE_CUT provably leaves the tokens unchanged only for byte-level
        # pre-tokenisation with GPT-2's regex and no normaliser (what `train` builds).
        state = json.loads(hf_tokenizer.to_str())
        pre = state.get("pre_tokenizer") or {}
        self._cuttable = (state.get("normalizer") is None and pre.get("type") == "ByteLevel"
                          and pre.get("use_regex", True))

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Train byte-level BPE on ``text``; ``vocab_size`` counts the 256 bytes and 4 specials."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if not isinstance(text, str) or not text:
            raise ValueError(
                f"text must be a non-empty str to train a BPE tokenizer, got {text!r:.40}")
        if not isinstance(vocab_size, int) or vocab_size < 260:
            raise ValueError(
                f"vocab_size must be an int >= 260 (256 bytes + 4 specials), got {vocab_size!r}")
        hf = HFTokenizer(models.BPE())
        hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - len(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False)
        hf.train_from_iterator(text.splitlines(keepends=True), trainer)
        return cls(hf)

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> BPETokenizer:
        """Load a Hugging Face ``tokenizer.json``."""
        from tokenizers import Tokenizer as HFTokenizer

        if not os.path.isfile(path):
            raise ValueError(f"path must be an existing tokenizer.json file, got {str(path)!r}")
        try:
            hf = HFTokenizer.from_file(os.fspath(path))
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(
                f"{str(path)!r} is not a valid Hugging Face tokenizer.json: {e}") from None
        return cls(hf)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """Token ids of `text`. Texts longer than PARALLEL_CHUNK_CHARS are cut at newlines
        where byte-level BPE cannot merge across (`_SAFE_CUT`) and encoded on all cores; the
        result equals encoding the whole text. Tokenizers with another pre-tokenizer
        (loaded from elsewhere) are encoded in one piece."""
        _check_text(text)
        pieces = self._pieces(text) if self._cuttable else [text]
        encodings = self._hf.encode_batch(pieces, add_special_tokens=False)
        return np.concatenate([np.asarray(e.ids, dtype=np.int32) for e in encodings])

    @staticmethod
    def _pieces(text: str) -> list[str]:
        pieces, start = [], 0
        while len(text) - start > PARALLEL_CHUNK_CHARS:
            cut = _SAFE_CUT.search(text, start + PARALLEL_CHUNK_CHARS)
            if cut is None:
                break
            pieces.append(text[start:cut.end()])
            start = cut.end()
        pieces.append(text[start:])
        return pieces

    def _decode_ordinary(self, ids: np.ndarray) -> str:
        return self._hf.decode(ids.tolist(), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._hf.to_str()


def build_tokenizer(spec: str | os.PathLike, text: str | None = None,
                    vocab_size: int = 4096) -> Tokenizer:
    """Make the tokenizer named by ``spec``.

    spec: ``"char"`` (trained on ``text``), ``"byte"``, ``"bpe"`` (trained on ``text``
    with ``vocab_size`` ids), or a path to a ``tokenizer.json`` or to a directory
    holding one (as written by ``Tokenizer.save``).
    """
    if spec in ("char", "bpe") and text is None:
        raise ValueError(f"tokenizer {spec!r} is trained on the corpus: pass text")
    if spec == "char":
        return CharTokenizer.train(text)
    if spec == "byte":
        return ByteTokenizer()
    if spec == "bpe":
        return BPETokenizer.train(text, vocab_size)
    if isinstance(spec, (str, os.PathLike)) and os.path.exists(spec):
        return load_tokenizer(spec)
    raise ValueError(
        f"tokenizer spec must be 'char', 'byte', 'bpe' or an existing tokenizer.json "
        f"file or directory, got {spec!r}")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """Load a tokenizer saved by ``Tokenizer.save`` (its directory) or any ``tokenizer.json``."""
    file = os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else os.fspath(path)
    if not os.path.isfile(file):
        raise ValueError(
            f"path must be a tokenizer.json or a directory holding one, got {str(path)!r}")
    data = read_json(file, "tokenizer file")
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer file {file!r} holds a JSON {type(data).__name__}, expected an "
                         f"object (Hugging Face's tokenizer.json or {{{_OWN_FORMAT_KEY!r}: ...}})")
    if _OWN_FORMAT_KEY not in data:
        return BPETokenizer.from_file(file)
    own = data[_OWN_FORMAT_KEY]
    kind = own.get("kind") if isinstance(own, dict) else None
    if kind == "char":
        chars = own.get("chars")
        if not (isinstance(chars, list) and chars and all(isinstance(c, str) and len(c) == 1 for c in chars)):
            raise ValueError(f"tokenizer file {file!r}: a char tokenizer needs \"chars\", a non-empty "
                             f"list of single characters, got {str(chars)[:60]}")
        return CharTokenizer(chars)
    if kind == "byte":
        return ByteTokenizer()
    raise ValueError(f"tokenizer file {file!r}: {_OWN_FORMAT_KEY!r} must be an object whose \"kind\" "
                     f"is 'char' or 'byte', got {str(own)[:60]}")


def _check_text(text: str) -> None:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")


def _code_points(text: str) -> np.ndarray:
    """Unicode code points of ``text`` as uint32 ``[len(text)]`` (vectorised, no Python loop)."""
    return np.frombuffer(text.encode("utf-32-le"), dtype="<u4")
