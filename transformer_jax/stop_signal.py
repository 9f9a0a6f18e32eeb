"""Stopping a training run on SIGTERM/SIGINT: the loop finishes its step, saves it and
says truthfully what is on disk (shared by the transformer and the word-vector loops).

    with StopSignal() as stop:
        for step in ...:
            ...                                  # train the step
            if stop.received or ...:
                try:
                    ckpt.save(done, state)
                except Exception as e:
                    if stop.received:
                        say_not_saved(ckpt, stop.received, done, e, say)
                    raise
            if stop.received:
                say_saved(ckpt, stop.received, done, say)
                break
"""
from __future__ import annotations

import signal
import threading
from typing import Callable


class StopSignal:
    """Within the block, SIGTERM/SIGINT set `received` ("SIGTERM"/"SIGINT") instead of
    ending the process, so the loop can finish its step, save it and return. A no-op
    outside the main thread (Python delivers signals to the main thread only)."""

    def __init__(self):
        self.received: str | None = None
        self._old: dict = {}

    def __enter__(self) -> StopSignal:
        if threading.current_thread() is threading.main_thread():
            self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

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
