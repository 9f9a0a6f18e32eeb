"""sentence-transformers directories: the pooling (and normalisation) after the encoder.

`modules.json` lists the pipeline: a Transformer (the directory's own model), a Pooling
module (its `config.json` says which pooling) and optionally Normalize (unit length).
Other modules (Dense, LayerNorm, ...) are refused rather than silently dropped.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp

from transformer_jax.models import pool

MODULES_FILE = "modules.json"
_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "first",
          "pooling_mode_max_tokens": "max"}
_UNSUPPORTED_MODES = ("pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                      "pooling_mode_lasttoken")


class Pooling(NamedTuple):
    """How a sentence encoder turns hidden states into one vector per sentence.

    mode: "mean" (over real tokens), "first" (the [CLS] slot) or "max"; normalize: scale
    each vector to unit L2 norm afterwards.
    """

    mode: str
    normalize: bool

    def __call__(self, hidden: jax.Array, padding_mask: jax.Array | None = None) -> jax.Array:
        """hidden [b, t, d], padding_mask bool [b, t] -> float32 embeddings [b, d]."""
        pooled = pool(hidden, padding_mask, self.mode)
        if self.normalize:  # as torch.nn.functional.normalize: divide by max(norm, 1e-12)
            pooled = pooled / jnp.maximum(jnp.linalg.norm(pooled, axis=-1, keepdims=True), 1e-12)
        return pooled


def read_pooling(directory: str) -> Pooling | None:
    """The Pooling of a sentence-transformers `directory`, or None if it is not one."""
    path = os.path.join(directory, MODULES_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        modules = json.load(f)
    mode, normalize = None, False
    for module in modules:
        kind = module.get("type", "").rsplit(".", 1)[-1]
        if kind == "Transformer":
            if module.get("path", "") != "":
                raise ValueError(f"{path!r}: the Transformer module must be the directory itself, "
                                 f"got path {module.get('path')!r}")
        elif kind == "Pooling":
            mode = _read_mode(os.path.join(directory, module.get("path", ""), "config.json"))
        elif kind == "Normalize":
            normalize = True
        else:
            raise ValueError(f"{path!r} has a {module.get('type')!r} module, which transformer_jax "
                             "does not implement (supported: Transformer, Pooling, Normalize)")
    if mode is None:
        raise ValueError(f"{path!r} has no Pooling module")
    return Pooling(mode, normalize)


def _read_mode(path: str) -> str:
    if not os.path.isfile(path):
        raise ValueError(f"the Pooling module's config {path!r} is missing")
    with open(path, encoding="utf-8") as f:
        config = json.load(f)
    on = [k for k in (*_MODES, *_UNSUPPORTED_MODES) if config.get(k)]
    if len(on) != 1 or on[0] not in _MODES:
        raise ValueError(f"{path!r} sets pooling modes {on}; transformer_jax supports exactly one of "
                         f"{sorted(_MODES)}")
    return _MODES[on[0]]


def pooling_files(pooling: Pooling, d_model: int) -> dict[str, str]:
    """The files of a sentence-transformers directory that record `pooling`, name (relative
    to the directory) -> text: modules.json and 1_Pooling/config.json."""
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    if pooling.normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                        "type": "sentence_transformers.models.Normalize"})
    config = {"word_embedding_dimension": d_model,
              **{k: pooling.mode == v for k, v in _MODES.items()},
              "pooling_mode_mean_sqrt_len_tokens": False}
    return {MODULES_FILE: json.dumps(modules, indent=2),
            os.path.join("1_Pooling", "config.json"): json.dumps(config, indent=2)}


def pooling_directories(pooling: Pooling) -> list[str]:
    """The module directories a sentence-transformers directory with `pooling` holds."""
    return ["1_Pooling", *(["2_Normalize"] if pooling.normalize else [])]
