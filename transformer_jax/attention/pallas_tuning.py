"""Tile sizes and Triton launch parameters for the Pallas flash-attention kernels.

The table is keyed by (head_dim, GPU generation). Its entries are starting points
taken from the shapes public Triton flash-attention kernels use on A100/H100; they
have NOT been autotuned on hardware yet (no GPU was available when they were written).
`STAGES` is the search benchmarks/tune_pallas.py runs on a GPU to tune them;
benchmarks/PALLAS_NOTES.md says where to record the result.
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax

_MIN_BLOCK = 16  # Triton's tensor-core dot needs every tile dimension >= 16.


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles (sequence positions) and launch parameters of the three kernels.

    Forward: a program owns `block_q` queries and loops over keys `block_k` at a time.
    dK/dV: a program owns `block_k_dkv` keys and loops over queries `block_q_dkv` at a time.
    dQ: a program owns `block_q_dq` queries and loops over keys `block_k_dq` at a time.
    All sizes are powers of two >= 16. Hashable, so it can be a static jit argument.
    """

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 32
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 32
    num_warps: int = 4
    num_stages: int = 2
    num_warps_bwd: int = 4
    num_stages_bwd: int = 2

    def __post_init__(self):
        for field in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < _MIN_BLOCK or value & (value - 1):
                raise ValueError(f"BlockSizes.{field}={value!r}: expected a power of two >= {_MIN_BLOCK}")
        for field in ("num_warps", "num_stages", "num_warps_bwd", "num_stages_bwd"):
            value = getattr(self, field)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"BlockSizes.{field}={value!r}: expected a positive int")

    def clamped(self, q_len: int, kv_len: int) -> BlockSizes:
        """Shrinks tiles that exceed the (power-of-two rounded) sequence, so short inputs pad little."""
        def fit(block: int, length: int) -> int:
            return min(block, max(_MIN_BLOCK, 1 << (length - 1).bit_length()))

        return dataclasses.replace(
            self,
            block_q=fit(self.block_q, q_len), block_k=fit(self.block_k, kv_len),
            block_q_dkv=fit(self.block_q_dkv, q_len), block_k_dkv=fit(self.block_k_dkv, kv_len),
            block_q_dq=fit(self.block_q_dq, q_len), block_k_dq=fit(self.block_k_dq, kv_len),
        )


# (head_dim, generation) -> tiles. Forward tiles follow FlashAttention-2's 128x64 for
# d <= 128; the backward keeps the key tile large in dK/dV and the query tile large in
# dQ (the tile that stays resident), as in Triton's fused-attention tutorial.
# sm90 gets one more pipeline stage than sm80 because H100 has 228 KB of shared memory
# per SM against A100's 164 KB. Not autotuned: see benchmarks/PALLAS_NOTES.md.
_TABLE: dict[tuple[int, str], BlockSizes] = {
    (64, "sm80"): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=3, num_warps_bwd=4, num_stages_bwd=2),
    (64, "sm90"): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=4, num_stages=4, num_warps_bwd=4, num_stages_bwd=3),
    (128, "sm80"): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=2),
    (128, "sm90"): BlockSizes(128, 64, 32, 128, 128, 32, num_warps=8, num_stages=3, num_warps_bwd=8, num_stages_bwd=2),
    (256, "sm80"): BlockSizes(64, 32, 32, 64, 64, 32, num_warps=8, num_stages=1, num_warps_bwd=8, num_stages_bwd=1),
    (256, "sm90"): BlockSizes(64, 64, 32, 64, 64, 32, num_warps=8, num_stages=2, num_warps_bwd=8, num_stages_bwd=1),
}

SUPPORTED_HEAD_DIMS = tuple(sorted({head_dim for head_dim, _ in _TABLE}))


def gpu_generation(device: jax.Device | None = None) -> str:
    """'sm90' for Hopper and newer, else 'sm80' (also the answer on CPU, for interpret mode)."""
    device = jax.devices()[0] if device is None else device
    capability = getattr(device, "compute_capability", None)
    if capability is not None and float(capability) >= 9.0:
        return "sm90"
    return "sm80"


def default_block_sizes(head_dim: int, generation: str | None = None) -> BlockSizes:
    """The table entry for `head_dim` on `generation` (default: the first device's)."""
    generation = gpu_generation() if generation is None else generation
    try:
        return _TABLE[(head_dim, generation)]
    except KeyError:
        raise ValueError(
            f"head_dim={head_dim}, generation={generation!r}: the Pallas attention kernel "
            f"supports head dims {SUPPORTED_HEAD_DIMS} on generations ('sm80', 'sm90')"
        ) from None


class Stage(NamedTuple):
    """One step of the tuning search: the fields it varies, and the values it tries."""

    name: str
    timed_pass: str  # "forward" (time the forward) or "backward" (time forward + backward)
    options: tuple[dict[str, int], ...]


# Coordinate descent, one group of fields at a time, each stage starting from the best so far:
# tiles first (they decide the work per program), then warps and pipeline depth for those
# tiles. 34 candidates per head dim instead of the 36 * 96 of the full product. Each pass's
# time depends on its own fields only, so the forward stages leave the backward fields alone.
STAGES: tuple[Stage, ...] = (
    Stage("forward tiles", "forward", tuple(
        dict(block_q=bq, block_k=bk) for bq in (64, 128) for bk in (32, 64, 128))),
    Stage("forward launch", "forward", tuple(
        dict(num_warps=w, num_stages=s) for w in (4, 8) for s in (2, 3, 4))),
    Stage("backward tiles", "backward", tuple(
        dict(block_q_dkv=q1, block_k_dkv=k1, block_q_dq=q2, block_k_dq=k2)
        for q1, k1 in ((32, 64), (32, 128), (64, 64), (64, 128))
        for q2, k2 in ((64, 32), (128, 32), (64, 64), (128, 64)))),
    Stage("backward launch", "backward", tuple(
        dict(num_warps_bwd=w, num_stages_bwd=s) for w in (4, 8) for s in (1, 2, 3))),
)


def stage_candidates(stage: Stage, best: BlockSizes) -> list[BlockSizes]:
    """`best` with each of the stage's options applied (the tuner times these)."""
    return [dataclasses.replace(best, **option) for option in stage.options]
