"""Checkpoints of a TrainState with Orbax: async, atomic, keep-last-N plus best, with fallback.

A checkpoint holds three Orbax items: "params", "opt_state" and "progress"
({"step", "rng"}: the data position and the dropout key), so a run continues
exactly, and fine-tuning can read the parameters alone.

Atomicity comes from Orbax: a step is written to `<step>.orbax-checkpoint-tmp-*`
and renamed to `<step>` only once complete, and unfinished temporary directories
are never listed as steps (and are removed when a manager opens the directory).
A step that is listed but unreadable (corrupted or truncated files) is skipped
with a warning by `restore`, which falls back to the next older one.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint.checkpoint_managers import preservation_policy as policies

from transformer_jax.training import TrainState

_ITEMS = ("params", "opt_state", "progress")


class Checkpointer:
    """An Orbax CheckpointManager over one run's checkpoint directory.

    Args:
      directory: where the step directories live (created if missing): a local path
        (made absolute) or a URL such as gs://bucket/run (kept as given).
      max_to_keep: the newest `max_to_keep` checkpoints are kept ...
      keep_best: ... plus the `keep_best` with the lowest validation loss.
      async_save: write in a background thread (the device-to-host copy is still
        synchronous, so the caller may donate the state right after `save`).
    """

    def __init__(self, directory: str, *, max_to_keep: int = 3, keep_best: int = 1,
                 async_save: bool = True):
        if not (isinstance(max_to_keep, int) and max_to_keep >= 1):
            raise ValueError(f"max_to_keep={max_to_keep!r}: expected a positive int")
        if not (isinstance(keep_best, int) and keep_best >= 0):
            raise ValueError(f"keep_best={keep_best!r}: expected an int >= 0")
        self.directory = _resolve_directory(directory)
        policy = policies.AnyPreservationPolicy([
            policies.LatestN(n=max_to_keep),
            # reverse=True sorts by descending loss and keeps the tail: the lowest.
            policies.BestN(get_metric_fn=_val_loss, reverse=True, n=keep_best,
                           keep_checkpoints_without_metrics=False),
        ])
        options = ocp.CheckpointManagerOptions(
            preservation_policy=policy,
            # Orbax writes metrics to disk only when it tracks a best_fn.
            best_fn=_val_loss,
            best_mode="min",
            enable_async_checkpointing=async_save,
            cleanup_tmp_directories=True,
            create=True,
        )
        # Naming the handlers lets a fresh manager read item metadata (restore_params).
        handlers = {name: ocp.StandardCheckpointHandler() for name in _ITEMS}
        self._manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    # ------------------------------------------------------------------ queries

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        return sorted(self._manager.all_steps())

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def best_step(self) -> int | None:
        """The step with the lowest saved validation loss (None if none has one)."""
        scored = [(m["val_loss"], s) for s in self.all_steps()
                  if (m := self._manager.metrics(s)) and "val_loss" in m]
        return min(scored)[1] if scored else None

    # ------------------------------------------------------------------ save

    def save(self, step: int, state: TrainState, *, val_loss: float | None = None,
             force: bool = False) -> bool:
        """Start saving `state` as checkpoint `step` (returns once the arrays are on the host).

        Raises ValueError, and writes nothing, if any parameter or optimizer value
        is non-finite. Returns False if a checkpoint for `step` (or a later one)
        already exists and `force` is False.
        """
        if not _all_finite((state.params, state.opt_state)):
            raise ValueError(f"refusing to save a non-finite train state at step {step}")
        # Always a dict (Orbax warns on a missing one); without val_loss it ranks last.
        metrics = {} if val_loss is None else {"val_loss": float(val_loss)}
        progress = {"step": state.step, "rng": state.rng}
        return self._manager.save(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardSave(state.params),
                opt_state=ocp.args.StandardSave(state.opt_state),
                progress=ocp.args.StandardSave(progress),
            ),
            metrics=metrics,
            force=force,
        )

    def wait(self) -> None:
        """Block until pending asynchronous saves are on disk."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def __enter__(self) -> Checkpointer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ restore

    def restore(self, target: TrainState, step: int | None = None) -> TrainState | None:
        """Restore onto `target`, a TrainState of jax.ShapeDtypeStruct (with shardings).

        With `step=None`: the newest readable checkpoint; unreadable newer ones are
        reported with a warning and renamed to `<step>.corrupt-<time>` so that later
        saves can reuse their step numbers. Returns None if there is no checkpoint.
        With an explicit `step`, errors propagate.
        """
        if step is not None:
            return self._restore_step(target, step)
        steps = self.all_steps()
        for s in reversed(steps):
            try:
                return self._restore_step(target, s)
            except Exception as e:  # noqa: BLE001 - any failure to read means "corrupt"
                warnings.warn(
                    f"checkpoint at step {s} in {self.directory} is unreadable "
                    f"({type(e).__name__}: {str(e)[:200]}); falling back to an older one",
                    stacklevel=2,
                )
                self._quarantine(s)
        if steps:
            raise RuntimeError(f"no readable checkpoint in {self.directory} (tried steps {steps})")
        return None

    def restore_params(self, step: int | None = None) -> Any:
        """The parameters alone as NumPy arrays, from `step` or else the best, else the latest
        checkpoint; readable on any machine, whatever mesh saved them."""
        step = step if step is not None else self.best_step()
        step = step if step is not None else self.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        host = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=host),
                              self._manager.item_metadata(step)["params"])
        restored = self._manager.restore(
            step, args=ocp.args.Composite(params=ocp.args.StandardRestore(target)))
        return jax.tree.map(np.asarray, restored["params"])

    def _restore_step(self, target: TrainState, step: int) -> TrainState:
        progress = {"step": target.step, "rng": target.rng}
        restored = self._manager.restore(
            step,
            args=ocp.args.Composite(
                params=ocp.args.StandardRestore(target.params),
                opt_state=ocp.args.StandardRestore(target.opt_state),
                progress=ocp.args.StandardRestore(progress),
            ),
        )
        p = restored["progress"]
        return TrainState(step=p["step"], params=restored["params"],
                          opt_state=restored["opt_state"], rng=p["rng"])

    def _quarantine(self, step: int) -> None:
        if jax.process_index() == 0:
            path = epath.Path(self.directory) / str(step)
            if path.is_dir():
                path.rename(path.parent / f"{step}.corrupt-{int(time.time())}")
        self._manager.reload()


def _resolve_directory(directory: str | os.PathLike) -> str:
    """`directory` as a string: local paths made absolute, URLs ("gs://bucket/run", any path
    containing "://") left untouched, as Orbax opens them through etils.epath."""
    directory = os.fspath(directory)
    return directory if "://" in directory else os.path.abspath(directory)


def abstract_state(state: Any, shardings: Any = None) -> Any:
    """jax.ShapeDtypeStruct leaves for `state` (arrays or ShapeDtypeStructs), placed on
    `shardings` (a matching tree) or, if None, on each leaf's own sharding / device 0."""
    default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if shardings is None:
        shardings = jax.tree.map(lambda x: getattr(x, "sharding", None) or default, state)
    return jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, shardings)


@jax.jit
def _finite_flags(leaves):
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def _all_finite(tree: Any) -> bool:
    leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.inexact)]
    return not leaves or bool(_finite_flags(leaves))


def _val_loss(metrics: dict) -> float:
    return metrics.get("val_loss", math.inf)
