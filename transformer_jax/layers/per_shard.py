"""Run a fused attention kernel shard by shard under a device mesh.

XLA's SPMD partitioner cannot split a Pallas kernel (an opaque custom call): left alone it
would gather q, k and v onto every device and compute all of attention everywhere. So a
layer running `implementation="pallas"` under a mesh calls the kernel inside `jax.shard_map`:
each device attends for its own batch rows and its own heads, which needs no communication
(attention is independent across batch rows and heads).

Batch rows follow the logical axis "batch" and heads the axis "heads" (the rules active in
`sharding.use_mesh`). A dimension the mesh does not divide is not split. When key/value
heads cannot be split like the query heads (e.g. MQA on a tensor-parallel mesh), every
device keeps all of them and slices out the one its query heads use; when even that does
not line up, heads are not split at all.
"""
from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
from jax.sharding import PartitionSpec as P


def attend_per_shard(
    attend: Callable[..., jax.Array],
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
    """`attend(q, k, v, segment_ids)` computed per shard of the current mesh.

    q: [b, t, h, d]; k, v: [b, s, hk, d] (h a multiple of hk); segment_ids: int [b, t] or
    None (self-attention packing). `attend` must treat batch rows and heads independently
    and map query head i to key/value head i // (h // hk), as `dot_product_attention` does.
    Without a mesh of more than one device it is called directly.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return attend(q, k, v, segment_ids)
    batch_axes = _mesh_axes("batch", q.shape[0], mesh)
    head_axes = _mesh_axes("heads", q.shape[2], mesh)
    heads, kv_heads = q.shape[2], k.shape[2]
    shards = _size(head_axes, mesh)
    local_heads, group = heads // shards, heads // kv_heads
    if kv_heads % shards == 0:  # key/value heads split like the query heads
        kv_head_axes, pick_kv = head_axes, None
    elif group % local_heads == 0:  # each device's query heads share one key/value head
        kv_head_axes, pick_kv = None, local_heads
    else:  # no consistent split: keep every head on every device
        head_axes = kv_head_axes = pick_kv = None

    def body(q, k, v, *ids):
        if pick_kv is not None:
            first = _shard_index(head_axes, mesh) * pick_kv // group
            k, v = (jax.lax.dynamic_slice_in_dim(x, first, 1, axis=2) for x in (k, v))
        return attend(q, k, v, ids[0] if ids else None)

    q_spec = P(batch_axes, None, head_axes, None)
    kv_spec = P(batch_axes, None, kv_head_axes, None)
    specs = (q_spec, kv_spec, kv_spec) + ((P(batch_axes, None),) if segment_ids is not None else ())
    args = (q, k, v) + ((segment_ids,) if segment_ids is not None else ())
    return jax.shard_map(body, mesh=mesh, in_specs=specs, out_specs=q_spec, check_vma=False)(*args)


def _mesh_axes(logical: str, size: int, mesh) -> tuple[str, ...] | None:
    """The mesh axes the active rules give `logical`, or None if they do not divide `size`."""
    entry = nn.logical_to_mesh_axes((logical,))[0]
    axes = () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)
    axes = tuple(a for a in axes if a in mesh.axis_names and mesh.shape[a] > 1)
    if not axes or size % _size(axes, mesh):
        return None
    return axes


def _size(axes: tuple[str, ...] | None, mesh) -> int:
    return math.prod(mesh.shape[a] for a in axes) if axes else 1


def _shard_index(axes: tuple[str, ...], mesh) -> jax.Array:
    """This device's position along the (flattened, major-to-minor) `axes`."""
    index = 0
    for axis in axes:
        index = index * mesh.shape[axis] + jax.lax.axis_index(axis)
    return index
