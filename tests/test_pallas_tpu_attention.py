"""jax's splash-attention kernel behind our semantics (pallas_tpu), in Pallas interpret mode
on CPU, against float64 NumPy: outputs and gradients w.r.t. q, k and v."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fused_reference import Case, expected, make_inputs
from transformer_jax.attention import dot_product_attention, pallas_tpu, select_implementation

CASES = {
    # causal self-attention, GQA, per-batch lengths; 37 pads to one 128-block
    "causal-gqa-lengths": Case(37, 37, 4, 2, 64, causal=True, lengths=True),
    # cross attention, MQA, segments (some query ids absent among keys), window, soft-cap
    "segments-window-cap-mqa": Case(29, 45, 2, 1, 128, window=(7, 1), cap=5.0, segments=True),
    # causal + window + segments + lengths, q_len > kv_len
    "everything": Case(40, 23, 2, 2, 64, causal=True, window=(9, 2), cap=3.0, lengths=True, segments=True),
    # several blocks each way, causal: skipped, partial and full blocks
    "causal-blocks": Case(300, 300, 2, 1, 64, causal=True, tiles=(128, 128)),
    # the window leaves the queries past the keys' blocks with no key at all (statically
    # empty rows, whose blocks the kernel skips entirely)
    "window-beyond-keys": Case(300, 100, 2, 2, 64, window=(4, 4), tiles=(128, 128)),
}


def run_kernel(case: Case, q, k, v, d_out, q_lens, kv_lens, q_ids, kv_ids):
    """(out, (dq, dk, dv)) of the splash kernel in interpret mode, under one jit."""
    def attend(q, k, v):
        return pallas_tpu.attention(
            q, k, v, scale=case.head_dim**-0.5, is_causal=case.causal, query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens, segment_ids=None if q_ids is None else (q_ids, kv_ids),
            local_window_size=case.window, logits_soft_cap=case.cap, block_sizes=case.tiles, interpret=True,
        )

    @jax.jit
    def vjp(q, k, v, d_out):
        out, pullback = jax.vjp(attend, q, k, v)
        return out, pullback(d_out)

    return vjp(q, k, v, d_out)


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_output_and_gradients_match_float64_reference(name):
    case = CASES[name]
    tensors, masking = make_inputs(case, jnp.float32, seed=len(name))
    out, grads = run_kernel(case, *tensors, *masking)
    keep, want_out, want_grads = expected(case, *tensors, *masking)

    np.testing.assert_allclose(out, want_out, rtol=1e-4, atol=1e-5)
    for label, got, want in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"d{label}")
    empty_rows = ~keep.any(-1)  # [b, Lq]
    if case.lengths or case.segments or name == "window-beyond-keys":
        assert empty_rows.any(), "the case should contain fully masked rows"
        assert np.all(np.asarray(out)[empty_rows] == 0.0)
        assert np.all(np.asarray(grads[0])[empty_rows] == 0.0)


def test_bfloat16_uses_float32_statistics():
    case = CASES["everything"]
    tensors, masking = make_inputs(case, jnp.bfloat16, seed=7)
    out, grads = run_kernel(case, *tensors, *masking)
    _, want_out, want_grads = expected(case, *tensors, *masking)
    assert out.dtype == jnp.bfloat16 and all(g.dtype == jnp.bfloat16 for g in grads)
    for label, got, want in zip(["out", "dq", "dk", "dv"], (out, *grads), (want_out, *want_grads)):
        error = np.max(np.abs(np.asarray(got, np.float64) - want))
        assert error <= 2e-2 * np.max(np.abs(want)), f"{label}: max error {error}"


def test_kernel_lowers_for_tpu():
    """No TPU needed: lowering for TPU runs the Pallas->Mosaic lowering of the forward and
    both backward kernels with the default 512-wide blocks (lane-aligned shapes, supported
    primitives)."""
    b, n, h, d = 1, 1024, 4, 128
    q = jax.ShapeDtypeStruct((b, n, h, d), jnp.bfloat16)
    kv = jax.ShapeDtypeStruct((b, n, 2, d), jnp.bfloat16)

    def loss(q, k, v):
        out = pallas_tpu.attention(q, k, v, scale=d**-0.5, is_causal=True, query_seq_lengths=None,
                                   key_value_seq_lengths=None, segment_ids=None, local_window_size=None,
                                   logits_soft_cap=None, block_sizes=None, interpret=False)
        return jnp.sum(out.astype(jnp.float32))

    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(q, kv, kv).lower(lowering_platforms=("tpu",))
    assert "tpu_custom_call" in lowered.as_text()


def test_supports_explains_why_not():
    q = jnp.zeros((1, 8, 2, 64), jnp.bfloat16)
    common = dict(bias=None, mask=None, dropout_rate=0.0, logits_soft_cap=None)
    assert "TPU" in pallas_tpu.supports(q, q, q, **common)  # this machine has none
    assert "bias" in pallas_tpu.supports(q, q, q, **{**common, "bias": q})
    assert "dropout" in pallas_tpu.supports(q, q, q, **{**common, "dropout_rate": 0.1})
    with pytest.raises(ValueError, match="pallas"):  # named on CPU: refused, no fallback
        select_implementation(q, q, q, implementation="pallas")


@pytest.mark.parametrize("overrides, message", [
    (dict(block_sizes=(100, 128)), "multiples of 128"),
    (dict(local_window_size=(-1, 2)), "local_window_size"),
    (dict(logits_soft_cap=0.0), "logits_soft_cap"),
])
def test_bad_input_raises_value_error_naming_it(overrides, message):
    q = jnp.zeros((1, 8, 2, 64), jnp.float32)
    kwargs = dict(scale=0.125, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                  segment_ids=None, local_window_size=None, logits_soft_cap=None, block_sizes=None,
                  interpret=True)
    with pytest.raises(ValueError, match=message):
        pallas_tpu.attention(q, q, q, **{**kwargs, **overrides})
    with pytest.raises(ValueError, match="head_dim"):
        pallas_tpu.attention(jnp.zeros((1, 8, 2, 48)), jnp.zeros((1, 8, 2, 48)), jnp.zeros((1, 8, 2, 48)),
                             **kwargs)


def test_public_api_on_cpu_keeps_auto_off_the_kernel():
    q = jnp.zeros((1, 256, 2, 64), jnp.bfloat16)
    assert select_implementation(q, q, q, is_causal=True).implementation == "blockwise"
    assert dot_product_attention(q, q, q, is_causal=True).shape == q.shape


def test_auto_on_a_tpu_picks_the_splash_kernel_where_it_applies(monkeypatch):
    """Selection only (nothing runs): with the backend reported as TPU, auto takes the
    kernel for long sequences and keeps the reference for short ones and blockwise for
    what the kernel cannot do (a dense bias)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    long, short = jnp.zeros((1, 256, 2, 64), jnp.bfloat16), jnp.zeros((1, 64, 2, 64), jnp.bfloat16)
    chosen = select_implementation(long, long, long, is_causal=True)
    assert chosen.implementation == "pallas" and "splash" in chosen.reason
    assert select_implementation(short, short, short).implementation == "reference"
    bias = jnp.zeros((1, 2, 256, 256), jnp.bfloat16)
    assert select_implementation(long, long, long, bias).implementation == "blockwise"
    assert select_implementation(long, long, long, implementation="pallas").implementation == "pallas"
