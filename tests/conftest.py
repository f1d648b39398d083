"""Shared pytest set-up.

Eight fake CPU devices are requested before JAX is imported anywhere, so
sharding tests can build multi-device meshes; single-device tests are
unaffected (they run on device 0).

JAX's persistent compilation cache is on for the test session, in the
tests' own folder under /tmp (as their data is): many tests start run.py
processes that compile the same small train steps again, and a process
that finds them there skips XLA's compile (about 10 s of a 26 s demo run
here). The compiled programs are the same ones, so no result changes. The
environment variables reach the subprocesses too; a cache folder set by
the caller is kept.
"""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      "/tmp/uniter_jax_test_jax_cache")
# Only programs that take a while to compile: the many tiny ones are as
# quick to compile as to read.
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
