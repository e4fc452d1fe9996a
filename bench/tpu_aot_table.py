"""The TPU memory table of README.md / bench/RESULTS.md: `python -m mimo_jax.tools.aot` for each model x slice.

    PYTHONPATH=. python bench/tpu_aot_table.py --out /tmp/aot          # all rows, one compile at a time
    PYTHONPATH=. python bench/tpu_aot_table.py --out /tmp/aot --table  # only print the table from saved JSON

Each row runs in its own process (full-size compiles take minutes and GBs of host RAM), is
skipped when its JSON already exists or when the planner already says its weights and KV cache
exceed the chip's HBM, and the markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

from mimo_jax.tools import aot

GiB = 1024**3
BATCH, CONTEXT, CHUNK = 16, 32768, 512

# (model config, slice name, topology, mesh, weights[, MTP speculative steps]), in the order compiled
ROWS = [
    ("mimo-v2-flash", "v5e-64", "v5e:8x8", "tensor=4,expert=16", "fp8"),
    ("mimo-v2-flash", "v5p-16", "v5p:2x2x2", "tensor=4,expert=2", "bf16"),
    ("mimo-v2-flash", "v6e-16", "v6e:4x4", "tensor=4,expert=4", "fp8", 3),
    ("mimo-v2-flash", "v5p-16", "v5p:2x2x2", "tensor=4,expert=2", "fp8"),
    ("mimo-v2-flash", "v6e-16", "v6e:4x4", "tensor=4,expert=4", "fp8"),
    ("mimo-v2.5-pro", "v5p-64", "v5p:2x4x4", "tensor=8,expert=4", "fp8"),
    ("mimo-v2.5-pro", "v6e-64", "v6e:8x8", "tensor=8,expert=8", "fp8"),
    ("mimo-v2-flash", "v5e-64", "v5e:8x8", "tensor=4,expert=16", "bf16"),
    ("mimo-v2.5-pro", "v5p-64", "v5p:2x4x4", "tensor=8,expert=4", "bf16"),
    ("mimo-v2-flash", "v6e-16", "v6e:4x4", "tensor=4,expert=4", "bf16"),
    ("mimo-v2.5-pro", "v6e-64", "v6e:8x8", "tensor=8,expert=8", "bf16"),
]


def unpack(row: tuple) -> tuple[str, str, str, str, str, int]:
    return (*row, 0) if len(row) == 5 else row


def json_path(out: str, row: tuple) -> str:
    model, slice_name, _, _, weights, k = unpack(row)
    return os.path.join(out, f"{model}_{slice_name}_{weights}{f'_mtp{k}' if k else ''}.json")


def hbm_of(topology: str) -> int:
    return aot.HBM_BYTES[KIND[topology.split(":")[0]]][1]


def compile_row(out: str, row: tuple) -> None:
    model, _, topology, mesh, weights, k = unpack(row)
    path = json_path(out, row)
    est = planner_only(model, mesh, weights, k)
    if os.path.exists(path) or sum(est.values()) >= hbm_of(topology):
        return
    cmd = [
        sys.executable,
        "-m",
        "mimo_jax.tools.aot",
        f"--config=configs/{model}.json",
        f"--topology={topology}",
        f"--mesh={mesh}",
        f"--weights={weights}",
        f"--batch={BATCH}",
        f"--context={CONTEXT}",
        f"--chunk={CHUNK}",
        f"--json={path}",
        f"--speculative-steps={k}",
    ]
    print(" ".join(cmd[1:]), flush=True)
    with open(path.replace(".json", ".log"), "w") as log:
        subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, check=False)


KIND = {"v5e": "TPU v5 lite", "v5p": "TPU v5", "v6e": "TPU v6 lite"}


def planner_only(model: str, mesh: str, weights: str, k: int = 0) -> dict[str, int]:
    from mimo_jax.config import MiMoConfig
    from mimo_jax.sharding import parse_mesh_arg
    from mimo_jax.tools.plan import abstract_mesh

    cfg = MiMoConfig.from_json(f"configs/{model}.json")
    return aot.planner_estimate(cfg, abstract_mesh(parse_mesh_arg(mesh)), weights, BATCH, CONTEXT, mtp_layers=k)


def gib(n: int | None) -> str:
    return "-" if n is None else f"{n / GiB:.1f}"


def planned_cell(est: dict[str, int]) -> str:
    return f"{gib(sum(est.values()))} ({gib(est['params'])} + {gib(est['kv_cache'])} + {gib(est['dequantized'])})"


def table(out: str) -> str:
    lines = [
        "| model | slice | weights | mesh | planner est. GiB/chip (params + KV + fp8 dequantized) | "
        "compiler GiB/chip prefill / decode "
        "(args + temps) | compiler / planner | HBM GiB/chip | fits | compile s prefill / decode |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(ROWS, key=lambda r: (unpack(r)[5], unpack(r)[4] != "fp8", unpack(r)[0])):
        model, slice_name, topology, mesh, weights, k = unpack(row)
        name = f"{model} + MTP k={k} (speculative)" if k else model
        path = json_path(out, row)
        if not os.path.exists(path):  # not compiled: the planner's figure alone
            est = planner_only(model, mesh, weights, k)
            hbm = hbm_of(topology)
            total = sum(est.values())
            lines.append(
                f"| {name} | {slice_name} ({topology}) | {weights} | {mesh} | {planned_cell(est)} | not compiled | | "
                f"{gib(hbm)} | "
                f"{'planner: yes' if total < hbm else 'no (planner: weights + KV exceed HBM)'} | |"
            )
            continue
        with open(path) as f:
            r = json.load(f)
        est = planner_only(model, mesh, weights, k)  # today's planner (the saved JSON has the compile-time one)
        steps = {s["name"]: s for s in r["steps"]}

        def peak(s):
            if s["error"]:
                return f"needs {gib(s['required_bytes'])}" if s["required_bytes"] else "error"
            return f"{gib(s['peak_bytes'])} ({gib(s['argument_bytes'])} + {gib(s['temp_bytes'])})"

        loop = steps["speculative" if k else "decode"]
        planned = sum(est.values())
        worst = max((s["peak_bytes"] for s in (steps["prefill"], loop) if not s["error"]), default=None)
        lines.append(
            f"| {name} | {slice_name} ({topology}) | {weights} | {mesh} | "
            f"{planned_cell(est)} | "
            f"{peak(steps['prefill'])} / {peak(loop)} | "
            f"{'-' if worst is None else f'{worst / planned:.2f}'} | {gib(r['hbm_bytes'])} | "
            f"{'yes' if r['fits'] else 'no'} | "
            f"{steps['prefill']['compile_s']:.0f} / {loop['compile_s']:.0f} |"
        )
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for the per-row JSON and logs")
    p.add_argument("--table", action="store_true", help="only print the table from the saved JSON")
    p.add_argument("--only", default=None, help="run only rows whose model or slice contains this text")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.table:
        for row in ROWS:
            if args.only is None or args.only in row[0] or args.only in row[1]:
                compile_row(args.out, row)
    print(f"batch {BATCH} sequences, context {CONTEXT} tokens, prefill chunk {CHUNK}")
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
