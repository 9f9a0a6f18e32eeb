"""Tests for transformer_jax.checkpoint: exact round trip, retention, atomicity, checksums, fallback, faults."""
import asyncio
import contextlib
import os
import shutil
import subprocess
import sys
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from processes import REPO, cpu_env
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
        with pytest.warns(UserWarning, match="step 2 .* damaged"):
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


# ------------------------------------------------------------------ checksums and faults


def _numpy_checksum(x: np.ndarray) -> tuple[int, int]:
    """leaf_checksum's definition written out in NumPy uint64 arithmetic, element by element order."""
    m = (1 << 32) - 1

    def fmix(h):
        h = h ^ (h >> 16)
        h = (h * 0x85EBCA6B) & m
        h = h ^ (h >> 13)
        h = (h * 0xC2B2AE35) & m
        return h ^ (h >> 16)

    words = x.reshape(-1).view({1: np.uint8, 2: np.uint16, 4: np.uint32}[x.dtype.itemsize])
    w = words.astype(np.uint64)
    i = np.arange(w.size, dtype=np.uint64)
    a = fmix(w ^ fmix(i))
    b = fmix(((w ^ fmix(i ^ 0x9E3779B9)) * 0x27D4EB2F) & m)
    return int(a.sum() & m), int(b.sum() & m)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "int32", "uint8"])
def test_leaf_checksum_matches_numpy_definition(dtype):
    rng = np.random.default_rng()
    x = (rng.normal(size=(7, 5, 3)) * 100).astype(jnp.dtype(dtype))
    got = np.asarray(checkpoint.leaf_checksum(jnp.asarray(x)))
    assert tuple(int(v) for v in got) == _numpy_checksum(np.asarray(x))


def test_leaf_checksum_ignores_sharding_and_sees_one_bit():
    rng = np.random.default_rng()
    x = rng.normal(size=(8, 6)).astype(np.float32)
    mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("a", "b"))
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("a", "b")))
    whole = np.asarray(checkpoint.leaf_checksum(jnp.asarray(x)))
    np.testing.assert_array_equal(np.asarray(jax.jit(checkpoint.leaf_checksum)(sharded)), whole)
    flipped = x.copy()
    flipped.view(np.uint32)[rng.integers(8), rng.integers(6)] ^= np.uint32(1 << int(rng.integers(32)))
    assert (np.asarray(checkpoint.leaf_checksum(jnp.asarray(flipped))) != whole).all()


class Wide(nn.Module):
    """A 64x64 kernel: large enough that Orbax stores its values in a data file of their own."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(64, name="wide")(x)


WIDE_TX = training.make_optimizer(1e-2)


def _wide_state(seed):
    state = training.init_train_state(Wide(), WIDE_TX, (jnp.zeros((1, 64)),), seed=seed)
    return state.replace(step=jnp.asarray(seed, jnp.int32))


def _flip_byte_in_array_data(step_dir):
    """Flip one bit in the middle of the largest data file of the params item (the kernel's
    values: random floats that zstd leaves as raw bytes)."""
    files = [os.path.join(r, n) for r, _, ns in os.walk(step_dir / "params") for n in ns
             if os.sep + "d" + os.sep in os.path.join(r, n)]
    target = max(files, key=os.path.getsize)
    data = bytearray(open(target, "rb").read())
    data[len(data) // 2] ^= 0x04
    open(target, "wb").write(bytes(data))


def test_flipped_byte_in_array_data_falls_back_to_older(tmp_path):
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        for step in (1, 2):
            ckpt.save(step, _wide_state(step))
    _flip_byte_in_array_data(tmp_path / "2")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning, match="step 2 .* damaged: .*checksum"):
            restored = ckpt.restore(checkpoint.abstract_state(_wide_state(0)))
        _assert_same(restored, _wide_state(1))
        assert ckpt.all_steps() == [1]
    assert [n for n in os.listdir(tmp_path) if n.startswith("2.corrupt-")]  # set aside, not deleted


def test_damaged_checksum_manifest_is_corruption(tmp_path):
    _save_steps(tmp_path, {1: None, 2: None})
    manifest = tmp_path / "2" / "checksums" / "metadata"
    text = open(manifest).read()
    open(manifest, "w").write(text.replace('"float32"', '"float16"', 1))  # valid JSON, wrong digest
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        with pytest.warns(UserWarning, match="step 2 .* manifest fails its own digest"):
            _assert_same(ckpt.restore(checkpoint.abstract_state(_state(0))), _state(1))


def test_shape_or_structure_mismatch_is_a_configuration_error_that_renames_nothing(tmp_path):
    _save_steps(tmp_path, {1: None, 2: None})
    before = sorted(os.listdir(tmp_path))

    class Wider(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(nn.Dense(6, name="body")(x)))

    class Deeper(nn.Module):  # a structure change: one layer more (e.g. another --num-layers)
        @nn.compact
        def __call__(self, x):
            x = nn.Dense(4, name="extra")(nn.Dense(4, name="body")(x))
            return nn.Dense(3, name="head")(nn.LayerNorm(name="norm")(x))

    for module, error in [
            (Wider(), r"step 2 .*\['body'\]\['kernel'\]: saved \(5, 4\) float32, expected \(5, 6\)"),
            (Deeper(), r"step 2 .*\['extra'\]\['bias'\]: not in the checkpoint")]:
        other = training.init_train_state(module, TX, (jnp.zeros((1, 5)),), seed=0)
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            with pytest.raises(checkpoint.CheckpointMismatchError, match=error):
                ckpt.restore(checkpoint.abstract_state(other))
        assert sorted(os.listdir(tmp_path)) == before


@pytest.mark.parametrize("error", [MemoryError("host out of memory"),
                                   PermissionError(13, "Permission denied"),
                                   ValueError("RESOURCE_EXHAUSTED: Error reading local file")])
def test_environment_failure_propagates_and_renames_nothing(tmp_path, monkeypatch, error):
    _save_steps(tmp_path, {1: None, 2: None})
    before = sorted(os.listdir(tmp_path))
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        real = ckpt._manager.restore

        def failing(step, args=None):
            if "params" in args.keys():  # the manifest reads fine; the arrays "fail"
                raise error
            return real(step, args=args)

        monkeypatch.setattr(ckpt._manager, "restore", failing)
        with pytest.raises(type(error)):
            ckpt.restore(checkpoint.abstract_state(_state(0)))
    assert sorted(os.listdir(tmp_path)) == before


def test_no_readable_checkpoint_is_an_error_now_and_on_the_next_run(tmp_path):
    _save_steps(tmp_path, {1: None, 2: None})
    _truncate_files(tmp_path / "1" / "params")
    _truncate_files(tmp_path / "2" / "params")
    for _ in range(2):  # the second time every step has been set aside already
        with checkpoint.Checkpointer(tmp_path) as ckpt:
            with pytest.warns(UserWarning) if ckpt.all_steps() else contextlib.nullcontext():
                with pytest.raises(checkpoint.NoReadableCheckpointError, match="no readable checkpoint"):
                    ckpt.restore(checkpoint.abstract_state(_state(0)))
    assert len([n for n in os.listdir(tmp_path) if ".corrupt-" in n]) == 2


def test_restore_params_falls_back_from_a_truncated_best_and_renames_nothing(tmp_path):
    _save_steps(tmp_path, {1: 1.0, 2: 2.0, 3: None}, max_to_keep=3)
    _truncate_files(tmp_path / "1" / "params")
    with checkpoint.Checkpointer(tmp_path) as ckpt:
        assert ckpt.best_step() == 1
        with pytest.warns(UserWarning, match="step 1 .* damaged"):
            params = ckpt.restore_params()
    _assert_same(params, jax.tree.map(np.asarray, _state(2).params))  # the next best by loss
    assert sorted(os.listdir(tmp_path)) == ["1", "2", "3"]


def test_step_with_unparsable_orbax_metadata_is_set_aside_when_opened(tmp_path):
    _save_steps(tmp_path, {1: None, 2: None})
    _truncate_files(tmp_path / "2")  # _CHECKPOINT_METADATA too: Orbax could not open the directory
    with pytest.warns(UserWarning, match="step 2 .* damaged: _CHECKPOINT_METADATA cannot be parsed"):
        ckpt = checkpoint.Checkpointer(tmp_path)
    with ckpt:
        assert ckpt.all_steps() == [1]
        _assert_same(ckpt.restore(checkpoint.abstract_state(_state(0))), _state(1))
    assert [n for n in os.listdir(tmp_path) if n.startswith("2.corrupt-")]


def test_disk_full_is_one_line_naming_the_path(tmp_path):
    """A real full disk: a 1.5 MB tmpfs mounted in a private mount namespace (unshare -rm)."""
    mount = tmp_path / "mnt"
    mount.mkdir()
    script = tmp_path / "fill.py"
    script.write_text(DISK_FULL_CHILD)
    command = (f"mount -t tmpfs -o size=1500k tmpfs {mount} && "
               f"{sys.executable} {script} {mount}/run/checkpoints")
    try:
        probe = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs tmpfs {mount}"],
                               capture_output=True, timeout=30)
    except FileNotFoundError:
        probe = None
    if probe is None or probe.returncode != 0:
        pytest.skip("cannot mount a tmpfs in a user namespace here (unshare -rm)")
    result = subprocess.run(["unshare", "-rm", "sh", "-c", command], capture_output=True, text=True,
                            env=cpu_env(), cwd=REPO, timeout=300)
    assert result.returncode == 3, result.stdout + result.stderr
    assert result.stdout.strip().splitlines()[-1].startswith(
        f"DiskFullError: [Errno 28] disk full: no space left on the device holding {mount}/run/checkpoints")
    noise = [line for line in result.stderr.splitlines() if "Traceback" in line or "asyncio" in line]
    assert not noise, result.stderr[-3000:]


DISK_FULL_CHILD = """
import sys
import jax
import jax.numpy as jnp
from transformer_jax import checkpoint
from transformer_jax.training import TrainState

# many arrays written in parallel: when one write fails the others still complete later
params = {f"p{i}": jax.random.normal(jax.random.key(i), (4096,)) for i in range(24)}
state = TrainState(step=jnp.int32(0), params=params, opt_state={"count": jnp.zeros(3)},
                   rng=jnp.zeros(2, jnp.uint32))
try:
    with checkpoint.Checkpointer(sys.argv[1], max_to_keep=100) as ckpt:
        for step in range(1, 100):
            ckpt.save(step, state)
except checkpoint.DiskFullError as e:
    print(f"DiskFullError: {e}")
    sys.exit(3)
"""


def test_only_closed_loop_callbacks_from_outside_python_are_dropped():
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        closed = e
    passed = []
    hook = checkpoint._drop_closed_loop_callbacks(passed.append)
    from_cpp = types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed, object=None,
                                     exc_traceback=closed.__traceback__.tb_next)  # no Python caller
    from_python = types.SimpleNamespace(exc_type=RuntimeError, exc_value=closed, object=None,
                                        exc_traceback=closed.__traceback__)
    other = types.SimpleNamespace(exc_type=ValueError, exc_value=ValueError("x"), object=None,
                                  exc_traceback=None)
    for unraisable in (from_cpp, from_python, other):
        hook(unraisable)
    assert passed == [from_python, other]
