"""Scaling out: the device mesh, logical-axis rules and multi-process start-up.

Everything here is JAX's own machinery. A `jax.sharding.Mesh` names the device axes
`data`, `fsdp` and `tensor`; `LOGICAL_RULES` maps the layers' logical axis names onto
them; `state_shardings` turns a train state's `nn.LogicallyPartitioned` boxes into
`NamedSharding`s for `jax.jit(..., in_shardings=..., out_shardings=...)`, and XLA's
SPMD partitioner (GSPMD) inserts the collectives. `jax.distributed` joins the
processes of a multi-host run.

- data parallelism: the batch is split over `data` (and `fsdp`), parameters replicated
  along `data`;
- FSDP / ZeRO-3: parameters and the optimizer moments that mirror them are split along
  `embed` over `fsdp`, and the batch too, so every `fsdp` device is also a data replica;
- Megatron tensor parallelism: attention heads, MLP hidden units and the vocabulary
  are split over `tensor`.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES: tuple[str, ...] = ("data", "fsdp", "tensor")

# Batch axes of activations and input batches: every device that is not a tensor
# shard holds different rows.
BATCH_AXES: tuple[str, ...] = ("data", "fsdp")

# Flax assigns rules in order and skips a rule whose mesh axes are already taken in
# that array, so "batch" must come before "embed": an activation [batch, length, embed]
# gets batch -> (data, fsdp) and leaves embed unsplit, while a parameter [vocab, embed]
# gets vocab -> tensor, embed -> fsdp.
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]

LOGICAL_RULES: Rules = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("embed", "fsdp"),
    ("head_dim", None),
    ("layers", None),
)

# Tensor parallelism gives each device whole attention heads; any other dimension the
# mesh does not divide is left unsplit instead.
_MUST_DIVIDE = frozenset({"heads"})


# --------------------------------------------------------------------------- processes

# Variables by which cluster launchers tell a process it is one of several; JAX reads
# the coordinator, count and id from them itself (jax._src.clusters). Process counts:
_LAUNCHER_PROCESS_COUNTS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
# Comma-separated host lists (GKE TPU):
_LAUNCHER_HOST_LISTS = ("TPU_PROCESS_ADDRESSES", "TPU_WORKER_HOSTNAMES")


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r}: expected an integer") from None


def _launched_multi_process() -> bool:
    """Whether a cluster launcher (Slurm, Open MPI, GKE TPU, multislice) started us
    as one of several processes."""
    if any((_env_int(v) or 1) > 1 for v in _LAUNCHER_PROCESS_COUNTS):
        return True
    if any("," in os.environ.get(v, "") for v in _LAUNCHER_HOST_LISTS):
        return True
    return "MEGASCALE_COORDINATOR_ADDRESS" in os.environ


# jax.distributed.initialize's own default wait for every process to join.
DEFAULT_DISTRIBUTED_TIMEOUT_S = 300.0
# jax is given this much longer than `timeout_s`, so that our one-line exit comes first.
_JAX_TIMEOUT_GRACE_S = 30


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout_s: float | None = None,
) -> None:
    """Join a multi-process JAX run (`jax.distributed.initialize`); call before any
    other JAX work.

    Each argument falls back to the environment variables `JAX_COORDINATOR_ADDRESS`
    ("host:port" of process 0), `JAX_NUM_PROCESSES` and `JAX_PROCESS_ID`; whatever is
    still unset is detected by JAX from the launcher (Slurm `srun`, Open MPI `mpirun`,
    GKE, Cloud TPU metadata). With nothing given and no multi-process launcher detected
    this is a no-op, so single-process runs need no flags; on Cloud TPU VMs, whose
    launcher sets no variables, pass `num_processes` (or set JAX_NUM_PROCESSES) to opt
    in. Calling it again once initialized is also a no-op.

    `timeout_s` (default DEFAULT_DISTRIBUTED_TIMEOUT_S, 300 s, as jax's own) bounds the
    wait for every process to join. When it passes (a peer that never started, a wrong
    address or process count) the process prints one line to stderr naming the
    coordinator and the timeout, and exits with status 1: jax would instead abort it
    with a C++ trace, which Python cannot catch.

    Raises:
      ValueError / TypeError: a malformed argument or environment variable.
    """
    if jax.distributed.is_initialized():
        return
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    given = (coordinator_address, num_processes, process_id)
    if all(v is None for v in given) and not _launched_multi_process():
        return
    if coordinator_address is not None and (
        not isinstance(coordinator_address, str) or ":" not in coordinator_address
    ):
        raise ValueError(
            f"coordinator_address={coordinator_address!r}: expected 'host:port' of process 0"
        )
    for name, value, low in (("num_processes", num_processes, 1), ("process_id", process_id, 0)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            raise TypeError(f"{name}={value!r}: expected an int")
        if value is not None and value < low:
            raise ValueError(f"{name}={value}: expected an int >= {low}")
    if num_processes is not None and process_id is not None and process_id >= num_processes:
        raise ValueError(
            f"process_id={process_id}: expected 0 <= process_id < num_processes={num_processes}"
        )
    timeout_s = DEFAULT_DISTRIBUTED_TIMEOUT_S if timeout_s is None else timeout_s
    if not isinstance(timeout_s, (int, float)) or isinstance(timeout_s, bool) or not 0 < timeout_s < math.inf:
        raise ValueError(f"timeout_s={timeout_s!r}: expected a positive number of seconds")
    where = (f"the coordinator {coordinator_address}" if coordinator_address
             else "the coordinator named by the launcher's environment")
    who = "this process" if process_id is None else f"process {process_id}"
    message = (f"initialize_distributed: {who} of {num_processes or 'the launcher-given number of'} "
               f"could not join the run at {where} within {timeout_s:g} s (timeout_s, the "
               f"--distributed-timeout flag): check that every process was started, with the same "
               f"coordinator address and process count, and that the address is reachable")
    with _exit_unless_done_within(timeout_s, message):
        jax.distributed.initialize(coordinator_address, num_processes, process_id,
                                   initialization_timeout=int(math.ceil(timeout_s)) + _JAX_TIMEOUT_GRACE_S)


@contextlib.contextmanager
def _exit_unless_done_within(timeout_s: float, message: str) -> Iterator[None]:
    """Print `message` and end the process (status 1) if the block has not finished within
    `timeout_s`. A hard exit, because the block is stuck in C++ that Python cannot interrupt."""
    def expire() -> None:
        sys.stdout.flush()
        sys.stderr.write(message + "\n")
        sys.stderr.flush()
        os._exit(1)

    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


# -------------------------------------------------------------------------------- mesh


def parse_mesh_spec(spec: str | None, num_devices: int) -> dict[str, int]:
    """Parse "data=2,fsdp=2,tensor=2" into {axis: size} for all of `MESH_AXES`.

    Axes not named get size 1; one axis may be -1, meaning the devices left over.
    `None` or "" puts every device on `data`. The sizes must multiply to `num_devices`.
    """
    if spec is not None and not isinstance(spec, str):
        raise TypeError(f"spec={spec!r}: expected a string like 'data=2,fsdp=2,tensor=2' or None")
    if spec is None or not spec.strip():
        spec = "data=-1"
    sizes: dict[str, int] = {}
    for item in spec.split(","):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or not name or not value:
            raise ValueError(f"mesh spec {spec!r}: item {item.strip()!r} is not 'axis=size'")
        if name not in MESH_AXES:
            raise ValueError(f"mesh spec {spec!r}: unknown axis {name!r}, expected one of {MESH_AXES}")
        if name in sizes:
            raise ValueError(f"mesh spec {spec!r}: axis {name!r} given twice")
        try:
            size = int(value)
        except ValueError:
            raise ValueError(f"mesh spec {spec!r}: size {value!r} of axis {name!r} is not an integer") from None
        if size < 1 and size != -1:
            raise ValueError(f"mesh spec {spec!r}: size {size} of axis {name!r}: expected >= 1 or -1 (the rest)")
        sizes[name] = size
    rest = [name for name, size in sizes.items() if size == -1]
    if len(rest) > 1:
        raise ValueError(f"mesh spec {spec!r}: only one axis may be -1, got {rest}")
    known = math.prod(size for size in sizes.values() if size != -1)
    if rest:
        if num_devices % known:
            raise ValueError(
                f"mesh spec {spec!r}: the fixed axes take {known} devices, which does not "
                f"divide the {num_devices} devices available"
            )
        sizes[rest[0]] = num_devices // known
    elif known != num_devices:
        raise ValueError(
            f"mesh spec {spec!r}: the axis sizes multiply to {known}, expected the device "
            f"count {num_devices} (use -1 on one axis for 'the rest')"
        )
    return {name: sizes.get(name, 1) for name in MESH_AXES}


def make_mesh(spec: str | None = None, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A mesh over `devices` (default: all devices of all processes) with axes
    ("data", "fsdp", "tensor"), sized by a spec like "data=2,fsdp=2,tensor=2".

    -1 on one axis means "the rest of the devices"; axes not named have size 1; `None`
    puts every device on "data". The axes are `AxisType.Auto`, so GSPMD propagates
    shardings from the jit in/out shardings. `data` is the outermost axis, so on a
    multi-host run each host's devices hold a contiguous block of the batch.

    Raises:
      ValueError: malformed spec, unknown or repeated axis, sizes that do not multiply
        to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = parse_mesh_spec(spec, len(devices))
    shape = tuple(sizes[name] for name in MESH_AXES)
    auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
    return jax.make_mesh(shape, MESH_AXES, axis_types=auto, devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
    """Make `mesh` and the logical-axis `rules` current, so the models'
    `nn.with_logical_constraint` activation annotations become sharding constraints.

    Call (and so trace) the jitted step inside it; outside, those annotations are
    no-ops and GSPMD infers activation shardings from the parameters and batch alone.
    """
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield mesh


# --------------------------------------------------------------------------- shardings


def _mesh_axes_of(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    if entry is None:
        return ()
    return (entry,) if isinstance(entry, str) else tuple(entry)


def _box_spec(path: str, box: nn.LogicallyPartitioned, mesh: Mesh, rules: Rules) -> tuple[PartitionSpec, list[str]]:
    """PartitionSpec of one boxed parameter, and notes on the dimensions left unsplit
    because the mesh does not divide them."""
    names = tuple(box.names)
    shape = box.value.shape
    if len(names) != len(shape):
        raise ValueError(f"parameter {path}: logical axes {names} do not match its shape {shape}")
    known = {logical for logical, _ in rules}
    unknown = [n for n in names if n is not None and n not in known]
    if unknown:
        raise ValueError(
            f"parameter {path}: logical axes {unknown} have no rule; known logical axes: {sorted(known)}"
        )
    spec, unsplit = [], []
    for logical, size, entry in zip(names, shape, nn.logical_to_mesh_axes(names, rules)):
        axes = _mesh_axes_of(entry)
        missing = [a for a in axes if a not in mesh.shape]
        if missing:
            raise ValueError(
                f"rules map logical axis {logical!r} to {missing}, not axes of the mesh {dict(mesh.shape)}"
            )
        split = math.prod(mesh.shape[a] for a in axes)
        if size % split and logical in _MUST_DIVIDE:
            raise ValueError(
                f"parameter {path}: {logical} ({size}) is not divisible by the size {split} of "
                f"mesh axes {axes}; choose a mesh whose {'*'.join(axes)} size divides {size}"
            )
        if size % split:
            unsplit.append(f"{logical}={size} over {'*'.join(axes)}={split}")
            entry = None
        spec.append(entry)
    return PartitionSpec(*spec), unsplit


def state_shardings(abstract_state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Any:
    """NamedShardings for a train state, from its abstract (`jax.eval_shape`) version
    whose parameters (and the optimizer moments that mirror them) are still
    `nn.LogicallyPartitioned` boxes.

    Returns the same pytree with every box, and every other leaf, replaced by a
    `NamedSharding`, so it matches the unboxed state: pass it as `out_shardings` of the
    jitted init and as in/out shardings of the train step. Leaves without logical names
    (step counters, scalars) are replicated. A dimension the mesh does not divide
    (say an odd vocabulary over tensor=2) is left unsplit, with a warning; attention
    heads must divide, since tensor parallelism splits whole heads.

    Raises:
      ValueError, before any compilation: a logical axis with no rule; heads not
        divisible by the tensor axis; or no boxes at all while the mesh has fsdp/tensor
        axes larger than 1 (everything would silently be replicated).
    """
    is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)  # noqa: E731
    leaves = jax.tree_util.tree_leaves(abstract_state, is_leaf=is_box)
    if not any(is_box(x) for x in leaves) and math.prod(mesh.shape[a] for a in MESH_AXES[1:]) > 1:
        raise ValueError(
            "abstract_state has no nn.LogicallyPartitioned leaves, so nothing could be "
            f"sharded over the mesh {dict(mesh.shape)}; build it with the boxes kept "
            "(do not nn.unbox before jax.eval_shape)"
        )
    all_unsplit: list[str] = []

    def sharding(path, leaf):
        if not is_box(leaf):
            return NamedSharding(mesh, PartitionSpec())
        spec, unsplit = _box_spec(jax.tree_util.keystr(path), leaf, mesh, rules)
        all_unsplit.extend(unsplit)
        return NamedSharding(mesh, spec)

    shardings = jax.tree_util.tree_map_with_path(sharding, abstract_state, is_leaf=is_box)
    if all_unsplit:
        warnings.warn(
            "these dimensions are not divisible by their mesh axes and stay unsplit "
            "(replicated): " + ", ".join(dict.fromkeys(all_unsplit)),
            stacklevel=2,
        )
    return shardings


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding of a batch: the leading (batch) dimension split over ("data", "fsdp"),
    the rest (e.g. seq of [batch, seq] int32 tokens) unsplit."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def _local_batch_shards(mesh: Mesh) -> list[int]:
    """Sorted indices of the batch shards (out of data*fsdp) held by this process's devices."""
    num_shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    indices = batch_sharding(mesh).addressable_devices_indices_map((num_shards,))
    return sorted({index[0].start or 0 for index in indices.values()})


def process_batch_slice(mesh: Mesh, global_batch_size: int) -> slice:
    """The rows of a [global_batch_size, ...] batch that this process must load.

    Processes whose devices are replicas along the batch axes (e.g. a `tensor` axis
    spanning hosts) get the same rows.

    Raises:
      ValueError: global_batch_size not divisible by the data*fsdp size of the mesh.
    """
    split = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if not isinstance(global_batch_size, int) or global_batch_size < 1 or global_batch_size % split:
        raise ValueError(
            f"global_batch_size={global_batch_size!r}: expected a positive multiple of "
            f"data*fsdp={split} of the mesh {dict(mesh.shape)}"
        )
    starts = _local_batch_shards(mesh)
    rows = global_batch_size // split
    if starts != list(range(starts[0], starts[0] + len(starts))):
        raise ValueError(
            f"this process's devices hold non-contiguous batch shards {starts} of the mesh "
            f"{dict(mesh.shape)}, which one slice of rows cannot describe"
        )
    return slice(starts[0] * rows, (starts[-1] + 1) * rows)


def make_global_batch(local_array: Any, mesh: Mesh) -> Any:
    """Assemble a global, batch-sharded `jax.Array` from this process's rows.

    Args:
      local_array: this process's rows, e.g. [global_batch // num_processes, seq] int32
        (the rows `process_batch_slice` names), or a pytree of such arrays.
      mesh: the mesh of `make_mesh`.
    Returns:
      The global array(s), [global_batch, ...], sharded by `batch_sharding(mesh)`.
    Raises:
      ValueError: this process's row count does not split over its devices' batch shards.
    """
    sharding = batch_sharding(mesh)
    num_local = len(_local_batch_shards(mesh))

    def assemble(x):
        x = np.asarray(x)
        if x.ndim == 0 or x.shape[0] % num_local:
            raise ValueError(
                f"local_array of shape {x.shape}: expected a leading batch dimension divisible "
                f"by the {num_local} batch shards on this process's devices"
            )
        return jax.make_array_from_process_local_data(sharding, x)

    return jax.tree.map(assemble, local_array)
