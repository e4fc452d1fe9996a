"""`python -m mimo_jax.plan --config configs/mimo-v2-flash.json --context 262144`: KV cache memory per sequence."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mimo_jax.cache import kv_plan
from mimo_jax.config import MiMoConfig


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimo_jax.plan", description=__doc__)
    p.add_argument("--config", required=True, help="config.json or a checkpoint directory")
    p.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the model's context)")
    p.add_argument("--batch", type=int, default=1, help="sequences (slots)")
    p.add_argument("--dtype-bytes", type=int, default=2, help="bytes per cached element (2 = bf16)")
    p.add_argument("--extra-ring-slots", type=int, default=0, help="SWA ring slots beyond the window (drafts)")
    args = p.parse_args(argv)
    cfg = MiMoConfig.from_json(args.config)
    plan = kv_plan(cfg, args.context or cfg.context_len, args.dtype_bytes, args.extra_ring_slots)
    print(plan.report())
    if args.batch > 1:
        print(f"x {args.batch} sequences: {args.batch * plan.total_bytes / 2.0**30:.3f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
