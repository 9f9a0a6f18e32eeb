"""Stopping a training run on SIGTERM/SIGINT: the loop finishes its step, saves it and
says truthfully what is on disk (shared by the transformer and the word-vector loops).

    with StopSignal() as stop:
        for step in ...:
            ...                                  # train (and log) the step
            stopping = stop.now(sync_point=...)  # the same steps on every process
            if stopping or ...:
                stopping = stop.save(ckpt, done, state, say)
            if stopping:
                say_saved(ckpt, stopping, done, say)
                break

On a multi-process run a signal reaches the processes at different steps (or only some of
them), but a checkpoint save is collective: a process saving while another runs its next
step would hang both. So there the processes agree, at sync points every process passes at
the same step, and all stop after that step.
"""
from __future__ import annotations

import signal
import threading
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils

_SIGNALS = ("SIGTERM", "SIGINT")  # all-gathered as 1 + their index; 0: none


class StopSignal:
    """Within the block, SIGTERM/SIGINT set `received` ("SIGTERM"/"SIGINT") instead of
    ending the process, so the loop can finish its step, save it and return. A no-op
    outside the main thread (Python delivers signals to the main thread only)."""

    def __init__(self):
        self.received: str | None = None  # this process's signal, as it arrived
        self.stopping: str | None = None  # the stop the loop acted on (every process agrees)
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def pending(self) -> str | None:
        """A signal to act on before the next sync point: this process's on a one-process run
        (a step that would not log can still stop at once); None on several processes,
        which act only at sync points."""
        return self.received if jax.process_count() == 1 else None

    def now(self, sync_point: bool) -> str | None:
        """The stop to act on after this step ("SIGTERM"/"SIGINT" or None), the same on every
        process; also recorded as `stopping`.

        One process: its signal, at any step. Several: None except at a `sync_point`, where
        every process's signal is all-gathered (a collective: every process must call it at
        the same steps) and any one signal stops them all.
        """
        if jax.process_count() == 1:
            self.stopping = self.received
        elif sync_point:
            code = 0 if self.received is None else 1 + _SIGNALS.index(self.received)
            codes = [int(c) for c in np.ravel(multihost_utils.process_allgather(np.int32(code))) if c]
            if codes:
                self.stopping = self.received or _SIGNALS[codes[0] - 1]
        return self.stopping

    def save(self, ckpt, step: int, state, say: Callable[[str], None], **kwargs) -> str | None:
        """Starts `ckpt.save(step, state, **kwargs)` (a checkpoint.Checkpointer) and returns the
        stop to act on after it: a signal that arrived during the save stops now, its step
        being saved. Call it at the same steps on every process. A save that fails at once
        while stopping is said (`say_not_saved`) before its error is re-raised."""
        try:
            ckpt.save(step, state, **kwargs)
        except Exception as e:
            if self.stopping:
                say_not_saved(ckpt, self.stopping, step, e, say)
            raise
        return self.now(sync_point=True)

    def __exit__(self, *exc) -> None:
        for s, handler in self._old.items():
            signal.signal(s, handler)
        self._old = {}


def say_saved(ckpt, signal_name: str, step: int, say: Callable[[str], None]) -> None:
    """After a stop signal's save of `step` (started with `ckpt.save`): "saved step N" only
    once it is on disk, else that it could not save, why, and the latest step on disk.

    `ckpt`: a checkpoint.Checkpointer (its `wait` and `latest_step`). Re-raises the error of
    a save that failed (e.g. run_dir.DiskFullError), after saying so.
    """
    try:
        ckpt.wait()
    except Exception as e:
        say_not_saved(ckpt, signal_name, step, e, say)
        raise
    if ckpt.latest_step() == step:
        say(f"{signal_name} received: saved step {step}, exiting")
    else:
        say(f"{signal_name} received: could not save step {step}; the latest checkpoint is step "
            f"{ckpt.latest_step()}, exiting")


def say_not_saved(ckpt, signal_name: str, step: int, error: BaseException,
                  say: Callable[[str], None]) -> None:
    """A stop signal's save of `step` failed with `error` (the caller re-raises it): say so,
    why, and which step is the latest on disk."""
    say(f"{signal_name} received: could not save step {step} ({error}); the latest checkpoint "
        f"is step {ckpt.latest_step()}, exiting")
