"""`TrainConfig`: every setting of a training run, as `train.py`'s flags spell them.

Fields left at None are filled by `resolve` from the device (a few CPU minutes on a
CPU; nanoGPT's Shakespeare character model on an accelerator) and from the other
fields. The resolved config is what a run records in its `config.json`.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from typing import Any

from transformer_jax.config import ModelConfig, get_config

# Settings that may change when a run is resumed (the rest must match the saved run).
RESUMABLE = ("max_steps", "eval_every", "eval_batches", "checkpoint_every", "log_every",
             "keep_checkpoints", "skip_nonfinite", "sample_tokens")
# Settings derived from max_steps unless given: they follow it when a run is extended.
DERIVED_FROM_MAX_STEPS = ("warmup_steps", "decay_steps")
# The settings config.json records under "train" (the others concern this process only:
# where the run lives, how it starts, which devices it uses).
RECORDED = ("objective", "data", "tokenizer", "batch_size", "seq_len", "accum_steps", "lr",
            "warmup_steps", "decay_steps", "weight_decay", "grad_clip", "label_smoothing",
            "freeze", "pooling", "seed", "init_from", *RESUMABLE)
# The CPU default model: char-small shrunk to a few CPU minutes (nanoGPT's "baby GPT").
CPU_MODEL = dict(d_model=128, num_heads=4, num_layers=4, d_ff=512)
CPU_DEFAULTS = dict(batch_size=16, seq_len=64, max_steps=1000, lr=2e-3, eval_batches=8, log_every=20)
ACCELERATOR_DEFAULTS = dict(batch_size=64, seq_len=256, max_steps=5000, lr=1e-3, eval_batches=20,
                            log_every=10)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run. `train.py --flag-name` sets the field `flag_name`; the model
    flags (`--d-model`, `--vocab-size`, ...) go into `model` as ModelConfig overrides.

    Attributes (None = derived by `resolve`):
      objective: a registered objective ("clm", "mlm", "seq2seq", "classify", ...).
      preset: a `get_config` preset (default: a small char model on CPU, char-small on
        accelerators; with `init_from`, the source run's architecture).
      data: the objective's data (default: the objective's own, e.g. "stdlib").
      tokenizer: "char" | "byte" | "bpe" | a tokenizer.json path.
      out_dir: the run directory (default: `default_out_dir(self)`).
      init_from: fine-tune from the parameters of this run directory.
      resume / overwrite: insist on resuming / discard an existing run in `out_dir`.
      model: ModelConfig field overrides; `vocab_size` sizes a BPE tokenizer.
      dropout, dtype: ModelConfig's dropout_rate and dtype.
      distributed_timeout_s: multi-process runs: seconds to wait for every process to join
        (`sharding.initialize_distributed`) before exiting with a one-line error.
      compile_cache: keep jitted programs in JAX's persistent compilation cache.
      reuse_host_memory: CPU: malloc keeps each step's freed temp memory for the next step
        (`run.host_memory`: ~20% cheaper steps; the loop then keeps one step in flight, not
        two). None (default): wherever it can apply (glibc, computing on the CPU, `train`
        running before JAX's first computation) and pays: a step whose temp buffer,
        estimated from the model and batch (`run.step_memory`), is above glibc's 32 MiB mmap
        threshold. True: wherever it can apply, whatever the size, and `train` says when it
        could not; False: off.
      onednn: CPU: the steps' matrix products through oneDNN, an experimental XLA option
        (`run.compiler_options`).
      The rest: see `train.py --help`.
    """

    objective: str = "clm"
    preset: str | None = None
    data: str | None = None
    tokenizer: str = "char"
    out_dir: str | None = None
    init_from: str | None = None
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    max_steps: int | None = None
    batch_size: int | None = None
    seq_len: int | None = None
    accum_steps: int = 1
    lr: float | None = None
    warmup_steps: int | None = None
    decay_steps: int | None = None
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    label_smoothing: float | None = None
    pooling: str = "first"
    freeze: str | None = None
    skip_nonfinite: bool = False
    dtype: str | None = None
    dropout: float | None = None
    eval_every: int | None = None
    eval_batches: int | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    keep_checkpoints: int = 3
    sample_tokens: int = 300
    mesh: str | None = None
    coordinator_address: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    distributed_timeout_s: float = 300.0
    compile_cache: bool = True
    reuse_host_memory: bool | None = None
    onednn: bool = False
    model: dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "seq_len", "accum_steps", "decay_steps",
                     "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "keep_checkpoints", "num_processes"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name}={value!r}: expected a positive integer")
        for name in ("warmup_steps", "sample_tokens", "process_id"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise ValueError(f"{name}={value!r}: expected an integer >= 0")
        if not (isinstance(self.distributed_timeout_s, (int, float))
                and math.isfinite(self.distributed_timeout_s) and self.distributed_timeout_s > 0):
            raise ValueError(f"distributed_timeout_s={self.distributed_timeout_s!r}: expected a "
                             f"positive number of seconds")
        if self.lr is not None and not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr={self.lr!r}: expected a positive number")
        for name in ("weight_decay", "grad_clip"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name}={value!r}: expected a number >= 0")
        for name in ("label_smoothing", "dropout"):
            value = getattr(self, name)
            if value is not None and not 0 <= value < 1:
                raise ValueError(f"{name}={value!r}: expected a number in [0, 1)")
        if self.pooling not in ("mean", "first"):
            raise ValueError(f"pooling={self.pooling!r}: expected 'mean' or 'first'")
        unknown = set(self.model) - {f.name for f in dataclasses.fields(ModelConfig)}
        if unknown:
            raise ValueError(f"model overrides {sorted(unknown)}: not ModelConfig fields")

    def resolve(self, accelerator: bool) -> TrainConfig:
        """This config with every None filled in (see the module docstring); validates the
        combination. `accelerator`: defaults for a GPU/TPU rather than a CPU."""
        from transformer_jax.objectives import get_objective

        objective = get_objective(self.objective)
        d = ACCELERATOR_DEFAULTS if accelerator else CPU_DEFAULTS
        preset, model, dropout = self.preset, dict(self.model), self.dropout
        if preset is None and self.init_from is None:
            preset = "char-small"
            if not accelerator:
                model = {**CPU_MODEL, "max_len": self.seq_len or d["seq_len"], **model}
                dropout = 0.0 if dropout is None else dropout
        seq_len = self.seq_len or min(d["seq_len"], self._context(preset, model))
        max_steps = self.max_steps or d["max_steps"]
        decay = self.decay_steps or max_steps
        warmup = min(200, decay // 20) if self.warmup_steps is None else self.warmup_steps
        lr = self.lr or (d["lr"] if self.init_from is None else d["lr"] / 10)
        out = dataclasses.replace(
            self, preset=preset, model=model, dropout=dropout, seq_len=seq_len,
            batch_size=self.batch_size or d["batch_size"], max_steps=max_steps, lr=lr,
            decay_steps=decay, warmup_steps=warmup,
            eval_every=self.eval_every or min(250, max_steps),
            eval_batches=self.eval_batches or d["eval_batches"],
            log_every=self.log_every or min(d["log_every"], max_steps),
            checkpoint_every=self.checkpoint_every or min(1000, max_steps),
            dtype=self.dtype or ("bfloat16" if accelerator else "float32"),
            label_smoothing=(objective.default_label_smoothing if self.label_smoothing is None
                             else self.label_smoothing),
            data=self.data or objective.default_data,
            out_dir=self.out_dir or default_out_dir(self))
        if out.batch_size % out.accum_steps:
            raise ValueError(f"--batch-size={out.batch_size} is not divisible by "
                             f"--accum-steps={out.accum_steps}")
        if out.warmup_steps >= out.decay_steps:
            raise ValueError(f"--warmup-steps={out.warmup_steps} must be smaller than "
                             f"--decay-steps={out.decay_steps}")
        return out

    def _context(self, preset: str | None, model: dict) -> int:
        """The longest sequence the model takes: its learned position table, else unbounded."""
        if "max_len" in model:
            return model["max_len"]
        if preset is None:  # --init-from: the source run's model
            from transformer_jax.run.load import source_model_config

            base = source_model_config(self.init_from)
        else:
            base = get_config(preset)
        return base.max_len

    def derived(self) -> list[str]:
        """The fields of DERIVED_FROM_MAX_STEPS left to `resolve` (call on the unresolved config)."""
        return [name for name in DERIVED_FROM_MAX_STEPS if getattr(self, name) is None]

    def record(self) -> dict:
        """The "train" section of config.json (call on a resolved config)."""
        return {name: getattr(self, name) for name in RECORDED}

    def model_overrides(self, vocab_size: int) -> dict[str, Any]:
        """ModelConfig overrides of this (resolved) config for a tokenizer of `vocab_size`."""
        overrides = {**self.model, "vocab_size": vocab_size, "dtype": self.dtype}
        if self.dropout is not None:
            overrides["dropout_rate"] = self.dropout
        return overrides


def default_out_dir(config: TrainConfig) -> str:
    """runs/<objective>[-<preset>]-<data>, e.g. runs/clm-stdlib (the default model),
    runs/clm-gpt2-small-my_corpus or runs/classify-from-mlm-shuffle (--init-from runs/mlm):
    each example of the README gets its own run."""
    from transformer_jax.objectives import get_objective

    model = config.preset or (f"from-{_label(config.init_from)}" if config.init_from else None)
    data = _label(config.data or get_objective(config.objective).default_data)
    return os.path.join("runs", "-".join(p for p in (config.objective, model, data) if p))


def _label(path: str) -> str:
    """A short file-name-safe label of a path or name."""
    name = os.path.basename(os.path.normpath(path)) or "data"
    name = os.path.splitext(name)[0] or name
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def read_run_config(run_dir: str) -> dict:
    """The run's config.json ({"model", "train", "task"}); ValueError if there is none."""
    from transformer_jax.run_dir import read_json

    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        raise ValueError(f"{run_dir!r} holds no run (no config.json)")
    return read_json(path, "the run's config")
