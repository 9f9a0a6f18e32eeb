"""Test-session setup shared by every test module.

Eight virtual CPU devices let the sharding tests build real meshes; single-device
code is unaffected (it runs on device 0). Must be set before jax is imported.
TRANSFORMER_JAX_TEST_PLATFORM=cuda runs the tests on the GPU instead (benchmarks/essentials.py
does this for the Pallas kernel's tests, so Triton really compiles them). On the CPU, LLVM's
optimisation is off as well (processes.TEST_XLA_FLAGS says why).
"""
import os

from processes import TEST_XLA_FLAGS

_platform = os.environ.get("TRANSFORMER_JAX_TEST_PLATFORM", "cpu")
if _platform == "cpu":
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
    os.environ["JAX_PLATFORMS"] = _platform
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

# `train` makes malloc keep freed memory for good when it runs before JAX's first
# computation (run/host_memory.py); a test worker is one process for many tests, so its
# backends start here and in-process runs keep malloc's defaults (tests/test_host_memory.py
# checks the setting in fresh processes).
import jax  # noqa: E402

jax.devices()
