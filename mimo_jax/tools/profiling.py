"""Where a jitted call spends its device time: a profiler trace summed by kernel (benchmarks' `--profile`).

    rows = top_ops(fn, args, calls=3)     # [(kernel name, ms per call, launches per call), ...]
    print(format_ops(rows, top=15))
    activity = device_activity(trace_dir)  # a window of host-driven work: how much of it the device was busy

Reads the trace with `jax.profiler.ProfileData` (no TensorBoard needed). On GPU it sums the kernels of
the first device's streams (XLA fusions, cuBLAS/cuDNN, Pallas kernels by their names, NCCL collectives);
on CPU the XLA client threads' op events, so the same code is tested on CPU.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import tempfile
from collections.abc import Callable, Sequence

import jax
from jax.profiler import ProfileData

_SKIPPED = ("ThreadpoolListener", "ThunkExecutor", "end: ")  # CPU bookkeeping events, not work


def _first_device_plane(data: ProfileData):
    planes = list(data.planes)
    gpu = sorted((p for p in planes if p.name.startswith("/device:GPU:")), key=lambda p: p.name)
    if gpu:
        return gpu[0], lambda line: line.name.startswith("Stream")
    host = next((p for p in planes if p.name == "/host:CPU"), None)
    return host, lambda line: "XLA" in line.name and "Client" in line.name


def _device_lines(trace_dir: str):
    """(line, wanted) for every line of the first device's plane in each trace file under `trace_dir`; `wanted`:
    whether the line holds kernel events."""
    files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
    if not files:
        raise FileNotFoundError(f"no *.xplane.pb trace under {trace_dir}")
    for path in files:
        plane, wanted = _first_device_plane(ProfileData.from_file(path))
        if plane is not None:
            for line in plane.lines:
                yield line, wanted(line)


def summarize_trace(trace_dir: str) -> dict[str, tuple[float, int]]:
    """Kernel name -> (total seconds, launches) on the first device of the trace under `trace_dir`."""
    totals: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for line, kernels in _device_lines(trace_dir):
        if not kernels:
            continue
        for event in line.events:
            if event.name.startswith(_SKIPPED):
                continue
            totals[event.name][0] += event.duration_ns * 1e-9
            totals[event.name][1] += 1
    return {name: (s, n) for name, (s, n) in totals.items()}


SHORT_GAP_NS = 50_000  # an idle gap below this is a launch gap between kernels, not the device waiting for the host


@dataclasses.dataclass(frozen=True)
class DeviceActivity:
    """The first device's work in a trace: from its first kernel's start to its last kernel's end (`window_s`),
    the time at least one kernel ran (`busy_s`, overlapping kernels counted once), the idle time split into gaps
    shorter than SHORT_GAP_NS (`launch_gaps_s`: between kernels of a program) and longer (`waits_s`: the device
    waiting for the host), the kernels run, the device time of each XLA program where the trace has a modules
    line (name -> (seconds, runs); empty on CPU), and the device plane's lines (name -> events)."""

    window_s: float
    busy_s: float
    launch_gaps_s: float
    waits_s: float
    kernels: int
    programs: dict[str, tuple[float, int]]
    lines: dict[str, int]

    @property
    def idle_fraction(self) -> float:
        return 1.0 - self.busy_s / self.window_s if self.window_s > 0 else 0.0


def device_activity(trace_dir: str) -> DeviceActivity:
    """How busy the first device of the trace under `trace_dir` was, where it idled, and its time per program."""
    spans: list[tuple[int, int]] = []
    programs: dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    lines: dict[str, int] = collections.Counter()
    for line, kernels in _device_lines(trace_dir):
        events = list(line.events)
        lines[line.name] += len(events)
        if "module" in line.name.lower():
            for event in events:
                programs[event.name][0] += event.duration_ns * 1e-9
                programs[event.name][1] += 1
        elif kernels:
            spans += [(e.start_ns, e.start_ns + e.duration_ns) for e in events if not e.name.startswith(_SKIPPED)]
    if not spans:
        return DeviceActivity(0.0, 0.0, 0.0, 0.0, 0, {}, dict(lines))
    spans.sort()
    busy, short, long = 0, 0, 0
    start, end = spans[0]
    for s, e in spans[1:]:  # the union of the kernels' intervals, and the gaps between
        if s > end:
            busy += end - start
            gap = s - end
            short, long = (short + gap, long) if gap < SHORT_GAP_NS else (short, long + gap)
            start, end = s, e
        else:
            end = max(end, e)
    busy += end - start
    window = end - spans[0][0]
    return DeviceActivity(
        window * 1e-9,
        busy * 1e-9,
        short * 1e-9,
        long * 1e-9,
        len(spans),
        {k: (s, n) for k, (s, n) in programs.items()},
        dict(lines),
    )


def top_ops(fn: Callable, args: Sequence, calls: int = 3) -> list[tuple[str, float, float]]:
    """Profile `calls` calls of fn(*args) (already compiled and warm): [(kernel, ms per call, launches per
    call)], slowest first."""
    jax.block_until_ready(fn(*args))
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                jax.block_until_ready(fn(*args))
        totals = summarize_trace(trace_dir)
    rows = [(name, s * 1e3 / calls, n / calls) for name, (s, n) in totals.items()]
    return sorted(rows, key=lambda r: -r[1])


def format_ops(rows: list[tuple[str, float, float]], top: int = 15, width: int = 70) -> str:
    """A markdown table of the `top` kernels and the rest's total, with each one's share of the device time."""
    total = sum(ms for _, ms, _ in rows) or 1.0
    head = f"| kernel (first device; device time {total:.3f} ms per call) | ms | share | launches |"
    lines = [head, "|---|---|---|---|"]
    for name, ms, launches in rows[:top]:
        short = name if len(name) <= width else name[: width - 3] + "..."
        lines.append(f"| {short} | {ms:.3f} | {ms / total:.0%} | {launches:g} |")
    rest = rows[top:]
    if rest:
        ms = sum(r[1] for r in rest)
        lines.append(f"| ({len(rest)} others) | {ms:.3f} | {ms / total:.0%} | {sum(r[2] for r in rest):g} |")
    return "\n".join(lines)
