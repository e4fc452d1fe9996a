import os
import shutil
import tempfile

import pytest

# Multi-device tests use 8 fake CPU devices; must be set before JAX is imported anywhere.
# Compilation dominates the suite's time and the programs run briefly: XLA:CPU's LLVM backend at -O0 compiles a
# third faster, and its older loop emitters instead of the MLIR fusion emitters another ~40% (XLA's HLO passes, and
# so the programs' math and layouts, are unchanged). Child processes get the same flags (tests.fixtures.child_env).
os.environ.setdefault(
    "XLA_FLAGS",
    "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0 --xla_cpu_use_fusion_emitters=false",
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache per run, shared by the xdist workers and the processes tests start (they inherit
# the environment): many modules compile the same demo-model programs, and a load is ~4x cheaper than a compile.
# jax records its compile event for a cache load too, so "nothing compiles" still means no jit cache miss.
RUN_COMPILATION_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    RUN_COMPILATION_CACHE = tempfile.mkdtemp(prefix="mimo_jax-tests-xla-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = RUN_COMPILATION_CACHE
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# Session fixtures (tests/fixtures.py): one demo server for every module; the served test checkpoint's server; the
# speculating demo server; servers that collected tests use start with the session (servers_started_early; with
# xdist workers, where every worker collects every test, each starts when a test first needs it).
from tests.fixtures import (  # noqa: E402, F401
    demo_server,
    demo_server_process,
    mtp_server_process,
    servers_started_early,
    tiny_server,
)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: without xdist (-p no:xdist) it is not called
def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): two workers at most. The tests compile on about one core each, and every worker
    holds up to ~7 GB (CI's machine: 2 cores, 24 GB)."""
    return max(1, min(os.cpu_count() or 1, 2))


def pytest_unconfigure(config):
    """The process that made the run's compilation cache (the xdist controller, or the only one) removes it."""
    if RUN_COMPILATION_CACHE is not None and not hasattr(config, "workerinput"):
        shutil.rmtree(RUN_COMPILATION_CACHE, ignore_errors=True)
