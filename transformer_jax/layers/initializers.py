"""Parameter initialisers with logical axis names (GPT-2 scheme).

Every weight is normal(0.02); the projections that write into the residual stream
are scaled by 1/sqrt(2 * num_layers) so the residual variance stays O(1) with depth
(GPT-2 paper, section 2.3). Biases start at zero, norm scales at one.
"""
from __future__ import annotations

import math

import flax.linen as nn

INIT_STD = 0.02

Axes = tuple[str | None, ...]


def normal(axes: Axes, std: float = INIT_STD) -> nn.initializers.Initializer:
    """normal(std) initialiser whose parameter carries the logical `axes`."""
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


def zeros(axes: Axes) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.zeros_init(), axes)


def ones(axes: Axes) -> nn.initializers.Initializer:
    return nn.with_logical_partitioning(nn.initializers.ones_init(), axes)


def residual_std(num_layers: int) -> float:
    """Standard deviation of the output projections of a stack of `num_layers` blocks."""
    return INIT_STD / math.sqrt(2 * num_layers)
