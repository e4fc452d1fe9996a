"""Largest real-pattern MiMo-V2-Flash prefix (`flash-layers-N`) whose fp8 weights and a KV cache fit one device.

    python bench/pick_layers.py --hbm-bytes 1.4e11 --batch 64 --context 16384 [--mesh expert=4]

Uses the memory planner (`mimo_jax.tools.plan`): the same parameter table `load_model` places.
"""

from __future__ import annotations

import argparse
import os

from mimo_jax.config import MiMoConfig
from mimo_jax.sharding import parse_mesh_arg
from mimo_jax.tools.plan import kv_plan_per_device, param_bytes_per_device

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mimo-v2-flash.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hbm-bytes", type=float, required=True, help="usable bytes on the device")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--margin", type=float, default=12e9, help="activations, compiled code, scratch")
    ap.add_argument("--mesh", default="", help="axis=size,... (bytes are per device)")
    args = ap.parse_args()
    full = MiMoConfig.from_json(CONFIG)
    sizes = parse_mesh_arg(args.mesh)
    data_shards = sizes.get("data", 1) * sizes.get("expert", 1)  # the batch splits over data x expert
    best = 1
    for n in range(1, full.num_layers + 1):
        cfg = full.first_layers(n)
        kv = kv_plan_per_device(cfg, sizes).bytes_per_sequence(args.context)
        need = param_bytes_per_device(cfg, sizes, "fp8") + -(-args.batch // data_shards) * kv
        if need + args.margin <= args.hbm_bytes:
            best = n
    print(best)


if __name__ == "__main__":
    main()
