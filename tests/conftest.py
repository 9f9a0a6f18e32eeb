"""Test-session setup shared by every test module.

Eight virtual CPU devices let the sharding tests build real meshes; single-device
code is unaffected (it runs on device 0). Must be set before jax is imported.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
