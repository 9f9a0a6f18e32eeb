"""Tests for transformer_jax.training against float64 NumPy references, on a tiny local model
(so they do not depend on the model zoo)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from transformer_jax import training

VOCAB, DIM = 11, 8


class TinyLM(nn.Module):
    """Embedding -> LayerNorm -> dropout -> MLP -> head; the head kernel is logically boxed."""

    dropout_rate: float = 0.0

    @nn.compact
    def __call__(self, tokens, *, deterministic=True):
        x = nn.Embed(VOCAB, DIM, name="embed")(tokens)
        x = nn.LayerNorm(name="norm")(x)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        x = nn.gelu(nn.Dense(DIM, name="hidden")(x))
        kernel_init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "vocab"))
        return nn.Dense(VOCAB, kernel_init=kernel_init, name="head")(x)


def _batch(seed, b=8, t=6, weights=False):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, VOCAB, size=(b, t + 1))
    batch = {"inputs": jnp.asarray(tokens[:, :-1], jnp.int32),
             "targets": jnp.asarray(tokens[:, 1:], jnp.int32)}
    if weights:
        batch["weights"] = jnp.asarray(rng.integers(0, 2, size=(b, t)), jnp.float32)
    return batch


def _state(tx, model=TinyLM(), seed=0):
    return training.init_train_state(model, tx, (jnp.zeros((1, 6), jnp.int32),), seed=seed)


def _np_cross_entropy(logits, targets, weights, eps):
    logits = np.asarray(logits, np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
    vocab = logits.shape[-1]
    q = np.full(logp.shape, eps / vocab)
    np.put_along_axis(q, targets[..., None], 1 - eps + eps / vocab, axis=-1)
    per_token = -(q * logp).sum(-1)
    return (per_token * weights).sum(), weights.sum()


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_cross_entropy_matches_float64_reference(eps):
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(3, 5, 7)) * 3
    targets = rng.integers(0, 7, size=(3, 5))
    weights = rng.random((3, 5))
    got = training.cross_entropy(jnp.asarray(logits, jnp.float32), jnp.asarray(targets),
                                 jnp.asarray(weights, jnp.float32), label_smoothing=eps)
    want = _np_cross_entropy(logits, targets, weights, eps)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5)
    # d loss / d logits = weight * (softmax - target distribution)
    grad = jax.grad(lambda x: training.cross_entropy(x, jnp.asarray(targets), jnp.asarray(weights, jnp.float32),
                                                     label_smoothing=eps)[0])(jnp.asarray(logits, jnp.float32))
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    q = np.full(logits.shape, eps / 7)
    np.put_along_axis(q, targets[..., None], 1 - eps + eps / 7, axis=-1)
    np.testing.assert_allclose(grad, weights[..., None] * (probs - q), rtol=1e-4, atol=1e-6)


def test_cross_entropy_rejects_bad_input():
    with pytest.raises(ValueError, match="targets.shape"):
        training.cross_entropy(jnp.zeros((2, 3, 4)), jnp.zeros((2, 4), jnp.int32))
    with pytest.raises(ValueError, match="label_smoothing"):
        training.cross_entropy(jnp.zeros((2, 4)), jnp.zeros((2,), jnp.int32), label_smoothing=1.0)


def test_decay_mask_and_freeze_labels():
    params = _state(optax.sgd(0.1)).params
    mask = {training.param_path(p): v for p, v in jax.tree_util.tree_leaves_with_path(
        training.decay_mask(params))}
    assert mask == {"embed/embedding": False, "norm/scale": False, "norm/bias": False,
                    "hidden/kernel": True, "hidden/bias": False,
                    "head/kernel": True, "head/bias": False}
    labels = jax.tree.leaves(training.param_labels(params, "^(?!head/)"))
    assert sorted(labels).count("trainable") == 2
    with pytest.raises(ValueError, match="freeze="):
        training.make_optimizer(1e-3, freeze="(")


def test_schedule_warmup_then_cosine():
    sched = training.make_schedule(1.0, warmup_steps=10, total_steps=110, final_ratio=0.1)
    np.testing.assert_allclose([sched(0), sched(5), sched(10)], [0.0, 0.5, 1.0], atol=1e-6)
    mid = 0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi * 0.5))  # halfway through the decay
    np.testing.assert_allclose([sched(60), sched(110)], [mid, 0.1], rtol=1e-5)
    with pytest.raises(ValueError, match="warmup_steps"):
        training.make_schedule(1.0, warmup_steps=10, total_steps=10)
    with pytest.raises(ValueError, match="learning_rate"):
        training.make_schedule(0.0, warmup_steps=0, total_steps=10)


def test_weight_decay_skips_masked_params():
    # With zero gradients, AdamW's update is exactly -lr * wd * param on decayed leaves.
    tx = training.make_optimizer(0.5, weight_decay=0.1, grad_clip=None)
    params = _state(tx).params
    grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(grads, tx.init(params), params)
    for path, u in jax.tree_util.tree_leaves_with_path(updates):
        p = params
        for k in path:
            p = p[k.key]
        expect = -0.5 * 0.1 * np.asarray(p) if path[-1].key == "kernel" else np.zeros_like(p)
        np.testing.assert_allclose(np.asarray(u), expect, rtol=1e-6, err_msg=training.param_path(path))


SGD = optax.sgd(0.5)
LOSS = training.make_loss_fn(TinyLM(), "clm")
STEP_1 = jax.jit(training.make_train_step(LOSS, SGD, accum_steps=1))
STEP_4 = jax.jit(training.make_train_step(LOSS, SGD, accum_steps=4))


def test_grad_accumulation_equals_one_big_batch():
    batch = _batch(2, b=8, weights=True)  # unequal weights per micro-batch
    big, m_big = STEP_1(_state(SGD), batch)
    acc, m_acc = STEP_4(_state(SGD), batch)
    np.testing.assert_allclose(m_acc["loss"], m_big["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(acc.params), jax.tree.leaves(big.params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    # and the loss is the weighted mean of the float64 reference
    logits = TinyLM().apply({"params": _state(SGD).params}, batch["inputs"])
    s, w = _np_cross_entropy(logits, np.asarray(batch["targets"]), np.asarray(batch["weights"]), 0.0)
    np.testing.assert_allclose(m_big["loss"], s / w, rtol=1e-5)
    assert int(acc.step) == 1
    with pytest.raises(ValueError, match="accum_steps=4"):
        STEP_4(_state(SGD), _batch(2, b=6))


def test_nonfinite_step_keeps_state_and_reports():
    state = _state(SGD)
    batch = _batch(3, weights=True)
    batch["weights"] = batch["weights"].at[0, 0].set(jnp.nan)
    new, metrics = STEP_1(state, batch)
    assert not bool(metrics["finite"])
    assert int(new.step) == 1
    for a, b in zip(jax.tree.leaves(new.params), jax.tree.leaves(state.params)):
        np.testing.assert_array_equal(a, b)


def test_adamw_training_reduces_loss_and_freezing_holds_params():
    tx = training.make_optimizer(3e-2, weight_decay=0.01, freeze="^embed/")
    model = TinyLM(dropout_rate=0.1)
    step = jax.jit(training.make_train_step(training.make_loss_fn(model, "clm"), tx), donate_argnums=0)
    state = _state(tx, model)
    embed0 = np.asarray(state.params["embed"]["embedding"])
    head0 = np.asarray(state.params["head"]["kernel"])
    # a deterministic sequence (next = token + 1 mod V) is learnable from the current token
    start = np.arange(8)[:, None]
    seq = (start + np.arange(7)[None]) % VOCAB
    batch = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32)}
    losses = []
    for _ in range(60):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < 0.3 * losses[0], losses
    np.testing.assert_array_equal(state.params["embed"]["embedding"], embed0)
    assert not np.allclose(state.params["head"]["kernel"], head0)


def test_dropout_key_depends_on_step_only():
    model = TinyLM(dropout_rate=0.5)
    step = jax.jit(training.make_train_step(training.make_loss_fn(model, "clm"), SGD))
    batch = _batch(4)
    s0 = _state(SGD, model)
    _, m_a = step(s0, batch)
    _, m_b = step(_state(SGD, model), batch)
    _, m_c = step(s0.replace(step=jnp.asarray(1, jnp.int32)), batch)
    assert float(m_a["loss"]) == float(m_b["loss"])
    assert float(m_a["loss"]) != float(m_c["loss"])


def test_init_train_state_abstract_keeps_partition_boxes():
    tx = training.make_optimizer(1e-3, freeze="^embed/")
    abstract = jax.eval_shape(lambda: training.init_train_state(
        TinyLM(), tx, (jnp.zeros((1, 6), jnp.int32),), seed=0, unbox=False))
    head = abstract.params["head"]["kernel"]
    assert isinstance(head, nn.LogicallyPartitioned) and head.names == ("embed", "vocab")
    assert head.value.shape == (DIM, VOCAB)
    plain = _state(tx)
    assert jax.tree.structure(plain) == jax.tree.structure(nn.meta.unbox(abstract))


@pytest.mark.parametrize("kind, flops", [
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H100 PCIe", 756e12), ("NVIDIA H200", 989e12),
    ("NVIDIA A100-SXM4-40GB", 312e12), ("TPU v5 lite", 197e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("cpu", None),
])
def test_peak_flops_table(kind, flops):
    class Device:
        device_kind = kind
    assert training.peak_flops(Device()) == flops


def test_freezing_a_layer_of_a_scanned_stack_equals_freezing_it_unscanned():
    """One --freeze regex, two layouts: the looped stack (blocks/layer_i/...) and the scanned
    one (blocks/layers/... with a leading layer axis) train identically from equal weights.

    Checked in two parts so that float32 rounding cannot decide the outcome: (1) at every
    step the two layouts' gradients agree to float32 rounding; (2) AdamW with the freeze,
    fed the same gradients in either layout for 3 steps (lr 3e-2), leaves layer 0 exactly as
    it was, trains layer 1 and makes the same updates everywhere, key biases included.
    Training each layout on its own gradients and comparing the parameters is
    ill-conditioned: Adam divides each component by its own running magnitude, so a
    component that is a near-cancelling sum (the key bias's is exactly zero in exact
    arithmetic: softmax ignores a shift shared by all keys) turns layout-dependent rounding
    into lr-sized differences; a layer-norm change whose gradients agree with a float64
    reference moved one key-kernel element by 14x the old tolerance that way.
    """
    from transformer_jax import DecoderLM, get_config

    tx = training.make_optimizer(3e-2, weight_decay=0.1, freeze="^blocks/layer_0/")
    rng = np.random.default_rng(0)
    seq = rng.integers(0, 61, (4, 9))
    batch = {"inputs": jnp.asarray(seq[:, :-1], jnp.int32), "targets": jnp.asarray(seq[:, 1:], jnp.int32)}
    grad_fns = {}
    for scan in (False, True):
        model = DecoderLM(get_config("tiny", scan_layers=scan, dropout_rate=0.0))
        grad_fns[scan] = jax.jit(jax.grad(lambda p, m=model: training.make_loss_fn(m, "clm")(p, batch)[0]))
    looped = training.init_train_state(DecoderLM(get_config("tiny", dropout_rate=0.0)), tx,
                                       (batch["inputs"],), seed=0).params

    def stack(tree):  # looped layout -> scanned layout
        layers = [tree["blocks"][f"layer_{i}"] for i in range(2)]
        return {**tree, "blocks": {"layers": jax.tree.map(lambda *xs: jnp.stack(xs), *layers)}}

    params = {False: looped, True: stack(looped)}
    opt_state = {scan: tx.init(p) for scan, p in params.items()}
    update = jax.jit(tx.update)
    for _ in range(3):
        grads = {scan: grad_fns[scan](p) for scan, p in params.items()}
        scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(grads[False]))
        for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stack(grads[False])),
                                jax.tree.leaves(grads[True])):
            np.testing.assert_allclose(b, a, rtol=2e-5, atol=2e-6 * scale, err_msg=training.param_path(path))
        fed = {False: grads[False], True: stack(grads[False])}
        for scan in params:
            updates, opt_state[scan] = update(fed[scan], opt_state[scan], params[scan])
            params[scan] = optax.apply_updates(params[scan], updates)

    before, after = stack(looped)["blocks"]["layers"], params[True]["blocks"]["layers"]
    for (path, old), new in zip(jax.tree_util.tree_leaves_with_path(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(new[0], old[0], err_msg=f"layer 0 {path} moved")
        assert not np.allclose(new[1], old[1]), f"layer 1 {path} did not train"
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(stack(params[False])),
                            jax.tree.leaves(params[True])):
        np.testing.assert_allclose(b, a, rtol=2e-6, atol=2e-7, err_msg=training.param_path(path))
