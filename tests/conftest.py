"""Shared pytest set-up.

Eight fake CPU devices are requested before JAX is imported anywhere, so
sharding tests can build multi-device meshes; single-device tests are
unaffected (they run on device 0).
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
