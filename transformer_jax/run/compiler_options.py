"""Opt-in XLA compiler options of the training steps: on the CPU, matrix products through oneDNN.

XLA's CPU backend gives the products that its YNNPACK fusions do not take (the weight
gradients, the batched products of attention's backward with a transposed operand) to
Eigen's generic dot. Handing each of those to oneDNN instead (XLA's
`xla_cpu_experimental_onednn_fusion_type` INDIVIDUAL_DOT; the same library PyTorch's CPU
matmuls use) cut the user time of a `small` training step by a sixth, at the same float32
accuracy (benchmarks/RESULTS.md, "Fifth round"). `TrainConfig(onednn=True)` /
`train.py --onednn` turn it on.

Why it is not the default: the option is experimental in XLA, and jaxlib 0.10.2 aborts the
process (`object_pool.h: Check failed: available_.size() == num_created_`, in
~OneDnnFusionThunk) when a compiled program is destroyed while its last execution is still
finishing: seen in 2 of about 20 runs of a test that dropped its jitted steps right after
their last call. `train` keeps its steps until every execution has been read back. Nor can
JAX's persistent compilation cache store such a program ("ToProto is not implemented for
thunk kind: onednn-fusion", a warning): with the option, every run compiles its steps afresh.
"""
from __future__ import annotations

import jax

ONEDNN_DOTS = {
    "xla_cpu_use_onednn": True,
    # the enum's full name: XLA's option parser takes no short form
    "xla_cpu_experimental_onednn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
}


def step_compiler_options(onednn: bool) -> dict | None:
    """`jax.jit(..., compiler_options=...)` for a training or evaluation step: ONEDNN_DOTS
    when `onednn` and JAX's default backend is the CPU, else None (XLA's defaults)."""
    return dict(ONEDNN_DOTS) if onednn and jax.default_backend() == "cpu" else None
