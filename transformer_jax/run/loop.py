"""The training loop: steps, the non-finite guard, logging, evaluation, checkpoints, and
stopping on SIGTERM/SIGINT after a saved step."""
from __future__ import annotations

import math
import sys
import time
from typing import Any, Callable

import jax
import numpy as np

from transformer_jax import training
from transformer_jax.objectives import Objective, Task
from transformer_jax.run.steps import CompiledRun
from transformer_jax.run_log import RunLog
from transformer_jax.stop_signal import StopSignal, say_saved
from transformer_jax.train_config import TrainConfig


class FiniteGuard:
    """Reads a step's metrics and stops the run on a non-finite loss or gradient
    (or counts the skipped update, with skip_nonfinite)."""

    def __init__(self, skip: bool, ckpt, say):
        self.skip, self.ckpt, self.say, self.skipped = skip, ckpt, say, 0

    def check(self, done: int, metrics) -> dict:
        m = jax.device_get(metrics)
        if not m["finite"]:
            if not self.skip:
                raise FloatingPointError(
                    f"non-finite loss or gradient at step {done} (loss {m['loss']}, grad norm "
                    f"{m['grad_norm']}); stopping without saving (latest checkpoint: step "
                    f"{self.ckpt.latest_step()}). Pass --skip-nonfinite to skip such steps.")
            self.skipped += 1
            self.say(f"step {done}: non-finite loss or gradient, update skipped")
        return m


def train_loop(config: TrainConfig, objective: Objective, task: Task, flops_per_token: float | None,
               run: CompiledRun, state, ckpt, stop: StopSignal, say: Callable[[str], None],
               is_main: bool) -> tuple[Any, float | None]:
    """Steps from state.step to config.max_steps (or a stop signal); logs, evaluates,
    checkpoints. Returns (state, last validation loss or None).

    Host-side checks run one step behind the device (the next step is already queued when
    a step's metrics are read). With `config.reuse_host_memory` in effect it waits for each
    step before queueing the next instead: with malloc keeping freed memory
    (`run.host_memory`), two steps' temp buffers alive at once grow the heap for good.
    tokens/s leaves out the first step of the process, which compiles, and evaluation time;
    that first step's wall time is logged as first_step_sec.
    """
    start = int(state.step)
    log = RunLog(config.out_dir, start, enabled=is_main)
    peak = training.peak_flops(jax.devices()[0])
    bar = _progress(config.max_steps, start, enabled=is_main and sys.stderr.isatty())
    guard = FiniteGuard(config.skip_nonfinite, ckpt, say)
    t_start = time.perf_counter()
    t_log, step_log, first_step_sec, pending, first_record = t_start, start, None, None, True
    val_loss = None

    def evaluate(params) -> float:
        sums = [run.eval_step(params, run.put(b)) for b in task.val_batches]
        total, weight = np.sum(jax.device_get(sums), axis=0)
        return float(total / max(weight, 1.0))

    try:
        for step in range(start, config.max_steps):
            state, metrics = run.train_step(state, run.put(task.train_batch(step)))
            if config.reuse_host_memory:  # one step in flight (see the docstring)
                jax.block_until_ready(metrics)
            done = step + 1
            if first_step_sec is None:  # compiled and ran: start the tokens/s clock here
                jax.block_until_ready(metrics)
                t_log = time.perf_counter()
                first_step_sec, step_log = t_log - t_start, done
            if pending is not None:  # one step behind, so the device stays busy
                guard.check(*pending)
            pending = (done, metrics)
            last = done == config.max_steps or stop.pending()
            if not (last or done % config.log_every == 0 or done % config.eval_every == 0
                    or done % config.checkpoint_every == 0):
                bar.update(1)
                continue
            m = guard.check(*pending)
            pending = None
            now = time.perf_counter()
            # Only the compiling first step so far: its own rate, compilation included.
            steps, seconds = (done - step_log, now - t_log) if done > step_log else (1, first_step_sec)
            rate = steps * task.tokens_per_batch / seconds
            t_log, step_log = now, done
            record = {"step": done, "train_loss": float(m["loss"]), "lr": float(run.schedule(step)),
                      "tokens_per_sec": rate, "grad_norm": float(m["grad_norm"]),
                      "elapsed_sec": now - t_start}
            if first_record:
                record["first_step_sec"], first_record = first_step_sec, False
            if peak and flops_per_token:
                record["mfu"] = rate * flops_per_token / (peak * run.num_devices)
            step_val = None
            if last or done % config.eval_every == 0:
                step_val = val_loss = evaluate(state.params)
                record["val_loss"] = val_loss
                if objective.perplexity:
                    record["val_ppl"] = math.exp(min(val_loss, 50.0))
                t_log = time.perf_counter()  # keep evaluation out of tokens/s
            log.write(record)
            bar.update(1)
            _report(record, task.baseline, say if not bar.enabled else bar.write)
            # asked again here: a signal that arrived during evaluation or logging stops now.
            # Every process reaches this line at the same steps (those that log, evaluate or save).
            stopping = stop.now(sync_point=True)
            if last or stopping or done % config.checkpoint_every == 0:
                stopping = stop.save(ckpt, done, state, say, val_loss=step_val)
            if stopping:
                say_saved(ckpt, stopping, done, say)
                break
        if pending is not None:
            guard.check(*pending)
    finally:
        bar.close()
        ckpt.wait()
        log.close()
    if guard.skipped:
        say(f"{guard.skipped} step(s) skipped for non-finite values")
    return state, val_loss


def _report(record: dict, baseline: float | None, write) -> None:
    parts = [f"step {record['step']}", f"loss {record['train_loss']:.4f}",
             f"lr {record['lr']:.2e}", f"{record['tokens_per_sec']:,.0f} tok/s"]
    if "mfu" in record:
        parts.append(f"MFU {100 * record['mfu']:.1f}%")
    if "val_loss" in record:
        ppl = f" (ppl {record['val_ppl']:.2f})" if "val_ppl" in record else ""
        parts.append(f"val loss {record['val_loss']:.4f}{ppl}")
        if baseline:  # (a one-symbol corpus has entropy 0)
            parts.append(f"= {record['val_loss'] / baseline:.0%} of the unigram entropy")
    write(" | ".join(parts))


class _NoBar:
    enabled = False

    def update(self, n):
        pass

    def close(self):
        pass


def _progress(total: int, initial: int, enabled: bool):
    if not enabled:
        return _NoBar()
    from tqdm import tqdm
    bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)
    bar.enabled = True
    return bar
