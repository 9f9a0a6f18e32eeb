"""`train(config)`: start, resume or extend the run in `config.out_dir` and train it."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from typing import Any, Callable

import jax
import numpy as np

from transformer_jax import checkpoint, run_dir, sharding, tokenizers
from transformer_jax.config import ModelConfig, field_defaults, get_config
from transformer_jax.objectives import Task, TaskInputs, get_objective
from transformer_jax.run import host_memory
from transformer_jax.run import out_dir as run_dir_lib
from transformer_jax.run.compile_cache import disable_compile_cache, enable_compile_cache
from transformer_jax.run.load import init_params_from, load_source_model, source_model_config
from transformer_jax.run.source import load_run_tokenizer
from transformer_jax.run.loop import train_loop
from transformer_jax.run.step_memory import estimate_step_temp_bytes
from transformer_jax.run.steps import compile_run, make_run_mesh
from transformer_jax.stop_signal import StopSignal
from transformer_jax.train_config import TrainConfig


@dataclasses.dataclass
class TrainResult:
    """What `train` did.

    config: the resolved TrainConfig (every default filled in; out_dir included).
    step: the step the run stands at.
    val_loss: the last validation loss of this call (None if it trained no step).
    sample: the final sample / demonstration text (None if skipped).
    already_finished: the run had reached max_steps before this call (nothing trained).
    stopped_by: "SIGTERM"/"SIGINT" if a signal stopped it (after saving), else None.
    state: the final TrainState (None where nothing trained).
    """

    config: TrainConfig
    step: int
    val_loss: float | None = None
    sample: str | None = None
    already_finished: bool = False
    stopped_by: str | None = None
    state: Any = None


def build_task(config: TrainConfig) -> tuple[Task, ModelConfig, Any]:
    """(task, model config, tokenizer) of a resolved `config`, with the data checked
    before anything compiles.

    `init_from` fixes the architecture and tokenizer to the source's; an existing run in
    `out_dir` (to be resumed) keeps its own tokenizer.
    """
    tokenizer, base_cfg, legacy = None, None, {}
    if config.init_from:
        base_cfg, tokenizer = load_source_model(config.init_from, config.objective)
    existing = os.path.join(config.out_dir, "config.json")
    if os.path.exists(existing) and not config.overwrite:
        tokenizer = load_run_tokenizer(config.out_dir)
        legacy = _fields_recorded_before_they_existed(existing, config)

    def model_config(vocab_size: int) -> ModelConfig:
        overrides = {**legacy, **config.model_overrides(vocab_size)}
        if base_cfg is not None:
            return dataclasses.replace(base_cfg, **overrides)
        return get_config(config.preset, **overrides)

    objective = get_objective(config.objective)
    inputs = TaskInputs(config, model_config, tokenizer, config.model.get("vocab_size") or 4096)
    task, cfg, tokenizer = objective.build_task(inputs)
    first = task.train_batch(0)
    widths = [first[k].shape[-1] for k in objective.token_keys if k in first and first[k].ndim == 2]
    if cfg.pos_encoding == "learned" and widths and max(widths) > cfg.max_len:
        raise ValueError(f"--seq-len={config.seq_len} exceeds the model's max_len={cfg.max_len}: "
                         f"pass --max-len {config.seq_len} or a shorter --seq-len")
    for batch in (first, *task.val_batches):
        objective.check_batch(batch, cfg)
    return task, cfg, tokenizer


def _fields_recorded_before_they_existed(path: str, config: TrainConfig) -> dict:
    """The model fields (with their defaults) that the run recorded at `path` lacks and the
    command does not set: a run from before a field existed (e.g. `fused_qkv`, which the
    presets now turn on) resumes with the value it was trained with."""
    try:
        record = run_dir.read_json(path, "the run's config")
    except (OSError, ValueError):
        return {}  # judged, with an error naming it, by validate_out_dir
    model = record.get("model") if isinstance(record, dict) else None
    if not isinstance(model, dict):
        return {}
    return {k: v for k, v in field_defaults().items() if k not in model and k not in config.model}


def _reuse_host_memory(config: TrainConfig) -> bool:
    """Apply `run.host_memory`'s setting as `config.reuse_host_memory` asks (None: where the
    step's temp buffer is one that malloc would map afresh on every step); whether it is in
    effect (False cannot undo an earlier run's: the loop must then still keep one step in
    flight)."""
    wanted = config.reuse_host_memory
    if wanted is None:
        wanted = host_memory.cpu_only() and host_memory.worth_it(_step_temp_bytes(config))
    return host_memory.reuse_freed_host_memory() if wanted else host_memory.in_effect()


def _step_temp_bytes(config: TrainConfig) -> int:
    """`run.step_memory`'s estimate for `config` on the CPU, before JAX starts (a tokenizer
    still to be built counts as 256 symbols, a BPE one as 4096)."""
    resolved = config.resolve(accelerator=False)
    if resolved.init_from:
        cfg = source_model_config(resolved.init_from)
    else:
        vocab = resolved.model.get("vocab_size") or (256 if resolved.tokenizer in ("char", "byte") else 4096)
        cfg = get_config(resolved.preset, **resolved.model_overrides(vocab))
    return estimate_step_temp_bytes(
        cfg, resolved.batch_size // resolved.accum_steps, resolved.seq_len,
        encoder_decoder=get_objective(resolved.objective).model_kind == "encoder_decoder")


def train(config: TrainConfig, *, say: Callable[[str], None] | None = None) -> TrainResult:
    """Train as `config` says: validate everything, then start, resume or overwrite the run
    in `config.out_dir` and train to `max_steps` (or a SIGTERM/SIGINT, after which the step
    is finished and saved). A run that already reached `max_steps` is left as it is (pass
    a larger `max_steps` to extend it).

    `say` prints progress (default: print on process 0, nothing elsewhere).

    Raises ValueError for invalid settings, data or run directories (before writing
    anything; run_dir.RunLockedError when another live process holds the run), for a
    run whose checkpoints are all unreadable (checkpoint.NoReadableCheckpointError) or do
    not fit the model (checkpoint.CheckpointMismatchError); FloatingPointError for a
    non-finite step without `skip_nonfinite`; run_dir.DiskFullError (an OSError) for a
    full disk.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config={config!r}: expected a TrainConfig")
    reused = _reuse_host_memory(config)  # first: it must come before JAX starts its backends
    sharding.initialize_distributed(config.coordinator_address, config.num_processes, config.process_id,
                                    timeout_s=config.distributed_timeout_s)
    enable_compile_cache() if config.compile_cache else disable_compile_cache()
    # reuse_host_memory: from here on, whether it is in effect (the loop reads it)
    resolved = dataclasses.replace(config.resolve(accelerator=jax.default_backend() != "cpu"),
                                   reuse_host_memory=bool(reused))
    is_main = jax.process_index() == 0
    say = say or (print if is_main else (lambda *a, **k: None))
    if config.reuse_host_memory is True and not reused:
        say("reuse_host_memory: not applied (JAX had already started its backends, or this is not a "
            "CPU-only setup on glibc; see transformer_jax.run.host_memory)")
    objective = get_objective(resolved.objective)

    task, cfg, tokenizer = build_task(resolved)
    record = run_dir_lib.run_record(cfg.to_dict(), resolved.record(), task.extra, config.derived())
    resuming = run_dir_lib.agree_on_out_dir(resolved.out_dir, record, overwrite=resolved.overwrite,
                                            resume=resolved.resume)
    run = compile_run(task, objective, lr=resolved.lr, warmup_steps=resolved.warmup_steps,
                      decay_steps=resolved.decay_steps, batch_size=resolved.batch_size,
                      weight_decay=resolved.weight_decay, grad_clip=resolved.grad_clip,
                      freeze=resolved.freeze, seed=resolved.seed, label_smoothing=resolved.label_smoothing,
                      accum_steps=resolved.accum_steps, mesh=make_run_mesh(resolved.mesh),
                      onednn=resolved.onednn)
    # Only once every setting has been validated: one writer per run (process 0 holds the
    # lock until the run ends), and a full disk anywhere in the run is one error naming it.
    with run_dir.disk_full_as_error(resolved.out_dir, "training"), \
            run_dir_lib.lock_out_dir(resolved.out_dir, overwrite=resolved.overwrite, resuming=resuming):
        return _train_locked(resolved, objective, task, cfg, tokenizer, record, run, resuming,
                             is_main, say)


def _train_locked(resolved: TrainConfig, objective, task: Task, cfg: ModelConfig, tokenizer,
                  record: dict, run, resuming: bool, is_main: bool,
                  say: Callable[[str], None]) -> TrainResult:
    """`train`'s body once the run directory is locked: write it, restore, train, sample."""
    if is_main:
        run_dir_lib.prepare_out_dir(resolved.out_dir, record, tokenizer, resuming=resuming)
    if jax.process_count() > 1:  # no process reads the directory before process 0 has written it
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices("train: out-dir ready")

    ckpt = checkpoint.Checkpointer(os.path.join(resolved.out_dir, "checkpoints"),
                                   max_to_keep=resolved.keep_checkpoints)
    mesh_ctx = sharding.use_mesh(run.mesh) if run.mesh is not None else contextlib.nullcontext()
    with ckpt, StopSignal() as stop:
        with mesh_ctx:
            state = None
            if resuming:
                state = ckpt.restore(checkpoint.abstract_state(run.abstract, run.state_sharding))
            start = 0 if state is None else int(state.step)
            if start >= resolved.max_steps:
                say(f"{resolved.out_dir} already finished: it stands at step {start} "
                    f"(--max-steps {resolved.max_steps}). To train it further, re-run with a larger "
                    f"--max-steps (e.g. --max-steps {2 * resolved.max_steps}); warmup and decay follow it "
                    f"unless you set them. To generate from it: python train.py sample --out-dir "
                    f"{resolved.out_dir}")
                return TrainResult(resolved, start, already_finished=True)
            if state is None:
                state = run.init_state()
                if resolved.init_from:
                    state = state.replace(params=init_params_from(resolved.init_from, state.params, say))
            n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.abstract.params))
            say(f"{resolved.objective}: {n_params / 1e6:.2f}M params ({cfg.d_model}d x {cfg.num_layers}L, "
                f"{cfg.dtype}), vocab {cfg.vocab_size}, batch {resolved.batch_size} x {resolved.seq_len}, "
                f"{resolved.max_steps} steps on {run.num_devices} {jax.default_backend()} device(s), "
                f"into {resolved.out_dir}" + (f"; resuming at step {start}" if start else ""))
            if task.baseline is not None:
                say(f"unigram entropy of the training tokens: {task.baseline:.3f} nats")
            flops = None
            if objective.model_kind == "decoder_lm":
                from transformer_jax.models import flops_per_token
                flops = float(flops_per_token(cfg, resolved.seq_len))
            state, val_loss = train_loop(resolved, objective, task, flops, run, state, ckpt, stop, say,
                                         is_main)
        result = TrainResult(resolved, int(state.step), val_loss, stopped_by=stop.stopping, state=state)
        # Outside the mesh, on one device: generation under the mesh's sharding rules would
        # make XLA rematerialise every sharded weight. (Multi-process: params span hosts,
        # and generation here is single-process.)
        if not stop.stopping and jax.process_count() == 1 and resolved.sample_tokens and task.show:
            result.sample = task.show(jax.device_get(state.params))
            run_dir.write_atomic(os.path.join(resolved.out_dir, "sample.txt"), result.sample + "\n")
            say(("sample:\n" if "\n" in result.sample else "") + result.sample)
    return result
