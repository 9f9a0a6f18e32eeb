"""The run directory: whether to resume it, and what is written into it before training.

`config.json` records {"model": ModelConfig, "train": TrainConfig.record(), "task": the
task's facts, "derived": the schedule settings derived from max_steps}. A run resumes
when its recorded config matches, except the RESUMABLE settings and the DERIVED ones
(so `--max-steps` can extend a finished run; its warmup and decay follow). A model field
added to the package after the run was recorded counts as its default there (what the
run was trained with), and the resumed run is built with that default unless the command
names the field (see `transformer_jax.run.trainer.build_task`).

The directory rules and the one-writer lock are transformer_jax/run_dir.py's (issue 12):
a run never deletes what it did not write; `validate_out_dir` judges the directory without
changing it, `lock_out_dir` takes the lock (process 0) and, for --overwrite, removes the
package's own files under it.
"""
from __future__ import annotations

import contextlib
import os
from typing import Any

from transformer_jax import run_dir
from transformer_jax.config import field_defaults
from transformer_jax.train_config import DERIVED_FROM_MAX_STEPS, RESUMABLE


def validate_out_dir(out_dir: str, record: dict, *, overwrite: bool, resume: bool) -> bool:
    """True if `out_dir` holds a compatible run to resume; False for a fresh start.

    Raises ValueError (run_dir.RunDirError) for an incompatible run, `resume` with nothing
    to resume, a non-empty folder that is not a run, or a run that lost its config.json;
    reads only (nothing is created or removed here).
    """
    status = run_dir.prepare_run_dir(out_dir, overwrite=overwrite, resume=resume, dry_run=True)
    if not status.resume:
        return False
    old = {**status.config, "model": recorded_model(status.config)}
    free = set(RESUMABLE) | (set(old.get("derived", ())) & set(record.get("derived", ())))
    diffs = [f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
             for section in ("model", "train", "task") for k, v in record[section].items()
             if not (section == "train" and k in free) and old.get(section, {}).get(k) != v]
    if diffs:
        raise ValueError(
            f"--out-dir {out_dir!r} holds a run with a different configuration ("
            + "; ".join(diffs[:6]) + "): pass --overwrite to replace it, or another --out-dir")
    return True


def recorded_model(record: Any) -> dict:
    """The model config a run's config.json records, with the fields it lacks (the run was
    recorded before they existed) at their defaults, the values it was trained with."""
    model = record.get("model") if isinstance(record, dict) else None
    return {**field_defaults(), **model} if isinstance(model, dict) else {}


def agree_on_out_dir(out_dir: str, record: dict, *, overwrite: bool, resume: bool) -> bool:
    """`validate_out_dir` decided on process 0 alone and broadcast to every process, so that
    all agree although process 0 may be rewriting a shared `out_dir` meanwhile.

    The broadcast is a collective, so it also keeps process 0 from writing before every
    process has read what it needs from the directory (a resumed run's tokenizer).
    Process 0 re-raises its ValueError after the broadcast; the others raise one too.
    """
    import jax

    decision, error = 0, None  # 1: resume, 0: start fresh
    if jax.process_index() == 0:
        try:
            decision = int(validate_out_dir(out_dir, record, overwrite=overwrite, resume=resume))
        except ValueError as e:
            decision, error = run_dir.REJECTED, e
    return run_dir.agree(decision, error, out_dir) == 1


def lock_out_dir(out_dir: str, *, overwrite: bool, resuming: bool) -> contextlib.ExitStack:
    """Process 0 takes the one-writer lock of `out_dir` (`run_dir.open_run_dir`, which
    re-checks the directory under it and, for a fresh --overwrite'n run, removes the
    package's own files, nothing else); the lock is released when the returned stack
    exits. Its failure is broadcast, so every process raises instead of waiting for
    process 0 (run_dir.RunLockedError everywhere when another run holds the lock).
    """
    stack = contextlib.ExitStack()
    stack.enter_context(run_dir.open_run_dir_on_all_processes(
        out_dir, overwrite=overwrite and not resuming, resume=resuming))
    return stack


def prepare_out_dir(out_dir: str, record: dict, tokenizer, *, resuming: bool) -> None:
    """Process 0, under the lock of `lock_out_dir`: a fresh run writes config.json and the
    tokenizer; a resumed run records its resumable changes (e.g. a larger max_steps) in
    config.json. (An --overwrite'n run was emptied of the package's files by the lock.)
    """
    if not resuming:
        tokenizer.save(out_dir)
    run_dir.write_json_atomic(os.path.join(out_dir, run_dir.CONFIG_FILE), record)


def run_record(model_config: dict, train_record: dict, task_facts: dict, derived: list[str]) -> dict:
    """The contents of config.json."""
    return {"model": model_config, "train": train_record, "task": task_facts,
            "derived": [k for k in derived if k in DERIVED_FROM_MAX_STEPS]}
