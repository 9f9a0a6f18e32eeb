"""JAX's persistent compilation cache, on by default for training runs.

A second run of the same command then reads its compiled programs from disk instead of
compiling them again. The cache lives under the package's cache directory unless JAX is
already configured with one (`JAX_COMPILATION_CACHE_DIR` or `jax.config`).

Several processes may share it: JAX writes entries only from process 0 of a
multi-process job, and a size limit makes it take a file lock around every read and
write (the `filelock` package), so two independent runs never see half-written entries.
"""
from __future__ import annotations

import os

import jax

DEFAULT_DIR = os.path.join("~", ".cache", "transformer_jax", "jax_compilation_cache")
MAX_BYTES = 4 << 30  # least recently used entries are evicted beyond this
MIN_COMPILE_SECONDS = 0.5  # programs that compile faster are not worth a disk entry


def enable_compile_cache(directory: str | None = None) -> str:
    """Turn the persistent compilation cache on (at `directory`, default DEFAULT_DIR, unless
    JAX already has a cache directory) and return the directory in use."""
    current = jax.config.jax_compilation_cache_dir
    if current:
        jax.config.update("jax_enable_compilation_cache", True)
        return current
    path = os.path.expanduser(directory or DEFAULT_DIR)
    os.makedirs(path, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECONDS)
    if jax.config.jax_compilation_cache_max_size == -1:
        try:
            import filelock  # noqa: F401  (the size limit needs it for its lock)
            jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
        except ImportError:
            pass
    return path


def disable_compile_cache() -> None:
    """Compile everything afresh in this process (`--no-compile-cache`)."""
    jax.config.update("jax_enable_compilation_cache", False)
