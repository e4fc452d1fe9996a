"""MTP speculative decoding: decode tok/s with and without speculation, per batch size.

    python bench/bench_mtp.py --model demo --batch 1,8,32 --steps 3
    python bench/bench_mtp.py --model flash-slice-4 --batch 1,8,32 --steps 3 --context 2048

`demo`: the embedded demo checkpoint (trained MTP layers) decoding greedily from windows of
held-out text (Python standard library files the demo never trained on, chosen by its split
rule): real acceptance. `flash-slice-N` (or a config.json): random weights with random MTP
layers, caches filled as if a `--context`-token prompt had been prefilled: drafts are never
accepted (acceptance length 1), so the table shows what a speculative iteration costs.

Each configuration runs the engine's jitted `greedy_decode_fn` (one `while_loop` of `--iters`
iterations per host round-trip, every slot running) for `--rounds` timed rounds after two
untimed ones. Columns: ms per iteration (one token, or one draft-verify-accept round),
tok/s, acceptance length (tokens per target forward), speedup over k=0 at the same batch, and
the ideal speedup (= acceptance length: what a free draft and a verify as cheap as one plain
step would give); `cost` is a speculative iteration's time over a plain step's, `HBM cost` the
same ratio of the bytes each must move (weights touched, KV read: `iteration_bytes`), and the
HBM-bound speedup the acceptance length over it (the roofline when decode is bandwidth-bound).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import sysconfig
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import MiMoConfig
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.model.cache import kv_bytes_per_token
from mimo_jax.model.mimo import relayout_experts
from mimo_jax.model.moe import EXPERT_IMPLS
from mimo_jax.tools.bench import bench_page_tables, decode_step_bytes, fill_as_if_prefilled, layer_weight_bytes
from mimo_jax.weights.random import bench_config, random_model

# Held out of the demo's training corpus by its split rule (sha256("heldout:" + path) % 50 == 0),
# present in Python 3.11 and 3.12.
HELDOUT_FILES = (
    "statistics.py",
    "difflib.py",
    "fileinput.py",
    "hashlib.py",
    "pkgutil.py",
    "ast.py",
    "dbm/dumb.py",
    "email/headerregistry.py",
)


def is_heldout(relpath: str) -> bool:
    digest = hashlib.sha256(("heldout:" + relpath).encode()).digest()[:8]
    return int.from_bytes(digest, "little") % 50 == 0


def heldout_prompts(tokenizer_path: str, count: int, length: int) -> list[list[int]]:
    """`count` windows of `length` tokens, spread over the held-out files."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(tokenizer_path)
    root = Path(sysconfig.get_paths()["stdlib"])
    streams = []
    for rel in HELDOUT_FILES:
        assert is_heldout(rel), rel
        path = root / rel
        if path.is_file():
            streams.append(tok.encode(path.read_text(encoding="utf-8")).ids)
    if not streams:
        raise SystemExit(f"no held-out standard library files under {root}")
    prompts = []
    for i in range(count):
        ids = streams[i % len(streams)]
        windows = max(1, len(ids) // length - 1)
        start = ((i // len(streams)) * 7 + 1) % windows * length  # different windows of the same file
        prompts.append(ids[start : start + length])
    return prompts


def iteration_bytes(cfg: MiMoConfig, batch: int, k: int, context: int, dtype_bytes: int) -> float:
    """HBM bytes one decode iteration must move: a plain step (k = 0), or k MTP draft steps (MTP layer,
    eh_proj, lm_head, the window of its ring) and a verify whose batch x (k+1) tokens touch more experts
    but read the KV cache once."""
    plain = decode_step_bytes(cfg, batch, context, dtype_bytes)
    if not k:
        return plain["total"]
    target, _ = layer_weight_bytes(cfg, batch * (k + 1), dtype_bytes)
    verify = target + cfg.hidden_size * cfg.vocab_size * dtype_bytes + plain["kv"]
    mtp_cfg = cfg.replace(num_layers=1, sliding=(True,), moe=(False,))
    mtp_layer, _ = layer_weight_bytes(mtp_cfg, batch, dtype_bytes)
    h = cfg.hidden_size
    draft = mtp_layer + 2 * h * h * dtype_bytes + h * cfg.vocab_size * dtype_bytes
    draft += batch * min(cfg.window_keys, context) * kv_bytes_per_token(cfg.mtp_layer(), dtype_bytes)
    return verify + k * draft


def decode_rounds(engine: Engine, iters: int, rounds: int, tables: jax.Array) -> dict:
    """Time `rounds` decode rounds of `iters` iterations after two untimed ones (every slot, page tables
    `tables`); every slot must keep running."""
    n = jnp.int32(iters)
    rows = jnp.arange(engine.max_batch, dtype=jnp.int32)
    args = lambda: (engine.params, engine.cache, engine.state, rows, tables, n, engine.allow_all(engine.max_batch))
    # Two untimed rounds: compilation, then one more so the timed ones start from steady state.
    for _ in range(2):
        engine.cache, engine.state, out = engine.greedy_decode_fn(*args())
        jax.block_until_ready(out)
    tokens, forwards, times = 0, 0, []
    for _ in range(rounds):
        t = time.perf_counter()
        engine.cache, engine.state, out = engine.greedy_decode_fn(*args())
        count, accepted = np.asarray(out.count), np.asarray(out.accepted)  # the round trip a server makes
        times.append(time.perf_counter() - t)
        tokens += int(count.sum())
        forwards += int((accepted >= 0).sum())
    if not bool(np.asarray(engine.state.active).all()):
        raise RuntimeError("a slot stopped during the timed rounds: raise max_context")
    sec = float(np.sum(times))
    return dict(
        ms_per_iter=sec / (rounds * iters) * 1e3,
        tok_s=tokens / sec,
        accept_length=tokens / forwards,
        tokens=tokens,
    )


def run_demo(lm: LanguageModel, batch: int, k: int, args, prompts: list[list[int]]) -> dict:
    needed = args.prompt_len + (args.rounds + 3) * args.iters * (k + 1) + 2
    if needed > lm.config.context_len:
        raise SystemExit(f"--prompt-len/--rounds/--iters need {needed} positions, the demo has {lm.config.context_len}")
    engine = Engine(
        lm,
        max_batch=batch,
        max_context=needed,
        prefill_chunk=args.prompt_len,
        max_round_tokens=args.iters,
        speculative_steps=k,
    )
    options = SamplingOptions(max_new_tokens=1 << 20)
    for i in range(batch):
        engine.add(i, prompts[i], options)
    engine.step(max_tokens_per_round=1, prefill_tokens=1 << 62)  # prefill + first tokens (not timed)
    for i in range(batch):  # the rounds below run outside `step`: every page they write now
        engine.reserve(i, needed + k + 1)
    return decode_rounds(engine, args.iters, args.rounds, jnp.asarray(engine.page_table))


def run_random(lm: LanguageModel, batch: int, k: int, args, context: int) -> dict:
    max_context = context + (args.rounds + 3) * args.iters * (k + 1) + 2
    engine = Engine(
        lm, max_batch=batch, max_context=max_context, prefill_chunk=16, max_round_tokens=args.iters, speculative_steps=k
    )
    fill_as_if_prefilled(engine, context)
    return decode_rounds(engine, args.iters, args.rounds, bench_page_tables(engine))


def expert_impl(choice: str | None, tokens_per_step: int) -> str:
    """As `python -m mimo_jax.tools.bench`: the Pallas kernel on GPU, gather for <= 8 tokens per step, else ragged."""
    if choice:
        return choice
    if "pallas_gpu" in EXPERT_IMPLS and jax.default_backend() == "gpu":
        return "pallas_gpu"
    return "gather" if tokens_per_step <= 8 else "ragged"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_mtp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo, flash-slice-N or a config.json path")
    p.add_argument("--scale-down", action="store_true", help="flash-slice: tiny dimensions (CPU smoke test)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 (float32 on CPU)")
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--steps", default="3", help="comma-separated speculative_steps k (k=0 always runs)")
    p.add_argument("--iters", type=int, default=16, help="decode iterations per round (one while_loop)")
    p.add_argument("--rounds", type=int, default=4, help="timed rounds")
    p.add_argument("--prompt-len", type=int, default=128, help="demo: tokens per held-out prompt")
    p.add_argument("--context", type=int, default=2048, help="random weights: positions already in the cache")
    p.add_argument(
        "--moe-impl",
        default=None,
        help="expert implementation (default: the Pallas kernel on GPU, else gather for <= 8 tokens per step, "
        "else ragged)",
    )
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    batches = [int(b) for b in args.batch.split(",")]
    steps = [0] + [int(k) for k in args.steps.split(",") if int(k) > 0]
    device = jax.devices()[0]
    if args.model == "demo":
        from mimo_jax.weights.demo import demo_model_dir

        directory = demo_model_dir()
        lm = load_model(directory, dtype=dtype, mtp=max(steps))
        prompts = heldout_prompts(str(directory / "tokenizer.json"), max(batches), args.prompt_len)
        name = "demo checkpoint (held-out stdlib text, greedy)"
        lm_cfg = lm.config
    else:
        cfg = bench_config(args.model, args.scale_down)
        model = random_model(cfg, jnp.dtype(dtype), mtp_layers=max(steps))
        lm_cfg = cfg
        name = f"{args.model}{' (scaled down)' if args.scale_down else ''} random weights, context {args.context}"
    print(f"# {name}, {dtype}, {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"# {args.iters} iterations per round, {args.rounds} timed rounds")
    columns = "batch | k | MoE | ms/iteration | tok/s | accept length | speedup | ideal | cost | HBM cost | HBM-bound"
    print(f"| {columns} |")
    print("|---" * (columns.count("|") + 1) + "|")
    results = dict(model=name, dtype=dtype, device=device.device_kind, runs=[])
    for batch in batches:
        plain = None
        for k in steps:
            impl = expert_impl(args.moe_impl, batch * (k + 1))
            # same weights, another expert path, re-laid out for it (the previous view is consumed)
            if args.model == "demo":
                lm = LanguageModel(relayout_experts(lm.model.with_options(replace(lm.options, moe_impl=impl))))
                r = run_demo(lm, batch, k, args, prompts)
            else:
                model = relayout_experts(model.with_options(replace(model.options, moe_impl=impl)))
                r = run_random(LanguageModel(model), batch, k, args, args.context)
            r["moe"] = impl
            plain = plain or r
            r.update(batch=batch, k=k, speedup=r["tok_s"] / plain["tok_s"])
            r["cost"] = r["ms_per_iter"] / plain["ms_per_iter"]
            context = args.prompt_len if args.model == "demo" else args.context
            nbytes = [iteration_bytes(lm_cfg, batch, kk, context, jnp.dtype(dtype).itemsize) for kk in (0, k)]
            r["hbm_cost"] = nbytes[1] / nbytes[0]
            print(
                f"| {batch} | {k} | {r['moe']} | {r['ms_per_iter']:.2f} | {r['tok_s']:.1f} | "
                f"{r['accept_length']:.2f} | {r['speedup']:.2f}x | {r['accept_length']:.2f}x | {r['cost']:.2f} | "
                f"{r['hbm_cost']:.2f} | {r['accept_length'] / r['hbm_cost']:.2f}x |",
                flush=True,
            )
            results["runs"].append(r)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        os.replace(tmp, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
