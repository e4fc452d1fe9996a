"""Check and time the Pallas ring decode attention kernel against the model's XLA ring path on one GPU.

    PYTHONPATH=. python bench/check_ring_kernel.py                     # GPU: Flash SWA shapes, check and time
    PYTHONPATH=. python bench/check_ring_kernel.py --interpret --batch 2   # CPU smoke run

A Flash SWA layer (64 q heads, 8 kv heads, D 192, Dv 128, sinks, a 128-key window in a ring of 128 + T slots) at
--batch rows with wrapped rings, T = 1 and 4 queries: the kernel over the ring after the write (`write_ring`) against
`update_and_read` + `attention` (the ring read before the write), max abs error over max |XLA|; exit code 1 above
TOLERANCE. Then us per call of each (the write included), jitted.
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.kernels import ring_attention_gpu as rk
from mimo_jax.model.attention import attention
from mimo_jax.model.cache import LayerKV, update_and_read, write_ring
from mimo_jax.tools.bench import seconds_per_call

N, KV, D, DV, WINDOW = 64, 8, 192, 128, 128
TOLERANCE = 0.02  # bf16 inputs and outputs


def make_case(batch: int, t: int, seed: int):
    rs = np.random.RandomState(seed)
    slots = WINDOW + t
    nxt = rs.randint(slots, 10 * slots, batch)  # every ring wrapped
    nxt[0] = 5  # one short row
    pos = np.full((batch, slots), -1, np.int32)
    for row, n in enumerate(nxt):
        for p in range(max(0, n - slots), n):
            pos[row, p % slots] = p
    bf16 = lambda *shape: jnp.asarray(rs.randn(*shape), jnp.float32).astype(jnp.bfloat16)
    ring = LayerKV(bf16(batch, KV, slots, D), bf16(batch, KV, slots, DV), jnp.asarray(pos), ring=True)
    q_pos = jnp.asarray(nxt[:, None] + np.arange(t)[None], jnp.int32)
    sink = jnp.asarray(rs.randn(N), jnp.float32)
    return bf16(batch, t, N, D), ring, bf16(batch, t, KV, D), bf16(batch, t, KV, DV), q_pos, sink


def xla_path(q, ring, k, v, q_pos, sink):
    keys, values, key_pos, ring = update_and_read(ring, k, v, q_pos)
    return attention(q, keys, values, q_pos, key_pos, window_keys=WINDOW, sink=sink, scale=D**-0.5), ring


def kernel_path(q, ring, k, v, q_pos, sink, interpret=False):
    ring = write_ring(ring, k, v, q_pos)
    out = rk.ring_attention(
        q, ring.k, ring.v, ring.pos, q_pos, window=WINDOW, scale=D**-0.5, sink=sink, interpret=interpret
    )
    return out, ring


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", default="1,16,64")
    p.add_argument("--interpret", action="store_true")
    args = p.parse_args()
    print(f"# {jax.devices()[0].device_kind}, jax {jax.__version__}")
    print("| batch | T | max abs err / max abs | XLA us | kernel us | speed-up |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    for batch in (int(b) for b in args.batch.split(",")):
        for t in (1, 4):
            case = make_case(batch, t, seed=batch + t)
            fx = jax.jit(xla_path)
            fk = jax.jit(lambda *a: kernel_path(*a, interpret=args.interpret))
            want, ring_x = fx(*case)
            got, ring_k = fk(*case)
            want, got = np.asarray(want, np.float32), np.asarray(got, np.float32)
            err = float(np.abs(got - want).max() / np.abs(want).max())
            same_ring = all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip((ring_x.k, ring_x.v, ring_x.pos), (ring_k.k, ring_k.v, ring_k.pos), strict=True)
            )
            worst = max(worst, err if same_ring else float("inf"))
            sx, sk = seconds_per_call(fx, *case, iters=50), seconds_per_call(fk, *case, iters=50)
            print(f"| {batch} | {t} | {err:.1e}{'' if same_ring else ' (rings differ!)'} | {sx * 1e6:.1f} | "
                  f"{sk * 1e6:.1f} | {sx / sk:.2f}x |", flush=True)  # fmt: skip
    ok = worst <= TOLERANCE
    print(f"# {'PASS' if ok else 'FAIL'}: worst error {worst:.1e} (tolerance {TOLERANCE})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
