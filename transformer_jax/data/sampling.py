"""Deterministic randomness for batches: one NumPy Generator per (seed, step, stream).

Every batch function draws the *global* batch from ``batch_rng(seed, step, stream)``
and returns only this process's rows, so the global batch does not depend on the
number of processes, and a resumed run sees exactly the batches it would have seen.
"""
from __future__ import annotations

import numpy as np

# Distinct streams keep e.g. the masking draws independent of the window draws.
WINDOWS, MASKING, EXAMPLES = 0, 1, 2


def batch_rng(seed: int, step: int, stream: int) -> np.random.Generator:
    """A fresh Generator determined by ``(seed, step, stream)``; no global state."""
    for name, value in (("seed", seed), ("step", step)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    return np.random.default_rng([int(seed), int(step), stream])


def local_rows(batch_size: int, process_index: int = 0, process_count: int = 1,
               rows: slice | None = None) -> slice:
    """The rows of a global batch of ``batch_size`` that this process loads.

    By default process ``process_index`` of ``process_count`` gets the
    ``process_index``-th equal share. ``rows``, when given, names them directly (e.g.
    ``sharding.process_batch_slice(mesh, batch_size)``, which gives replica processes
    the same rows) and overrides the other two.
    """
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if rows is not None:
        if not (isinstance(rows, slice) and rows.step in (None, 1)
                and 0 <= (rows.start or 0) < (rows.stop or 0) <= batch_size):
            raise ValueError(
                f"rows must be a non-empty slice within [0, {batch_size}), got {rows!r}")
        return rows
    if not isinstance(process_count, (int, np.integer)) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, (int, np.integer)) or not 0 <= process_index < process_count:
        raise ValueError(
            f"process_index must be an int in [0, {process_count}), got {process_index!r}")
    if batch_size % process_count:
        raise ValueError(
            f"batch_size must be divisible by process_count={process_count}, got {batch_size}")
    local = batch_size // process_count
    return slice(process_index * local, (process_index + 1) * local)
