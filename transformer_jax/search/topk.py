"""Exact top-k by inner product over a corpus, in chunks, on one device or split over a mesh.

The corpus is scanned `chunk` rows at a time: each chunk's scores `[m, chunk]` are
reduced to their top k, and the chunks' top k are merged at the end, so memory stays
`O(m * (chunk + chunks * k))` whatever the corpus size. On a mesh the corpus rows are split over
every device; each device runs the same scan over its rows and the per-device
top k are merged once at the end.

Ties are broken by the lower corpus row, deterministically: `lax.top_k` puts the
lower position first among equal values, and every merge concatenates lower rows
before higher ones (chunk 0 before chunk 1; device 0 before device 1).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec


def _chunked_top_k(queries: jax.Array, corpus: jax.Array, valid_rows: jax.Array, k: int,
                   chunk: int, padded: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top k of `queries @ corpus.T` over the first `valid_rows` rows of `corpus`.

    queries float32 [m, d]; corpus float32 [r, d] with r a multiple of `chunk`;
    valid_rows an int32 scalar. Returns scores float32 [m, k] (descending) and
    row indices int32 [m, k] into `corpus`; slots beyond the valid rows hold -inf.
    Each chunk keeps its own top k ([chunks, m, k] in all); one final top_k merges them.
    padded=False promises that every row is valid (the mask is then skipped).
    """
    num_chunks = corpus.shape[0] // chunk
    chunk_k = min(k, chunk)

    def chunk_top_k(block, start):
        scores = jnp.dot(queries, block.T, precision=jax.lax.Precision.HIGHEST,
                         preferred_element_type=jnp.float32)
        rows = start + jnp.arange(chunk, dtype=jnp.int32)
        if padded:
            scores = jnp.where(rows[None, :] < valid_rows, scores, -jnp.inf)
        top_scores, top_pos = jax.lax.top_k(scores, chunk_k)
        return top_scores, top_pos + start

    if num_chunks == 1:
        scores, rows = chunk_top_k(corpus, jnp.int32(0))
        if chunk_k == k:  # already the top k, in the merge's order: no merge needed
            return scores, rows
    else:
        chunks = corpus.reshape(num_chunks, chunk, corpus.shape[1])
        starts = jnp.arange(num_chunks, dtype=jnp.int32) * chunk
        _, (scores, rows) = jax.lax.scan(lambda carry, xs: (carry, chunk_top_k(*xs)), None,
                                         (chunks, starts))
        # [m, chunks * chunk_k] in chunk order: among equal scores the lower rows come first.
        scores = jnp.moveaxis(scores, 0, 1).reshape(queries.shape[0], -1)
        rows = jnp.moveaxis(rows, 0, 1).reshape(queries.shape[0], -1)
    if scores.shape[1] < k:  # a device holding fewer rows than k: pad with empty slots
        pad = ((0, 0), (0, k - scores.shape[1]))
        scores = jnp.pad(scores, pad, constant_values=-jnp.inf)
        rows = jnp.pad(rows, pad, constant_values=-1)
    top, pick = jax.lax.top_k(scores, k)
    return top, jnp.take_along_axis(rows, pick, axis=1)


@functools.partial(jax.jit, static_argnames=("k", "chunk", "padded"))
def top_k_single(queries: jax.Array, corpus: jax.Array, num_rows: jax.Array, *, k: int,
                 chunk: int, padded: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top k on one device: queries [m, d], corpus [r, d] (rows >= num_rows are padding;
    padded=False: there are none)."""
    return _chunked_top_k(queries, corpus, num_rows, k, chunk, padded)


@functools.lru_cache(maxsize=32)
def _sharded_fn(mesh: Mesh, k: int, chunk: int, padded: bool):
    axes = tuple(mesh.axis_names)

    def local(queries, corpus_shard, num_rows):
        rows_per_device = corpus_shard.shape[0]
        offset = jax.lax.axis_index(axes).astype(jnp.int32) * rows_per_device
        valid = jnp.clip(num_rows - offset, 0, rows_per_device)
        scores, rows = _chunked_top_k(queries, corpus_shard, valid, k, chunk, padded)
        # [m, devices * k], device 0's candidates first: the merge keeps the lower rows on ties.
        scores = jax.lax.all_gather(scores, axes, axis=1, tiled=True)
        rows = jax.lax.all_gather(rows + offset, axes, axis=1, tiled=True)
        top, pick = jax.lax.top_k(scores, k)
        return top, jnp.take_along_axis(rows, pick, axis=1)

    run = jax.shard_map(
        local, mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec(axes), PartitionSpec()),
        out_specs=(PartitionSpec(), PartitionSpec()),
        check_vma=False)  # the scan carry starts replicated and becomes per-device
    return jax.jit(run)


def top_k_sharded(queries: jax.Array, corpus: jax.Array, num_rows: jax.Array, *, k: int,
                  chunk: int, mesh: Mesh, padded: bool = True) -> tuple[jax.Array, jax.Array]:
    """Top k with `corpus` [r, d] split by rows over every device of `mesh` (r a multiple
    of devices * chunk); queries replicated. Same results as `top_k_single`."""
    return _sharded_fn(mesh, k, chunk, padded)(queries, corpus, num_rows)


def corpus_sharding(mesh: Mesh) -> NamedSharding:
    """Rows over all mesh axes together, features whole."""
    return NamedSharding(mesh, PartitionSpec(tuple(mesh.axis_names), None))


def padded_layout(num_rows: int, chunk_size: int, num_devices: int) -> tuple[int, int]:
    """(chunk, rows per device) for `num_rows` split over `num_devices`.

    A chunk is `chunk_size` rows, or fewer for a small corpus (all its rows, rounded up
    to 8), whatever the number of devices; each device holds whole chunks. So the chunks
    of a mesh are exactly those of one device (same rows, same shapes), and a mesh gives
    bit-identical scores and ids; a device pads at most one chunk.
    """
    chunk = min(chunk_size, -(-num_rows // 8) * 8)
    per_device = -(-num_rows // num_devices)
    return chunk, -(-per_device // chunk) * chunk


def pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
    """x [n, d] with zero rows appended up to `rows`."""
    if x.shape[0] == rows:
        return x
    out = np.zeros((rows, x.shape[1]), x.dtype)
    out[: x.shape[0]] = x
    return out
