"""Decode-size projections on block-FP8 weights (issue 25 item 2): which way of applying the block scales reads
the weight once, at the read ceiling, with no copy.

    PYTHONPATH=. python bench/bench_projection.py                 # GPU: Flash shapes, rows 1/4/16
    PYTHONPATH=. python bench/bench_projection.py --rows 1 --scale 16 --steps 4   # CPU smoke run

Each way runs inside a `fori_loop` of --steps iterations with the weight a loop invariant, as a decode round
does (XLA may then hoist a re-laid-out copy of the weight out of the loop: counted as "copies", the transposes
and copies of weight-sized arrays in the compiled program). Ways:
- `dequantize`: the weight dequantized to bf16 and a dot (`quant.weight`; today's path for 2-d blocks);
- `reduce`: one multiply-reduce x[k] * values[k, o] * scale[k // b, o // b'] over k (a column reduction);
- `project`: `quant.project` on this backend (on GPU: partial products per input block on the fp8 values, then
  the scales, for q/k/v and 2-d blocks alike);
- `padded`: `project` with one row padded to two (XLA turns a one-row dot into a reduce that wants the weight
  re-laid out).
Times: us per projection, the weight's bytes over that time against the read ceiling of the same run; error:
max |y - float64 reference| / max |reference|.
"""

from __future__ import annotations

import argparse
import re

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import quant
from mimo_jax.tools.bench import measure_read_bandwidth, seconds_per_call

# (name, weight shape [in, *out], block): Flash's fp8 projections (q/k/v per output element, dense MLP 128 x 128)
SHAPES = (
    ("q", (4096, 64, 192), (128, 1, 1)),
    ("k", (4096, 8, 192), (128, 1, 1)),
    ("v", (4096, 8, 128), (128, 1, 1)),
    ("mlp_gate", (4096, 16384), (128, 128)),
    ("mlp_down", (16384, 4096), (128, 128)),
)


def way_dequantize(x, value):
    return jnp.tensordot(x, quant.weight(value, after=x), axes=1)


def way_reduce(x, value):
    values, scales = quant.block_views(quant.tied(value, x))
    c, b = values.shape[:2]
    xb = x.astype(jnp.float32).reshape(*x.shape[:-1], c, b, *(1,) * (values.ndim - 2))
    lead = x.ndim - 1
    y = jnp.sum(xb * (values.astype(jnp.float32) * scales[:, None]), axis=(lead, lead + 1))
    return y.reshape(*x.shape[:-1], *value.shape[1:]).astype(x.dtype)


def way_project(x, value):
    return quant.project(x, value, jax.default_backend())


def way_padded(x, value):
    """`project` with one row padded to two: a dot XLA keeps a dot (one row becomes a reduce over a re-laid copy)."""
    if x.shape[0] != 1:
        return way_project(x, value)
    return way_project(jnp.pad(x, ((0, 1), (0, 0))), value)[:1]


def in_a_loop(fn, steps: int):
    """fn(x, value) `steps` times in a fori_loop, the weight a loop invariant (a decode round)."""

    def loop(x, value):
        def body(i, carry):
            x, acc = carry
            y = fn(x, value).astype(jnp.float32)
            return x + (jnp.sum(y) * 1e-12).astype(x.dtype), acc + y

        zeros = jnp.zeros(x.shape[:-1] + value.shape[1:], jnp.float32)
        return jax.lax.fori_loop(0, steps, body, (x, zeros))[1]

    return loop


WAYS = {
    "dequantize": way_dequantize,
    "reduce": way_reduce,
    "project": way_project,
    "padded": way_padded,
}


def make_weight(shape, block, seed: int) -> tuple[quant.BlockQuantized, np.ndarray]:
    """A random block-FP8 weight and its float64 dequantized value."""
    rs = np.random.RandomState(seed)
    k, out = shape[0], int(np.prod(shape[1:]))
    w = rs.standard_normal((k, out)).astype(np.float32) * 0.02
    if len(shape) == 2:
        values, scales = quant.quantize_blocks(w, block)
    else:  # one scale per (input block, output element)
        groups = w.reshape(k // block[0], block[0], out)
        scales = np.abs(groups).max(axis=1) / quant.FP8_MAX
        values = np.clip(groups / scales[:, None], -quant.FP8_MAX, quant.FP8_MAX).astype(quant.FP8).reshape(k, out)
        scales = scales.reshape(k // block[0], *shape[1:])
    values = values.reshape(shape)
    exact = quant.dequantize_blocks(values, scales, block, np.float64)
    return quant.BlockQuantized(jnp.asarray(values), jnp.asarray(scales, jnp.float32), block), exact


def copies_in(compiled_text: str, nbytes: int) -> int:
    """Transposes / copies in the compiled program whose output is at least half the weight's fp8 size."""
    count = 0
    for m in re.finditer(r"= (\w+)\[([0-9,]+)\][^ ]* (?:fusion|transpose|copy)\(([^)]*)\)[^\n]*", compiled_text):
        line = m.group(0)
        if "transpose" not in line and " copy(" not in line:
            continue
        size = int(np.prod([int(d) for d in m.group(2).split(",")])) * (1 if m.group(1).startswith("f8") else 2)
        count += size * 2 >= nbytes
    return count


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16")
    p.add_argument("--ways", default=",".join(WAYS))
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--steps", type=int, default=32, help="projections per jitted loop")
    p.add_argument("--scale", type=int, default=1, help="divide the weights' dims by this (CPU smoke runs)")
    p.add_argument("--read-mb", type=int, default=8192)
    args = p.parse_args()
    ceiling = measure_read_bandwidth(args.read_mb << 20)
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}; HBM read ceiling {ceiling / 1e12:.3f} TB/s")
    print("| weight | rows | way | us | GB/s (% of read) | copies | error |")
    print("|---|---|---|---|---|---|---|")
    for name, shape, block in SHAPES:
        if name not in args.shapes.split(","):
            continue
        shape = (shape[0] // args.scale,) + tuple(
            max(d // args.scale, b) if b > 1 else d for d, b in zip(shape[1:], block[1:], strict=True)
        )
        value, exact = make_weight(shape, block, seed=len(name))
        nbytes = value.nbytes
        for rows in (int(r) for r in args.rows.split(",")):
            x = jax.random.normal(jax.random.key(rows), (rows, shape[0]), jnp.bfloat16)
            reference = np.tensordot(np.asarray(x, np.float64), exact, axes=1)
            for way in args.ways.split(","):
                fn = WAYS[way]
                looped = jax.jit(in_a_loop(fn, args.steps))
                text = looped.lower(x, value).compile().as_text()
                one = np.asarray(jax.jit(fn)(x, value), np.float64)
                err = np.abs(one - reference).max() / np.abs(reference).max()
                sec = seconds_per_call(looped, x, value) / args.steps
                rate = nbytes / sec
                print(
                    f"| {name} {list(shape)} | {rows} | {way} | {sec * 1e6:.1f} | {rate / 1e9:.0f} "
                    f"({rate / ceiling:.0%}) | {copies_in(text, nbytes)} | {err:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
