"""run/host_memory.py: malloc keeps XLA's freed CPU temp buffers, so their pages stop faulting.

Each case runs in a fresh Python: the setting is process-wide and must come before JAX
starts its backends (this test process started them long ago).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys

import pytest

from transformer_jax.run import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GLIBC = platform.system() == "Linux" and platform.libc_ver()[0] == "glibc"
needs_glibc = pytest.mark.skipif(not GLIBC, reason="mallopt is glibc's")

# One jitted call whose compiled temp buffer is a single 64 MiB array (exp(x), the dot's
# operand); it reports the temp size and each call's minor page faults after a first call.
# One device (not the suite's eight) pinned to one core: with more, the runtime may free a
# call's buffer only after the next call took a new one, and the heap grows by a buffer now
# and then (the memory cost the module's docstring states).
PROBE = """
import json, os, resource, sys
os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
from transformer_jax.run.host_memory import reuse_freed_host_memory
mode = sys.argv[1]
applied = reuse_freed_host_memory() if mode in ("reuse", "accelerator") else None
import jax, jax.numpy as jnp
late = reuse_freed_host_memory() if mode == "late" else None  # imported, backends not started
if mode == "accelerator":  # asked while JAX_PLATFORMS named a GPU; compute on the CPU here
    jax.config.update("jax_platforms", "cpu")
f = jax.jit(lambda x: jnp.dot(jnp.exp(x), jnp.cos(x)[::-1]))
x = jnp.ones((1 << 24,), jnp.float32)
compiled = f.lower(x).compile()
compiled(x).block_until_ready()
faults = []
for _ in range(8):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    compiled(x).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "late": late, "faults": faults,
                  "temp_pages": compiled.memory_analysis().temp_size_in_bytes // 4096}))
"""


def probe(mode: str, **env: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": "", "PYTHONPATH": ROOT, **env},
                         timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


@needs_glibc
def test_reused_host_memory_stops_the_temp_buffer_faulting_every_call():
    plain, reused = probe("plain"), probe("reuse")
    pages = plain["temp_pages"]
    assert pages >= (64 << 20) // 4096  # the premise: a block malloc would mmap afresh
    assert plain["applied"] is None and reused["applied"] is True
    assert min(plain["faults"]) >= pages  # every page of the temp buffer, on every call
    # the heap may still grow by a buffer in the first calls (the module's memory cost); then
    # the freed buffer is the next call's
    assert max(reused["faults"][4:]) < pages // 10


@needs_glibc
def test_it_is_in_time_until_the_backends_start_and_refuses_after():
    late = probe("late")  # jax imported, no backend yet
    assert late["late"] is True and max(late["faults"][4:]) < late["temp_pages"] // 10
    import jax

    jax.devices()  # this process: started; the runtime's threads hold their own arenas
    assert host_memory.backends_started()
    assert host_memory.reuse_freed_host_memory() is False


@needs_glibc
def test_it_changes_nothing_where_an_accelerator_may_compute():
    gpu = probe("accelerator", JAX_PLATFORMS="cuda")
    assert gpu["applied"] is False and min(gpu["faults"]) >= gpu["temp_pages"]


def test_cpu_only_reads_the_chosen_platforms(monkeypatch):
    monkeypatch.setattr(host_memory.sys, "modules", {k: v for k, v in sys.modules.items() if k != "jax"})
    for chosen, expected in (("cpu", True), ("cuda", False), ("cpu,tpu", False), (" cpu ", True)):
        monkeypatch.setenv("JAX_PLATFORMS", chosen)
        assert host_memory.cpu_only() is expected, chosen


TRAIN_PY_PROBE = """
import json, sys
from transformer_jax.run import host_memory
real = host_memory.reuse_freed_host_memory
def report(applied): print(json.dumps({"applied": applied})); raise SystemExit(0)
host_memory.reuse_freed_host_memory = lambda: report(real())
host_memory.in_effect = lambda: report("not asked")
import train
train.main(sys.argv[1:])
"""


def train_py_applied(tmp_path, *flags: str):
    """What train.py with `flags` did about it, as its trainer's first act, before any backend
    exists (the run stops right there): True/False from `reuse_freed_host_memory`, or "not
    asked" where it decided against it."""
    out = subprocess.run([sys.executable, "-c", TRAIN_PY_PROBE, "--out-dir", str(tmp_path / "run"), *flags],
                         capture_output=True, text=True, cwd=ROOT,
                         env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": ROOT}, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])["applied"]


@needs_glibc
def test_train_py_applies_it_before_jax_starts_where_the_step_buffer_is_large(tmp_path):
    assert train_py_applied(tmp_path) is True  # the default model: a ~50 MiB buffer
    assert train_py_applied(tmp_path, "--preset", "tiny") == "not asked"  # under 1 MiB
    assert train_py_applied(tmp_path, "--preset", "tiny", "--reuse-host-memory") is True
    assert train_py_applied(tmp_path, "--no-reuse-host-memory") == "not asked"


def test_the_default_follows_the_estimated_step_buffer(monkeypatch):
    from transformer_jax import TrainConfig
    from transformer_jax.run import trainer

    monkeypatch.setattr(host_memory, "cpu_only", lambda: True)
    monkeypatch.setattr(host_memory, "reuse_freed_host_memory", lambda: "applied")
    assert trainer._reuse_host_memory(TrainConfig()) == "applied"  # train.py's default model
    assert trainer._reuse_host_memory(TrainConfig(preset="char-small")) == "applied"
    assert trainer._reuse_host_memory(TrainConfig(preset="tiny", batch_size=8)) is False
    # the default model below the line: a quarter of its batch, or micro-batches of 4
    assert trainer._reuse_host_memory(TrainConfig(batch_size=4)) is False
    assert trainer._reuse_host_memory(TrainConfig(batch_size=8, accum_steps=2)) is False
    monkeypatch.setattr(host_memory, "cpu_only", lambda: False)  # an accelerator's buffers are not malloc's
    assert trainer._reuse_host_memory(TrainConfig()) is False


def test_train_py_and_train_config_defaults():
    import train
    from transformer_jax import TrainConfig

    assert TrainConfig().reuse_host_memory is None  # wherever it pays
    parse = lambda *argv: train.config_from_args(train.build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse().reuse_host_memory is None
    assert parse("--no-reuse-host-memory").reuse_host_memory is False
    assert parse("--reuse-host-memory").reuse_host_memory is True


def test_train_says_when_it_could_not_apply_what_was_asked(tmp_path):
    import jax

    from transformer_jax import TrainConfig, train

    jax.devices()  # as in a notebook that computed something first: too late
    said = {}
    for asked in (True, None):
        lines = said[asked] = []
        result = train(TrainConfig(preset="tiny", max_steps=1, seq_len=16, batch_size=4, mesh="none",
                                   sample_tokens=0, compile_cache=False, out_dir=str(tmp_path / str(asked)),
                                   reuse_host_memory=asked), say=lines.append)
        assert result.config.reuse_host_memory is False  # the resolved config: not in effect
    assert any(line.startswith("reuse_host_memory: not applied") for line in said[True]), said[True]
    assert not any("reuse_host_memory" in line for line in said[None]), said[None]  # the default: quiet


def test_the_loop_runs_one_step_at_a_time_while_it_is_in_effect(tmp_path, monkeypatch):
    # in effect, two steps' temp buffers alive at once would grow the kept heap for good
    # (the module's docstring): the loop waits for each step before queueing the next
    import jax

    from transformer_jax import TrainConfig, train

    real_wait, waited = jax.block_until_ready, []
    monkeypatch.setattr(jax, "block_until_ready", lambda x: waited.append(1) or real_wait(x))
    counts = {}
    for in_effect in (False, True):
        monkeypatch.setattr(host_memory, "reuse_freed_host_memory", lambda: in_effect)
        waited.clear()
        train(TrainConfig(preset="tiny", max_steps=5, seq_len=16, batch_size=4, mesh="none", sample_tokens=0,
                          compile_cache=False, log_every=100, eval_every=100, checkpoint_every=100,
                          reuse_host_memory=True, out_dir=str(tmp_path / str(in_effect))), say=lambda _: None)
        counts[in_effect] = len(waited)
    # one wait per step on top of the loop's own (the first step's, for its timing)
    assert counts[True] - counts[False] == 5, counts


def test_asking_for_off_after_it_was_applied_still_keeps_one_step_in_flight(tmp_path, monkeypatch):
    from transformer_jax import TrainConfig, train

    monkeypatch.setattr(host_memory, "_applied", True)  # an earlier train() in this process
    result = train(TrainConfig(preset="tiny", max_steps=1, seq_len=16, batch_size=4, mesh="none", sample_tokens=0,
                               compile_cache=False, out_dir=str(tmp_path / "run"), reuse_host_memory=False),
                   say=lambda _: None)
    assert result.config.reuse_host_memory is True  # irreversible: the loop still runs one step at a time
