"""Tests for transformer_jax.sharding on 8 virtual CPU devices (tests/conftest.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import distributed_worker as worker  # tests/ is on sys.path under pytest
from transformer_jax import checkpoint, sharding


# ------------------------------------------------------------------------------ mesh


@pytest.mark.parametrize(
    "spec, shape",
    [
        (None, (8, 1, 1)),
        ("", (8, 1, 1)),
        ("data=8", (8, 1, 1)),
        ("data=2,fsdp=2,tensor=2", (2, 2, 2)),
        (" tensor = 4 , fsdp=-1 ", (1, 2, 4)),
        ("fsdp=-1", (1, 8, 1)),
        ("data=-1,tensor=2", (4, 1, 2)),
    ],
)
def test_make_mesh_shapes(spec, shape):
    mesh = sharding.make_mesh(spec)
    assert mesh.axis_names == ("data", "fsdp", "tensor")
    assert tuple(mesh.shape.values()) == shape
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in jax.devices())


def test_make_mesh_on_a_subset_of_devices():
    mesh = sharding.make_mesh("fsdp=2,tensor=-1", devices=jax.devices()[:4])
    assert tuple(mesh.shape.values()) == (1, 2, 2)
    assert {d.id for d in mesh.devices.flat} == {d.id for d in jax.devices()[:4]}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("data=3", "multiply to 3, expected the device count 8"),
        ("data=2,fsdp=2", "multiply to 4"),
        ("data=16", "multiply to 16"),
        ("data=3,fsdp=-1", "does not divide the 8 devices"),
        ("pipeline=8", "unknown axis 'pipeline'"),
        ("data=2,data=4", "given twice"),
        ("data=-1,fsdp=-1", "only one axis may be -1"),
        ("data", "not 'axis=size'"),
        ("data=2;fsdp=4", "not an integer"),
        ("data=two", "not an integer"),
        ("data=0,fsdp=-1", "expected >= 1 or -1"),
        ("data=-2", "expected >= 1 or -1"),
    ],
)
def test_make_mesh_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message) as info:
        sharding.make_mesh(spec)
    assert repr(spec) in str(info.value)  # the error names the offending spec


def test_make_mesh_rejects_non_string_spec():
    with pytest.raises(TypeError, match="spec="):
        sharding.make_mesh(8)


# ------------------------------------------------------------------- state shardings


class _Toy(nn.Module):
    """Parameters with logical names, as the models declare them."""

    heads: int = 4
    names: tuple = ("embed", "heads", "head_dim")

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal()
        qkv = self.param("qkv", nn.with_logical_partitioning(init, self.names), (8, self.heads, 2))
        emb = self.param("emb", nn.with_logical_partitioning(init, ("vocab", "embed")), (12, 8))
        mlp = self.param("mlp", nn.with_logical_partitioning(init, ("layers", "mlp", "embed")), (2, 16, 8))
        plain = self.param("plain", init, (3,))
        return x @ emb.T + qkv.sum() + mlp.sum() + plain.sum()


def _abstract(module=_Toy(), boxed=True):
    variables = jax.eval_shape(module.init, jax.random.key(0), jnp.ones((1, 8)))
    return variables if boxed else nn.meta.unbox(variables)


def test_state_shardings_follow_the_logical_rules():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    specs = jax.tree.map(lambda s: s.spec, sharding.state_shardings(_abstract(), mesh))
    P = jax.sharding.PartitionSpec
    assert specs["params"] == {
        "qkv": P("fsdp", "tensor", None),
        "emb": P("tensor", "fsdp"),
        "mlp": P(None, "tensor", "fsdp"),
        "plain": P(),
    }


def test_state_shardings_shard_optimizer_moments_like_parameters():
    import optax

    params = _abstract()["params"]
    state = {"params": params, "opt": jax.eval_shape(optax.adam(1e-3).init, params)}
    out = sharding.state_shardings(state, sharding.make_mesh("fsdp=4,tensor=2"))
    mu, nu = out["opt"][0].mu, out["opt"][0].nu
    for name in ("qkv", "emb", "mlp"):
        assert mu[name] == nu[name] == out["params"][name]
    assert out["opt"][0].count.spec == jax.sharding.PartitionSpec()


def test_state_shardings_rejects_heads_not_divisible_by_tensor():
    with pytest.raises(ValueError, match=r"\['qkv'\]: heads \(6\) is not divisible by the size 4"):
        sharding.state_shardings(_abstract(_Toy(heads=6)), sharding.make_mesh("fsdp=2,tensor=4"))


def test_state_shardings_leaves_other_indivisible_dimensions_unsplit():
    # vocab 12 over tensor=8 cannot split: it stays whole, with a warning.
    with pytest.warns(UserWarning, match="vocab=12 over tensor=8"):
        out = sharding.state_shardings(_abstract(_Toy(heads=8)), sharding.make_mesh("tensor=8"))
    assert out["params"]["emb"].spec == jax.sharding.PartitionSpec(None, "fsdp")  # fsdp=1
    assert out["params"]["qkv"].spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)


def test_state_shardings_rejects_unknown_logical_axes():
    module = _Toy(names=("embed", "attention_heads", "head_dim"))
    with pytest.raises(ValueError, match=r"\['attention_heads'\] have no rule"):
        sharding.state_shardings(_abstract(module), sharding.make_mesh())


def test_state_shardings_rejects_unboxed_state_on_a_model_parallel_mesh():
    with pytest.raises(ValueError, match="no nn.LogicallyPartitioned leaves"):
        sharding.state_shardings(_abstract(boxed=False), sharding.make_mesh("fsdp=8"))
    # Pure data parallelism replicates everything anyway, so unboxed is fine there.
    out = sharding.state_shardings(_abstract(boxed=False), sharding.make_mesh())
    assert all(s.spec == jax.sharding.PartitionSpec() for s in jax.tree.leaves(out))


def test_use_mesh_turns_logical_constraints_into_shardings():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    constrain = lambda x: nn.with_logical_constraint(2 * x, ("batch", "length", "mlp"))  # noqa: E731
    x = jnp.asarray(np.random.default_rng(1).normal(size=(8, 3, 4)), jnp.float32)
    with sharding.use_mesh(mesh):
        y = jax.jit(constrain)(x)
    assert y.sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"), None, "tensor")
    np.testing.assert_array_equal(np.asarray(y), 2 * np.asarray(x))
    # Outside, the annotation is a no-op: the result stays on x's single device.
    assert len(jax.jit(lambda x: constrain(x) + 0)(x).sharding.device_set) == 1


# --------------------------------------------------------------------------- batches


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=2,tensor=2", "tensor=8"])
def test_make_global_batch_single_process(spec):
    mesh = sharding.make_mesh(spec)
    rows = np.random.default_rng(0).integers(0, 100, size=(8, 5)).astype(np.int32)
    assert sharding.process_batch_slice(mesh, 8) == slice(0, 8)
    batch = sharding.make_global_batch({"inputs": rows, "weights": rows[:, 0] * 0.5}, mesh)
    np.testing.assert_array_equal(np.asarray(batch["inputs"]), rows)
    np.testing.assert_array_equal(np.asarray(batch["weights"]), rows[:, 0] * 0.5)
    split = mesh.shape["data"] * mesh.shape["fsdp"]
    for shard in batch["inputs"].addressable_shards:  # each device holds its own rows
        assert shard.data.shape == (8 // split, 5)
        np.testing.assert_array_equal(np.asarray(shard.data), rows[shard.index])


def test_batch_size_must_split_over_the_batch_axes():
    mesh = sharding.make_mesh("data=2,fsdp=2,tensor=2")
    with pytest.raises(ValueError, match="global_batch_size=6: expected a positive multiple of data\\*fsdp=4"):
        sharding.process_batch_slice(mesh, 6)
    with pytest.raises(ValueError, match=r"local_array of shape \(6, 3\)"):
        sharding.make_global_batch(np.zeros((6, 3), np.int32), mesh)


# ---------------------------------------------------------------- distributed start-up

_DIST_ENV = (
    "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID", "SLURM_NTASKS",
    "OMPI_COMM_WORLD_SIZE", "TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES",
    "MEGASCALE_COORDINATOR_ADDRESS",
)


@pytest.fixture
def fake_initialize(monkeypatch):
    """Record calls to jax.distributed.initialize instead of joining a cluster."""
    for name in _DIST_ENV:
        monkeypatch.delenv(name, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *args, **kwargs: calls.append(args))
    return calls


def test_initialize_distributed_is_a_no_op_for_one_process(fake_initialize, monkeypatch):
    sharding.initialize_distributed()
    monkeypatch.setenv("SLURM_NTASKS", "1")  # a one-task Slurm job is still one process
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "localhost")
    sharding.initialize_distributed()
    assert fake_initialize == []


def test_initialize_distributed_from_arguments_and_environment(fake_initialize, monkeypatch):
    sharding.initialize_distributed("10.0.0.1:1234", 4, 3)
    monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "host0:8476")
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAX_PROCESS_ID", "1")
    sharding.initialize_distributed()
    sharding.initialize_distributed(process_id=0)  # arguments win over the environment
    assert fake_initialize == [("10.0.0.1:1234", 4, 3), ("host0:8476", 2, 1), ("host0:8476", 2, 0)]


@pytest.mark.parametrize("variable, value", [("SLURM_NTASKS", "8"), ("OMPI_COMM_WORLD_SIZE", "2"),
                                             ("TPU_WORKER_HOSTNAMES", "w0,w1")])
def test_initialize_distributed_lets_jax_read_a_launcher(fake_initialize, monkeypatch, variable, value):
    monkeypatch.setenv(variable, value)
    sharding.initialize_distributed()
    assert fake_initialize == [(None, None, None)]


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(coordinator_address="localhost", num_processes=2, process_id=0), ValueError, "'host:port'"),
        (dict(num_processes=2, process_id=2), ValueError, "process_id=2: expected 0 <= process_id < num_processes=2"),
        (dict(num_processes=0), ValueError, "num_processes=0: expected an int >= 1"),
        (dict(process_id=-1), ValueError, "process_id=-1"),
        (dict(num_processes="2"), TypeError, "num_processes='2': expected an int"),
    ],
)
def test_initialize_distributed_validates(fake_initialize, kwargs, error, message):
    with pytest.raises(error, match=message):
        sharding.initialize_distributed(**kwargs)
    assert fake_initialize == []


def test_initialize_distributed_validates_environment(fake_initialize, monkeypatch):
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two': expected an integer"):
        sharding.initialize_distributed()


# ------------------------------------------------------------- sharded training runs
# A tiny DecoderLM (tests/distributed_worker.py) trained with training.make_train_step
# under jit with explicit in/out shardings; every mesh must reproduce one device.

STEPS = 3
# Adam turns rounding differences of near-zero gradients (other reduction orders on
# other meshes) into update differences of a fraction of the learning rate (3e-3).
PARAM_ATOL = 1e-4


@pytest.fixture(scope="module")
def one_device_run():
    batches = worker.batches(STEPS)
    state, losses = worker.train(sharding.make_mesh(devices=jax.devices()[:1]), batches)
    return batches, jax.device_get(state.params), losses


def _query_kernel_spec(params_shardings):
    [spec] = [leaf.spec for path, leaf in jax.tree_util.tree_leaves_with_path(params_shardings)
              if jax.tree_util.keystr(path).endswith("['query']['kernel']")]
    return spec


@pytest.mark.parametrize("spec", ["data=8", "data=2,fsdp=2,tensor=2", "fsdp=2,tensor=4"])
def test_sharded_training_matches_one_device(one_device_run, spec):
    batches, ref_params, ref_losses = one_device_run
    mesh = sharding.make_mesh(spec)
    state, losses = worker.train(mesh, batches)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, atol=PARAM_ATOL), state.params, ref_params)

    # Parameters and optimizer state live where the rules say ...
    shardings, _, _ = worker.compiled(mesh)
    assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), state, shardings))
    assert _query_kernel_spec(shardings.params) == jax.sharding.PartitionSpec(None, "fsdp", "tensor", None)
    # ... and each device really holds only its part of every split array.
    def split_leaves(tree):
        split = []
        for array in jax.tree.leaves(tree):
            local = list(array.shape)
            for dim, entry in enumerate(array.sharding.spec):
                for axis in sharding._mesh_axes_of(entry):
                    local[dim] //= mesh.shape[axis]
            assert all(shard.data.shape == tuple(local) for shard in array.addressable_shards)
            split += [array] if tuple(local) != array.shape else []
        return split

    num_params = len(jax.tree.leaves(state.params))
    if mesh.shape["fsdp"] > 1 and mesh.shape["tensor"] > 1:
        # Every parameter has an embed, heads, mlp or vocab axis, so all are split,
        # and so are both Adam moments of each.
        assert len(split_leaves(state.params)) == num_params
        assert len(split_leaves(state.opt_state)) == 2 * num_params
    else:
        assert split_leaves(state) == []


def test_decoder_lm_heads_not_divisible_by_tensor_fail_before_compiling():
    # The tiny DecoderLM has 4 heads; the error comes from the abstract state alone.
    with pytest.raises(ValueError, match=r"\['self_attn'\]\['\w+'\]\['kernel'\]: heads \(4\) is not divisible by the size 8"):
        worker.compiled(sharding.make_mesh("tensor=8"))


def test_checkpoint_from_8_devices_restores_on_1_and_4(one_device_run, tmp_path):
    batches, _, ref_losses = one_device_run
    state, _ = worker.train(sharding.make_mesh("data=2,fsdp=2,tensor=2"), batches[:2])
    with checkpoint.Checkpointer(str(tmp_path), async_save=False) as ckpt:
        ckpt.save(2, state)
    abstract = jax.eval_shape(lambda: worker.init_state(unbox=True))
    for mesh in (sharding.make_mesh(devices=jax.devices()[:1]), sharding.make_mesh("fsdp=2,tensor=2", jax.devices()[:4])):
        shardings, _, _ = worker.compiled(mesh)
        with checkpoint.Checkpointer(str(tmp_path)) as ckpt:
            restored = ckpt.restore(checkpoint.abstract_state(abstract, shardings))
        assert int(restored.step) == 2
        assert jax.tree.all(jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), restored, shardings))
        _, losses = worker.train(mesh, batches[2:], restored)
        np.testing.assert_allclose(losses, ref_losses[2:], rtol=1e-5)


@pytest.mark.parametrize("spec", ["data=2,fsdp=2,tensor=2", "fsdp=4,tensor=2"])
def test_sharded_train_step_never_replicates_a_whole_tensor(capfd, spec):
    """XLA's partitioner warns on stderr (from C++, hence capfd) when it can only reshard an
    array by replicating it in full; the embedding look-ups used to trigger it."""
    mesh = sharding.make_mesh(spec)
    shardings, _, step = worker.compiled(mesh)
    abstract_batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding.batch_sharding(mesh))
                      for k, v in worker.batches(1)[0].items()}
    abstract_state = jax.tree.map(lambda leaf, s: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=s),
                                  jax.eval_shape(lambda: worker.init_state(unbox=True)), shardings)
    capfd.readouterr()
    with sharding.use_mesh(mesh):
        step.lower(abstract_state, abstract_batch).compile()  # lower+compile: no jit cache involved
    assert "Involuntary full rematerialization" not in capfd.readouterr().err
