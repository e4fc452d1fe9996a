"""One MoE layer (router + routed experts) at MiMo-V2-Flash dims on 1, 2, 4... devices.

For each mesh, token count, dispatch strategy and expert implementation: correctness against a
float32 per-token reference, then the median time per layer, the achieved bandwidth over the
bytes of the experts actually touched, and the useful TFLOP/s; beside them the ceilings measured
in the same run (a large device copy, a large bf16 matmul), scaled by the mesh's device count.

    python bench/bench_moe.py                                  # Flash dims, meshes expert=1,2,4
    python bench/bench_moe.py --hidden 64 --experts 16 --intermediate 32 --tokens 1,64 \\
        --meshes "expert=1;expert=2" --ceiling-mib 16 --matmul 256   # tiny, on CPU

The last lines suggest `mimo_jax.model.moe.ALL_TO_ALL_MIN_TOKENS` (the strategy switch point).
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mimo_jax.model import moe
from mimo_jax.quant import BlockQuantized
from mimo_jax.sharding import make_mesh, parse_mesh_arg
from mimo_jax.tools.profiling import format_ops, top_ops

DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}
# bf16 operands with f32 accumulation land near 1e-3..1e-2 of an f32 reference (METHOD.md).
MAX_REL_ERR = {"bfloat16": 2e-2, "float32": 1e-4}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--intermediate", type=int, default=2048)
    ap.add_argument("--tokens", default="1,8,32,64,128,256,512,1024,2048,4096,8192")
    ap.add_argument("--meshes", default="expert=1;expert=2;expert=4", help="';'-separated --mesh specs")
    ap.add_argument("--strategies", default=",".join(s for s in moe.STRATEGIES if s != "auto"))
    ap.add_argument("--impls", default=",".join(sorted(moe.EXPERT_IMPLS)))
    ap.add_argument(
        "--split-tokens",
        action="store_true",
        help="tokens arrive split over the expert axis (data-parallel attention) instead of replicated",
    )
    ap.add_argument("--dense-max-tokens", type=int, default=64, help="experts_dense computes every expert")
    ap.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="activations (and bf16 weights)")
    ap.add_argument("--weights", default="bf16", choices=["bf16", "fp8"], help="fp8: e4m3 blocks, f32 scales")
    ap.add_argument("--block", type=int, default=128, help="fp8 block size (the releases use 128)")
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--check-tokens", type=int, default=4, help="tokens compared with the f32 reference")
    ap.add_argument("--ceiling-mib", type=int, default=4096, help="size of the copy that measures bandwidth")
    ap.add_argument("--matmul", type=int, default=8192, help="n of the n^3 bf16 matmul that measures TFLOP/s")
    ap.add_argument("--out", default=None, help="write one JSON line per measurement here")
    ap.add_argument("--profile", type=int, default=0, help="print the N slowest kernels of each configuration")
    ap.add_argument(
        "--layers-per-call",
        type=int,
        default=1,
        help="time this many chained layers per jitted call (ms reported per layer): amortizes the dispatch of "
        "one call to the mesh's devices as the engine does (the correctness check uses one layer)",
    )
    return ap.parse_args(argv)


def median_seconds(fn, arg_sets: tuple[tuple, ...], reps: int, warmup: int, budget_s: float = 3.0) -> float:
    """Median wall time of fn over reps calls (synchronized), rotating among the argument sets.

    Slow configurations get fewer repetitions (at least 3), so a sweep stays within a run's time limit.
    """
    for i in range(max(1, warmup)):
        start = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    reps = max(3, min(reps, int(budget_s / max(time.perf_counter() - start, 1e-6))))
    times = []
    for i in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_ceilings(device, copy_mib: int, matmul_n: int, reps: int) -> dict[str, float]:
    """One device: bytes/s of a large copy (read + write) and FLOP/s of an n^3 bf16 matmul."""
    n = copy_mib * 2**20 // 2
    src = jax.device_put(jax.random.normal(jax.random.key(0), (n,), jnp.bfloat16), device)
    copy = jax.jit(lambda a: a + jnp.asarray(1, a.dtype))  # reads and writes every element once
    copy_s = median_seconds(copy, ((src,),), reps, 2)
    keys = jax.random.split(jax.random.key(1), 2)
    a, b = (jax.device_put(jax.random.normal(k, (matmul_n, matmul_n), jnp.bfloat16), device) for k in keys)
    mm = jax.jit(lambda a, b: a @ b)
    mm_s = median_seconds(mm, ((a, b),), reps, 2)
    del src, a, b
    return {"copy_bytes_per_s": 2 * n * 2 / copy_s, "matmul_flop_per_s": 2 * matmul_n**3 / mm_s}


def make_weights(mesh, gate_spec, args, dtype):
    """Random expert weights created directly in their shards (12.9 GB at Flash dims in bf16, 6.5 GB fp8).

    fp8: `mimo_jax.quant.BlockQuantized` as the importer loads them (values [E, in, out] e4m3,
    f32 scales per (1, block, block)), sharded like the bf16 weights.
    """
    e, h, i = args.experts, args.hidden, args.intermediate
    down_spec = P(gate_spec[0], gate_spec[2], None)
    fp8 = args.weights == "fp8"

    def one(key, shape, spec):
        scale = 1 / math.sqrt(shape[1])
        if not fp8:
            return (jax.random.normal(key, shape, jnp.float32) * scale).astype(dtype)
        kv, ks = jax.random.split(key)
        blocks = (shape[0], -(-shape[1] // args.block), -(-shape[2] // args.block))
        values = (jax.random.normal(kv, shape, jnp.float32) * 64).astype(jnp.float8_e4m3fn)
        scales = jax.random.uniform(ks, blocks, jnp.float32, 0.5, 1.5) * scale / 64
        return BlockQuantized(values, scales, (1, args.block, args.block), jnp.dtype(dtype).name)

    def sharding_of(shape, spec):
        named = NamedSharding(mesh, spec)
        if not fp8:
            return named
        blocks = (shape[0], -(-shape[1] // args.block), -(-shape[2] // args.block))
        divides = all(
            ax is None or n % mesh.shape[ax] == 0 for ax, n in zip(spec, blocks, strict=True)
        )  # scales follow the values where their block counts divide
        scales = named if divides else NamedSharding(mesh, P(spec[0]))
        return BlockQuantized(named, scales, (1, args.block, args.block), jnp.dtype(dtype).name)

    shapes = ((e, h, i), (e, h, i), (e, i, h))
    specs = (gate_spec, gate_spec, down_spec)
    keys = jax.random.split(jax.random.key(2), 3)
    init = jax.jit(
        lambda keys: tuple(one(k, sh, sp) for k, sh, sp in zip(keys, shapes, specs, strict=True)),
        out_shardings=tuple(sharding_of(sh, sp) for sh, sp in zip(shapes, specs, strict=True)),
    )
    return init(keys)


def repeated(layer, n: int):
    """`layer` applied n times in one jitted call, each on the previous residual stream (x + layer(x)), as
    the model's layers run in one program: the per-call dispatch to the devices is paid once, not per layer."""

    def fn(x, *rest):
        return jax.lax.fori_loop(0, n, lambda _, h: h + layer(h, *rest).astype(h.dtype), x)

    return fn


def weight_bytes_per_expert(w) -> int:
    if isinstance(w, BlockQuantized):
        return (math.prod(w.values.shape) + 4 * math.prod(w.scales.shape)) // w.values.shape[0]
    return math.prod(w.shape) * w.dtype.itemsize // w.shape[0]


def reference(x, weights, ids, w_gate, w_up, w_down):
    """float32 per-token sum over the chosen experts (gathers [C, K, H, I] weights: keep C small)."""
    hi = jax.lax.Precision.HIGHEST

    def chosen(w):  # [C, K, in, out] float32, only the chosen experts dequantized
        flat = ids.reshape(-1)
        if isinstance(w, BlockQuantized):
            w = BlockQuantized(w.values[flat], w.scales[flat], w.block, "float32").dequantize()
        else:
            w = w[flat].astype(jnp.float32)
        return w.reshape(*ids.shape, *w.shape[1:])

    xf = x.astype(jnp.float32)
    g = jnp.einsum("ch,ckhi->cki", xf, chosen(w_gate), precision=hi)
    u = jnp.einsum("ch,ckhi->cki", xf, chosen(w_up), precision=hi)
    y = jnp.einsum("cki,ckih->ckh", jax.nn.silu(g) * u, chosen(w_down), precision=hi)
    return jnp.einsum("ckh,ck->ch", y, weights)


def run(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    dtype = DTYPES[args.dtype]
    h, i, k, e = args.hidden, args.intermediate, args.top_k, args.experts
    token_counts = [int(t) for t in args.tokens.split(",")]
    impls = args.impls.split(",")
    for name in impls:
        if name not in moe.EXPERT_IMPLS:
            raise SystemExit(f"--impls: unknown {name!r}; registered: {sorted(moe.EXPERT_IMPLS)}")
    devices = jax.devices()
    print(
        f"# {devices[0].device_kind} x{len(devices)}, jax {jax.__version__}, {args.dtype}, {args.weights} weights",
        flush=True,
    )
    ceil = measure_ceilings(devices[0], args.ceiling_mib, args.matmul, max(5, args.reps // 2))
    print(
        f"# ceilings per device: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, "
        f"bf16 matmul {ceil['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s",
        flush=True,
    )
    route = functools.partial(moe.route, top_k=k, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0)
    rng = np.random.RandomState(0)
    router = jnp.asarray(rng.randn(e, h) / math.sqrt(h), jnp.float32)
    bias = jnp.asarray(0.01 * rng.randn(e), jnp.float32)
    rows = []
    out_file = open(args.out, "w") if args.out else None  # noqa: SIM115 (kept open across the sweep)
    for mesh_text in filter(None, (m.strip() for m in args.meshes.split(";"))):
        sizes = parse_mesh_arg(mesh_text)
        n_dev = math.prod(sizes.values())
        if n_dev > len(devices):
            print(f"# skip mesh {mesh_text}: needs {n_dev} devices, have {len(devices)}", flush=True)
            continue
        mesh = make_mesh(**sizes, devices=devices[:n_dev])
        gate_spec = P(
            "expert" if mesh.shape["expert"] > 1 else None, None, "tensor" if mesh.shape["tensor"] > 1 else None
        )
        w_gate, w_up, w_down = make_weights(mesh, gate_spec, args, dtype)
        by_layout = {"in_out": ((w_gate, w_up, w_down), gate_spec)}

        def experts_for(impl: str, by_layout=by_layout, gate_spec=gate_spec):
            """(weights, gate spec) in the layout `impl` reads (`moe.expert_layout`), re-laid out once on the
            devices as `relayout_experts` does, so no transpose is timed."""
            layout = moe.expert_layout(impl)
            if layout not in by_layout:
                stored = by_layout["in_out"][0]
                by_layout[layout] = tuple(map(moe.swap_expert_axes, stored)), P(*moe.swapped_axes(gate_spec))
            return by_layout[layout]

        strategies = args.strategies.split(",") if n_dev > 1 else ["local"]
        token_axes = "expert" if args.split_tokens and gate_spec[0] else None
        token_sharding = NamedSharding(mesh, P(token_axes, None))
        for tokens in token_counts:
            if token_axes and tokens % mesh.shape["expert"]:
                continue
            xs = tuple(
                (jax.device_put(jnp.asarray(rng.randn(tokens, h), dtype), token_sharding), router, bias)
                for _ in range(3)
            )
            weights, ids = route(*xs[0][:3])
            touched = len(np.unique(np.asarray(ids)))
            touched_bytes = touched * sum(weight_bytes_per_expert(w) for w in (w_gate, w_up, w_down))
            useful_flop = 2 * tokens * k * 3 * h * i
            c = min(args.check_tokens, tokens)
            ref = np.asarray(reference(xs[0][0][:c], weights[:c], ids[:c], w_gate, w_up, w_down))
            for strategy in strategies:
                for impl in impls:
                    if impl == "dense" and tokens > args.dense_max_tokens:
                        continue
                    row = dict(
                        device=devices[0].device_kind,
                        mesh=mesh_text,
                        tokens_split=bool(token_axes),
                        devices=n_dev,
                        tokens=tokens,
                        strategy=strategy,
                        impl=impl,
                        dtype=args.dtype,
                        weights=args.weights,
                        experts_touched=touched,
                        touched_gb=touched_bytes / 1e9,
                    )
                    try:
                        experts, impl_gate_spec = experts_for(impl)
                        calls = tuple(inputs + experts for inputs in xs)
                        if strategy == "local":

                            def layer(x, router, bias, wg, wu, wd, impl=impl):
                                experts = [moe.read_experts(w, impl, x) for w in (wg, wu, wd)]
                                return moe.EXPERT_IMPLS[impl](x, *route(x, router, bias), *experts)
                        else:
                            sharded = functools.partial(
                                moe.experts_sharded, route_fn=route, top_k=k, mesh=mesh, gate_spec=impl_gate_spec,
                                token_axes=token_axes, impl=impl, strategy=strategy,
                            )  # fmt: skip

                            def layer(x, router, bias, wg, wu, wd, sharded=sharded, impl=impl):
                                experts = [moe.read_experts(w, impl, x) for w in (wg, wu, wd)]
                                return sharded(x, router, bias, *experts)[0]

                        fn = jax.jit(layer)
                        timed = fn if args.layers_per_call == 1 else jax.jit(repeated(layer, args.layers_per_call))
                        with jax.set_mesh(mesh):
                            out = np.asarray(fn(*calls[0])[:c], np.float32)
                            err = float(np.linalg.norm(out - ref) / np.linalg.norm(ref))
                            seconds = median_seconds(timed, calls, args.reps, args.warmup) / args.layers_per_call
                            if args.profile:
                                print(f"# per call of {args.layers_per_call} layer(s):", flush=True)
                                print(format_ops(top_ops(timed, calls[0]), args.profile), flush=True)
                        row.update(
                            ms=seconds * 1e3,
                            rel_err=err,
                            ok=bool(err < MAX_REL_ERR[args.dtype]),
                            tb_per_s=touched_bytes / seconds / 1e12,
                            bw_frac=touched_bytes / seconds / (n_dev * ceil["copy_bytes_per_s"]),
                            tflop_per_s=useful_flop / seconds / 1e12,
                            matmul_frac=useful_flop / seconds / (n_dev * ceil["matmul_flop_per_s"]),
                        )
                    except Exception as exc:  # a configuration that does not compile or fit is a result too
                        row.update(error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
                    rows.append(row)
                    if out_file:
                        out_file.write(json.dumps({**row, **ceil}) + "\n")
                        out_file.flush()
                    print(format_row(row), flush=True)
            del xs
        del w_gate, w_up, w_down
        by_layout.clear()
    if out_file:
        out_file.close()
    print_summary(rows, ceil)
    return rows


HEADER = (
    "| mesh | tokens | strategy | impl | experts touched | GB touched | ms | TB/s (% copy) "
    "| TFLOP/s (% matmul) | rel err |"
)


def format_row(r: dict) -> str:
    head = f"| {r['mesh']} | {r['tokens']} | {r['strategy']} | {r['impl']} | {r['experts_touched']} | "
    head += f"{r['touched_gb']:.2f} | "
    if "error" in r:
        return head + f"fails: {r['error']} | | | |"
    mark = "" if r["ok"] else " WRONG"
    return head + (
        f"{r['ms']:.3f} | {r['tb_per_s']:.2f} ({100 * r['bw_frac']:.0f}%) | "
        f"{r['tflop_per_s']:.1f} ({100 * r['matmul_frac']:.0f}%) | {r['rel_err']:.1e}{mark} |"
    )


def print_summary(rows: list[dict], ceil: dict) -> None:
    print()
    print(
        f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {ceil['matmul_flop_per_s'] / 1e12:.0f} TFLOP/s "
        "per device (ceilings scale with the mesh's device count)"
    )
    print(HEADER)
    print("|" + "---|" * (HEADER.count("|") - 1))
    for r in rows:
        print(format_row(r))
    # switch point: the fewest tokens from which all_to_all is at least as fast as replicated (best impl each)
    best: dict[tuple, float] = {}
    for r in rows:
        if "ms" in r and r["ok"]:
            key = (r["mesh"], r["tokens"], r["strategy"])
            best[key] = min(best.get(key, math.inf), r["ms"])
    for mesh in sorted({m for m, _, s in best if s == "all_to_all"}):
        counts = sorted({t for m, t, _ in best if m == mesh})
        faster = [
            t
            for t in counts
            if best.get((mesh, t, "all_to_all"), math.inf) <= best.get((mesh, t, "replicated"), math.inf)
        ]
        switch = next((t for t in counts if all(u in faster for u in counts if u >= t)), None)
        if switch is None:
            print(f"mesh {mesh}: replicated is faster up to {counts[-1]} tokens (keep ALL_TO_ALL_MIN_TOKENS above)")
        else:
            print(f"mesh {mesh}: all_to_all wins from {switch} tokens on (suggested ALL_TO_ALL_MIN_TOKENS)")
    bad = [r for r in rows if "ok" in r and not r["ok"]]
    if bad:
        print(f"{len(bad)} configurations gave WRONG results")


def main(argv: list[str] | None = None) -> int:
    rows = run(argv)
    return 1 if any("ok" in r and not r["ok"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
