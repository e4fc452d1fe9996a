"""Convert a released checkpoint into an Orbax checkpoint of the imported parameters.

    python -m mimo_jax.tools.convert SRC DST [--weights fp8|bf16] [--mtp] [--dtype bfloat16] [--mesh tensor=8]

Validates the whole source first (an error names the file and tensor, and nothing is written),
imports it like `load_model` (FP8 kept or dequantized, fused qkv split per head), writes the
Orbax tree, `mimo_jax.json`, `config.json` and the tokenizer files into a temporary sibling of
DST and renames it to DST at the end: an interrupted or failed conversion leaves nothing at DST.
The temporary sibling is named `.DST.partial-HOST-PID-*`; one left by a killed conversion (its process
gone) is removed by the next conversion to DST on that host.
`load_model(DST, mesh=...)` restores it onto a mesh of any shape.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import shutil
import socket
import sys
import tempfile

from mimo_jax import sharding
from mimo_jax.config import ConfigError
from mimo_jax.lm import load_model
from mimo_jax.sharding import make_mesh, parse_mesh_arg
from mimo_jax.weights.orbax_store import META_NAME, save_params
from mimo_jax.weights.safetensors_io import CheckpointError

# Files beside the weights that a converted directory keeps (tokenizer, chat template, generation defaults).
_SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)


def _partial_prefix(dst: str) -> str:
    """The temporary sibling's name up to mkdtemp's random suffix (letters, digits and '_')."""
    return f".{os.path.basename(dst)}.partial-{socket.gethostname()}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partials(dst: str) -> list[str]:
    """Remove the temporary siblings of `dst` left by killed conversions: those named for this host whose
    process is gone (a live process's, another host's or an unrecognised name are kept). Returns their paths."""
    parent, host = os.path.dirname(dst), socket.gethostname()
    pattern = re.compile(rf"\.{re.escape(os.path.basename(dst))}\.partial-{re.escape(host)}-(\d+)-[A-Za-z0-9_]+")
    removed = []
    for name in os.listdir(parent) if os.path.isdir(parent) else ():
        m = pattern.fullmatch(name)
        if m and not _pid_alive(int(m.group(1))):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
            removed.append(os.path.join(parent, name))
    return removed


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    weights: str = "fp8",
    mtp: bool = False,
    dtype: str = "bfloat16",
    mesh=None,
    progress: bool = True,
    options=None,
) -> str:
    """Write the Orbax checkpoint of `src` at `dst` (which must not exist), loaded with `options` (a
    `RunOptions`; the experts are written in the stored layout whatever it re-lays them out to). Returns `dst`."""
    src, dst = os.fspath(src), os.path.abspath(os.fspath(dst))
    if os.path.exists(dst):
        raise FileExistsError(f"{dst} already exists; remove it or choose another destination")
    remove_stale_partials(dst)
    # validates the whole checkpoint before anything is written
    lm = load_model(src, dtype=dtype, weights=weights, mtp=mtp, mesh=mesh, options=options, progress=progress)
    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=_partial_prefix(dst), dir=parent)
    try:
        save_params(lm.model, tmp)
        for name in _SIDE_FILES:
            for path in glob.glob(os.path.join(src, name)):
                shutil.copy2(path, os.path.join(tmp, name))
        meta = {"format": "orbax", "weights": weights, "dtype": dtype, "mtp_layers": len(lm.model.mtp)}
        with open(os.path.join(tmp, META_NAME), "w") as f:
            json.dump(meta, f, indent=2)
        os.rename(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mimo_jax.tools.convert", description=__doc__.splitlines()[0])
    ap.add_argument("src", help="released checkpoint directory (config.json + safetensors)")
    ap.add_argument("dst", help="output directory (must not exist)")
    ap.add_argument("--weights", choices=("fp8", "bf16"), default="fp8", help="keep FP8 blocks or dequantize")
    ap.add_argument("--mtp", action="store_true", help="include the MTP layers")
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--mesh", default="", help="mesh to import on, e.g. tensor=8 (default: the first device)")
    sharding.add_distributed_arguments(ap)
    args = ap.parse_args(argv)
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)  # multi-host
    mesh = None
    if args.mesh:
        mesh = make_mesh(**parse_mesh_arg(args.mesh))
    try:
        out = convert(args.src, args.dst, weights=args.weights, mtp=args.mtp, dtype=args.dtype, mesh=mesh)
    except (CheckpointError, ConfigError, FileExistsError, FileNotFoundError, NotADirectoryError) as e:
        print(f"mimo_jax.tools.convert: {e}", file=sys.stderr)  # a bad source or destination: no traceback
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
