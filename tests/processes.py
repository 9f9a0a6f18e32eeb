"""Run test subprocesses together and report how they ended (shared by the tests that do)."""
from __future__ import annotations

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every test process, the pytest workers (conftest.py) and their children alike, compiles with
# LLVM's optimisation off: XLA runs the same HLO passes (a train step's optimised HLO is the same
# text either way) and calls the same library kernels (YNNPACK, Eigen, oneDNN); only its own
# generated loops are left unoptimised. Compiling is most of the suite's time, and this cuts it
# by about a third. The unoptimised loops may round the last bit differently (seen: 9 of 256
# values of a few Adam steps, 2.4e-7 apart), so a child whose numbers a test compares bit for
# bit with its own must compile with the same flags.
# Speed is measured by benchmarks/, never by tests.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"


def cpu_env(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment for a child process: CPU only, `devices` virtual devices, the repo importable."""
    return dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices} {TEST_XLA_FLAGS}",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
        **extra,
    )


def run_together(commands: list[list[str]], log_dir, *, env: dict[str, str], timeout_s: float
                 ) -> tuple[list[int] | None, list[str]]:
    """Starts every command (argv lists, run with this Python from the repo root) at once.

    Returns (exit codes, or None if any timed out; the last 3000 characters of each log).
    Processes still running at the timeout are killed.
    """
    logs = [open(os.path.join(log_dir, f"process{i}.log"), "w+") for i in range(len(commands))]
    procs = [subprocess.Popen([sys.executable, *command], env=env, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
             for command, log in zip(commands, logs)]
    try:
        codes = [p.wait(timeout=timeout_s) for p in procs]
    except subprocess.TimeoutExpired:
        codes = None
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    tails = []
    for log in logs:
        log.seek(0)
        tails.append(log.read()[-3000:])
        log.close()
    return codes, tails


def free_port() -> int:
    """A localhost TCP port nobody is listening on (for jax.distributed's coordinator)."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]
