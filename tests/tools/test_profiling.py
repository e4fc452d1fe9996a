"""The benchmarks' kernel profile: a trace summed by kernel, checked on CPU against a known workload."""

import jax
import jax.numpy as jnp
import pytest

from mimo_jax.tools.profiling import format_ops, summarize_trace, top_ops


def test_top_ops_attributes_the_time_of_a_known_workload():
    big = jnp.ones((384, 384), jnp.float32)
    small = jnp.ones((8, 8), jnp.float32)
    fn = jax.jit(lambda a, b: ((a @ a) @ a).sum() + jnp.tanh(b).sum())
    rows = top_ops(fn, (big, small), calls=3)
    assert rows, "the trace held no kernel events"
    names = [name for name, _, _ in rows]
    ms = [m for _, m, _ in rows]
    assert ms == sorted(ms, reverse=True) and all(m >= 0 for m in ms)
    assert all(launches > 0 for _, _, launches in rows)
    assert sum(ms) > 0.01  # two 384^3 matmuls per call take well over 10 us
    table = format_ops(rows, top=1)
    assert table.splitlines()[2].startswith(f"| {names[0][:60]}")
    assert "per call" in table.splitlines()[0]


def test_summarize_trace_names_a_missing_trace(tmp_path):
    with pytest.raises(FileNotFoundError, match="xplane"):
        summarize_trace(str(tmp_path))


def test_device_activity_sees_the_device_idle_while_the_host_sleeps(tmp_path):
    import time

    from mimo_jax.tools.profiling import device_activity

    a = jnp.ones((384, 384), jnp.float32)
    fn = jax.jit(lambda a: ((a @ a) @ a).sum())
    jax.block_until_ready(fn(a))
    with jax.profiler.trace(str(tmp_path)):
        jax.block_until_ready(fn(a))
        time.sleep(0.3)  # the host holds the device back: the window grows, the busy time does not
        jax.block_until_ready(fn(a))
    activity = device_activity(str(tmp_path))
    assert activity.window_s >= 0.3
    assert 0 < activity.busy_s < 0.15
    assert activity.idle_fraction > 0.5
    assert activity.kernels >= 2 and activity.lines
    assert activity.waits_s >= 0.25  # the sleep is a wait for the host, not a launch gap
    idle = activity.window_s - activity.busy_s
    assert abs(activity.launch_gaps_s + activity.waits_s - idle) < 1e-6
