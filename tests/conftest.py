import os

# Multi-device tests use 8 fake CPU devices; must be set before JAX is imported anywhere.
# Compilation dominates the suite's time and the programs run briefly: XLA:CPU's LLVM backend at -O0 compiles a
# third faster (XLA's HLO passes, and so the programs' math and layouts, are unchanged). Child processes get the
# same flag (tests.fixtures.child_env).
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 --xla_backend_optimization_level=0")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

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


def pytest_xdist_auto_num_workers(config):
    """`-n auto` (setup.cfg): two workers at most. The tests compile on about one core each, and every worker
    holds up to ~7 GB (CI's machine: 2 cores, 24 GB)."""
    return max(1, min(os.cpu_count() or 1, 2))
