"""run/compiler_options.py: asked for, the CPU training steps' matrix products go through oneDNN,
with the same results as XLA's own kernels up to float32 rounding."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import DecoderLM, ModelConfig, training
from transformer_jax.objectives import Task
from transformer_jax.run import compile_run
from transformer_jax.run.compiler_options import ONEDNN_DOTS, step_compiler_options

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="a CPU compiler option")

SEQ, BATCH = 16, 4
# Compiled runs outlive the test: jaxlib aborts when a program with oneDNN thunks is destroyed
# while its last execution is finishing (run/compiler_options.py), as a dropped run could be.
KEEP_ALIVE = []

TASK = Task(DecoderLM(ModelConfig(vocab_size=50, max_len=SEQ, d_model=32, num_heads=4, num_layers=2, d_ff=64,
                                  fused_qkv=True)),
            (jnp.zeros((1, SEQ), jnp.int32),), train_batch=None, val_batches=[], tokens_per_batch=BATCH * SEQ)


def test_options_only_when_asked_on_the_cpu():
    assert step_compiler_options(onednn=True) == ONEDNN_DOTS
    assert step_compiler_options(onednn=False) is None


def test_off_by_default():
    import train
    from transformer_jax import TrainConfig

    assert TrainConfig().onednn is False
    assert train.config_from_args(train.build_parser().parse_args([])).onednn is False
    assert train.config_from_args(train.build_parser().parse_args(["--onednn"])).onednn is True


def test_the_steps_compile_their_products_to_onednn_and_agree_with_xla_kernels():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(3, BATCH, SEQ + 1)).astype(np.int32)
    batches = [{"inputs": t[:, :-1], "targets": t[:, 1:]} for t in tokens]
    results = {}
    for onednn in (True, False):
        run = compile_run(TASK, "clm", lr=1e-2, warmup_steps=0, decay_steps=100, batch_size=BATCH, onednn=onednn)
        KEEP_ALIVE.append(run)
        state = run.init_state()
        compiled = [run.train_step.lower(state, batches[0]).compile(),
                    run.eval_step.lower(state.params, batches[0]).compile()]
        KEEP_ALIVE.append(compiled)
        assert all(("__onednn_fusion" in c.as_text()) is onednn for c in compiled)
        # the gradient of the first batch, compiled as the steps are
        loss_fn = training.make_loss_fn(TASK.model, "clm")
        grad_fn = jax.jit(jax.grad(lambda p, b: loss_fn(p, b)[0]), compiler_options=step_compiler_options(onednn))
        KEEP_ALIVE.append(grad_fn)
        grad = grad_fn(state.params, batches[0])
        metrics = []
        for batch in batches:  # three steps, each from the updates of the last
            state, m = run.train_step(state, batch)
            metrics.append((float(m["loss"]), float(m["grad_norm"])))
        results[onednn] = metrics, jax.device_get(grad), float(run.eval_step(state.params, batches[0])[0])
    (metrics_a, grad_a, eval_a), (metrics_b, grad_b, eval_b) = results[True], results[False]
    np.testing.assert_allclose(metrics_a, metrics_b, rtol=1e-5)
    np.testing.assert_allclose(eval_a, eval_b, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):  # float32 rounding, leaf-wise
        assert np.abs(a - b).max() <= 1e-5 * np.abs(b).max()
