"""The compiled pieces of a run: optimiser, state initialiser, jitted train/eval steps,
and where arrays live (one device or a mesh)."""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import numpy as np

from transformer_jax import sharding, training
from transformer_jax.objectives import Objective, Task, get_objective
from transformer_jax.run.compiler_options import step_compiler_options


def make_run_mesh(spec: str | None) -> jax.sharding.Mesh | None:
    """The device mesh of a run: a spec for `sharding.make_mesh`; "none" for one device
    (no mesh; single-process runs only); None (the default) puts every device on "data"
    when there are several, and is one device otherwise."""
    if spec is None:
        return sharding.make_mesh(None) if jax.device_count() > 1 else None
    if spec.strip().lower() == "none":
        if jax.process_count() > 1:
            raise ValueError("--mesh none: a multi-process run needs a mesh over every process's devices")
        return None
    return sharding.make_mesh(spec)


@dataclasses.dataclass(frozen=True)
class CompiledRun:
    """The optimiser, the jitted steps and where arrays live, for one run."""

    schedule: Callable[[int], Any]
    init_fn: Callable[[], Any]  # -> a fresh TrainState
    abstract: Any  # the TrainState's shapes
    mesh: jax.sharding.Mesh | None
    state_sharding: Any  # None without a mesh
    jit_state: dict  # jax.jit kwargs placing a fresh state on the mesh
    put: Callable[[dict], Any]  # host batch -> device (global) batch
    train_step: Callable
    eval_step: Callable

    @property
    def num_devices(self) -> int:
        return self.mesh.size if self.mesh is not None else 1

    def init_state(self) -> training.TrainState:
        """A fresh TrainState, placed on the mesh."""
        return jax.jit(self.init_fn, **self.jit_state)()


def compile_run(task: Task, objective: str | Objective, *, lr: float, warmup_steps: int,
                decay_steps: int, batch_size: int, weight_decay: float = 0.1,
                grad_clip: float | None = 1.0, freeze: str | None = None, seed: int = 0,
                label_smoothing: float = 0.0, accum_steps: int = 1,
                mesh: jax.sharding.Mesh | None = None, onednn: bool = False) -> CompiledRun:
    """Optimiser (AdamW, warmup + cosine), state initialiser and jitted train/eval steps of
    `task`, sharded over `mesh` if any (batches of `batch_size` rows split over data*fsdp).
    `onednn`: on the CPU, the steps' matrix products through oneDNN (`run.compiler_options`).

    Raises ValueError before compiling: a `freeze` regex matching no or every parameter,
    or a batch that does not split over the mesh.
    """
    schedule = training.make_schedule(lr, warmup_steps=warmup_steps, total_steps=decay_steps)
    tx = training.make_optimizer(schedule, weight_decay=weight_decay, grad_clip=grad_clip or None,
                                 freeze=freeze)
    init_fn = functools.partial(training.init_train_state, task.model, tx, task.init_args,
                                seed=seed, init_kwargs=task.init_kwargs)
    abstract = jax.eval_shape(init_fn)
    if freeze:
        frozen = [np.broadcast_to(m, x.shape) for m, x in zip(
            jax.tree.leaves(training.frozen_layers(abstract.params, freeze)), jax.tree.leaves(abstract.params))]
        if not any(m.any() for m in frozen) or all(m.all() for m in frozen):
            paths = [training.param_path(p) for p, _ in jax.tree_util.tree_leaves_with_path(abstract.params)]
            raise ValueError(f"--freeze={freeze!r} matches {'no' if not any(m.any() for m in frozen) else 'every'}"
                             f" parameter; paths look like {paths[:4]}")
    if mesh is not None:
        split = mesh.shape["data"] * mesh.shape["fsdp"]
        if batch_size % split:
            raise ValueError(f"--batch-size={batch_size} does not split over the data*fsdp={split} "
                             f"devices of the mesh {dict(mesh.shape)}: pass another --batch-size or --mesh")
        state_sh = sharding.state_shardings(jax.eval_shape(functools.partial(init_fn, unbox=False)), mesh)
        batch_sh = sharding.batch_sharding(mesh)
        rows = sharding.process_batch_slice(mesh, batch_size)
        put = lambda batch: sharding.make_global_batch({k: v[rows] for k, v in batch.items()}, mesh)  # noqa: E731
        jit_state = dict(out_shardings=state_sh)
        jit_step = dict(in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None))
        jit_eval = dict(in_shardings=(state_sh.params, batch_sh))
    else:
        state_sh, put = None, jax.device_put
        jit_state = jit_step = jit_eval = {}
    objective = get_objective(objective)
    loss_fn = training.make_loss_fn(task.model, objective, label_smoothing=label_smoothing)
    options = step_compiler_options(onednn)
    train_step = jax.jit(training.make_train_step(loss_fn, tx, accum_steps=accum_steps),
                         donate_argnums=0, compiler_options=options, **jit_step)
    eval_step = jax.jit(training.make_loss_fn(task.model, objective), compiler_options=options, **jit_eval)
    return CompiledRun(schedule, init_fn, abstract, mesh, state_sh, jit_state, put, train_step, eval_step)
