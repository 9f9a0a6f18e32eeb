"""The run directory: whether to resume it, and what is written into it before training.

`config.json` records {"model": ModelConfig, "train": TrainConfig.record(), "task": the
task's facts, "derived": the schedule settings derived from max_steps}. A run resumes
when its recorded config matches, except the RESUMABLE settings and the DERIVED ones
(so `--max-steps` can extend a finished run; its warmup and decay follow).

The out-dir safety rules and the one-writer lock (transformer_jax/run_dir.py, issue 12)
plug in at `validate_out_dir` and `prepare_out_dir`, the only places that judge or
write the directory before training.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from transformer_jax.train_config import DERIVED_FROM_MAX_STEPS, RESUMABLE


def validate_out_dir(out_dir: str, record: dict, *, overwrite: bool, resume: bool) -> bool:
    """True if `out_dir` holds a compatible run to resume; False for a fresh start.

    Raises ValueError for an incompatible run, or `resume` with nothing to resume.
    RUN-DIR PLUG-IN (issue 12): the safety rules on what a fresh run may replace go here.
    """
    path = os.path.join(out_dir, "config.json")
    if resume and (overwrite or not os.path.exists(path)):
        raise ValueError(f"--resume needs an existing run in {out_dir!r} (and no --overwrite)")
    if overwrite or not os.path.exists(path):
        return False
    with open(path) as f:
        old = json.load(f)
    free = set(RESUMABLE) | (set(old.get("derived", ())) & set(record.get("derived", ())))
    diffs = [f"{section}.{k}: {old.get(section, {}).get(k)!r} -> {v!r}"
             for section in ("model", "train", "task") for k, v in record[section].items()
             if not (section == "train" and k in free) and old.get(section, {}).get(k) != v]
    if diffs:
        raise ValueError(
            f"--out-dir {out_dir!r} holds a run with a different configuration ("
            + "; ".join(diffs[:6]) + "): pass --overwrite to replace it, or another --out-dir")
    return True


def agree_on_out_dir(out_dir: str, record: dict, *, overwrite: bool, resume: bool) -> bool:
    """`validate_out_dir` decided on process 0 alone and broadcast to every process, so that
    all agree although process 0 may be rewriting a shared `out_dir` meanwhile.

    The broadcast is a collective, so it also keeps process 0 from writing before every
    process has read what it needs from the directory (a resumed run's tokenizer).
    Process 0 re-raises its ValueError after the broadcast; the others raise one too.
    """
    import jax

    decision, error = 0, None  # 1: resume, 0: start fresh, -1: invalid
    if jax.process_index() == 0:
        try:
            decision = int(validate_out_dir(out_dir, record, overwrite=overwrite, resume=resume))
        except ValueError as e:
            decision, error = -1, e
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        decision = int(multihost_utils.broadcast_one_to_all(np.int32(decision)))
    if error is not None:
        raise error
    if decision < 0:
        raise ValueError(f"--out-dir {out_dir!r} was rejected by process 0 (see its error)")
    return decision == 1


def prepare_out_dir(out_dir: str, record: dict, tokenizer, *, resuming: bool) -> None:
    """Process 0, once every setting has been validated: a fresh run empties `out_dir` (an
    --overwrite) and writes config.json and the tokenizer; a resumed run records its
    resumable changes (e.g. a larger max_steps) in config.json.

    RUN-DIR PLUG-IN (issue 12): take the one-writer lock and clear only what the package
    wrote here.
    """
    if not resuming:
        if os.path.isdir(out_dir):
            for name in os.listdir(out_dir):
                full = os.path.join(out_dir, name)
                shutil.rmtree(full) if os.path.isdir(full) else os.remove(full)
        os.makedirs(out_dir, exist_ok=True)
        tokenizer.save(out_dir)
    write_json(os.path.join(out_dir, "config.json"), record)


def write_json(path: str, value: dict) -> None:
    """Write `value` to `path` atomically (a temporary name, then a rename)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
    os.replace(tmp, path)


def run_record(model_config: dict, train_record: dict, task_facts: dict, derived: list[str]) -> dict:
    """The contents of config.json."""
    return {"model": model_config, "train": train_record, "task": task_facts,
            "derived": [k for k in derived if k in DERIVED_FROM_MAX_STEPS]}
