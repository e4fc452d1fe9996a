"""Largest real-pattern MiMo-V2-Flash prefix (`flash-layers-N`) whose fp8 weights and a KV cache fit one device.

    python bench/pick_layers.py --hbm-bytes 1.4e11 --batch 64 --context 16384

Uses the memory planner (`mimo_jax.plan`): the same parameter table `load_model` places.
"""

from __future__ import annotations

import argparse
import os

from mimo_jax.config import MiMoConfig
from mimo_jax.plan import kv_plan_per_device, param_bytes_per_device

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "mimo-v2-flash.json")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hbm-bytes", type=float, required=True, help="usable bytes on the device")
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--context", type=int, default=16384)
    ap.add_argument("--margin", type=float, default=12e9, help="activations, compiled code, scratch")
    args = ap.parse_args()
    full = MiMoConfig.from_json(CONFIG)
    best = 1
    for n in range(1, full.num_layers + 1):
        cfg = full.first_layers(n)
        need = param_bytes_per_device(cfg, {}, "fp8") + args.batch * kv_plan_per_device(cfg, {}).bytes_per_sequence(
            args.context
        )
        if need + args.margin <= args.hbm_bytes:
            best = n
    print(best)


if __name__ == "__main__":
    main()
