"""malloc keeps the host memory a CPU training step frees, for the next step (glibc).

XLA's CPU runtime takes every call's temp buffer from malloc and frees it when the call
ends (0.2 GB a step at the `small` benchmark model, 3.4 GB at `char-small`). glibc serves a
block that large with a fresh mmap, so each of its 4 KiB pages faults, and is zeroed by
the kernel, again on every step: a fifth of a `small` CPU step, a quarter of `char-small`'s
(benchmarks/RESULTS.md).

`reuse_freed_host_memory` sets three malloc parameters: one arena for every thread (a
thread's own arena cannot hold a block over 64 MiB and would mmap it), large blocks from
the heap instead of mmap, and no trimming of the heap back to the OS. A step's temp buffer
is then memory an earlier step freed, and its pages stay mapped.

The price is memory held, not returned: freed blocks are reused only where they still fit
(XLA asks for 64-byte aligned blocks, which glibc 2.36 serves from a hole only if it is a
little larger than the block), so with two steps' buffers alive at once the heap grew by
three or four buffers (1.4 GB instead of 0.8 at `small`, 11 GB instead of 4.5 at
`char-small`). The training loop therefore runs one step at a time when this is applied
(`run.loop.train_loop`): the heap then stays within about one buffer of the peak of a run
without it (measured 0.8-1.0 GB at `small`, 4.3 GB at `char-small`).

It pays only for a temp buffer above glibc's largest mmap threshold (`worth_it`): a smaller
freed block is served from the heap again anyway, and one arena shared by every thread
slows their small allocations (the `tiny` preset's steps ran 30-55% slower). `train`
applies it by default where the step's estimated buffer is above it
(`TrainConfig.reuse_host_memory`, `run.step_memory`).

It must run before JAX starts its backends (the first computation, `jax.devices()`,
`jax.default_backend()`): the runtime's threads take their malloc arenas then, and keep
them. It applies only where JAX computes on the CPU (`JAX_PLATFORMS=cpu`, or no accelerator
plugin installed): an accelerator's buffers are not malloc's.
"""
from __future__ import annotations

import ctypes
import importlib.metadata
import importlib.util
import os
import platform
import sys

# glibc's mallopt parameters (malloc.h)
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
M_ARENA_MAX = -8
NEVER_TRIM = -1  # mallopt(3): "Setting M_TRIM_THRESHOLD to -1 disables trimming completely"
# glibc's mmap threshold rises to the size of each mmapped block freed, up to this
# (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit); a block at most this large is then reused from the heap
MMAP_THRESHOLD_MAX = 32 << 20


def worth_it(temp_bytes: int) -> bool:
    """Whether steps whose temp buffer is `temp_bytes` gain from `reuse_freed_host_memory`:
    only a buffer that malloc would otherwise map afresh on every call. Measured with
    train.py's default model (benchmarks/RESULTS.md): +29% tokens/s at a 46 MiB buffer,
    about even at 23 MiB, -22% at 12 MiB, -30% at the `tiny` preset's 0.7 MiB."""
    return temp_bytes > MMAP_THRESHOLD_MAX


def backends_started() -> bool:
    """Whether JAX has created its backends (and with them its runtime threads) already."""
    if "jax" not in sys.modules:
        return False
    from jax._src import xla_bridge  # JAX has no public query for this

    return xla_bridge.backends_are_initialized()


def cpu_only() -> bool:
    """Whether JAX will compute on the CPU alone: JAX_PLATFORMS (or jax.config) names only
    "cpu", or names nothing and no accelerator plugin (CUDA, ROCm, TPU) is installed."""
    chosen = sys.modules["jax"].config.jax_platforms if "jax" in sys.modules else os.environ.get("JAX_PLATFORMS")
    if chosen:
        return all(name.strip() == "cpu" for name in chosen.split(","))
    return (not importlib.metadata.entry_points(group="jax_plugins")
            and importlib.util.find_spec("jax_plugins") is None and importlib.util.find_spec("libtpu") is None)


_applied = False  # by an earlier call in this process


def in_effect() -> bool:
    """Whether `reuse_freed_host_memory` has been applied in this process."""
    return _applied


def reuse_freed_host_memory() -> bool:
    """Make malloc keep and reuse freed memory for the rest of the process, so XLA's per-call
    CPU temp buffers stop faulting in fresh pages (at the memory cost in the module's
    docstring). Returns True when in effect (applied now or by an earlier call); False,
    changing nothing, off glibc, where an accelerator may compute (`cpu_only`), or once
    JAX's backends have started (too late to reach the runtime's threads). Process-wide
    and irreversible."""
    global _applied
    if _applied:
        return True
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or not cpu_only() \
            or backends_started():
        return False
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # each returns 1 on success; all are tried, so no failure hides behind another
    results = [mallopt(M_ARENA_MAX, 1), mallopt(M_MMAP_MAX, 0), mallopt(M_TRIM_THRESHOLD, NEVER_TRIM)]
    _applied = all(r == 1 for r in results)
    return _applied
