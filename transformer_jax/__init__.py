"""transformer_jax: functional Flax transformers on a pluggable attention core.

Public names are re-exported lazily, so `import transformer_jax` stays cheap and
each submodule is imported the first time one of its names is used.
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    # attention
    "dot_product_attention": "transformer_jax.attention",
    "select_implementation": "transformer_jax.attention",
    # configs
    "ModelConfig": "transformer_jax.config",
    "get_config": "transformer_jax.config",
    "list_presets": "transformer_jax.config",
    # models
    "DecoderLM": "transformer_jax.models",
    "Encoder": "transformer_jax.models",
    "MaskedLM": "transformer_jax.models",
    "SequenceClassifier": "transformer_jax.models",
    "EncoderDecoder": "transformer_jax.models",
    "pool": "transformer_jax.models",
    # generation
    "generate": "transformer_jax.generation",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'transformer_jax' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return __all__
