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
    "flax_attention_fn": "transformer_jax.attention",
    "select_implementation": "transformer_jax.attention",
    "Selection": "transformer_jax.attention",
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
    "init_cache": "transformer_jax.models",
    "check_tokens": "transformer_jax.models",
    "count_params": "transformer_jax.models",
    "flops_per_token": "transformer_jax.models",
    # generation
    "generate": "transformer_jax.generation",
    "generate_text": "transformer_jax.generation",
    "generate_windowed": "transformer_jax.generation",
    "GenerateOutput": "transformer_jax.generation",
    # sentence embeddings and semantic search
    "SentenceEncoder": "transformer_jax.search",
    "VectorIndex": "transformer_jax.search",
    # tokenizers and data
    "Tokenizer": "transformer_jax.tokenizers",
    "CharTokenizer": "transformer_jax.tokenizers",
    "ByteTokenizer": "transformer_jax.tokenizers",
    "BPETokenizer": "transformer_jax.tokenizers",
    "build_tokenizer": "transformer_jax.tokenizers",
    "load_tokenizer": "transformer_jax.tokenizers",
    "load_text": "transformer_jax.data",
    "prepare_tokens": "transformer_jax.data",
    "get_batch": "transformer_jax.data",
    # training and checkpoints
    "TrainState": "transformer_jax.training",
    "make_optimizer": "transformer_jax.training",
    "init_train_state": "transformer_jax.training",
    "make_train_step": "transformer_jax.training",
    "make_schedule": "transformer_jax.training",
    "make_loss_fn": "transformer_jax.training",
    "cross_entropy": "transformer_jax.training",
    "Checkpointer": "transformer_jax.checkpoint",
    # pretrained models (the Hugging Face format)
    "from_pretrained": "transformer_jax.pretrained",
    "save_pretrained": "transformer_jax.pretrained",
    "Pretrained": "transformer_jax.pretrained",
    "Pooling": "transformer_jax.pretrained",
    "minilm_path": "transformer_jax.pretrained",
    # training runs
    "TrainConfig": "transformer_jax.train_config",
    "train": "transformer_jax.run",
    "TrainResult": "transformer_jax.run",
    "load_run": "transformer_jax.run",
    "LoadedRun": "transformer_jax.run",
    "Objective": "transformer_jax.objectives",
    "register_objective": "transformer_jax.objectives",
    "get_objective": "transformer_jax.objectives",
    # scaling out
    "make_mesh": "transformer_jax.sharding",
    "initialize_distributed": "transformer_jax.sharding",
    "state_shardings": "transformer_jax.sharding",
    "batch_sharding": "transformer_jax.sharding",
    "make_global_batch": "transformer_jax.sharding",
    "process_batch_slice": "transformer_jax.sharding",
    "use_mesh": "transformer_jax.sharding",
    "LOGICAL_RULES": "transformer_jax.sharding",
    # word vectors
    "WordVectorConfig": "transformer_jax.word_vectors",
    "train_word_vectors": "transformer_jax.word_vectors",
    "load_word_vectors": "transformer_jax.word_vectors",
    "KeyedVectors": "transformer_jax.word_vectors",
    "WordVectorEncoder": "transformer_jax.word_vectors",
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
