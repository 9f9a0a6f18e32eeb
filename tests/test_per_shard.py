"""Fused kernels under a mesh: attention computed shard by shard (batch rows x heads) equals
attention computed whole, for every way key/value heads can line up with query heads."""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import sharding
from transformer_jax.attention import Selection, dot_product_attention
from transformer_jax.config import ModelConfig
from transformer_jax.layers import attention as attention_layer
from transformer_jax.layers.per_shard import attend_per_shard


def _reference(q, k, v, segment_ids, seen=None):
    if seen is not None:
        seen.append((q.shape, k.shape))
    return dot_product_attention(q, k, v, segment_ids=segment_ids, is_causal=True, implementation="reference")


@pytest.mark.parametrize("spec, heads, kv_heads, local_q, local_kv", [
    ("data=2,tensor=4", 8, 8, 2, 2),    # key/value heads split like the query heads
    ("data=2,tensor=4", 8, 2, 2, 1),    # GQA: each device's two query heads share one kv head
    ("data=2,tensor=4", 8, 1, 2, 1),    # MQA
    ("data=2,tensor=4", 12, 6, 12, 6),  # 3 query heads per device, groups of 2: heads not split
    ("fsdp=4,tensor=2", 4, 2, 2, 1),    # batch over fsdp
])
def test_per_shard_attention_equals_whole_attention(spec, heads, kv_heads, local_q, local_kv):
    mesh = sharding.make_mesh(spec)
    rng = np.random.default_rng(heads * 10 + kv_heads)
    b, t, d = 4, 16, 8
    q = jnp.asarray(rng.standard_normal((b, t, heads, d)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((b, t, kv_heads, d)), jnp.float32) for _ in range(2))
    ids = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1), jnp.int32)

    def loss(attend, q, k, v):
        return jnp.sum(jnp.sin(attend(q, k, v)))

    whole = functools.partial(_reference, segment_ids=ids)
    want, want_grads = jax.value_and_grad(loss, argnums=(1, 2, 3))(whole, q, k, v)
    seen = []
    local = functools.partial(_reference, seen=seen)
    with sharding.use_mesh(mesh):
        got, grads = jax.jit(jax.value_and_grad(
            lambda q, k, v: loss(lambda q, k, v: attend_per_shard(local, q, k, v, ids), q, k, v),
            argnums=(0, 1, 2)))(q, k, v)
    batch_shards = 2 if spec.startswith("data=2") else 4
    assert seen[0] == ((b // batch_shards, t, local_q, d), (b // batch_shards, t, local_kv, d))
    np.testing.assert_allclose(got, want, rtol=1e-5)
    for label, g, w in zip("qkv", grads, want_grads):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-6, err_msg=f"d{label}")


def test_without_a_mesh_the_kernel_is_called_directly():
    q = jnp.ones((1, 4, 2, 8))
    calls = []
    attend_per_shard(lambda *args: calls.append(args) or args[0], q, q, q)
    assert len(calls) == 1 and calls[0][0] is q


def test_the_attention_layer_splits_a_pallas_kernel_by_hand(monkeypatch):
    """The layer routes a call whose selection is "pallas" through attend_per_shard (the
    kernel itself needs a GPU/TPU, so a reference stands in for it here)."""
    routed = []

    def fake_select(*args, **kwargs):
        return Selection("pallas", "test")

    def fake_per_shard(attend, q, k, v, segment_ids):
        routed.append(q.shape)
        return attend_per_shard(attend, q, k, v, segment_ids)

    def reference_instead(q, k, v, **kwargs):
        return dot_product_attention(q, k, v, **{**kwargs, "implementation": "reference"})

    cfg = ModelConfig(vocab_size=8, max_len=16, d_model=32, num_heads=4, num_kv_heads=2, num_layers=1, d_ff=32)
    layer = attention_layer.MultiHeadAttention(cfg, causal=True)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((4, 16, 32)), jnp.float32)
    params = layer.init(jax.random.key(0), x)
    want = layer.apply(params, x)
    monkeypatch.setattr(attention_layer, "select_implementation", fake_select)
    monkeypatch.setattr(attention_layer, "attend_per_shard", fake_per_shard)
    monkeypatch.setattr(attention_layer, "dot_product_attention", reference_instead)
    with sharding.use_mesh(sharding.make_mesh("data=2,fsdp=2,tensor=2")):
        got = jax.jit(layer.apply)(params, x)
    assert routed == [(4, 16, 4, 8)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
