"""Where the engine's host loop spends its time: `bench/bench_engine.py` (any mode and arguments) under cProfile,
then the functions by own time and the engine's by cumulative time.

    python bench/profile_host.py constrained --model flash-slice-4 --dtype bfloat16 --conversations 16 \
        --prompt 512 --output 384 --round 8 --reps 1          # one GPU: is the host the bottleneck, and where

On a GPU a host-bound loop shows the device idle between rounds (`bench_engine.py constrained --profile`: the
device was busy 72% of the window with 16 free requests alone on an H200); this names the host's share.
"""

from __future__ import annotations

import cProfile
import pathlib
import pstats
import sys

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import bench_engine  # noqa: E402


def main(argv: list[str]) -> int:
    profile = cProfile.Profile()
    profile.enable()
    status = bench_engine.main(argv)
    profile.disable()
    stats = pstats.Stats(profile)
    stats.sort_stats("tottime").print_stats(40)
    stats.sort_stats("cumulative").print_stats("mimo_jax/engine", 30)
    return status


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
