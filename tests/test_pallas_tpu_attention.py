"""jax's splash-attention kernel behind our semantics (pallas_tpu), in Pallas interpret mode
on CPU, against float64 NumPy: outputs and gradients w.r.t. q, k and v."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

pytest.importorskip("jax.experimental.pallas.ops.tpu.splash_attention",
                    reason="this jax has no bundled splash kernel (pallas_tpu.supports says so too)")

from fused_reference import Case, assert_bfloat16_within_its_precision, assert_float32_matches
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


@pytest.mark.parametrize("name", sorted(CASES))
def test_float32_output_and_gradients_match_float64_reference(name):
    case = CASES[name]
    assert_float32_matches(pallas_tpu.attention, case, seed=len(name),
                           expect_empty_rows=case.lengths or case.segments or name == "window-beyond-keys")


def test_bfloat16_uses_float32_statistics():
    assert_bfloat16_within_its_precision(pallas_tpu.attention, CASES["everything"], seed=7)


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
    q = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)  # beyond REFERENCE_MAX_SCORES: blockwise
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
    longer = jnp.zeros((1, 512, 2, 64), jnp.bfloat16)  # beyond the reference's REFERENCE_MAX_SCORES too
    bias = jnp.zeros((1, 2, 512, 512), jnp.bfloat16)
    assert select_implementation(longer, longer, longer, bias).implementation == "blockwise"
    assert select_implementation(long, long, long, implementation="pallas").implementation == "pallas"


def test_a_model_on_a_tpu_mesh_runs_splash_per_shard(monkeypatch):
    """End to end, with the backend reported as TPU (the kernel then runs in interpret mode
    on this CPU): auto picks splash for 256-token rows, the layer runs it per shard of a
    data x fsdp x tensor mesh, and the model's loss and gradients equal a reference run."""
    from transformer_jax import sharding, training
    from transformer_jax.config import ModelConfig
    from transformer_jax.models import DecoderLM

    cfg = dict(vocab_size=32, max_len=256, d_model=128, num_heads=2, num_layers=2, d_ff=64,
               dropout_rate=0.0, scan_layers=True)
    batch = {"inputs": jax.random.randint(jax.random.key(1), (4, 256), 0, 32),
             "targets": jax.random.randint(jax.random.key(2), (4, 256), 0, 32)}

    params = DecoderLM(ModelConfig(**cfg)).init(jax.random.key(0), batch["inputs"][:1])["params"]

    def loss_and_grads(attention_impl):
        loss_fn = training.make_loss_fn(DecoderLM(ModelConfig(**cfg, attention_impl=attention_impl)), "clm")
        return jax.jit(jax.value_and_grad(lambda p: loss_fn(p, batch)[0]))(params)

    want_loss, want_grads = loss_and_grads("reference")
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    calls = []
    kernel = pallas_tpu.attention
    monkeypatch.setattr(pallas_tpu, "attention", lambda q, *a, **kw: calls.append(q.shape) or kernel(q, *a, **kw))
    q = jax.ShapeDtypeStruct((1, 256, 2, 64), jnp.float32)
    assert select_implementation(q, q, q, is_causal=True).implementation == "pallas"
    with sharding.use_mesh(sharding.make_mesh("data=2,fsdp=2,tensor=2")):
        got_loss, got_grads = loss_and_grads(None)
    assert calls and set(calls) == {(1, 256, 1, 64)}  # the kernel saw one row and one head per device
    assert abs(float(got_loss) - float(want_loss)) <= 1e-5 * abs(float(want_loss))
    # Per leaf, relative to its largest entry: sums of many float32 terms, added in another
    # order (online softmax, per-shard), differ by rounding that is relative to their size.
    # Key biases are left out: softmax ignores a shift shared by all keys, so their exact
    # gradient is 0 and both runs hold only rounding noise there.
    largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want_grads))
    for (path, got), want in zip(jax.tree_util.tree_leaves_with_path(got_grads), jax.tree.leaves(want_grads)):
        name = jax.tree_util.keystr(path)
        if "['key']['bias']" in name:  # noise in both runs, far below every real gradient
            assert max(float(jnp.max(jnp.abs(got))), float(jnp.max(jnp.abs(want)))) <= 1e-6 * largest, name
            continue
        error = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
        assert error <= 1e-5, (name, error)


def test_default_blocks_are_lane_multiples_that_pad_little():
    for n in range(1, 5000, 37):
        block, _ = pallas_tpu._blocks(None, n, n)
        least = -(-n // 128) * 128  # padded to 128-wide blocks
        assert block % 128 == 0 and 128 <= block <= 512
        assert -(-n // block) * block <= least * 9 // 8, n
        if -(-n // 512) * 512 <= least * 9 // 8 and least >= 512:
            assert block == 512, n
    assert pallas_tpu._blocks((256, 128), 1000, 1000) == (256, 128)
