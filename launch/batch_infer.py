#!/usr/bin/env python3
"""Batch inference over a JSONL file: `python launch/batch_infer.py ARGS` runs `python -m mimo_jax.batch ARGS`.

Works from a checkout without installing the package. See `mimo_jax/batch.py` (or `--help`) for the
input and output formats, and `launch/tpu_vm.sh` / `launch/gpu_multinode.sh` for several hosts.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mimo_jax.batch.run import main  # noqa: E402 (after the path is set)

if __name__ == "__main__":
    sys.exit(main())
