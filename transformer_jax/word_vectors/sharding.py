"""Embedding tables over a device mesh: rows (the vocabulary) and columns (the embedding)
split by the package's logical-axis rules, ``vocab`` -> ``tensor`` and ``embed`` -> ``fsdp``,
so a vocabulary too large for one device is spread over several; batches are split over
the batch axes (``data``, ``fsdp``)."""
from __future__ import annotations

import math
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from transformer_jax.sharding import BATCH_AXES, LOGICAL_RULES
from transformer_jax.training import TrainState

_RULES = dict(LOGICAL_RULES)


def _axis_size(mesh: Mesh, logical: str) -> int:
    axes = _RULES[logical]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(mesh.shape[a] for a in axes)


def padded_rows(vocab_size: int, mesh: Mesh | None) -> int:
    """Rows of a table for ``vocab_size`` words: rounded up so the mesh's ``vocab`` shards
    are equal (the extra rows are never looked up)."""
    if mesh is None:
        return vocab_size
    shards = _axis_size(mesh, "vocab")
    return -(-vocab_size // shards) * shards


def table_sharding(shape: tuple[int, ...], mesh: Mesh) -> NamedSharding:
    """Sharding of a [V, d] table (or a [V] bias): V over ``vocab``'s mesh axes, d over
    ``embed``'s where the mesh divides d (else d unsplit); scalars replicated."""
    spec: list[Any] = []
    for logical, size in zip(("vocab", "embed"), shape):
        split = _RULES[logical] if size % _axis_size(mesh, logical) == 0 else None
        spec.append(split)
    return NamedSharding(mesh, PartitionSpec(*spec))


def state_shardings(state: TrainState, mesh: Mesh) -> TrainState:
    """Shardings of a word-vector TrainState: every array of ``params`` and ``opt_state``
    with a leading vocabulary axis as ``table_sharding``, scalars, step and key replicated."""
    replicated = NamedSharding(mesh, PartitionSpec())

    def table(x):
        return table_sharding(x.shape, mesh) if x.ndim >= 1 else replicated

    return TrainState(step=replicated, params=jax.tree.map(table, state.params),
                      opt_state=jax.tree.map(table, state.opt_state), rng=replicated)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) dimension over the batch axes, the rest unsplit."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))
