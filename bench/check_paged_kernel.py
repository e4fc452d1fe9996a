"""Check (and optionally time) the Pallas paged decode attention kernel against the XLA paged path on one GPU.

    PYTHONPATH=. python bench/check_paged_kernel.py                  # GPU: compile at Flash shapes and compare
    PYTHONPATH=. python bench/check_paged_kernel.py --time           # also time kernel (by splits) vs XLA
    PYTHONPATH=. python bench/check_paged_kernel.py --interpret --batch 4 --context 256   # CPU smoke run

Check: a Flash full layer (64 q heads, 4 kv heads, D 192, Dv 128, sinks, pages of 64 tokens) at batch 64 and a
2K context on shuffled pages, rows of different lengths (one ending inside a page, one with a -1 hole, one of
padding only), T = 1 and 4 queries, bf16 and fp8 pools: the kernel (`paged_impl="pallas_gpu"`) against
`attention_paged`'s XLA path, max abs error printed. Exit code 1 if an error exceeds TOLERANCE x max |XLA|.
--time: ms per call of each at T = 1 for --time-batch x --time-context (every row at the full context), the
kernel at its default splits and each of --splits, and the KV read rate (bytes of the rows' keys and values).
"""

from __future__ import annotations

import argparse
import sys

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.kernels import paged_attention_gpu as pk
from mimo_jax.model.attention import attention_paged
from mimo_jax.model.cache import PagedKV, PagePool, quantize_fp8
from mimo_jax.tools.bench import seconds_per_call

FLASH = dict(heads=64, kv_heads=4, head_dim=192, v_head_dim=128, page_size=64)
TOLERANCE = 0.02  # max abs error over max |XLA output|: bf16 outputs, fp8 scales applied before vs after the dot


@jax.jit(static_argnums=(0, 1))
def _filled(shape: tuple, dtype, phase: jax.Array) -> jax.Array:
    """Deterministic values in [-1, 1] made in one fused pass (no float32 copy of a 20 GB pool): timing inputs."""
    angle = sum(jax.lax.broadcasted_iota(jnp.float32, shape, i) * (0.37 + 0.11 * i) for i in range(len(shape)))
    return jnp.sin(angle + phase).astype(dtype)


def make_case(batch: int, context: int, t: int, fp8: bool, seed: int, ragged: bool = True):
    """(q, PagedKV, q_pos, sink, keys held by the rows) at Flash head shapes on shuffled pages. `ragged`: rows of
    varied lengths and random values (the check); else every row at `context` with filled values (timing)."""
    n, kv, d, dv, size = (FLASH[k] for k in ("heads", "kv_heads", "head_dim", "v_head_dim", "page_size"))
    max_pages = -(-context // size)
    rs = np.random.RandomState(seed)
    keys = jax.random.split(jax.random.key(seed), 4)
    pages = batch * max_pages + 1
    k_shape, v_shape = (pages, kv, size, d), (pages, kv, size, dv)
    if ragged:
        k, v = jax.random.normal(keys[0], k_shape, jnp.bfloat16), jax.random.normal(keys[1], v_shape, jnp.bfloat16)
        if fp8:
            (k8, k_scale), (v8, v_scale) = quantize_fp8(k), quantize_fp8(v)
            pool = PagePool(k8, v8, k_scale, v_scale)
        else:
            pool = PagePool(k, v)
    elif fp8:
        ones = jnp.ones((pages, kv, size), jnp.float32)
        fp8_dtype = jnp.float8_e4m3fn
        pool = PagePool(_filled(k_shape, fp8_dtype, 0.0), _filled(v_shape, fp8_dtype, 1.0), ones, ones)
    else:
        pool = PagePool(_filled(k_shape, jnp.bfloat16, 0.0), _filled(v_shape, jnp.bfloat16, 1.0))
    table = rs.permutation(pages)[: batch * max_pages].reshape(batch, max_pages).astype(np.int32)
    lengths = np.full(batch, context)
    if ragged:
        lengths = rs.randint(1, context + 1, batch)
        lengths[0], lengths[1 % batch] = context, size * (max_pages // 2) + 7  # full; ends inside a page
        table[1 % batch, max_pages // 4] = -1  # a hole: those positions are invisible
        lengths[2 % batch] = 0  # padding only
    for r, length in enumerate(lengths):
        table[r, -(-length // size) :] = -1
    q_pos = np.maximum(lengths[:, None] - t + np.arange(t)[None], -1)
    q_pos[lengths == 0] = -1
    q = 2 * jax.random.normal(keys[2], (batch, t, n, d), jnp.bfloat16)
    sink = jax.random.normal(keys[3], (n,), jnp.float32)
    return q, PagedKV(pool, jnp.asarray(table)), jnp.asarray(q_pos, jnp.int32), sink, int(lengths.sum())


def paged_fn(impl: str, config: pk.PagedConfig | None = None, interpret: bool = False):
    """jit of one layer's paged attention: "xla" (attention_paged) or "kernel" (the Pallas kernel)."""
    scale = FLASH["head_dim"] ** -0.5
    if impl == "xla":
        return jax.jit(lambda q, c, pos, sink: attention_paged(q, c, pos, window_keys=None, sink=sink, scale=scale))

    def kernel(q, c, pos, sink):
        pool = c.pool
        return pk.paged_attention(
            q, pool.k, pool.v, c.page_table, pos, scale=scale, sink=sink, k_scale=pool.k_scale, v_scale=pool.v_scale,
            config=config, interpret=interpret,
        )  # fmt: skip

    return jax.jit(kernel)


def check(batch: int, context: int, interpret: bool) -> bool:
    ok = True
    print(f"# check: kernel vs XLA paged attention, Flash full layer, batch {batch}, context {context}")
    print("| pool | T | max abs error | max abs XLA | error / max | rel. L2 | ok |")
    print("|---|---|---|---|---|---|---|")
    for fp8 in (False, True):
        for t in (1, 4):
            q, cache, q_pos, sink, _ = make_case(batch, context, t, fp8, seed=t + 2 * fp8)
            want = np.asarray(paged_fn("xla")(q, cache, q_pos, sink), np.float32)
            got = np.asarray(paged_fn("kernel", interpret=interpret)(q, cache, q_pos, sink), np.float32)
            err, top = float(np.abs(got - want).max()), float(np.abs(want).max())
            rel = float(np.linalg.norm(got - want) / max(np.linalg.norm(want), 1e-30))
            padded = np.asarray(q_pos) < 0
            good = np.isfinite(got).all() and err <= TOLERANCE * top and not got[padded].any()
            ok &= bool(good)
            name = "fp8" if fp8 else "bf16"
            print(f"| {name} | {t} | {err:.2e} | {top:.2e} | {err / top:.2e} | {rel:.2e} | {'yes' if good else 'NO'} |")
    return ok


def _cell(fn, args: tuple, gb: float) -> str:
    """'ms (GB/s)' of one timed variant; a failure (e.g. out of memory) is printed, not raised."""
    try:
        ms = seconds_per_call(fn, *args, iters=20) * 1e3
    except Exception as e:
        return f"failed: {type(e).__name__}"
    return f"{ms:.3f} ({gb / ms * 1e3:.0f})"


def time_cases(batches: list[int], contexts: list[int], splits: list[int], interpret: bool) -> None:
    print("# timing, T = 1, every row at the full context: ms per call (GB/s of the rows' K+V)")
    columns = " | ".join(f"splits {s}" for s in splits)
    print(f"| pool | batch | context | xla | kernel default (splits) | {columns} |")
    print("|---|---|---|---|---|" + "---|" * len(splits))
    for fp8 in (False, True):
        for batch in batches:
            for context in contexts:
                q, cache, q_pos, sink, keys = make_case(batch, context, 1, fp8, seed=0, ragged=False)
                per_key = FLASH["kv_heads"] * (FLASH["head_dim"] + FLASH["v_head_dim"]) * (1 if fp8 else 2)
                args, gb = (q, cache, q_pos, sink), keys * per_key / 1e9
                blocks = -(-cache.max_pages // pk.pages_per_block(FLASH["page_size"], cache.max_pages))
                default = pk.default_splits(batch * FLASH["kv_heads"], blocks)
                row = [_cell(paged_fn("xla"), args, gb), _cell(paged_fn("kernel", None, interpret), args, gb)]
                row[-1] += f" ({default})"
                row += [_cell(paged_fn("kernel", pk.PagedConfig(splits=s), interpret), args, gb) for s in splits]
                name = "fp8" if fp8 else "bf16"
                print(f"| {name} | {batch} | {context} | " + " | ".join(row) + " |", flush=True)
                del q, cache, args  # the next case's pool may need the memory


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=64, help="check: rows")
    p.add_argument("--context", type=int, default=2048, help="check: table length in tokens")
    p.add_argument("--time", action="store_true", help="also time the kernel against XLA")
    p.add_argument("--time-batch", default="1,64", help="timing: comma-separated batch sizes")
    p.add_argument("--time-context", default="2048,131072", help="timing: comma-separated contexts")
    p.add_argument("--splits", default="1,2,4,8", help="timing: kernel splits to time beside the default")
    p.add_argument("--interpret", action="store_true", help="the kernel in the Pallas interpreter (CPU smoke run)")
    args = p.parse_args(argv)
    device = jax.devices()[0]
    print(f"# {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    if jax.default_backend() != "gpu" and not args.interpret:
        print("# no GPU: the compiled kernel needs one (--interpret runs the interpreter)")
        return 1
    ok = check(args.batch, args.context, args.interpret)
    if args.time:
        ints = lambda text: [int(x) for x in text.split(",") if x]
        time_cases(ints(args.time_batch), ints(args.time_context), ints(args.splits), args.interpret)
    print("# all checks passed" if ok else "# CHECK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
