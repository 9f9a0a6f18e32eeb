"""A tiny sharded DecoderLM training run, shared by the sharding tests.

Imported by tests/test_sharding.py (one process, several meshes) and run as a script
by tests/test_distributed.py, once per process of a multi-process run on localhost:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. \
    python tests/distributed_worker.py --coordinator localhost:PORT --num-processes 2 \
        --process-id I --mesh data=-1 --mesh fsdp=4,tensor=2 --out result.npz

For each `--mesh` the processes train a fresh state together, compiled by the library's
`compile_run` as `train()` does; each process puts only its own rows of every batch
on its devices (`CompiledRun.put`). Process 0 alone writes, for mesh
number i, "i/losses" and "i/<parameter path>" (the gathered final parameters) to `--out`.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax import sharding
from transformer_jax.config import ModelConfig
from transformer_jax.models import DecoderLM
from transformer_jax.objectives import Task
from transformer_jax.run import compile_run

CONFIG = dict(vocab_size=64, max_len=8, d_model=16, num_heads=4, num_layers=2, d_ff=32, dropout_rate=0.1,
              scan_layers=True)
BATCH, SEQ = 8, 8


def batches(num_steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Global batches {inputs, targets}: int32 [BATCH, SEQ], fresh random tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG["vocab_size"], size=(num_steps, BATCH, SEQ + 1), dtype=np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


def _task() -> Task:
    """The tiny DecoderLM as a Task (its batches come from `batches`, not from the task)."""
    model = DecoderLM(ModelConfig(**CONFIG))
    return Task(model, (jnp.zeros((1, SEQ), jnp.int32),), train_batch=None, val_batches=[],
                tokens_per_batch=BATCH * SEQ)


@functools.cache
def compiled_run(mesh):
    """The run's optimiser and jitted steps on `mesh` (None: one device), as train() compiles them."""
    return compile_run(_task(), "clm", lr=3e-3, warmup_steps=0, decay_steps=10_000, batch_size=BATCH,
                       weight_decay=0.1, mesh=mesh)


def init_state(unbox: bool):
    """The train state of the tiny model (traceable; see training.init_train_state)."""
    return compiled_run(None).init_fn(unbox=unbox)


def compiled(mesh):
    """(state shardings, jitted init, jitted train step) for `mesh`, compiled once per mesh."""
    run = compiled_run(mesh)
    return run.state_sharding, run.init_state, run.train_step


def train(mesh, global_batches, state=None):
    """Train from `state` (None: a fresh init on `mesh`) on `global_batches`; every
    process puts only its own rows on its devices. Returns (state, losses)."""
    run = compiled_run(mesh)
    losses = []
    with sharding.use_mesh(mesh):  # as train(): the models' activation constraints apply
        state = run.init_state() if state is None else state
        for batch in global_batches:
            state, metrics = run.train_step(state, run.put(batch))
            losses.append(float(metrics["loss"]))
    return state, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--mesh", action="append", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    sharding.initialize_distributed(args.coordinator, args.num_processes, args.process_id)
    results = {}
    for i, spec in enumerate(args.mesh):
        state, losses = train(sharding.make_mesh(spec), batches(args.steps))
        params = multihost_utils.process_allgather(state.params, tiled=True)
        results[f"{i}/losses"] = np.asarray(losses)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            results[f"{i}/{jax.tree_util.keystr(path)}"] = np.asarray(leaf)
    if jax.process_index() == 0:
        np.savez(args.out, **results)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
