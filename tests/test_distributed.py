"""Two processes on localhost (jax.distributed + CPU collectives) train together and
agree with a single-process run (tests/distributed_worker.py)."""
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import distributed_worker as worker  # tests/ is on sys.path under pytest
from transformer_jax import sharding

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
# data=-1: pure data parallelism across the two hosts. fsdp=4,tensor=2: parameters and
# Adam moments split across hosts (fsdp spans both processes), heads within each.
MESHES = ("data=-1", "fsdp=4,tensor=2")
STEPS = 3
TIMEOUT_S = 300
PARAM_ATOL = 1e-4  # as in test_sharding: Adam amplifies reduction-order rounding


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        pytest.skip(f"jax {jax.__version__} has no CPU collectives (jax_cpu_collectives_implementation)")
    out = tmp_path / "result.npz"
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=4",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
    )
    command = [sys.executable, WORKER, "--coordinator", f"localhost:{_free_port()}",
               "--num-processes", "2", "--steps", str(STEPS), "--out", str(out)]
    command += [arg for spec in MESHES for arg in ("--mesh", spec)]
    logs = [open(tmp_path / f"process{i}.log", "w+") for i in range(2)]
    procs = [subprocess.Popen(command + ["--process-id", str(i)], env=env, cwd=REPO,
                              stdout=log, stderr=subprocess.STDOUT) for i, log in enumerate(logs)]
    try:
        codes = [p.wait(timeout=TIMEOUT_S) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for i, log in enumerate(logs):
        log.seek(0)
        tails.append(f"--- process {i} ---\n" + log.read()[-3000:])
        log.close()
    assert codes == [0, 0], f"worker exit codes {codes} (None: timed out after {TIMEOUT_S}s)\n" + "\n".join(tails)

    result = np.load(out)
    batches = worker.batches(STEPS)
    state, ref_losses = worker.train(sharding.make_mesh(devices=jax.devices()[:1]), batches)
    for i, spec in enumerate(MESHES):
        np.testing.assert_allclose(result[f"{i}/losses"], ref_losses, rtol=1e-5, err_msg=spec)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            np.testing.assert_allclose(result[f"{i}/{jax.tree_util.keystr(path)}"], np.asarray(leaf),
                                       atol=PARAM_ATOL, err_msg=f"{spec} {jax.tree_util.keystr(path)}")
