"""A tiny sharded DecoderLM training run, shared by the sharding tests.

Imported by tests/test_sharding.py (one process, several meshes) and run as a script
by tests/test_distributed.py, once per process of a multi-process run on localhost:

    XLA_FLAGS=--xla_force_host_platform_device_count=4 JAX_PLATFORMS=cpu PYTHONPATH=. \
    python tests/distributed_worker.py --coordinator localhost:PORT --num-processes 2 \
        --process-id I --mesh data=-1 --mesh fsdp=4,tensor=2 --out result.npz

For each `--mesh` the processes train a fresh state together; each process loads only
its own rows of every batch (`process_batch_slice`). Process 0 alone writes, for mesh
number i, "i/losses" and "i/<parameter path>" (the gathered final parameters) to `--out`.
"""
from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from transformer_jax import sharding, training
from transformer_jax.config import ModelConfig
from transformer_jax.models import DecoderLM

CONFIG = dict(vocab_size=64, max_len=8, d_model=16, num_heads=4, num_layers=2, d_ff=32, dropout_rate=0.1,
              scan_layers=True)
BATCH, SEQ = 8, 8


def batches(num_steps: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """Global batches {inputs, targets}: int32 [BATCH, SEQ], fresh random tokens."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, CONFIG["vocab_size"], size=(num_steps, BATCH, SEQ + 1), dtype=np.int32)
    return [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]


@functools.cache
def _model_and_step():
    model = DecoderLM(ModelConfig(**CONFIG))
    tx = training.make_optimizer(3e-3, weight_decay=0.1)
    step = training.make_train_step(training.make_loss_fn(model, "clm"), tx)
    return model, tx, step


def init_state(unbox: bool):
    """The train state of the tiny model (traceable; see training.init_train_state)."""
    model, tx, _ = _model_and_step()
    return training.init_train_state(model, tx, (jnp.zeros((1, SEQ), jnp.int32),), seed=0, unbox=unbox)


@functools.cache
def compiled(mesh):
    """(state shardings, jitted init, jitted train step) for `mesh`, compiled once per mesh."""
    shardings = sharding.state_shardings(jax.eval_shape(lambda: init_state(unbox=False)), mesh)
    init = jax.jit(lambda: init_state(unbox=True), out_shardings=shardings)
    step = jax.jit(
        _model_and_step()[2],
        in_shardings=(shardings, sharding.batch_sharding(mesh)),
        out_shardings=(shardings, None),
        donate_argnums=0,
    )
    return shardings, init, step


def train(mesh, global_batches, state=None):
    """Train from `state` (None: a fresh init on `mesh`) on `global_batches`; every
    process passes only its own rows. Returns (state, losses)."""
    _, init, step = compiled(mesh)
    rows = sharding.process_batch_slice(mesh, BATCH)
    losses = []
    with sharding.use_mesh(mesh):  # as train.py: the models' activation constraints apply
        state = init() if state is None else state
        for batch in global_batches:
            local = {key: value[rows] for key, value in batch.items()}
            state, metrics = step(state, sharding.make_global_batch(local, mesh))
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
