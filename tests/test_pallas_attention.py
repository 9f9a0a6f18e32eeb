"""The Pallas flash-attention kernel, run in interpret mode on CPU, against float64 NumPy.

With TRANSFORMER_JAX_TEST_PLATFORM=cuda (benchmarks/essentials.py) the same cases run compiled
by Triton on the GPU, in bfloat16 and float16 (float32 dots run in TF32 there).

Every case checks the output and the gradients w.r.t. q, k and v (one jitted vjp per
case, so each case costs one compilation). Shapes are tiny and tiles 16 wide so that
several tiles, partial tiles and skipped tiles all occur.
"""
from __future__ import annotations

import dataclasses
import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import example, given, settings

import fused_reference
from fused_reference import (assert_bfloat16_within_its_precision, assert_float32_matches, expected,
                             make_inputs, reference_mask, reference_vjp)
from transformer_jax.attention import pallas_gpu
from transformer_jax.attention.pallas_bwd import q_tile_ranges
from transformer_jax.attention.pallas_fwd import MaskSpec, kv_tile_ranges
from transformer_jax.attention.pallas_tuning import STAGES, BlockSizes, default_block_sizes, stage_candidates

TILES = BlockSizes(16, 16, 16, 16, 16, 16)
ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="compiled kernels need a GPU (TRANSFORMER_JAX_TEST_PLATFORM=cuda)")
cpu_only = pytest.mark.skipif(ON_GPU, reason="float32 interpret-mode check; the GPU runs the compiled cases")
Case = functools.partial(fused_reference.Case, tiles=TILES)  # 16-wide tiles unless a case says otherwise


def test_reference_gradient_matches_finite_differences():
    """The NumPy backward is itself checked: directional derivative vs central differences."""
    rng = np.random.default_rng(0)
    q, k, v = rng.standard_normal((1, 5, 2, 4)), rng.standard_normal((1, 6, 1, 4)), rng.standard_normal((1, 6, 1, 4))
    d_out = rng.standard_normal((1, 5, 2, 4))
    keep = reference_mask(5, 6, causal=True, window=(3, 1), q_lens=[4], kv_lens=[6],
                          q_ids=[[0, 0, 1, 1, 1]], kv_ids=[[0, 0, 1, 1, 2, 1]])
    _, grads = reference_vjp(q, k, v, d_out, keep, 0.7, 2.0)
    directions = [rng.standard_normal(x.shape) for x in (q, k, v)]
    loss = lambda *xs: np.sum(reference_vjp(*xs, d_out, keep, 0.7, 2.0)[0] * d_out)  # noqa: E731
    eps = 1e-6
    plus = loss(*(x + eps * u for x, u in zip((q, k, v), directions)))
    minus = loss(*(x - eps * u for x, u in zip((q, k, v), directions)))
    predicted = sum(np.sum(g * u) for g, u in zip(grads, directions))
    np.testing.assert_allclose((plus - minus) / (2 * eps), predicted, rtol=1e-6)


# ----------------------------------------------------------------------------- kernel vs reference
CASES = {
    # causal self-attention, GQA, per-batch lengths, 37 = 2 tiles + 5
    "causal-gqa-lengths": Case(37, 37, 4, 2, 64, causal=True, lengths=True),
    # cross attention, MQA, segments (some query ids absent among keys), window, soft-cap
    "segments-window-cap-mqa": Case(29, 45, 2, 1, 128, window=(7, 1), cap=5.0, segments=True),
    # causal + window + segments + lengths, differing backward tiles, q_len > kv_len
    "everything": Case(40, 23, 2, 2, 64, causal=True, window=(9, 2), cap=3.0, lengths=True, segments=True,
                       tiles=BlockSizes(32, 16, 16, 32, 32, 16)),
    # no masks at all, tiles from the table (clamped to the sequence): unmasked tiles only
    "plain-table-tiles": Case(64, 64, 2, 2, 128, tiles=None),
    # causal, tile-aligned, no lengths: unmasked tiles below the diagonal, masked on it
    "causal-aligned": Case(48, 48, 2, 1, 64, causal=True),
}


@cpu_only
@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_output_and_gradients_match_float64_reference(name):
    case = CASES[name]
    assert_float32_matches(pallas_gpu.attention, case, seed=len(name),
                           expect_empty_rows=case.lengths or case.segments)


def test_bfloat16_uses_float32_statistics():
    assert_bfloat16_within_its_precision(pallas_gpu.attention, CASES["everything"], seed=7, interpret=not ON_GPU)


@needs_gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiled_kernels_match_float64_reference_on_gpu(name, dtype):
    assert_bfloat16_within_its_precision(pallas_gpu.attention, CASES[name], seed=len(name), interpret=False,
                                         dtype=dtype)


@cpu_only
def test_vmap_over_an_extra_leading_axis():
    """jax.vmap adds a grid axis to the kernels; each slice must still match the reference."""
    case = CASES["causal-gqa-lengths"]
    stacked = [make_inputs(case, jnp.float32, seed) for seed in (11, 12)]
    tensors = [jnp.stack(parts) for parts in zip(*(t for t, _ in stacked))]
    lengths = [jnp.stack(parts) for parts in zip(*(m[:2] for _, m in stacked))]

    def attend(q, k, v, q_lens, kv_lens):
        return pallas_gpu.attention(
            q, k, v, scale=case.head_dim**-0.5, is_causal=True, query_seq_lengths=q_lens,
            key_value_seq_lengths=kv_lens, segment_ids=None, local_window_size=None,
            logits_soft_cap=None, block_sizes=TILES, interpret=True,
        )

    out = jax.jit(jax.vmap(attend))(*tensors[:3], *lengths)
    for index, (slice_tensors, slice_masking) in enumerate(stacked):
        _, want, _ = expected(case, *slice_tensors, *slice_masking)
        np.testing.assert_allclose(out[index], want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name, dtype", [("everything", jnp.bfloat16), ("plain-table-tiles", jnp.float16)])
def test_kernels_lower_to_triton_for_cuda(name, dtype):
    """No GPU needed: lowering for CUDA runs the Pallas->Triton lowering of all three kernels
    (power-of-two tile shapes, supported primitives) on the real tile table."""
    case = dataclasses.replace(CASES[name], tiles=None)
    batch = 2
    shape = lambda length, heads: jax.ShapeDtypeStruct((batch, length, heads, case.head_dim), dtype)  # noqa: E731
    ids = lambda length: jax.ShapeDtypeStruct((batch, length), jnp.int32)  # noqa: E731

    def loss(q, k, v, lengths, q_ids, kv_ids):
        out = pallas_gpu.attention(
            q, k, v, scale=0.1, is_causal=case.causal, query_seq_lengths=lengths if case.lengths else None,
            key_value_seq_lengths=None, segment_ids=(q_ids, kv_ids) if case.segments else None,
            local_window_size=case.window, logits_soft_cap=case.cap, block_sizes=None, interpret=False,
        )
        return jnp.sum(out.astype(jnp.float32))

    args = (shape(300, case.heads), shape(280, case.kv_heads), shape(280, case.kv_heads),
            jax.ShapeDtypeStruct((batch,), jnp.int32), ids(300), ids(280))
    lowered = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
    text = lowered.as_text()
    assert text.count("xla.gpu.triton") == 3  # forward, dK/dV, dQ
    for kernel in ("flash_attention_forward", "flash_attention_dkdv", "flash_attention_dq"):
        assert kernel in text


# ----------------------------------------------------------------------------- tile skipping
@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    q_tiles=st.integers(1, 4), kv_tiles=st.integers(1, 4), bq=st.sampled_from([16, 32]),
    bk=st.sampled_from([16, 32]), causal=st.booleans(),
    window=st.none() | st.tuples(st.integers(0, 40), st.integers(0, 40)),
    q_valid=st.integers(0, 128), kv_valid=st.integers(0, 128), segments=st.booleans(),
)
# A window edge that lands on the first or last key of a tile (off-by-one bait).
@example(q_tiles=3, kv_tiles=4, bq=16, bk=16, causal=False, window=(1, 1), q_valid=128, kv_valid=128, segments=False)
@example(q_tiles=4, kv_tiles=3, bq=16, bk=32, causal=False, window=(17, 17), q_valid=128, kv_valid=128, segments=False)
@example(q_tiles=4, kv_tiles=4, bq=32, bk=16, causal=True, window=(16, 0), q_valid=128, kv_valid=128, segments=False)
def test_tile_ranges_skip_only_invisible_tiles_and_mask_only_partial_ones(
        q_tiles, kv_tiles, bq, bk, causal, window, q_valid, kv_valid, segments):
    """Brute force over the tile grid: tiles outside [lo, hi) hold no visible pair, tiles in
    [full_lo, full_hi) hold only visible pairs; with full lengths and no segment ids both
    ranges are exact, so every invisible tile is skipped and every full tile is unmasked."""
    q_len, kv_len = q_tiles * bq, kv_tiles * bk
    q_valid, kv_valid = min(q_valid, q_len), min(kv_valid, kv_len)
    left, right = window if window is not None else (None, None)
    if causal:
        right = 0 if right is None else min(right, 0)
    spec = MaskSpec(scale=1.0, left=left, right=right, soft_cap=None, has_segments=segments)
    keep = reference_mask(q_len, kv_len, causal=causal, window=window, q_lens=[q_valid], kv_lens=[kv_valid],
                          q_ids=None, kv_ids=None)[0].reshape(q_tiles, bq, kv_tiles, bk)
    some = keep.any(axis=(1, 3))  # [q tile, kv tile]
    every = keep.all(axis=(1, 3)) & (not segments)  # segment ids may mask any pair
    exact = q_valid == q_len and kv_valid == kv_len

    def check(ranges, some, every):
        lo, full_lo, full_hi, hi = (int(x) for x in ranges)
        assert lo <= full_lo <= full_hi <= hi
        tiles = np.arange(len(some))
        in_range, unmasked = (tiles >= lo) & (tiles < hi), (tiles >= full_lo) & (tiles < full_hi)
        assert not np.any(some & ~in_range) and not np.any(unmasked & ~every), (lo, full_lo, full_hi, hi)
        if exact:
            assert np.array_equal(in_range, some) or (not some.any() and lo == hi)
            assert np.array_equal(unmasked, every)

    scalars = lambda *xs: (jnp.int32(x) for x in xs)  # noqa: E731
    for i in range(q_tiles):
        check(kv_tile_ranges(*scalars(i * bq), bq, bk, *scalars(q_valid, kv_valid), spec), some[i], every[i])
    for j in range(kv_tiles):
        check(q_tile_ranges(*scalars(j * bk), bk, bq, *scalars(q_valid, kv_valid), spec), some[:, j], every[:, j])


# ----------------------------------------------------------------------------- support and bad input
def _qkv(head_dim=64, dtype=jnp.bfloat16, kv_heads=2):
    return (jnp.zeros((1, 8, 4, head_dim), dtype), jnp.zeros((1, 8, kv_heads, head_dim), dtype),
            jnp.zeros((1, 8, kv_heads, head_dim), dtype))


def test_supports_explains_why_not():
    no_extras = dict(bias=None, mask=None, dropout_rate=0.0, logits_soft_cap=None)
    assert "bias" in pallas_gpu.supports(*_qkv(), **{**no_extras, "bias": jnp.zeros((8, 8))})
    assert "mask" in pallas_gpu.supports(*_qkv(), **{**no_extras, "mask": jnp.ones((8, 8), bool)})
    assert "dropout" in pallas_gpu.supports(*_qkv(), **{**no_extras, "dropout_rate": 0.1})
    if ON_GPU:  # a supported call on a GPU, in float32 (TF32 dots) only by explicit request
        assert pallas_gpu.supports(*_qkv(dtype=jnp.bfloat16), **no_extras) is None
        assert "bfloat16" in pallas_gpu.supports(*_qkv(dtype=jnp.float32), **no_extras)
    else:
        assert "GPU" in pallas_gpu.supports(*_qkv(), **no_extras)


def _attend(q, k, v, **overrides):
    args = dict(scale=0.125, is_causal=False, query_seq_lengths=None, key_value_seq_lengths=None,
                segment_ids=None, local_window_size=None, logits_soft_cap=None, block_sizes=None)
    return pallas_gpu.attention(q, k, v, **{**args, **overrides})


@pytest.mark.parametrize("make, overrides, message", [
    (lambda: _qkv(head_dim=48), {}, "head_dim"),
    (lambda: _qkv(kv_heads=3), {}, "multiple"),
    (lambda: (*_qkv()[:2], _qkv(dtype=jnp.float16)[2]), {}, "dtype"),
    (lambda: _qkv(dtype=jnp.int8), {}, "dtype"),
    (_qkv, {"local_window_size": (2, -1)}, "local_window_size"),
    (_qkv, {"logits_soft_cap": 0.0}, "logits_soft_cap"),
    (_qkv, {"query_seq_lengths": jnp.ones((2,), jnp.int32)}, "query_seq_lengths"),
    (_qkv, {"segment_ids": (jnp.zeros((1, 8), jnp.int32), jnp.zeros((1, 7), jnp.int32))}, "segment ids"),
    (_qkv, {"block_sizes": (24, 16)}, "block_q"),
])
def test_bad_input_raises_value_error_naming_it(make, overrides, message):
    with pytest.raises(ValueError, match=message):
        _attend(*make(), **overrides)


def test_table_covers_every_head_dim_and_tuning_stages_vary_one_pass_each():
    for head_dim in pallas_gpu.SUPPORTED_HEAD_DIMS:
        for generation in ("sm80", "sm90"):
            assert isinstance(default_block_sizes(head_dim, generation), BlockSizes)
    with pytest.raises(ValueError, match="head_dim"):
        default_block_sizes(96, "sm90")
    table = default_block_sizes(128, "sm90")
    fwd_fields = {"block_q", "block_k", "num_warps", "num_stages"}
    for stage in STAGES:
        assert stage.timed_pass in ("forward", "backward")
        for option in stage.options:  # each stage varies only its own pass's fields
            assert (set(option) <= fwd_fields) == (stage.timed_pass == "forward"), (stage.name, option)
        sweep = stage_candidates(stage, table)
        assert len(sweep) == len(stage.options) == len(set(sweep))
        assert all(isinstance(c, BlockSizes) for c in sweep)
