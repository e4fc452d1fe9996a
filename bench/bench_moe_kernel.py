"""Check and time the Pallas MoE kernel (mimo_jax.kernels.moe_gpu) against plain-XLA paths on one GPU.

    PYTHONPATH=. python bench/bench_moe_kernel.py            # GPU: checks, ceilings, Flash-size timings
    PYTHONPATH=. python bench/bench_moe_kernel.py --small    # CPU smoke run of this script (interpret mode)

1. Checks (fresh random inputs each run): kernel vs a float32 `experts_dense` on mid-size experts, random and
   adversarial routings (all assignments on one expert, only three experts used, one token, foreign ids),
   bf16 and fp8 weights, every tile config; at Flash size, sampled tokens vs a per-token float32 reference.
2. Ceilings measured in this run: device copy bandwidth (read + write), bf16 8192^3 matmul.
3. Flash MoE layer (hidden 4096, 256 experts, top-8, intermediate 2048) at T = 1 ... 8192 tokens: kernel bf16 and
   fp8 (tile candidates, best kept; at a few tokens the fused decode kernel's variants beside the grouped tiles,
   `--variants`), plain paths timed in the same run, the calibration table's best plain path; `--profile N`
   prints where each best config's device time goes; `--chain L` also times the default and best configs per
   layer of L calls in one jitted loop (a decode step's setting: no per-call dispatch).
`--w8a8`: only the block-FP8 w8a8 GEMMs (mimo_jax.kernels.fp8_gemm_gpu), one command: checks against float32
w8a8 and bf16-activation references, then one Flash MoE layer at 2048 / 8192 tokens timed against the bf16 and
fp8-widened kernels with a tile sweep (about 60 s), and a dense projection against XLA.
Exit code 1 if any check fails. Results also go, line by line, to $OUT/bench_moe_kernel.jsonl when OUT is set.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import quant
from mimo_jax.kernels import fp8_gemm_gpu
from mimo_jax.kernels import moe_gpu as mg
from mimo_jax.model import moe
from mimo_jax.tools.profiling import format_ops, top_ops

FLASH = dict(experts=256, hidden=4096, inter=2048, top_k=8)
TOKENS = (1, 8, 32, 128, 1024, 8192)
# ../shared/docs/gpu-moe-calibration.md (H100, 2026-11-27): best plain-XLA path per T, ms.
CALIBRATION_BEST = {
    1: (0.56, "gather"),
    8: (3.50, "buckets"),
    32: (4.62, "buckets"),
    128: (4.86, "buckets"),
    1024: (5.76, "buckets"),
    8192: (15.4, "buckets"),
}
T = mg.TileConfig


W8A8_TOL = 8e-2  # fp8 activations (3 mantissa bits) vs the float32 reference: a few percent, by design


CANDIDATES = {  # per regime: kernel configs tried at Flash size (the first is the module default)
    "bf16": {
        "decode": [
            mg.DECODE,
            mg.KernelConfig(T(16, 64, 128, 4, 4), T(16, 64, 128, 4, 4)),
            mg.KernelConfig(T(16, 32, 256, 4, 3), T(16, 64, 256, 4, 3)),
        ],
        "middle": [mg.MIDDLE, mg.KernelConfig(T(32, 128, 128, 4, 4), T(32, 128, 128, 4, 4))],
        "prefill": [
            mg.PREFILL,
            mg.KernelConfig(T(128, 128, 64, 8, 3), T(128, 128, 64, 8, 3)),
            mg.KernelConfig(T(64, 128, 64, 4, 4), T(64, 128, 64, 4, 4)),
        ],
    },
    "fp8": {
        "decode": [
            mg.DECODE_FP8,
            dataclasses.replace(mg.DECODE_FP8, fp8_dot="bf16"),
            mg.KernelConfig(T(16, 256, 128, 4, 3), T(16, 256, 128, 4, 3), "f16"),
            mg.KernelConfig(T(16, 128, 128, 4, 6), T(16, 128, 128, 4, 6), "f16"),
            mg.KernelConfig(T(16, 64, 128, 4, 4), T(16, 64, 128, 4, 4), "f16"),
            mg.KernelConfig(T(16, 128, 128, 8, 4), T(16, 128, 128, 8, 4), "f16"),
            mg.KernelConfig(T(16, 64, 128, 4, 4), T(16, 64, 128, 4, 4)),
            # fewer stages: less shared memory per program, so several programs per SM keep loads in flight
            # (if the widening keeps Triton from pipelining the fp8 loads, stages buy nothing)
            mg.KernelConfig(T(16, 128, 128, 4, 2), T(16, 128, 128, 4, 2), "f16"),
            mg.KernelConfig(T(16, 64, 128, 4, 2), T(16, 64, 128, 4, 2), "f16"),
            # narrow gate/up columns: more programs when few experts x few column tiles leave SMs idle
            # (batch 1 on a tensor axis of 4: 8 experts x 512 / 128 = 32 programs for 132 SMs)
            mg.KernelConfig(T(16, 32, 128, 4, 4), T(16, 128, 128, 4, 4), "f16"),
        ],
        "middle": [
            mg.MIDDLE_FP8,
            dataclasses.replace(mg.MIDDLE_FP8, fp8_dot="bf16"),
            mg.KernelConfig(T(32, 128, 128, 4, 4), T(32, 128, 128, 4, 4), "f16"),
            mg.KernelConfig(T(64, 128, 128, 4, 3), T(64, 128, 128, 4, 3), "f16"),
        ],
        "prefill": [
            mg.PREFILL_FP8,
            dataclasses.replace(mg.PREFILL_FP8, fp8_dot="bf16"),
            mg.KernelConfig(T(128, 128, 64, 8, 4), T(128, 256, 64, 8, 3), "f16"),
            mg.KernelConfig(T(128, 128, 128, 8, 3), T(128, 128, 128, 8, 3), "f16"),
            mg.KernelConfig(T(128, 128, 64, 8, 4), T(128, 128, 64, 8, 4)),
        ],
    },
}
S = dict(swap_ab=True)
# Weights given [E, out, in] (kind "<weights>/out_in", what the model hands the kernel): the reduction
# dimension contiguous, as MMAs read operands (the first of each list is the module default).
OUT_IN_CANDIDATES = {
    "bf16": {
        "decode": [
            mg.DECODE,
            mg.KernelConfig(T(16, 128, 64, 4, 5, **S), T(16, 128, 128, 4, 4, **S)),
            mg.KernelConfig(T(16, 64, 128, 4, 4, **S), T(16, 64, 128, 4, 4, **S)),
        ],
        "middle": [mg.MIDDLE, mg.KernelConfig(T(64, 128, 64, 4, 4, **S), T(64, 128, 64, 4, 4, **S))],
        "prefill": [mg.PREFILL, mg.KernelConfig(T(128, 128, 64, 8, 3), T(128, 128, 64, 8, 3))],
    },
    "fp8": {
        "decode": [
            mg.DECODE_FP8,
            mg.KernelConfig(T(16, 128, 128, 4, 4, **S), T(16, 128, 128, 4, 4, **S), "f16"),
            mg.KernelConfig(T(16, 64, 128, 4, 4, **S), T(16, 64, 128, 4, 4, **S), "f16"),
            mg.KernelConfig(T(16, 128, 128, 4, 3, **S), T(16, 128, 128, 4, 3, **S), "f16"),
            mg.KernelConfig(T(16, 256, 128, 8, 3, **S), T(16, 256, 128, 8, 3, **S), "f16"),
            mg.KernelConfig(T(16, 128, 128, 4, 4, **S), T(16, 128, 128, 4, 4, **S), "bf16"),
        ],
        "middle": [
            mg.MIDDLE_FP8,
            mg.KernelConfig(T(64, 128, 128, 4, 3, **S), T(64, 128, 128, 4, 3, **S), "f16"),
        ],
        "prefill": [mg.PREFILL_FP8, mg.KernelConfig(T(128, 128, 128, 8, 3), T(128, 128, 128, 8, 3), "f16")],
    },
}
EXPERIMENTAL = []  # (tokens, weights, config): tried after the summary, so a failure there loses nothing
FUSED_BENCH_MAX = 64  # the fused decode kernel is timed up to this many assignments (module limit or not)


def fused_candidates(base: str, assignments: int, inter: int) -> list:
    """Variants of the fused decode kernel around the module's choice for this size: narrower intermediate
    blocks (more programs, several resident per SM), launch shapes, steps, operand order."""
    fp8 = base != "bf16"
    auto = mg.fused_config(assignments, inter, fp8)
    r = dataclasses.replace
    narrower = [bi for bi in (auto.block_inter // 2, auto.block_inter // 4) if bi >= 16 and inter % bi == 0]
    out = [auto] + [r(auto, block_inter=bi) for bi in narrower]
    half = r(auto, block_inter=narrower[0]) if narrower else auto
    out += [r(half, num_warps=8), r(half, num_stages=3), r(half, num_stages=6), r(half, swap_ab=not auto.swap_ab)]
    out += [r(auto, swap_ab=not auto.swap_ab), r(auto, num_warps=8)]
    out += [r(auto, unroll=2), r(auto, unroll=4), r(half, unroll=2)]  # loads of 2-4 steps issued together
    if fp8:
        out += [r(half, block_out=64), r(half, block_k=64), r(auto, fp8_dot="bf16")]
    else:
        out += [r(auto, block_k=128), r(half, block_k=128), r(auto, block_out=128)]
    return list(dict.fromkeys(out))


def split_candidates(base: str, assignments: int, inter: int) -> list:
    """The fused kernel in one launch and in two (`split`: 2-4 x the programs), with fewer pipeline stages (less
    shared memory per program, so more of them resident per SM) and 256-wide down steps."""
    auto = mg.fused_config(assignments, inter, base != "bf16")
    r = dataclasses.replace
    two, four = r(auto, split=2), r(auto, split=4)
    out = [auto, r(two, num_stages=3), r(two, num_stages=2), r(two, num_stages=3, block_out=256)]
    out += [r(two, num_stages=2, block_out=256), r(four, num_stages=2), r(four, num_stages=3)]
    out += [r(auto, block_out=256), r(auto, num_stages=3), r(auto, num_stages=2)]
    return list(dict.fromkeys(out))


def fma_candidates(assignments: int, inter: int) -> list:
    """The fused kernel on the CUDA cores (tensor_cores=False): widths and launch shapes."""
    shapes = [(64, 128, 128, 4, 4), (32, 128, 128, 4, 4), (16, 128, 128, 4, 4), (64, 128, 64, 8, 4),
              (128, 64, 64, 8, 3), (32, 64, 128, 4, 6)]  # fmt: skip
    return [mg.FusedConfig(*shape, tensor_cores=False) for shape in shapes if inter % shape[0] == 0]


def candidates(kind: str, assignments: int, experts: int, inter: int, variants: str = "all") -> list:
    """Configs timed for this kind and size, the module's default first: at a few assignments the fused
    kernel's variants and the grouped decode tiles side by side."""
    base, layout = split_kind(kind)
    table = OUT_IN_CANDIDATES if layout == "out_in" else CANDIDATES
    grouped = table[base][regime(assignments, experts)]
    if assignments > FUSED_BENCH_MAX:
        return grouped
    default = mg.default_config(assignments, experts, base != "bf16", inter)
    fused = fused_candidates(base, assignments, inter)
    listed = [default] + {
        "all": fused + grouped,
        "fused": fused,
        "fma": fma_candidates(assignments, inter),
        "split": split_candidates(base, assignments, inter),
    }[variants]
    return list(dict.fromkeys(listed))  # unique, in order


def split_kind(kind: str) -> tuple[str, str]:
    """Kind "fp8/out_in" -> ("fp8", "out_in"); no suffix: the in_out layout."""
    base, _, layout = kind.partition("/")
    return base, layout or "in_out"


def as_layout(w, layout: str):
    """Weights made [E, in, out] -> the layout timed (fp8 pairs: values and scales both transposed)."""
    if layout == "in_out":
        return w
    return tuple(tuple(map(moe.swap_expert_axes, m)) if isinstance(m, tuple) else moe.swap_expert_axes(m) for m in w)


LOG_PATH = os.path.join(os.environ["OUT"], "bench_moe_kernel.jsonl") if os.environ.get("OUT") else None


def emit(kind: str, **fields) -> None:
    """One JSON line per result, appended at once (a crash later keeps what was measured)."""
    if LOG_PATH:
        with open(LOG_PATH, "a") as f:
            f.write(json.dumps(dict(kind=kind, **fields), default=str) + "\n")


def regime(assignments: int, experts: int) -> str:
    per_expert = assignments / experts
    return "decode" if per_expert <= 16 else "middle" if per_expert <= 96 else "prefill"


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def timeit(fn, *args, target_s: float = 0.05, batches: int = 5) -> float:
    """Median over batches of the mean seconds per call, calls dispatched back to back (device-bound)."""
    jax.block_until_ready(fn(*args))  # compile + warm up
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    reps = max(1, min(50, int(target_s / max(once, 1e-6))))
    means = []
    for _ in range(batches):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = fn(*args)
        jax.block_until_ready(out)
        means.append((time.perf_counter() - t0) / reps)
    return statistics.median(means)


def random_weights(key, e, h, i, dtype=jnp.bfloat16):
    kg, ku, kd = jax.random.split(key, 3)
    make = jax.jit(
        lambda k, shape, scale: (jax.random.normal(k, shape, jnp.float32) * scale).astype(dtype), static_argnums=(1,)
    )
    return make(kg, (e, h, i), h**-0.5), make(ku, (e, h, i), h**-0.5), make(kd, (e, i, h), i**-0.5)


def random_routing(key, n, e, k):
    kr, kw = jax.random.split(key)
    ids = jax.lax.top_k(jax.random.uniform(kr, (n, e)), k)[1].astype(jnp.int32)
    weights = jax.random.uniform(kw, (n, k), minval=0.05, maxval=0.5)
    return ids, weights


quantize = jax.jit(mg.quantize_fp8_blocks)


def reference(x, weights, ids, wg, wu, wd):
    """float32 experts_dense (matmuls at full precision) with foreign ids dropped; fp8 pairs dequantized."""
    wg, wu, wd = (mg.dequantize_fp8_blocks(*w) if isinstance(w, tuple) else w.astype(jnp.float32) for w in (wg, wu, wd))
    ok = (ids >= 0) & (ids < wg.shape[0])
    with jax.default_matmul_precision("highest"):
        return moe.experts_dense(x.astype(jnp.float32), jnp.where(ok, weights, 0.0), jnp.where(ok, ids, 0), wg, wu, wd)


def token_reference(x, weights, ids, wg, wu, wd):
    """float32 output of a few tokens from their own experts' weights (gathered per token; Flash-size check)."""

    def expert_weights(w, e):
        if isinstance(w, tuple):
            return mg.dequantize_fp8_blocks(w[0][e], w[1][e])
        return w[e].astype(jnp.float32)

    def one(args):
        xt, wt, it = args
        g = jnp.einsum("h,khi->ki", xt.astype(jnp.float32), expert_weights(wg, it), precision="highest")
        u = jnp.einsum("h,khi->ki", xt.astype(jnp.float32), expert_weights(wu, it), precision="highest")
        y = jnp.einsum("ki,kih->kh", jax.nn.silu(g) * u, expert_weights(wd, it), precision="highest")
        return (y * wt[:, None]).sum(0)

    return jax.lax.map(one, (x, weights, ids))


def run_checks(key, dims, interpret: bool, tol: float, quick: bool = False, only: tuple = ()) -> bool:
    e, h, i, k = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    kw, key = jax.random.split(key)
    bf16 = random_weights(kw, e, h, i)
    fp8 = tuple(quantize(w) for w in bf16)
    kernel = jax.jit(
        lambda x, w, ids, g, u, d, cfg, layout: mg.experts_grouped(
            x, w, ids, g, u, d, config=cfg, layout=layout, interpret=interpret
        ),
        static_argnums=(6, 7),
    )
    swapped = {  # [E, out, in] weights through the swapped matmul
        "bf16/out_in": mg.KernelConfig(T(16, 128, 64, 4, 4, **S), T(16, 128, 128, 4, 4, **S)),
        "fp8-f16/out_in": mg.KernelConfig(T(16, 128, 128, 4, 4, **S), T(16, 128, 128, 4, 4, **S), "f16"),
        # the fused decode kernel at every check size (at thousands of assignments too: slow, still exact)
        "bf16-fused/out_in": mg.FusedConfig(64, 64, 64, 4, 4),
        "fp8-fused/out_in": mg.FusedConfig(64, 128, 128, 4, 4),
        "fp8-fused-rows/out_in": mg.FusedConfig(32, 128, 64, 4, 3, swap_ab=False),
        "bf16-fused-split/out_in": mg.FusedConfig(64, 64, 64, 4, 4, split=2),
        "fp8-fused-split/out_in": mg.FusedConfig(64, 128, 128, 4, 4, swap_ab=False, split=2),
        "fp8-fused-wide/out_in": mg.FusedConfig(64, 128, 256, 4, 3, swap_ab=False),  # 2 scales per down step
        "bf16-fused-fma/out_in": mg.FusedConfig(64, 128, 128, 4, 4, tensor_cores=False),
        "fp8-fused-fma/out_in": mg.FusedConfig(64, 128, 128, 4, 4, tensor_cores=False),
    }
    turned = {"bf16": as_layout(bf16, "out_in"), "fp8": as_layout(fp8, "out_in")}
    ref = jax.jit(reference)
    sizes = dims["check_tokens"]
    cases = []
    for t in sizes:
        cases.append((f"random T={t}", t, None, None))
    big = sizes[-2]
    cases += [
        (f"all on one expert T={big}", big, "one", None),
        (f"three experts T={big}", big, "three", None),
        ("one token", 1, None, None),
        (f"foreign ids T={big}", big, "foreign", None),
    ]
    for name in () if quick else ("DECODE", "MIDDLE", "PREFILL"):
        cases.append((f"config {name} T={sizes[1]}", sizes[1], None, name))
    ok_all = True
    print(f"\n== checks: experts {e}, hidden {h}, intermediate {i}, top-{k}; rel. error vs float32 (tol {tol})")
    for name, t, routing, cfg_name in cases:
        key, kx, kr = jax.random.split(key, 3)
        x = jax.random.normal(kx, (t, h), jnp.float32).astype(jnp.bfloat16)
        ids, weights = random_routing(kr, t, e, k)
        if routing == "one":
            ids = jnp.full_like(ids, e // 2)
        elif routing == "three":
            ids = jnp.asarray([0, e // 3, e - 1], jnp.int32)[ids % 3]
        elif routing == "foreign":
            ids = ids.at[::3, 0].set(-1).at[1::4, -1].set(e + 7)
        row = []
        kinds = [("bf16", bf16), ("fp8", fp8), ("fp8-f16", fp8)]
        if not cfg_name:
            kinds += [(name, turned["bf16" if name.startswith("bf16") else "fp8"]) for name in swapped]
        for wname, w in kinds:
            if only and wname not in only:
                continue
            cfg, layout = None, "in_out"
            if cfg_name:
                cfg = getattr(mg, cfg_name + ("" if wname == "bf16" else "_FP8"))
            if wname == "fp8-f16":
                cfg = dataclasses.replace(cfg or mg.default_config(t * k, e, fp8=True), fp8_dot="f16")
            if wname in swapped:
                cfg, layout = swapped[wname], "out_in"
            got = kernel(x, weights, ids, *w, cfg, layout)
            err = rel_err(got, ref(x, weights, ids, *(bf16 if wname.startswith("bf16") else fp8)))
            passed = err < tol
            ok_all &= passed
            row.append(f"{wname} {err:.2e}{'' if passed else ' FAIL'}")
            emit("check", case=name, weights=wname, rel_err=err, passed=passed)
        print(f"  {name:<28} " + "  ".join(row))
    return ok_all


def ceilings(small: bool) -> tuple[float, float]:
    n = (1 << 20) if small else (1 << 30)  # 2 GiB of bf16 on GPU
    a = jax.random.normal(jax.random.PRNGKey(1), (n,), jnp.float32).astype(jnp.bfloat16)
    copy_s = timeit(jax.jit(lambda v: -v), a)
    copy_bw = 2 * a.nbytes / copy_s
    m = 512 if small else 8192
    ka, kb = jax.random.split(jax.random.PRNGKey(2))
    p = jax.random.normal(ka, (m, m), jnp.bfloat16)
    q = jax.random.normal(kb, (m, m), jnp.bfloat16)
    mm_s = timeit(jax.jit(lambda p, q: p @ q), p, q)
    mm_rate = 2 * m**3 / mm_s
    del a, p, q
    print(
        f"\n== ceilings: device copy {copy_bw / 1e12:.2f} TB/s (read+write), bf16 {m}^3 matmul "
        f"{mm_rate / 1e12:.0f} TFLOP/s"
    )
    emit("ceilings", copy_tb_s=copy_bw / 1e12, matmul_tflop_s=mm_rate / 1e12)
    return copy_bw, mm_rate


def experts_gather(x, weights, ids, wg, wu, wd):
    """Plain XLA: gather each token's chosen experts' weights (good at 1 token)."""
    g = jnp.einsum("nh,nkhi->nki", x, wg[ids])
    u = jnp.einsum("nh,nkhi->nki", x, wu[ids])
    y = jnp.einsum("nki,nkih->nkh", jax.nn.silu(g) * u, wd[ids], preferred_element_type=jnp.float32)
    return (y * weights[..., None]).sum(1).astype(x.dtype)


def experts_buckets(x, weights, ids, wg, wu, wd):
    """Plain XLA: every expert on a bucket of capacity 2 x mean rows (overflow dropped: timing baseline only)."""
    n, k = ids.shape
    e = wg.shape[0]
    cap = max(1, 2 * n * k // e)
    order, sizes = moe.sort_by_expert(ids, e)
    flat = ids.reshape(-1)[order]
    slot = jnp.arange(n * k) - (jnp.cumsum(sizes) - sizes)[flat]
    keep = slot < cap
    dest = jnp.where(keep, flat * cap + slot, e * cap)
    xb = jnp.zeros((e * cap + 1, x.shape[1]), x.dtype).at[dest].set(x[order // k])[:-1].reshape(e, cap, -1)
    h = jax.nn.silu(jnp.einsum("ech,ehi->eci", xb, wg)) * jnp.einsum("ech,ehi->eci", xb, wu)
    y = jnp.einsum("eci,eih->ech", h, wd).reshape(e * cap, -1)
    y = jnp.where(keep[:, None], y[jnp.minimum(dest, e * cap - 1)], 0) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[order // k].add(y).astype(x.dtype)


def kernel_fn(cfg, layout: str, interpret: bool):
    return jax.jit(lambda *a: mg.experts_grouped(*a, config=cfg, layout=layout, interpret=interpret))


def chain_fn(cfg, layout: str, interpret: bool, layers: int):
    """`layers` calls in one jitted loop, each output added to a running sum (the residual stream of a decode
    step): per-call dispatch is gone, the kernels' launches and the combine remain. The barrier on the loop
    index keeps XLA from hoisting the (otherwise loop-invariant) call out of the loop."""

    def run(x, weights, ids, *w):
        def layer(i, acc):
            xi, wi, ii, _ = jax.lax.optimization_barrier((x, weights, ids, i))
            y = mg.experts_grouped(xi, wi, ii, *w, config=cfg, layout=layout, interpret=interpret)
            return acc + y.astype(jnp.float32)

        return jax.lax.fori_loop(0, layers, layer, jnp.zeros(x.shape, jnp.float32))

    return jax.jit(run)


def run_timings(
    key,
    dims,
    tokens,
    copy_bw,
    mm_rate,
    interpret,
    sweep_budget_s,
    start,
    kinds=("bf16", "fp8"),
    profile: int = 0,
    variants: str = "all",
    chain: int = 0,
) -> bool:
    e, h, i, k = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    kw, key = jax.random.split(key)
    bf16 = random_weights(kw, e, h, i)
    fp8 = tuple(quantize(w) for w in bf16)
    layouts = {split_kind(kind)[1] for kind in kinds}
    weight_sets = {
        (is_bf16, lay): as_layout(bf16 if is_bf16 else fp8, lay) for is_bf16 in (True, False) for lay in layouts
    }
    expert_bytes = {"bf16": 3 * h * i * 2, "fp8": 3 * (h * i + (h // 128) * (i // 128) * 4)}
    plain = {
        "gather": jax.jit(experts_gather),
        "ragged": jax.jit(moe.experts_ragged),
        "buckets": jax.jit(experts_buckets),
    }
    plain_limit = {"gather": 8, "ragged": 1, "buckets": 1 << 30}
    token_ref = jax.jit(token_reference)
    ok_all = True
    rows = []
    inputs = {}
    chained = []  # (T, kind, label, ms per layer)

    def measure(t, wname, w, cfg, label):
        """Check sampled tokens and time one kernel config; None if it does not compile."""
        nonlocal ok_all
        x, weights, ids, sample = inputs[t]
        base, layout = split_kind(wname)
        fn = kernel_fn(cfg, layout, interpret)
        w_ref = bf16 if base == "bf16" else fp8  # the reference reads [E, in, out]
        try:
            out = fn(x, weights, ids, *w)
            err = rel_err(out[sample], token_ref(x[sample], weights[sample], ids[sample], *w_ref))
            sec = timeit(fn, x, weights, ids, *w)
        except Exception as exc:  # a config that does not compile is reported, not fatal
            print(f"  T={t} {wname} {cfg}: {type(exc).__name__}: {str(exc)[:300]}")
            emit("config_error", tokens=t, weights=wname, config=repr(cfg), error=str(exc)[:2000])
            return None
        passed = err < 1e-2
        ok_all &= passed
        emit("kernel", tokens=t, weights=wname, config=repr(cfg), label=label, ms=sec * 1e3, rel_err=err, ok=passed)
        print(
            f"  T={t:<5} {wname} {label} {sec * 1e3:8.3f} ms  err {err:.1e}{'' if passed else ' FAIL'}"
            f"  {f'{cfg.gate_up} | {cfg.down}' if isinstance(cfg, mg.KernelConfig) else cfg}"
        )
        return sec

    print(f"\n== Flash MoE layer: experts {e}, hidden {h}, intermediate {i}, top-{k}")
    for t in tokens:
        key, kx, kr, ks = jax.random.split(key, 4)
        x = jax.random.normal(kx, (t, h), jnp.float32).astype(jnp.bfloat16)
        ids, weights = random_routing(kr, t, e, k)
        touched = len(np.unique(np.asarray(ids)))
        sample = np.unique(np.asarray(jax.random.randint(ks, (min(t, 6),), 0, t)))
        result = dict(tokens=t, experts_touched=touched)
        inputs[t] = (x, weights, ids, sample)
        for wname in kinds:
            base, layout = split_kind(wname)
            w = weight_sets[(base == "bf16", layout)]
            best = None
            configs = candidates(wname, t * k, e, i, variants)
            for n_cfg, cfg in enumerate(configs):
                if n_cfg and time.perf_counter() - start > sweep_budget_s:
                    break  # out of device time for the sweep: defaults only
                sec = measure(t, wname, w, cfg, f"cfg{n_cfg}")
                if sec is not None and (best is None or sec < best[0]):
                    best = (sec, n_cfg, cfg)
            if best and profile:  # where the best config's time goes, kernel by kernel
                print(format_ops(top_ops(kernel_fn(best[2], layout, interpret), (x, weights, ids, *w)), profile))
            if best and chain:
                timed = [("default", configs[0])] + ([(f"best cfg{best[1]}", best[2])] if best[1] else [])
                for label, cfg in timed:
                    sec = timeit(chain_fn(cfg, layout, interpret, chain), x, weights, ids, *w, batches=3) / chain
                    chained.append((t, wname, label, sec * 1e3))
                    emit("chain", tokens=t, weights=wname, label=label, config=repr(cfg), layers=chain, ms=sec * 1e3)
                    print(f"  T={t:<5} {wname} {label}: {sec * 1e3:.3f} ms per layer, {chain} layers in one jit")
            result[wname] = best and best[:2]
        measured_plain = {}
        for name, fn in plain.items():
            if t <= plain_limit[name]:
                measured_plain[name] = timeit(fn, x, weights, ids, *bf16, target_s=0.02, batches=3)
                emit("plain", tokens=t, path=name, ms=measured_plain[name] * 1e3)
        result["plain"] = measured_plain
        rows.append(result)

    print(f"\n== summary (copy {copy_bw / 1e12:.2f} TB/s, matmul {mm_rate / 1e12:.0f} TFLOP/s measured here)")
    columns = " | ".join(f"kernel {kind} ms (%bw, TFLOP/s, x bf16)" for kind in kinds)
    print(f"| T | experts | GB bf16 | roofline ms | {columns} | best plain here ms | calibration best plain ms |")
    print("|---|---|---|---|" + "---|" * len(kinds) + "---|---|")
    for r in rows:
        t, touched = r["tokens"], r["experts_touched"]
        gb = touched * expert_bytes["bf16"] / 1e9
        roof = touched * expert_bytes["bf16"] / copy_bw
        flops = 2 * t * k * 3 * h * i
        cells = []
        bf16_runs = [r[kind] for kind in kinds if split_kind(kind)[0] == "bf16" and r[kind]]
        bf16_best = min(bf16_runs, default=None, key=lambda run: run[0])  # the faster bf16 layout
        for wname in kinds:
            if r[wname] is None:
                cells.append("failed")
                continue
            sec, n_cfg = r[wname]
            bw = touched * expert_bytes[wname.split("-")[0].split("/")[0]] / copy_bw / sec
            tflops = f"{flops / sec / 1e12:.0f} TF"
            extra = tflops if wname.startswith("bf16") or not bf16_best else f"{tflops}, x{bf16_best[0] / sec:.2f}"
            cells.append(f"{sec * 1e3:.3f} ({bw:.0%} bw, {extra}, cfg{n_cfg})")
        if r["plain"]:
            name, sec = min(r["plain"].items(), key=lambda kv: kv[1])
            plain_cell = f"{sec * 1e3:.2f} ({name})"
        else:
            plain_cell = "-"
        cal = CALIBRATION_BEST.get(t)
        cal_cell = f"{cal[0]} ({cal[1]})" if cal else "-"
        cells = " | ".join([f"{t}", f"{touched}", f"{gb:.2f}", f"{roof * 1e3:.3f}", *cells, plain_cell, cal_cell])
        print(f"| {cells} |")
        emit(
            "summary",
            tokens=t,
            experts=touched,
            roofline_ms=roof * 1e3,
            kernels={kind: r[kind] for kind in kinds},
            plain=r["plain"],
            useful_tflop=flops / 1e12,
        )
    if chained:
        print(f"\n== chained: ms per layer, {chain} layers in one jitted loop (fp8 x the faster bf16 layout's best)")
        print("| T | kind | config | ms per layer | x bf16 |")
        print("|---|---|---|---|---|")
        for t, wname, label, ms in chained:
            bf16_ms = [m for tt, kind, _, m in chained if tt == t and split_kind(kind)[0] == "bf16"]
            ratio = f"{min(bf16_ms) / ms:.2f}" if bf16_ms and split_kind(wname)[0] != "bf16" else "-"
            print(f"| {t} | {wname} | {label} | {ms:.3f} | {ratio} |")
    print("\n== experimental configs")
    for t, wname, cfg in EXPERIMENTAL:
        if t in inputs:
            base, layout = split_kind(wname)
            measure(t, wname, weight_sets.get((base == "bf16", layout)), cfg, "exp")
    return ok_all


# ----------------------------------------------------------------------------- --w8a8: the fp8 tensor-core GEMMs
def w8a8_token_reference(x, weights, ids, wg, wu, wd):
    """float32 w8a8 math for a few tokens: x and h rounded as the kernels quantize them (per 128 columns),
    weights ([E, out, in] fp8 pairs) dequantized, products at full precision."""

    def expert_weights(w, e):  # [K, out, in] -> [K, in, out]
        return jnp.swapaxes(mg.dequantize_fp8_blocks(w[0][e], w[1][e]), 1, 2)

    def one(args):
        xt, wt, it = args
        xr = quant.round_activations(xt.astype(jnp.float32)[None])[0]
        g = jnp.einsum("h,khi->ki", xr, expert_weights(wg, it), precision="highest")
        u = jnp.einsum("h,khi->ki", xr, expert_weights(wu, it), precision="highest")
        h = quant.round_activations(jax.nn.silu(g) * u)
        y = jnp.einsum("ki,kih->kh", h, expert_weights(wd, it), precision="highest")
        return (y * wt[:, None]).sum(0)

    return jax.lax.map(one, (x, weights, ids))


def tiles_label(c) -> str:
    """GemmTiles / W8A8Config in a few characters: rows x cols, warps, stages."""
    if isinstance(c, fp8_gemm_gpu.W8A8Config):
        return f"gate/up {tiles_label(c.gate_up)}, down {tiles_label(c.down)}"
    return f"{c.block_rows}x{c.block_cols} w{c.num_warps} s{c.num_stages}"


def run_w8a8(key, dims: dict, tokens: tuple, interpret: bool, sweep_budget_s: float) -> bool:
    """One MoE layer (out_in weights, as the model stores them for the kernels) at each token count: the w8a8
    kernels checked against a float32 w8a8 reference and a bf16-activation one (sampled tokens), then timed
    beside the bf16 kernel and the fp8-widened kernel (module defaults), W8A8_CANDIDATES swept within the budget;
    then one dense projection (Flash q_proj, [4096, 64 x 192]) on `matmul_w8a8` against XLA."""
    e, h, i, k = dims["experts"], dims["hidden"], dims["inter"], dims["top_k"]
    kw, kx, kr = jax.random.split(key, 3)
    bf16 = [jnp.swapaxes(w, 1, 2) for w in random_weights(kw, e, h, i)]  # out_in
    fp8 = [quantize(w) for w in bf16]
    ok, start = True, time.perf_counter()
    for t in tokens:
        x = jax.random.normal(jax.random.fold_in(kx, t), (t, h), jnp.bfloat16)
        ids, weights = random_routing(jax.random.fold_in(kr, t), t, e, k)
        flops = 6 * t * k * h * i
        w8a8_default = mg.default_config(t * k, e, True, i, w8a8=True)
        if not isinstance(w8a8_default, fp8_gemm_gpu.W8A8Config):
            w8a8_default = fp8_gemm_gpu.w8a8_config(t * k, e)
        print(f"\n== w8a8 MoE layer: T = {t}, {e} experts x [{h}, {i}], top-{k} ({flops / 1e12:.3f} TFLOP)")
        got = kernel_fn(w8a8_default, "out_in", interpret)(x, weights, ids, *fp8)
        widened = kernel_fn(None, "out_in", interpret)(x, weights, ids, *fp8)
        sample = np.unique(np.linspace(0, t - 1, min(t, 16)).astype(int))
        args = (x[sample], weights[sample], ids[sample], *fp8)
        # on the CPU backend: XLA:GPU may drop the f32 -> e4m3 -> f32 round trip (excess precision allowed)
        cpu = jax.devices("cpu")[0]
        with jax.default_device(cpu):
            reference = w8a8_token_reference(*jax.device_put(args, cpu))
        err_w8a8 = rel_err(np.asarray(got[sample]), np.asarray(reference))
        err_bf16_act = rel_err(
            got[sample],
            token_reference(
                x[sample],
                weights[sample],
                ids[sample],
                *((jnp.swapaxes(v, 1, 2), jnp.swapaxes(sc, 1, 2)) for v, sc in fp8),
            ),
        )
        err_widened = rel_err(got, widened)
        passed = err_w8a8 < 1e-2 and err_bf16_act < W8A8_TOL
        ok &= passed
        print(
            f"  check: vs float32 w8a8 reference {err_w8a8:.1e}, vs bf16-activation reference {err_bf16_act:.1e}, "
            f"vs the widened kernel {err_widened:.1e}: {'ok' if passed else 'FAILED'}"
        )
        emit("w8a8_check", tokens=t, vs_w8a8=err_w8a8, vs_bf16_act=err_bf16_act, vs_widened=err_widened)
        rows = [("bf16 kernel (default)", None, bf16), ("fp8 widened (default)", None, fp8)]
        rows += [(f"fp8 w8a8 (default) {tiles_label(w8a8_default)}", w8a8_default, fp8)]
        others = [c for c in fp8_gemm_gpu.W8A8_CANDIDATES if c != w8a8_default]
        rows += [(f"fp8 w8a8 {tiles_label(c)}", c, fp8) for c in others]
        times = {}
        for label, cfg, w in rows:
            if label.startswith("fp8 w8a8") and cfg != w8a8_default and time.perf_counter() - start > sweep_budget_s:
                continue
            try:
                sec = timeit(kernel_fn(cfg, "out_in", interpret), x, weights, ids, *w)
            except Exception as err:  # a tile that does not compile: report and go on
                print(f"  {label}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            times[label] = sec
            print(f"  {label}: {sec * 1e3:.3f} ms, {flops / sec / 1e12:.0f} TFLOP/s")
            emit("w8a8_time", tokens=t, label=label, ms=sec * 1e3, tflop_s=flops / sec / 1e12)
        best = min((v, name) for name, v in times.items() if name.startswith("fp8 w8a8"))
        base, widened_s = times["bf16 kernel (default)"], times["fp8 widened (default)"]
        print(
            f"  best w8a8 {best[0] * 1e3:.3f} ms ({best[1]}): {base / best[0]:.2f}x the bf16 kernel, "
            f"{widened_s / best[0]:.2f}x fp8 widened"
        )
    ok &= run_dense_w8a8(jax.random.fold_in(key, 7), dims, tokens, interpret, sweep_budget_s, start)
    return ok


def run_dense_w8a8(key, dims: dict, tokens: tuple, interpret: bool, sweep_budget_s: float, start: float) -> bool:
    """Flash's q projection ([hidden, 64 heads x 192] with 128 x 128 blocks) at each token count: matmul_w8a8
    ([K, N] as stored, and [N, K]) against XLA on bf16 weights and on the dequantized fp8 weight (today's path)."""
    h = dims["hidden"]
    n = 12288 if h == 4096 else 2 * h
    kw, kx = jax.random.split(key)
    w = (jax.random.normal(kw, (h, n), jnp.float32) / np.sqrt(h)).astype(jnp.bfloat16)
    values, scales = quantize(w[None])
    values, scales = values[0], scales[0]
    col_scales = fp8_gemm_gpu.column_scales(scales, 128, n)
    block = quant.BlockQuantized(values, scales, (128, 128), "bfloat16")
    ok = True
    for t in tokens:
        x = jax.random.normal(jax.random.fold_in(kx, t), (t, h), jnp.bfloat16)
        flops = 2 * t * h * n
        print(f"\n== w8a8 dense projection: [{t}, {h}] @ [{h}, {n}] ({flops / 1e12:.3f} TFLOP)")
        w8a8 = lambda x, v, tiles=None, layout="in_out": fp8_gemm_gpu.matmul_w8a8(
            x, v, col_scales, layout=layout, tiles=tiles, interpret=interpret
        )
        got = jax.jit(w8a8)(x, values)
        want = quant.round_activations(x.astype(jnp.float32)) @ block.dequantize(jnp.float32)
        err = rel_err(got, want)
        ok &= err < 1e-2
        print(f"  check: vs float32 w8a8 reference {err:.1e}: {'ok' if err < 1e-2 else 'FAILED'}")
        rows = [
            ("XLA bf16 weight", jax.jit(lambda x, w: x @ w), (x, w)),
            ("XLA fp8 dequantized (today)", jax.jit(lambda x, b: quant.project(x, b)), (x, block)),
            ("w8a8 [K, N] default", jax.jit(w8a8), (x, values)),
            ("w8a8 [N, K] default", jax.jit(functools.partial(w8a8, layout="out_in")), (x, values.T)),
        ]
        for tiles in fp8_gemm_gpu.MATMUL_CANDIDATES[1:]:
            label = f"w8a8 [K, N] {tiles_label(tiles)}"
            rows.append((label, jax.jit(functools.partial(w8a8, tiles=tiles)), (x, values)))
        for label, fn, fn_args in rows:
            if label.startswith("w8a8 [K, N] ") and time.perf_counter() - start > sweep_budget_s:
                continue
            try:
                sec = timeit(fn, *fn_args)
            except Exception as err:
                print(f"  {label}: failed ({type(err).__name__}: {str(err)[:120]})")
                continue
            print(f"  {label}: {sec * 1e3:.3f} ms, {flops / sec / 1e12:.0f} TFLOP/s")
            emit("w8a8_dense_time", tokens=t, label=label, ms=sec * 1e3, tflop_s=flops / sec / 1e12)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--small", action="store_true", help="tiny dims in Pallas interpret mode (CPU smoke run)")
    parser.add_argument("--sweep-budget", type=float, default=330.0, help="seconds after which only defaults run")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--quick-checks", action="store_true", help="fewer check shapes (less compile time)")
    parser.add_argument("--tokens", default=",".join(map(str, TOKENS)), help="token counts timed at Flash size")
    parser.add_argument(
        "--weights",
        default="bf16,fp8",
        help="weight kinds to time; '/out_in' after a kind gives the kernel [E, out, in] weights",
    )
    parser.add_argument(
        "--intermediate",
        type=int,
        default=FLASH["inter"],
        help="expert intermediate size timed (512: one shard of Flash's experts on a tensor axis of 4)",
    )
    parser.add_argument("--profile", type=int, default=0, help="print the N slowest kernels of each best config")
    parser.add_argument(
        "--variants",
        choices=("all", "fused", "fma", "split"),
        default="all",
        help="at a few assignments: every candidate, the fused kernel's, its CUDA-core or two-launch ones",
    )
    parser.add_argument(
        "--chain",
        type=int,
        default=0,
        help="also time the default and best configs as L layers in one jitted loop (per layer, as in a decode step)",
    )
    parser.add_argument("--checks-only", action="store_true", help="the checks, no timings")
    parser.add_argument("--check-kinds", default="", help="only these weight kinds in the checks (default: all)")
    parser.add_argument(
        "--w8a8",
        action="store_true",
        help="only the fp8 tensor-core GEMMs: checks, then times vs the bf16 and fp8-widened kernels (--tokens, "
        "default 2048,8192) and a dense projection; --sweep-budget bounds the tile sweep (default 60 s here)",
    )
    args = parser.parse_args()
    start = time.perf_counter()
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"jax {jax.__version__}, devices {jax.devices()}, seed {seed}")
    emit("env", jax=jax.__version__, device=str(jax.devices()[0]), seed=seed)
    key = jax.random.PRNGKey(seed)
    kc, kt = jax.random.split(key)
    if args.w8a8:
        if args.small:
            dims, tokens = dict(experts=8, hidden=256, inter=256, top_k=2), (64, 512)
        else:
            given = args.tokens != ",".join(map(str, TOKENS))
            dims, tokens = dict(FLASH, inter=args.intermediate), tuple(int(t) for t in args.tokens.split(","))
            tokens = tokens if given else (2048, 8192)
        budget = args.sweep_budget if args.sweep_budget != 330.0 else 60.0
        if not args.small:  # the ceilings the prefill figures are stated against, measured in the same run
            from mimo_jax.tools.bench import measure_matmul_rate

            bf16_rate, fp8_rate = measure_matmul_rate(8192), measure_matmul_rate(8192, jnp.float8_e4m3fn)
            print(f"matmul ceilings (8192^3): bf16 {bf16_rate / 1e12:.1f} TFLOP/s, fp8 {fp8_rate / 1e12:.1f} TFLOP/s")
            emit("ceilings", bf16_tflop_s=bf16_rate / 1e12, fp8_tflop_s=fp8_rate / 1e12)
        ok = run_w8a8(kt, dims, tokens, args.small, budget)
        print(f"\nall checks {'passed' if ok else 'FAILED'}; {time.perf_counter() - start:.0f} s")
        return 0 if ok else 1
    if args.small:
        check_dims = dict(experts=8, hidden=256, inter=256, top_k=2, check_tokens=(1, 5, 40, 200))
        dims, tokens = dict(experts=8, hidden=256, inter=256, top_k=2), (1, 8, 600)
    else:
        sizes = (1, 7, 200, 2000) if args.quick_checks else (1, 7, 64, 200, 2000)
        check_dims = dict(experts=32, hidden=1024, inter=512, top_k=8, check_tokens=sizes)
        dims, tokens = dict(FLASH, inter=args.intermediate), tuple(int(t) for t in args.tokens.split(","))
    ok = True
    if not args.skip_checks:
        only = tuple(filter(None, args.check_kinds.split(",")))
        ok &= run_checks(kc, check_dims, args.small, tol=1e-2, quick=args.quick_checks, only=only)
        print(f"  checks took {time.perf_counter() - start:.0f} s")
    if args.checks_only:
        print(f"\nall checks {'passed' if ok else 'FAILED'}; {time.perf_counter() - start:.0f} s")
        return 0 if ok else 1
    copy_bw, mm_rate = ceilings(args.small)
    kinds = tuple(args.weights.split(","))
    ok &= run_timings(
        kt,
        dims,
        tokens,
        copy_bw,
        mm_rate,
        args.small,
        args.sweep_budget,
        start,
        kinds,
        args.profile,
        args.variants,
        args.chain,
    )
    print(f"\nall checks {'passed' if ok else 'FAILED'}; {time.perf_counter() - start:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
