"""A Hugging Face `tokenizer.json` behind the package's `Tokenizer` interface.

`encode(text)` gives the ids without special tokens (the interface's rule, what training
on a corpus wants); `encode_batch(texts)` gives what the model saw in training: special
tokens added by the file's post-processor ([CLS] ... [SEP] for BERT), truncated to
`max_length` (the sequence keeps its final special token), no padding.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

import numpy as np

from transformer_jax.run_dir import write_atomic
from transformer_jax.tokenizers import TOKENIZER_FILE, Tokenizer

CONFIG_FILE = "tokenizer_config.json"

# Names a special token goes by in the files of common models.
_SPECIALS = {
    "pad": ("[PAD]", "<pad>", "<|pad|>"),
    "bos": ("[CLS]", "<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "<|endoftext|>"),
    "eos": ("[SEP]", "</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "<|im_end|>"),
    "mask": ("[MASK]", "<mask>"),
}


class HFTokenizer(Tokenizer):
    """A `tokenizers.Tokenizer` with the model's special ids and maximum length.

    Attributes: pad_id, bos_id, eos_id, mask_id (-1 where the model has no such token;
    pad_id falls back to eos_id, as GPT-2 users do), max_length (most ids a sequence of
    `encode_batch` gets: the model's limit).
    """

    def __init__(self, json_text: str, *, max_length: int, special_ids: dict[str, int | None] | None = None):
        from tokenizers import Tokenizer as _HF

        self._json = json_text
        self._hf = _HF.from_str(json_text)
        self._hf.no_padding()  # a file may ask for fixed-width padding (MiniLM's does)
        self._hf.no_truncation()
        # `encode_batch` truncates, `encode` never does: a second copy (no shared state to
        # toggle), parsed on first use since parsing is much of a model's load time.
        self._hf_batch = None
        self.max_length = int(max_length)
        ids = dict(special_ids or {})
        for name, aliases in _SPECIALS.items():
            if ids.get(name) is None:
                found = [i for i in map(self._hf.token_to_id, aliases) if i is not None]
                ids[name] = found[0] if found else None
        if ids["pad"] is None:
            ids["pad"] = ids["eos"]
        self.pad_id, self.bos_id, self.eos_id, self.mask_id = (
            -1 if ids[n] is None else int(ids[n]) for n in ("pad", "bos", "eos", "mask"))

    @classmethod
    def from_directory(cls, directory: str, hf_config: dict, max_length: int) -> HFTokenizer | None:
        """The tokenizer of a model directory (None when it has no tokenizer.json)."""
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as f:
            text = f.read()
        specials = {n: hf_config.get(f"{n}_token_id") for n in ("pad", "bos", "eos")}
        specials = {n: (v[0] if isinstance(v, list) else v) for n, v in specials.items()}
        try:
            return cls(text, max_length=max_length, special_ids=specials)
        except Exception as e:  # the Rust side raises a bare Exception
            raise ValueError(f"{path!r} is not a valid Hugging Face tokenizer.json: {e}") from None

    @classmethod
    def from_saved(cls, directory: str) -> HFTokenizer:
        """The tokenizer `save` wrote into `directory` (tokenizer.json + tokenizer_config.json):
        the same ids, special tokens and maximum length."""
        from tokenizers import Tokenizer as _HF

        with open(os.path.join(directory, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        with open(os.path.join(directory, TOKENIZER_FILE), encoding="utf-8") as f:
            text = f.read()
        vocab = _HF.from_str(text)
        specials = {n: vocab.token_to_id(config[f"{n}_token"]) for n in ("pad", "bos", "eos", "mask")
                    if config.get(f"{n}_token") is not None}
        return cls(text, max_length=int(config["model_max_length"]), special_ids=specials)

    @property
    def vocab_size(self) -> int:
        return self._hf.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> np.ndarray:
        """int32 ids [n] of `text`, without special tokens and untruncated."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return np.asarray(self._hf.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """One int32 id array per text, special tokens added, at most `max_length` ids."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be a sequence of str")
        if self._hf_batch is None:
            from tokenizers import Tokenizer as _HF

            batch = _HF.from_str(self._json)
            batch.no_padding()
            batch.enable_truncation(self.max_length)
            self._hf_batch = batch
        return [np.asarray(e.ids, np.int32) for e in self._hf_batch.encode_batch(list(texts))]

    def _decode_ordinary(self, ids: np.ndarray) -> str:
        return self._hf.decode(ids.tolist(), skip_special_tokens=True)

    def to_json(self) -> str:
        """The tokenizer.json text as it was read."""
        return self._json

    def files(self) -> dict[str, str]:
        """The files `save` writes, name -> text: tokenizer.json as it was read, and a
        tokenizer_config.json that transformers' AutoTokenizer reads (special tokens, maximum length)."""
        names = {n: self._hf.id_to_token(i) for n, i in
                 (("pad_token", self.pad_id), ("bos_token", self.bos_id), ("eos_token", self.eos_id),
                  ("mask_token", self.mask_id)) if i >= 0}
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": self.max_length, **names}
        return {TOKENIZER_FILE: self._json, CONFIG_FILE: json.dumps(config, indent=2)}

    def save(self, directory: str | os.PathLike) -> str:
        """Write `files()` into `directory` (each atomically); return tokenizer.json's path."""
        os.makedirs(directory, exist_ok=True)
        for name, text in self.files().items():
            write_atomic(os.path.join(directory, name), text)
        return os.path.join(directory, TOKENIZER_FILE)
