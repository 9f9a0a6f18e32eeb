"""Reading a trained run back: `load_run(dir)` and the parameters for `--init-from`."""
from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any, Callable

import jax
import numpy as np

from transformer_jax import checkpoint, training
from transformer_jax.config import ModelConfig
from transformer_jax.run.source import HF, hf_architecture, hf_params, load_run_tokenizer, source_kind, stack_layers
from transformer_jax.tokenizers import Tokenizer
from transformer_jax.train_config import TrainConfig, read_run_config


@dataclasses.dataclass
class LoadedRun:
    """A trained run: what `load_run` returns.

    config: the run's TrainConfig (as recorded; out_dir is the directory it was loaded from).
    model_config: its ModelConfig.
    tokenizer: its tokenizer.
    params: the parameters of its best checkpoint by validation loss, else the newest,
      as jax arrays on the default device.
    model: the Flax module of its objective (DecoderLM for clm, ...), ready for
      `model.apply({"params": params}, ...)` and `generate`.
    step: the step of that checkpoint.
    task: the task facts it recorded (e.g. a classifier's label names).
    """

    config: TrainConfig
    model_config: ModelConfig
    tokenizer: Tokenizer
    params: Any
    model: Any
    step: int | None
    task: dict


def load_run(run_dir: str, *, step: int | None = None) -> LoadedRun:
    """Load the run in `run_dir` (written by `train` or `train.py`): its config, tokenizer,
    model and the parameters of checkpoint `step` (default: the best, else the newest).

    Raises:
      ValueError: `run_dir` holds no run, or no checkpoint; a damaged config.json (one line
        naming it); checkpoint.NoReadableCheckpointError when no checkpoint is readable (a
        damaged best one falls back, with a warning, to the others newest first).
    """
    from transformer_jax.objectives import get_objective

    record = read_run_config(run_dir)
    cfg = ModelConfig.from_dict(record["model"])
    config = TrainConfig(**{k: v for k, v in record["train"].items()
                            if k in {f.name for f in dataclasses.fields(TrainConfig)}},
                         out_dir=run_dir)
    tokenizer = load_run_tokenizer(run_dir)
    with checkpoint.Checkpointer(os.path.join(run_dir, "checkpoints")) as ckpt:
        chosen, params = _readable_params(ckpt, step, run_dir)
        params = jax.tree.map(jax.numpy.asarray, params)
    task = record.get("task", {})
    model = get_objective(config.objective).make_model(cfg, config, task)
    return LoadedRun(config, cfg, tokenizer, params, model, chosen, task)


def _readable_params(ckpt: checkpoint.Checkpointer, step: int | None, run_dir: str) -> tuple[int, Any]:
    """(step, params) of checkpoint `step`; by default the best, falling back (with a warning,
    renaming nothing) to the others newest first when one fails its checksums."""
    if step is not None:
        return step, ckpt.restore_params(step)
    best = ckpt.best_step()
    candidates = ([best] if best is not None else []) + [
        s for s in reversed(ckpt.all_steps()) if s != best]
    if not candidates and not ckpt.set_aside():
        raise ValueError(f"{run_dir!r} holds no checkpoint yet")
    for s in candidates:
        try:
            return s, ckpt.restore_params(s)
        except checkpoint.CorruptCheckpointError as e:
            warnings.warn(f"{e}; trying the next checkpoint", stacklevel=3)
    raise checkpoint.NoReadableCheckpointError(
        f"no readable checkpoint in {ckpt.directory} (tried steps {candidates}, set aside "
        f"earlier: {ckpt.set_aside()})")


def load_source_model(source: str, objective: str | None = None) -> tuple[ModelConfig, Tokenizer]:
    """The architecture and tokenizer that `--init-from source` fixes for a fine-tuning run:
    a run directory's, or a Hugging Face directory's (config.json and tokenizer.json).

    Raises ValueError for a directory that is neither, a Hugging Face directory without a
    tokenizer.json, or (given `objective`) one whose model cannot serve the objective.
    """
    if source_kind(source) == HF:
        cfg, _, tokenizer, _ = hf_architecture(source, objective)
        if tokenizer is None:
            raise ValueError(f"--init-from {source!r}: the Hugging Face directory has no tokenizer.json, "
                             f"and a fine-tuning run needs the model's own tokenizer")
        return cfg, tokenizer
    record = read_run_config(source)
    return ModelConfig.from_dict(record["model"]), load_run_tokenizer(source)


def source_model_config(source: str) -> ModelConfig:
    """The architecture `--init-from source` fixes (a run's or a Hugging Face directory's),
    without its tokenizer or weights."""
    if source_kind(source) == HF:
        return hf_architecture(source)[0]
    return ModelConfig.from_dict(read_run_config(source)["model"])


def load_source_params(source: str) -> Any:
    """The parameters `--init-from source` starts from (host arrays): a run directory's
    best, else newest, checkpoint, or a Hugging Face directory's weights (float32, one
    `layer_i` subtree per layer)."""
    if source_kind(source) == HF:
        return hf_params(source)
    with checkpoint.Checkpointer(os.path.join(source, "checkpoints")) as ckpt:
        return ckpt.restore_params()


def init_params_from(source: str, target: Any, say: Callable[[str], None] = print) -> Any:
    """`target` params with every leaf found (same path and shape) in `source`'s parameters
    (`load_source_params`) replaced by the saved value, placed like the target leaf.

    Raises ValueError when no parameter matches.
    """
    saved = load_source_params(source)
    if any("/layers/" in f"/{training.param_path(p)}/" for p, _ in jax.tree_util.tree_leaves_with_path(target)):
        saved = stack_layers(saved)  # the target scans its layers
    flat = {training.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(saved)}
    loaded, fresh = [], []

    def take(path, leaf):
        key = training.param_path(path)
        saved = flat.get(key)
        if saved is None or saved.shape != leaf.shape:
            fresh.append(key)
            return leaf
        loaded.append(key)
        return jax.device_put(np.asarray(saved, leaf.dtype), leaf.sharding)

    params = jax.tree_util.tree_map_with_path(take, target)
    if not loaded:
        raise ValueError(f"--init-from {source!r}: no parameter matches this model "
                         f"(saved paths look like {list(flat)[:4]})")
    say(f"--init-from {source}: loaded {len(loaded)} parameter arrays, "
        f"{len(fresh)} initialised fresh ({', '.join(fresh[:4])}{', ...' if len(fresh) > 4 else ''})")
    return params
