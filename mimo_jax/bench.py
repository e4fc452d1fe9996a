"""Engine benchmark with random weights at real dimensions, beside the roofline measured in the same run.

    python -m mimo_jax.bench decode  --model flash-slice-4 --batch 1,32 --context 2048
    python -m mimo_jax.bench prefill --model flash-slice-4 --prompt-len 8192 --chunk 2048

"flash-slice-N" is MiMo-V2-Flash (configs/mimo-v2-flash.json) cut to N layers in the real pattern:
layer 0 full attention + dense MLP, the rest SWA + MoE. Any config.json path also works.
`--scale-down` shrinks every dimension (a CPU smoke test). Weights are created on the device by
jitted initializers (no host copy). The roofline: bytes each step must move (weights touched +
KV read) over the measured HBM copy bandwidth, and FLOPs over the measured bf16 matmul rate.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.cache import LayerKV, kv_bytes_per_token
from mimo_jax.config import MiMoConfig
from mimo_jax.engine import Engine
from mimo_jax.lm import LanguageModel
from mimo_jax.model import MiMoModel
from mimo_jax.sampling import SamplingParams

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")

# transformers 5.17 (PyTorch, grouped_mm experts, eager attention), flash-slice-4 bf16, one H200 (issue 5).
PEER = {"decode": {1: 70.6, 32: 866.0}, "prefill": 41.6e3}


# ------------------------------------------------------------------ models
def bench_config(model: str, scale_down: bool = False) -> MiMoConfig:
    """'flash-slice-N' or a config.json path; `scale_down` divides the sizes for a CPU run."""
    if model.startswith("flash-slice-"):
        n = int(model.rsplit("-", 1)[1])
        cfg = MiMoConfig.from_json(os.path.join(CONFIG_DIR, "mimo-v2-flash.json"))
        cfg = cfg.replace(num_layers=n, sliding=(False,) + (True,) * (n - 1), moe=(False,) + (True,) * (n - 1))
    else:
        cfg = MiMoConfig.from_json(model)
    if scale_down:
        cfg = cfg.replace(
            vocab_size=cfg.vocab_size // 32,
            hidden_size=cfg.hidden_size // 16,
            intermediate_size=cfg.intermediate_size // 32,
            moe_intermediate_size=cfg.moe_intermediate_size // 16,
            num_heads=max(cfg.num_heads // 16, 1),
            swa_num_heads=max(cfg.swa_num_heads // 16, 1),
            num_kv_heads=1,
            swa_num_kv_heads=max(cfg.swa_num_kv_heads // 4, 1),
            head_dim=cfg.head_dim // 4,
            swa_head_dim=cfg.swa_head_dim // 4,
            v_head_dim=cfg.v_head_dim // 4,
            swa_v_head_dim=cfg.swa_v_head_dim // 4,
            num_experts=max(cfg.num_experts // 16, cfg.experts_per_token),
            experts_per_token=max(cfg.experts_per_token // 4, 1),
            partial_rotary_factor=0.5,
        )
    return cfg


def random_model(
    cfg: MiMoConfig, dtype: jnp.dtype, moe_impl: str, mesh: jax.sharding.Mesh | None = None, mtp_layers: int = 0
):
    """A MiMoModel (with `mtp_layers` MTP layers) with random weights made on the device, one jitted
    initializer per parameter."""
    abstract = nnx.eval_shape(lambda: MiMoModel(cfg, dtype, rngs=nnx.Rngs(0), mtp_layers=mtp_layers))
    abstract.set_moe_impl(moe_impl)
    graphdef, state = nnx.split(abstract)
    shardings = None
    if mesh is not None:
        from mimo_jax.sharding import model_shardings

        shardings = model_shardings(abstract, mesh)

    @functools.cache
    def initializer(kind: str, shape: tuple, leaf_dtype: jnp.dtype, sharding):
        if kind == "ones":
            fn = lambda k: jnp.ones(shape, leaf_dtype)
        elif kind == "zeros":
            fn = lambda k: jnp.zeros(shape, leaf_dtype)
        else:
            fn = lambda k: jax.random.normal(k, shape, leaf_dtype) * jnp.asarray(0.02, leaf_dtype)
        return jax.jit(fn, out_shardings=sharding)

    def make(path: tuple, leaf: jax.ShapeDtypeStruct, key: jax.Array) -> jax.Array:
        name = "/".join(map(str, path))
        if name.endswith("norm/weight") or "layernorm" in name:
            kind = "ones"
        elif name.endswith("correction_bias"):
            kind = "zeros"
        else:
            kind = "normal"
        sharding = None if shardings is None else shardings[path]
        return initializer(kind, tuple(leaf.shape), jnp.dtype(leaf.dtype), sharding)(key)

    flat = nnx.to_flat_state(state)
    keys = jax.random.split(jax.random.key(0), len(flat))
    values = [(path, var.replace(make(path, var.get_value(), k))) for (path, var), k in zip(flat, keys, strict=True)]
    return nnx.merge(graphdef, nnx.from_flat_state(values))


# ------------------------------------------------------------------ ceilings measured in this run
def _time(fn, *args, iters: int = 10) -> float:
    jax.block_until_ready(fn(*args))
    t = time.perf_counter()
    for _ in range(iters):
        out = fn(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t) / iters


def measure_copy_bandwidth(nbytes: int) -> float:
    """Bytes read + written per second by an elementwise pass over a large bf16 array."""
    x = jax.jit(lambda: jnp.ones((nbytes // 2,), jnp.bfloat16))()
    return 2 * nbytes / _time(jax.jit(lambda a: a * 3 + 1), x)


def measure_matmul_rate(n: int) -> float:
    """bf16 FLOP/s of an n x n x n matmul."""
    k1, k2 = jax.random.split(jax.random.key(1))
    a = jax.random.normal(k1, (n, n), jnp.bfloat16)
    b = jax.random.normal(k2, (n, n), jnp.bfloat16)
    return 2 * n**3 / _time(jax.jit(lambda a, b: a @ b), a, b)


# ------------------------------------------------------------------ what a step must move and compute
def expected_experts_touched(cfg: MiMoConfig, tokens: int) -> float:
    """Distinct experts per MoE layer for `tokens` tokens under uniform random routing."""
    e, k = cfg.num_experts, cfg.experts_per_token
    return e * (1 - (1 - k / e) ** tokens)


def layer_weight_bytes(cfg: MiMoConfig, tokens: int, dtype_bytes: int) -> tuple[int, int]:
    """(bytes of weights touched by `tokens` tokens, matmul parameters used per token) over all layers."""
    touched, per_token = 0, 0
    h = cfg.hidden_size
    for spec in cfg.layers:
        attn = h * spec.num_heads * spec.head_dim + h * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim)
        attn += spec.num_heads * spec.v_head_dim * h
        touched += attn * dtype_bytes
        per_token += attn
        if spec.moe:
            expert = 3 * h * cfg.moe_intermediate_size
            touched += int(expected_experts_touched(cfg, tokens) * expert * dtype_bytes) + cfg.num_experts * h * 4
            per_token += cfg.experts_per_token * expert
        else:
            touched += 3 * h * cfg.intermediate_size * dtype_bytes
            per_token += 3 * h * cfg.intermediate_size
    return touched, per_token


def decode_step_bytes(cfg: MiMoConfig, batch: int, context: int, dtype_bytes: int) -> dict[str, float]:
    weights, _ = layer_weight_bytes(cfg, batch, dtype_bytes)
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
def fill_as_if_prefilled(engine: Engine, context: int, seed: int = 0) -> None:
    """Make every slot look as if a `context`-token prompt had been prefilled (random keys/values) and start
    decoding greedily with no stop token: what a decode step reads is then exactly that of a real request."""
    b = engine.max_batch

    def fill(cache: list[LayerKV], state):
        key = jax.random.key(seed)
        out = []
        for layer in cache:
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
            sampling=SamplingParams.make(b),
        )
        return out, state

    shardings = jax.tree.map(lambda x: x.sharding, (engine.cache, engine.state))
    engine.cache, engine.state = jax.jit(fill, donate_argnums=(0, 1), out_shardings=shardings)(
        engine.cache, engine.state
    )


# ------------------------------------------------------------------ benchmarks
def run_decode(lm: LanguageModel, batch: int, context: int, steps: int, rounds: int, dtype_bytes: int) -> dict:
    cfg = lm.config
    max_context = context + steps * (rounds + 2) + 1
    engine = Engine(lm, max_batch=batch, max_context=max_context, max_round_tokens=steps, prefill_chunk=16)
    fill_as_if_prefilled(engine, context)
    n = jnp.int32(steps)
    t0 = time.perf_counter()
    engine.cache, engine.state, out = engine.decode_fn(engine.params, engine.cache, engine.state, n)
    jax.block_until_ready(out)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.cache, engine.state, out = engine.decode_fn(engine.params, engine.cache, engine.state, n)
        count = np.asarray(out.count)  # the host round-trip a server makes each round
        times.append(time.perf_counter() - t)
    assert (count == steps).all(), f"slots stopped early: {count}"
    sec = float(np.median(times)) / steps
    hidden_ok = bool(jnp.isfinite(engine.state.hidden.astype(jnp.float32)).all())
    return dict(
        batch=batch,
        context=context,
        ms_per_step=sec * 1e3,
        tok_s=batch / sec,
        bytes=decode_step_bytes(cfg, batch, context, dtype_bytes),
        compile_s=compile_s,
        finite=hidden_ok,
    )


def run_prefill(lm: LanguageModel, prompt_len: int, chunk: int, reps: int) -> dict:
    engine = Engine(lm, max_batch=1, max_context=prompt_len + 1, prefill_chunk=chunk)
    tokens = np.random.RandomState(0).randint(0, lm.config.vocab_size, prompt_len).astype(np.int32)

    def once() -> jax.Array:
        hidden = jnp.asarray(engine.empty_history())
        for start in range(0, prompt_len, chunk):
            length = min(chunk, prompt_len - start)
            bucket = next(b for b in engine.buckets if b >= length)
            padded = engine.prefill_tokens(tokens, start, length, bucket)
            engine.cache, hidden = engine.prefill_fn(
                engine.params, engine.cache, jnp.int32(0), padded, jnp.int32(start), jnp.int32(length), hidden
            )
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
    return dict(
        prompt_len=prompt_len,
        chunk=chunk,
        ms=sec * 1e3,
        tok_s=prompt_len / sec,
        flops=prefill_flops(lm.config, prompt_len),
        compile_s=compile_s,
        finite=bool(jnp.isfinite(hidden.astype(jnp.float32)).all()),
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mimo_jax.bench", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["decode", "prefill"])
    p.add_argument("--model", default="flash-slice-4", help="flash-slice-N or a config.json path")
    p.add_argument("--scale-down", action="store_true", help="tiny dimensions (CPU smoke test)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument(
        "--moe-impl", default=None, help="expert implementation (default: gather at <= 8 tokens, else ragged)"
    )
    p.add_argument("--mesh", default=None, help="e.g. tensor=8 or expert=8 (default: one device)")
    p.add_argument("--batch", default="1,32", help="decode: comma-separated batch sizes")
    p.add_argument("--context", default="2048", help="decode: comma-separated context lengths")
    p.add_argument("--steps", type=int, default=32, help="decode: tokens per round (one while_loop)")
    p.add_argument("--rounds", type=int, default=5, help="decode: timed rounds")
    p.add_argument("--prompt-len", type=int, default=8192, help="prefill: prompt tokens")
    p.add_argument("--chunk", type=int, default=2048, help="prefill: chunk size")
    p.add_argument("--reps", type=int, default=3, help="prefill: timed repetitions")
    p.add_argument("--copy-mb", type=int, default=2048, help="array size for the bandwidth ceiling")
    p.add_argument("--matmul-n", type=int, default=8192, help="matmul size for the FLOP/s ceiling")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    cfg = bench_config(args.model, args.scale_down)
    dtype = jnp.dtype(args.dtype)
    dtype_bytes = dtype.itemsize
    mesh = None
    if args.mesh:
        from mimo_jax.sharding import make_mesh, parse_mesh_arg

        mesh = make_mesh(**parse_mesh_arg(args.mesh))
    device = jax.devices()[0]
    ndev = 1 if mesh is None else mesh.size
    name = f"{args.model}{' (scaled down)' if args.scale_down else ''}"
    print(f"# {name}, {args.dtype}, {ndev} x {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    bandwidth = measure_copy_bandwidth(args.copy_mb << 20)
    matmul = measure_matmul_rate(args.matmul_n)
    print(
        f"# measured ceilings per device: copy {bandwidth / 1e12:.3f} TB/s (read+write), bf16 matmul "
        f"{matmul / 1e12:.1f} TFLOP/s ({args.matmul_n}^3)"
    )
    results = dict(
        model=name,
        dtype=args.dtype,
        device=device.device_kind,
        devices=ndev,
        copy_bytes_s=bandwidth,
        matmul_flop_s=matmul,
        runs=[],
    )

    def model_for(tokens: int) -> tuple[LanguageModel, str]:
        impl = args.moe_impl or ("gather" if tokens <= 8 else "ragged")
        t = time.perf_counter()
        model = random_model(cfg, dtype, impl, mesh)
        jax.block_until_ready(nnx.state(model))
        print(f"# random weights ({impl} experts) made on device in {time.perf_counter() - t:.1f} s")
        return LanguageModel(model, mesh=mesh), impl

    if args.mode == "decode":
        batches = [int(b) for b in args.batch.split(",")]
        contexts = [int(c) for c in args.context.split(",")]
        print(
            "| batch | context | MoE | ms/step | tok/s | GB/step (weights + KV) | HBM roofline tok/s | achieved | peer "
            "tok/s | x peer |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|")
        lm, impl = None, None
        for batch in batches:
            want = args.moe_impl or ("gather" if batch <= 8 else "ragged")
            if want != impl:
                lm = None  # free the previous weights before making new ones
                lm, impl = model_for(batch)
            for context in contexts:
                r = run_decode(lm, batch, context, args.steps, args.rounds, dtype_bytes)
                roof_s = r["bytes"]["total"] / (bandwidth * ndev)
                r.update(moe=impl, roofline_tok_s=batch / roof_s, achieved=roof_s / (r["ms_per_step"] / 1e3))
                peer = PEER["decode"].get(batch) if args.model == "flash-slice-4" and not args.scale_down else None
                r["peer_tok_s"] = peer
                vs_peer = f"{r['tok_s'] / peer:.2f}" if peer else "-"
                print(
                    f"| {batch} | {context} | {impl} | {r['ms_per_step']:.3f} | {r['tok_s']:.1f} | "
                    f"{r['bytes']['weights'] / 1e9:.2f} + {r['bytes']['kv'] / 1e9:.3f} | {r['roofline_tok_s']:.0f} | "
                    f"{r['achieved']:.0%} | {peer or '-'} | {vs_peer} |"
                )
                if not r["finite"]:
                    print("#   warning: non-finite hidden states (random weights overflowed)")
                results["runs"].append(r)
    else:
        lm, impl = model_for(args.chunk)
        r = run_prefill(lm, args.prompt_len, args.chunk, args.reps)
        achieved = r["flops"] / (r["ms"] / 1e3) / (matmul * ndev)
        peer = PEER["prefill"] if args.model == "flash-slice-4" and not args.scale_down else None
        r.update(
            moe=impl,
            achieved_of_matmul=achieved,
            roofline_tok_s=r["prompt_len"] * matmul * ndev / r["flops"],
            peer_tok_s=peer,
        )
        vs_peer = f"{r['tok_s'] / peer:.2f}" if peer else "-"
        print("| prompt | chunk | MoE | ms | tok/s | GFLOP/token | matmul roofline tok/s | achieved | peer | x peer |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        print(
            f"| {args.prompt_len} | {args.chunk} | {impl} | {r['ms']:.1f} | {r['tok_s']:.0f} | "
            f"{r['flops'] / args.prompt_len / 1e9:.2f} | {r['roofline_tok_s']:.0f} | {achieved:.0%} | "
            f"{peer or '-'} | {vs_peer} |"
        )
        if not r["finite"]:
            print("#   warning: non-finite hidden states (random weights overflowed)")
        results["runs"].append(r)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1, default=float)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
