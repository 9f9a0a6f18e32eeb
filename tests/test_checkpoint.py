"""Tests for transformer_jax.checkpoint: exact round trip, retention, atomicity, fallback."""
import os
import shutil

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import checkpoint, training


class Tiny(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(nn.Dense(4, name="body")(x)))


TX = training.make_optimizer(1e-2, freeze="^body/")  # frozen leaves give empty optimizer nodes


def _state(seed):
    """A state with non-trivial optimizer moments, different for each seed."""
    state = training.init_train_state(Tiny(), TX, (jnp.zeros((1, 5)),), seed=seed)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.1 * (seed + 1)), state.params)
    updates, opt_state = TX.update(grads, state.opt_state, state.params)
    return state.replace(step=jnp.asarray(seed, jnp.int32), opt_state=opt_state,
                         params=jax.tree.map(jnp.add, state.params, updates))


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, losses, **kwargs):
    with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
        for step, loss in losses.items():
            assert ckpt.save(step, _state(step), val_loss=loss)
        ckpt.wait()


def test_round_trip_is_exact(tmp_path):
    _save_steps(tmp_path, {3: 1.5})
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(checkpoint.abstract_state(_state(0)))
        params = ckpt.restore_params()
    _assert_same(restored, _state(3))
    _assert_same(params, jax.tree.map(np.asarray, _state(3).params))


def test_restore_on_empty_directory_returns_none(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.restore(checkpoint.abstract_state(_state(0))) is None
        with pytest.raises(FileNotFoundError):
            ckpt.restore_params()


def test_keeps_last_n_plus_best(tmp_path):
    _save_steps(tmp_path, {1: 3.0, 2: 1.0, 3: 2.0, 4: None, 5: 2.5, 6: None},
                max_to_keep=2, keep_best=1)
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2, keep_best=1) as ckpt:
        assert ckpt.all_steps() == [2, 5, 6]
        assert ckpt.best_step() == 2
        assert ckpt.latest_step() == 6


def test_refuses_non_finite_state(tmp_path):
    bad = _state(1)
    bad = bad.replace(params=jax.tree.map(lambda p: p.at[..., 0].set(jnp.nan), bad.params))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.raises(ValueError, match="non-finite.*step 1"):
            ckpt.save(1, bad)
        ckpt.wait()
        assert ckpt.all_steps() == []


def _truncate_files(directory):
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "r+b") as f:
                f.truncate(os.path.getsize(f.name) // 2)


def test_half_written_save_is_never_restored(tmp_path):
    _save_steps(tmp_path, {1: None, 2: None})
    # a save killed mid-way leaves only Orbax's temporary directory behind
    partial = tmp_path / "3.orbax-checkpoint-tmp-1700000000"
    shutil.copytree(tmp_path / "2", partial)
    _truncate_files(partial)
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.all_steps() == [1, 2]
        _assert_same(ckpt.restore(checkpoint.abstract_state(_state(0))), _state(2))
        assert ckpt.save(3, _state(3))  # the step number is free again
        ckpt.wait()
        assert ckpt.all_steps() == [1, 2, 3]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back_with_warning(tmp_path, damage):
    _save_steps(tmp_path, {1: None, 2: None})
    if damage == "truncate":
        _truncate_files(tmp_path / "2" / "params")
    else:
        shutil.rmtree(tmp_path / "2" / "opt_state")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning, match="step 2 .* unreadable"):
            restored = ckpt.restore(checkpoint.abstract_state(_state(0)))
        _assert_same(restored, _state(1))
        assert ckpt.all_steps() == [1]
        assert ckpt.save(2, _state(2))  # later saves can reuse the step
        ckpt.wait()
    assert any(n.startswith("2.corrupt-") for n in os.listdir(tmp_path))


def test_restore_onto_given_shardings(tmp_path):
    _save_steps(tmp_path, {1: None})
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ("data",))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    state = _state(0)
    shardings = jax.tree.map(lambda _: replicated, state)
    # split the head kernel's 4 rows over the 2 devices, replicate everything else
    shardings = shardings.replace(params={**shardings.params, "head": {
        **shardings.params["head"], "kernel": split}})
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        restored = ckpt.restore(checkpoint.abstract_state(state, shardings))
    assert restored.params["head"]["kernel"].sharding == split
    assert restored.params["norm"]["scale"].sharding == replicated
    _assert_same(restored, _state(1))


@pytest.mark.parametrize("directory", ["gs://bucket/run/checkpoints", "s3://b/ckpt"])
def test_checkpointer_keeps_url_directories(directory, monkeypatch):
    opened = []

    class Manager:  # stands in for Orbax, which would open the bucket
        def __init__(self, path, **kwargs):
            opened.append(path)

    monkeypatch.setattr(checkpoint.ocp, "CheckpointManager", Manager)
    assert checkpoint.Checkpointer(directory).directory == directory
    assert opened == [directory]


def test_checkpointer_makes_local_directories_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with checkpoint.Checkpointer("run/checkpoints") as ckpt:
        assert ckpt.directory == str(tmp_path / "run" / "checkpoints")
