"""Two processes on localhost (jax.distributed + CPU collectives) train together and
agree with a single-process run (tests/distributed_worker.py)."""
import os

import jax
import numpy as np
import pytest

import distributed_worker as worker  # tests/ is on sys.path under pytest
from processes import REPO, cpu_env, free_port, run_together
from transformer_jax import sharding

WORKER = os.path.join(REPO, "tests", "distributed_worker.py")
# data=-1: pure data parallelism across the two hosts. fsdp=4,tensor=2: parameters and
# Adam moments split across hosts (fsdp spans both processes), heads within each.
MESHES = ("data=-1", "fsdp=4,tensor=2")
STEPS = 3
TIMEOUT_S = 300
PARAM_ATOL = 1e-4  # as in test_sharding: Adam amplifies reduction-order rounding


@pytest.mark.slow
def test_two_processes_train_like_one(tmp_path):
    if not hasattr(jax.config, "jax_cpu_collectives_implementation"):
        pytest.skip(f"jax {jax.__version__} has no CPU collectives (jax_cpu_collectives_implementation)")
    out = tmp_path / "result.npz"
    command = [WORKER, "--coordinator", f"localhost:{free_port()}",
               "--num-processes", "2", "--steps", str(STEPS), "--out", str(out)]
    command += [arg for spec in MESHES for arg in ("--mesh", spec)]
    codes, tails = run_together([command + ["--process-id", str(i)] for i in range(2)], tmp_path,
                                env=cpu_env(devices=4), timeout_s=TIMEOUT_S)
    logs = "\n".join(f"--- process {i} ---\n{tail}" for i, tail in enumerate(tails))
    assert codes == [0, 0], f"worker exit codes {codes} (None: timed out after {TIMEOUT_S}s)\n{logs}"

    result = np.load(out)
    batches = worker.batches(STEPS)
    state, ref_losses = worker.train(sharding.make_mesh(devices=jax.devices()[:1]), batches)
    for i, spec in enumerate(MESHES):
        np.testing.assert_allclose(result[f"{i}/losses"], ref_losses, rtol=1e-5, err_msg=spec)
        for path, leaf in jax.tree_util.tree_leaves_with_path(state.params):
            np.testing.assert_allclose(result[f"{i}/{jax.tree_util.keystr(path)}"], np.asarray(leaf),
                                       atol=PARAM_ATOL, err_msg=f"{spec} {jax.tree_util.keystr(path)}")
