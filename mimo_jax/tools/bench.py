"""Engine benchmark with random weights at real dimensions, beside the roofline measured in the same run.

    python -m mimo_jax.tools.bench decode  --model flash-slice-4 --batch 1,32 --context 2048
    python -m mimo_jax.tools.bench decode  --batch 1,32,64 --context 2048,32768,131072 --paged xla,pallas_gpu
    python -m mimo_jax.tools.bench prefill --model flash-slice-4 --prompt-len 8192 --chunk 2048

"flash-slice-N" is MiMo-V2-Flash (configs/mimo-v2-flash.json) cut to N layers in the real pattern:
layer 0 full attention + dense MLP, the rest SWA + MoE. Any config.json path also works.
`--scale-down` shrinks every dimension (a CPU smoke test). Weights are created on the device by
jitted initializers (no host copy). The roofline: bytes each step must move (weights touched +
KV read) over the read-only HBM rate measured in the same run (a reduction over --read-mb; the copy
rate is printed beside it), and FLOPs over the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import itertools
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax import sharding
from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingParams
from mimo_jax.engine.state import KVCache
from mimo_jax.engine.steps import layer_caches
from mimo_jax.lm import LanguageModel
from mimo_jax.model import moe
from mimo_jax.model.attention import ATTENTION_IMPLS, PAGED_IMPLS, RING_IMPLS
from mimo_jax.model.cache import LayerKV, PagePool, empty_layer_kv, kv_bytes_per_token
from mimo_jax.model.mimo import MiMoModel, MoE, relayout_experts
from mimo_jax.model.moe import EXPERT_IMPLS
from mimo_jax.sharding import make_mesh, parse_mesh_arg
from mimo_jax.tools.profiling import format_ops, top_ops
from mimo_jax.weights.random import bench_config, random_model

# transformers 5.17 (PyTorch, grouped_mm experts, eager attention), flash-slice-4 bf16, one H200 (issue 5).
ATTENTION_CHECK_TOLERANCE = 0.05  # relative L2 of one bf16 attention layer's output, fast path vs XLA reference

PEER = {"decode": {1: 70.6, 32: 866.0}, "prefill": 41.6e3}


# ------------------------------------------------------------------ ceilings measured in this run
def seconds_per_call(fn, *args, iters: int = 10) -> float:
    """Mean wall seconds of `fn(*args)` over `iters` calls after one untimed call (compile, warm-up)."""
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def measure_read_bandwidth(nbytes: int) -> float:
    """Bytes read per second by a reduction over a large bf16 array: the ceiling a decode step (which reads
    its weights and KV and writes almost nothing) is held to; a copy's read+write rate is lower."""
    x = jax.jit(lambda: jnp.ones((nbytes // 2,), jnp.bfloat16))()
    return nbytes / seconds_per_call(jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32)), x)


def measure_copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by an elementwise pass over a large bf16 array."""
    x = jax.jit(lambda: jnp.ones((nbytes // 2,), jnp.bfloat16))()
    return 2 * nbytes / seconds_per_call(jax.jit(lambda a: a * 3 + 1), x)


def measure_matmul_rate(n: int, dtype: jnp.dtype = jnp.bfloat16) -> float:
    """FLOP/s of an n x n x n matmul in `dtype` accumulating in float32 (bf16; float8_e4m3fn: the fp8 tensor-core
    ceiling on GPUs that have one, which XLA reaches through cuBLASLt's fp8 GEMM)."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16).astype(dtype)
    fn = jax.jit(lambda a, b: jnp.dot(a, b.T, preferred_element_type=jnp.float32).astype(jnp.bfloat16))
    return 2 * n**3 / seconds_per_call(fn, a, b)


# ------------------------------------------------------------------ what a step must move and compute
def expected_experts_touched(cfg: MiMoConfig, tokens: int) -> float:
    """Distinct experts per MoE layer for `tokens` tokens under uniform random routing."""
    e, k = cfg.num_experts, cfg.experts_per_token
    return e * (1 - (1 - k / e) ** tokens)


def layer_weight_bytes(
    cfg: MiMoConfig, tokens: int, dtype_bytes: int, fp8: bool = False, experts_touched: float | None = None
) -> tuple[int, int]:
    """(bytes of weights touched by `tokens` tokens, matmul parameters used per token) over all layers.

    `experts_touched`: distinct experts per MoE layer (measured); default: uniform random routing.

    `fp8`: q/k/v, dense MLP and experts stored as float8 (1 byte) with float32 scales (q/k/v one per
    128 input rows; MLP and experts one per 128x128 block); o_proj stays in `dtype_bytes`.
    """
    qkv_bytes = 1 + 4 / 128 if fp8 else dtype_bytes
    mlp_bytes = 1 + 4 / 128**2 if fp8 else dtype_bytes
    touched, per_token = 0, 0
    h = cfg.hidden_size
    if experts_touched is None:
        experts_touched = expected_experts_touched(cfg, tokens)
    for spec in cfg.layers:
        qkv = h * spec.num_heads * spec.head_dim + h * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim)
        o = spec.num_heads * spec.v_head_dim * h
        touched += int(qkv * qkv_bytes) + o * dtype_bytes
        per_token += qkv + o
        if spec.moe:
            expert = 3 * h * cfg.moe_intermediate_size
            touched += int(experts_touched * expert * mlp_bytes) + cfg.num_experts * h * 4
            per_token += cfg.experts_per_token * expert
        else:
            touched += int(3 * h * cfg.intermediate_size * mlp_bytes)
            per_token += 3 * h * cfg.intermediate_size
    return touched, per_token


def decode_step_bytes(
    cfg: MiMoConfig, batch: int, context: int, dtype_bytes: int, fp8: bool = False, experts_touched: float | None = None
) -> dict:
    weights, _ = layer_weight_bytes(cfg, batch, dtype_bytes, fp8, experts_touched)
    weights += cfg.hidden_size * cfg.vocab_size * dtype_bytes  # lm_head
    kv = 0
    for spec in cfg.layers:
        keys = min(spec.window_keys, context) if spec.sliding else context
        kv += batch * keys * kv_bytes_per_token(spec, dtype_bytes)
    return {"weights": weights, "kv": kv, "total": weights + kv}


def prefill_flops(cfg: MiMoConfig, prompt_len: int) -> float:
    """FLOPs to prefill one prompt: matmuls for every token, causal attention, lm_head for the last token."""
    _, per_token = layer_weight_bytes(cfg, 1, 1)
    flops = 2.0 * per_token * prompt_len + 2.0 * cfg.hidden_size * cfg.vocab_size
    for spec in cfg.layers:
        w = min(spec.window_keys or prompt_len, prompt_len)  # query p sees min(p + 1, w) keys
        pairs = w * (w + 1) // 2 + (prompt_len - w) * w
        flops += 2.0 * pairs * spec.num_heads * (spec.head_dim + spec.v_head_dim)
    return flops


# ------------------------------------------------------------------ cache filling (decode at a given context)
def bench_page_tables(engine: Engine) -> jax.Array:
    """Page tables [max_batch, max_pages] giving slot b the pages b * max_pages .. (b+1) * max_pages - 1 (the
    engine's default pool holds exactly that many): the decode benchmark's slots, as if each held a request."""
    m = engine.steps.max_pages
    if engine.steps.num_pages < engine.max_batch * m:
        raise ValueError("the decode benchmark needs the default pool (max_batch x max_pages pages)")
    return jnp.arange(engine.max_batch * m, dtype=jnp.int32).reshape(engine.max_batch, m)


def fill_as_if_prefilled(engine: Engine, context: int, seed: int = 0) -> None:
    """Make every slot look as if a `context`-token prompt had been prefilled (random keys/values in its pages
    of `bench_page_tables` and its rings) and start decoding greedily with no stop token: what a decode step
    reads is then exactly that of a real request."""
    b = engine.max_batch

    def fill(cache: KVCache, state):
        key = jax.random.key(seed)
        pools = []
        for pool in cache.pools:
            key, k1, k2 = jax.random.split(key, 3)
            noise = lambda k, x: jax.random.normal(k, x.shape, jnp.float32).astype(x.dtype)
            scale = lambda x: None if x is None else jnp.full(x.shape, 1 / 448, x.dtype)  # FP8: values near 1
            pools.append(PagePool(noise(k1, pool.k), noise(k2, pool.v), scale(pool.k_scale), scale(pool.v_scale)))
        out = []
        for layer in cache.rings:
            slots = layer.slots
            s = jnp.arange(slots, dtype=jnp.int32)
            if layer.ring:  # ring slot s holds the latest position p <= context-1 with p % slots == s
                pos = context - 1 - ((context - 1 - s) % slots)
                pos = jnp.where(pos >= 0, pos, -1)
            else:
                pos = jnp.where(s < context, s, -1)
            key, k1, k2 = jax.random.split(key, 3)
            out.append(
                LayerKV(
                    k=jax.random.normal(k1, layer.k.shape, layer.k.dtype),
                    v=jax.random.normal(k2, layer.v.shape, layer.v.dtype),
                    pos=jnp.broadcast_to(pos, (b, slots)),
                    ring=layer.ring,
                )
            )
        ones = jnp.ones((b,), jnp.int32)
        state = dataclasses.replace(
            state,
            tokens=jax.random.randint(key, (b,), 0, engine.config.vocab_size, jnp.int32),
            positions=ones * context,
            active=jnp.ones((b,), bool),
            num_generated=ones,
            max_new_tokens=ones * (2**30),
            sampling=SamplingParams.make(b, max_logit_bias=engine.max_logit_bias),
        )
        return KVCache(pools, out), state

    shardings = jax.tree.map(lambda x: x.sharding, (engine.cache, engine.state))
    engine.cache, engine.state = jax.jit(fill, donate_argnums=(0, 1), out_shardings=shardings)(
        engine.cache, engine.state
    )


# ------------------------------------------------------------------ benchmarks
def device_memory_in_use() -> int:
    """Bytes in use on the fullest local device (0 where the backend keeps no statistics)."""
    stats = [d.memory_stats() or {} for d in jax.local_devices()]
    return max(s.get("bytes_in_use", 0) for s in stats)


def run_decode(
    lm: LanguageModel,
    batch: int,
    context: int,
    steps: int,
    rounds: int,
    dtype_bytes: int,
    fp8: bool = False,
    profile: int = 0,
    count_experts: bool = True,
) -> dict:
    cfg = lm.config
    max_context = context + steps * (rounds + 5) + 1  # warm-up, timed and profiled rounds
    engine = Engine(lm, max_batch=batch, max_context=max_context, max_round_tokens=steps, prefill_chunk=16)
    fill_as_if_prefilled(engine, context)
    n = jnp.int32(steps)
    rows = jnp.arange(batch, dtype=jnp.int32)
    tables = bench_page_tables(engine)

    def decode_round():
        args = (engine.params, engine.cache, engine.state, rows, tables, n, engine.allow_all(batch))
        engine.cache, engine.state, out = engine.decode_fn(*args)
        return out

    t0 = time.perf_counter()
    jax.block_until_ready(decode_round())
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        count = np.asarray(decode_round().count)  # the host round-trip a server makes each round
        times.append(time.perf_counter() - t)
    assert (count == steps).all(), f"slots stopped early: {count}"
    sec = float(np.median(times)) / steps
    if profile:
        print(f"# batch {batch} context {context}, one decode round of {steps} steps:")
        print(format_ops(top_ops(decode_round, (), calls=2), profile))
    hidden_ok = bool(jnp.isfinite(engine.state.hidden.astype(jnp.float32)).all())
    # Random weights need not route uniformly: count the experts this batch's next step touches.
    touched = measure_experts_touched(engine) if count_experts and batch > 1 and cfg.num_experts else None
    return dict(
        batch=batch,
        context=context,
        ms_per_step=sec * 1e3,
        tok_s=batch / sec,
        experts_touched=touched,
        experts_touched_uniform=expected_experts_touched(cfg, batch) if cfg.num_experts else None,
        bytes=decode_step_bytes(cfg, batch, context, dtype_bytes, fp8, touched),
        device_gb_in_use=device_memory_in_use() / 1e9,
        compile_s=compile_s,
        finite=hidden_ok,
    )


def measure_experts_touched(engine: Engine) -> float:
    """Mean distinct experts per MoE layer that the engine's next decode step routes its batch to."""
    graphdef = engine.lm.graphdef

    def count(params, cache, state, tables) -> jax.Array:
        model = nnx.merge(graphdef, params)
        x = model.embed(state.tokens[:, None])
        positions = jnp.where(state.active, state.positions, -1)[:, None]
        counts = []
        layers = layer_caches(model, cache, cache.rings, tables, engine.steps.page_shards, rows_on_shards=True)
        for layer, kv in zip(model.layers, layers, strict=False):  # DecoderLayer's steps, routing made visible
            attn_out, _ = layer.self_attn(layer.input_layernorm(x), positions, kv)
            x = x + attn_out
            y = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, MoE):
                m = layer.mlp
                _, ids = moe.route(
                    y.reshape(-1, y.shape[-1]),
                    m.router[...],
                    m.correction_bias[...],
                    top_k=m.top_k,
                    n_group=m.n_group,
                    topk_group=m.topk_group,
                    norm_topk_prob=m.norm_topk_prob,
                    scaling=m.scaling,
                )
                counts.append(jnp.zeros((m.router.shape[0],), bool).at[ids.reshape(-1)].set(True).sum())
            x = x + layer.mlp(y)
        return jnp.stack(counts)

    try:
        with engine.lm.mesh_context():
            tables = bench_page_tables(engine)
            return float(np.mean(jax.jit(count)(engine.params, engine.cache, engine.state, tables)))
    except Exception as e:  # a side measurement: the step's timing must survive it (e.g. out of memory)
        print(f"#   experts-touched count failed ({type(e).__name__}: {str(e)[:200]}); uniform-routing estimate used")
        return None


def run_prefill(lm: LanguageModel, prompt_len: int, chunk: int, reps: int, profile: int = 0) -> dict:
    engine = Engine(lm, max_batch=1, max_context=prompt_len + 1, prefill_chunk=chunk)
    tokens = np.random.RandomState(0).randint(0, lm.config.vocab_size, prompt_len).astype(np.int32)

    pages = bench_page_tables(engine)[0]

    def once() -> jax.Array:
        hidden = jnp.asarray(engine.empty_history())
        for start in range(0, prompt_len, chunk):
            length = min(chunk, prompt_len - start)
            bucket = next(b for b in engine.buckets if b >= length)
            padded = engine.prefill_tokens(tokens, start, length, bucket)
            args = (jnp.int32(0), pages, padded, jnp.int32(start), jnp.int32(length), hidden, jnp.int32(-1))
            engine.cache, hidden, _ = engine.prefill_fn(engine.params, engine.cache, *args)
        return jax.block_until_ready(hidden)

    t0 = time.perf_counter()
    once()
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        hidden = once()
        times.append(time.perf_counter() - t)
    sec = float(np.median(times))
    if profile:
        print(f"# prefill of {prompt_len} tokens in chunks of {chunk}:")
        print(format_ops(top_ops(once, (), calls=1), profile))
    return dict(
        prompt_len=prompt_len,
        chunk=chunk,
        ms=sec * 1e3,
        tok_s=prompt_len / sec,
        flops=prefill_flops(lm.config, prompt_len),
        compile_s=compile_s,
        finite=bool(jnp.isfinite(hidden.astype(jnp.float32)).all()),
    )


def compare_attention(model: MiMoModel, mesh, impl: str, prompt_len: int = 2048, chunk: int = 1024) -> float:
    """Largest relative L2 difference, over the first full-attention and first SWA layer, between `impl`
    and the XLA reference: one layer's attention on random activations, prefilled in two chunks through
    its KV cache (a semantic check of the fast path on this device, cheap to compile)."""
    sliding = [layer.self_attn.spec.sliding for layer in model.layers]
    index = [sliding.index(False), sliding.index(True)]  # the first full and the first SWA layer
    views = {a: model.with_options(dataclasses.replace(model.options, attention_impl=a)) for a in ("xla", impl)}
    errors = []
    for i in index:
        x = jax.random.normal(jax.random.key(2), (1, prompt_len, model.config.hidden_size), model.dtype)
        outs = []
        for attention_impl in ("xla", impl):
            attn = views[attention_impl].layers[i].self_attn
            graphdef, state = nnx.split(attn)

            @jax.jit
            def run(state, x, positions, cache, graphdef=graphdef):
                return nnx.merge(graphdef, state)(x, positions, cache)

            cache = empty_layer_kv(attn.spec, 1, prompt_len, model.dtype)
            pieces = []
            with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
                for start in range(0, prompt_len, chunk):
                    positions = jnp.arange(start, start + chunk, dtype=jnp.int32)[None]
                    out, cache = run(state, x[:, start : start + chunk], positions, cache)
                    pieces.append(np.asarray(out.astype(jnp.float32)))
            outs.append(np.concatenate(pieces, axis=1))
        ref, got = outs
        errors.append(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)))
    return max(errors)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimo_jax.tools.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["decode", "prefill"])
    p.add_argument("--model", "--config", default="flash-slice-4", help="flash-slice-N or a config.json path")
    p.add_argument("--scale-down", action="store_true", help="tiny dimensions (CPU smoke test)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--moe-impl",
        default=None,
        help="comma-separated expert implementations to time (default: gather_fused,gather at <= 8 tokens per "
        "step, else ragged)",
    )
    p.add_argument("--mesh", default=None, help="e.g. tensor=8 or expert=8 (default: one device)")
    p.add_argument("--batch", default="1,32", help="decode: comma-separated batch sizes")
    p.add_argument("--context", default="2048", help="decode: comma-separated context lengths")
    p.add_argument("--steps", type=int, default=32, help="decode: tokens per round (one while_loop)")
    p.add_argument("--rounds", type=int, default=5, help="decode: timed rounds")
    p.add_argument("--prompt-len", default="8192", help="prefill: comma-separated prompt lengths")
    p.add_argument("--chunk", default="8192", help="prefill: comma-separated chunk sizes")
    p.add_argument(
        "--attention",
        default=None,
        choices=list(ATTENTION_IMPLS),
        help="attention path (default: cudnn on GPU in bf16, else xla); decode steps always use xla",
    )
    p.add_argument(
        "--paged",
        default=None,
        help=f"decode: comma-separated paged attention implementations to time, each against the same cache "
        f"({', '.join(PAGED_IMPLS)}; default: xla,pallas_gpu on GPU, else xla)",
    )
    p.add_argument(
        "--ring",
        default=None,
        help=f"decode: comma-separated ring attention implementations for the SWA layers to time, each against the "
        f"same cache ({', '.join(RING_IMPLS)}; default: RunOptions' choice for the platform)",
    )
    p.add_argument("--reps", type=int, default=3, help="prefill: timed repetitions")
    p.add_argument("--read-mb", type=int, default=8192, help="array size for the read-only HBM ceiling (>= 8 GiB)")
    p.add_argument("--copy-mb", type=int, default=2048, help="array size for the copy (read+write) rate")
    p.add_argument("--matmul-n", type=int, default=8192, help="matmul size for the FLOP/s ceiling")
    p.add_argument("--json", default=None, help="also write the results to this file")
    p.add_argument("--profile", type=int, default=0, help="print the N slowest kernels of each case")
    p.add_argument(
        "--no-experts-count",
        action="store_true",
        help="decode: use the uniform-routing estimate of experts touched instead of counting them (which "
        "compiles the model a second time)",
    )
    p.add_argument(
        "--random-weights",
        default="bf16",
        choices=["bf16", "fp8"],
        help="fp8: float8 blocks + scales as load_model(..., weights='fp8') places them",
    )
    sharding.add_distributed_arguments(p)
    args = p.parse_args(argv)

    unknown = set(args.moe_impl.split(",") if args.moe_impl else ()) - set(EXPERT_IMPLS)
    if unknown:
        p.error(f"--moe-impl {sorted(unknown)}: choose from {sorted(EXPERT_IMPLS)}")
    unknown = set(args.paged.split(",") if args.paged else ()) - set(PAGED_IMPLS)
    if unknown:
        p.error(f"--paged {sorted(unknown)}: choose from {list(PAGED_IMPLS)}")
    unknown = set(args.ring.split(",") if args.ring else ()) - set(RING_IMPLS)
    if unknown:
        p.error(f"--ring {sorted(unknown)}: choose from {list(RING_IMPLS)}")
    prompt_lens = [int(n) for n in args.prompt_len.split(",")]
    cfg = bench_config(args.model, args.scale_down)
    dtype = jnp.dtype(args.dtype)
    dtype_bytes = dtype.itemsize
    sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)  # multi-host
    mesh = None
    if args.mesh:
        mesh = make_mesh(**parse_mesh_arg(args.mesh))
    device = jax.devices()[0]
    ndev = 1 if mesh is None else mesh.size
    name = f"{args.model}{' (scaled down)' if args.scale_down else ''}"
    print(f"# {name}, {args.dtype}, {ndev} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    read_bandwidth = measure_read_bandwidth(args.read_mb << 20)
    bandwidth = measure_copy_bandwidth(args.copy_mb << 20)
    matmul = measure_matmul_rate(args.matmul_n)
    print(
        f"# measured ceilings per device: HBM read {read_bandwidth / 1e12:.3f} TB/s (sum over {args.read_mb} MiB), "
        f"copy {bandwidth / 1e12:.3f} TB/s (read+write), bf16 matmul {matmul / 1e12:.1f} TFLOP/s ({args.matmul_n}^3)"
    )
    results = dict(
        model=name,
        dtype=args.dtype,
        device=device.device_kind,
        devices=ndev,
        read_bytes_s=read_bandwidth,
        copy_bytes_s=bandwidth,
        matmul_flop_s=matmul,
        runs=[],
    )

    t = time.perf_counter()
    platform = (mesh.devices.flat[0] if mesh is not None else jax.devices()[0]).platform
    model = random_model(cfg, dtype, RunOptions.for_platform(platform, moe_impl="ragged"), mesh, args.random_weights)
    jax.block_until_ready(nnx.state(model))
    fp8 = args.random_weights == "fp8"
    print(
        f"# random {args.random_weights} weights made on device in {time.perf_counter() - t:.1f} s;"
        f" device memory in use: {device_memory_in_use() / 1e9:.1f} GB (fullest device)"
    )
    on_gpu_16bit = jax.default_backend() == "gpu" and dtype.itemsize == 2
    attention_impl = args.attention or ("cudnn" if on_gpu_16bit else "xla")
    if attention_impl != "xla" and args.mode == "prefill":
        try:
            err = compare_attention(model, mesh, attention_impl)
            print(f"# check: {attention_impl} attention vs xla (full and SWA layer, 2 chunks), relative L2 {err:.2e}")
            results["attention_check_rel_err"] = err
            if not err <= ATTENTION_CHECK_TOLERANCE:
                raise ValueError(f"relative difference {err:.2e} > {ATTENTION_CHECK_TOLERANCE}")
        except Exception as e:
            print(f"# {attention_impl} attention failed its check ({type(e).__name__}: {str(e)[:300]}); using xla")
            attention_impl = "xla"
    model = model.with_options(dataclasses.replace(model.options, attention_impl=attention_impl))
    results["attention"] = attention_impl

    def save() -> None:  # after every case, so a run stopped at its time limit keeps what it measured
        if args.json:
            tmp = args.json + ".tmp"
            with open(tmp, "w") as f:
                json.dump(results, f, indent=1, default=float)
            os.replace(tmp, args.json)

    def with_experts(impl: str) -> LanguageModel:
        nonlocal model  # same weights, another expert path, re-laid out for it (the old view is consumed)
        model = relayout_experts(model.with_options(dataclasses.replace(model.options, moe_impl=impl)))
        return LanguageModel(model, mesh=mesh)

    def impls(tokens_per_step: int) -> list[str]:
        if args.moe_impl:
            return args.moe_impl.split(",")
        # The Pallas GPU kernel when this build has it; beside it the plain-XLA paths (prefill on GPU:
        # ragged_dot reads all experts and may not compile at large sizes, so only the kernel there).
        kernel = ["pallas_gpu"] if "pallas_gpu" in EXPERT_IMPLS and jax.default_backend() == "gpu" else []
        if tokens_per_step <= 8:
            return kernel + ["gather_fused", "gather"]
        if kernel and args.mode == "prefill":
            return kernel
        return kernel + ["ragged"]

    def paged_impls() -> list[str]:
        if args.paged:
            return args.paged.split(",")
        if jax.default_backend() == "gpu":
            return ["xla", "pallas_gpu"]
        print("# paged attention: xla only off a GPU (--paged xla,pallas_interpret runs the kernel in the interpreter)")
        return ["xla"]

    def failed(impl: str, what: str, error: Exception) -> None:
        print(f"#   {impl} {what} failed: {type(error).__name__}: {str(error)[:300]}")
        results["runs"].append(dict(moe=impl, case=what, error=f"{type(error).__name__}: {error}"[:2000]))
        save()

    def keep(r: dict) -> None:
        if not r["finite"]:
            print("#   warning: non-finite hidden states (random weights overflowed)")
        results["runs"].append(r)
        save()

    def vs_peer(tok_s: float, peer: float | None) -> str:
        return f"{tok_s / peer:.2f}" if peer else "-"

    is_peer_model = args.model == "flash-slice-4" and not args.scale_down
    if args.mode == "decode":
        print(
            "| batch | context | MoE | paged | experts/layer | ms/step | tok/s | GB/step (weights + KV) | HBM-read "
            "roofline tok/s | achieved (of read) | of copy | peer tok/s | x peer | GB in use |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
        paged = paged_impls()
        rings = args.ring.split(",") if args.ring else [None]
        for batch in (int(b) for b in args.batch.split(",")):
            for impl in impls(batch):
                lm = with_experts(impl)
                # the same weights and cache contents, another paged / ring attention path
                for paged_impl, ring_impl in itertools.product(paged, rings):
                    options = dataclasses.replace(lm.options, paged_impl=paged_impl, ring_impl=ring_impl)
                    view = lm.with_options(options)
                    label = paged_impl + (f", ring {ring_impl}" if ring_impl else "")
                    for context in (int(c) for c in args.context.split(",")):
                        case = f"decode batch {batch} context {context} paged {label}"
                        try:
                            r = run_decode(
                                view, batch, context, args.steps, args.rounds, dtype_bytes, fp8, args.profile,
                                count_experts=not args.no_experts_count,
                            )  # fmt: skip
                        except Exception as e:  # one failing path (e.g. out of memory) must not lose the others
                            failed(impl, case, e)
                            continue
                        roof_s = r["bytes"]["total"] / (read_bandwidth * ndev)
                        copy_roof_s = r["bytes"]["total"] / (bandwidth * ndev)
                        peer = PEER["decode"].get(batch) if is_peer_model else None
                        r.update(
                            moe=impl,
                            paged=paged_impl,
                            ring=view.options.ring_attention_impl,
                            roofline_tok_s=batch / roof_s,
                            achieved=roof_s / (r["ms_per_step"] / 1e3),
                            achieved_of_copy=copy_roof_s / (r["ms_per_step"] / 1e3),
                            peer_tok_s=peer,
                        )
                        touched = r["experts_touched"] or (
                            cfg.experts_per_token if batch == 1 else r["experts_touched_uniform"]
                        )
                        print(
                            f"| {batch} | {context} | {impl} | {label} | {touched or 0:.1f} | "
                            f"{r['ms_per_step']:.3f} | {r['tok_s']:.1f} | "
                            f"{r['bytes']['weights'] / 1e9:.2f} + {r['bytes']['kv'] / 1e9:.3f} | "
                            f"{r['roofline_tok_s']:.0f} | {r['achieved']:.0%} | {r['achieved_of_copy']:.0%} | "
                            f"{peer or '-'} | "
                            f"{vs_peer(r['tok_s'], peer)} | {r['device_gb_in_use']:.1f} |"
                        )
                        keep(r)
    else:
        print(
            "| prompt | chunk | MoE | attention | ms | tok/s | GFLOP/token | matmul roofline tok/s | achieved | peer "
            "| x peer |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        # Chunks longer than a prompt run as one chunk of the prompt's length.
        cases = {(n, min(c, n)): None for n in prompt_lens for c in (int(c) for c in args.chunk.split(","))}
        for prompt_len, chunk in cases:
            for impl in impls(chunk):
                try:
                    r = run_prefill(with_experts(impl), prompt_len, chunk, args.reps, args.profile)
                except Exception as e:  # one failing path (e.g. out of memory) must not lose the others
                    failed(impl, f"prefill {prompt_len} chunk {chunk}", e)
                    continue
                achieved = r["flops"] / (r["ms"] / 1e3) / (matmul * ndev)
                peer = PEER["prefill"] if is_peer_model else None
                r.update(
                    moe=impl,
                    attention=attention_impl,
                    achieved_of_matmul=achieved,
                    roofline_tok_s=r["prompt_len"] * matmul * ndev / r["flops"],
                    peer_tok_s=peer,
                )
                print(
                    f"| {prompt_len} | {chunk} | {impl} | {attention_impl} | {r['ms']:.1f} | {r['tok_s']:.0f} | "
                    f"{r['flops'] / prompt_len / 1e9:.2f} | {r['roofline_tok_s']:.0f} | {achieved:.0%} | "
                    f"{peer or '-'} | {vs_peer(r['tok_s'], peer)} |"
                )
                keep(r)
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
