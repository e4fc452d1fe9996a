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
from mimo_jax.model.mimo import relayout_experts, with_draft_vocab
from mimo_jax.model.moe import EXPERT_IMPLS
from mimo_jax.tools.bench import bench_page_tables, decode_step_bytes, fill_as_if_prefilled, layer_weight_bytes
from mimo_jax.weights.draft_vocab import read_draft_vocab
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


def iteration_bytes(
    cfg: MiMoConfig, batch: int, k: int, context: int, dtype_bytes: int, fp8: bool = False, draft_vocab: int = 0
) -> dict[str, float]:
    """HBM bytes one decode iteration must move, by part: a plain step (k = 0: `decode_step_bytes`), or k MTP
    draft steps and a verify of batch x (k+1) tokens. Uniform routing (the verify's tokens touch up to (k+1)x the
    experts of one token: `expected_experts_touched`); `fp8`: weights as `load_model(weights="fp8")` keeps them
    (q/k/v, dense MLP and experts, MTP layers alike); `draft_vocab` N > 0: the drafts' lm_head is N columns.

    Parts: `verify_layers` (target layers' weights touched), `lm_head` (the verify's, or the plain step's),
    `kv` (the target cache, read once), `draft_layers` (k MTP layers: attention, dense MLP, eh_proj),
    `draft_head` (k reads of the drafts' lm_head), `draft_kv` (the MTP rings), `logits` (float32 logits written
    and read back by sampling / accept: small), and `total`."""
    h, v = cfg.hidden_size, cfg.vocab_size
    plain = decode_step_bytes(cfg, batch, context, dtype_bytes, fp8)
    lm_head = h * v * dtype_bytes
    logits = 2 * batch * (k + 1) * v * 4
    if not k:
        return dict(
            verify_layers=plain["weights"] - lm_head,
            lm_head=lm_head,
            kv=plain["kv"],
            logits=logits,
            total=plain["total"] + logits,
        )
    target, _ = layer_weight_bytes(cfg, batch * (k + 1), dtype_bytes, fp8)
    mtp_cfg = cfg.replace(num_layers=1, sliding=(True,), moe=(False,))
    mtp_layer, _ = layer_weight_bytes(mtp_cfg, batch, dtype_bytes, fp8)
    ring = batch * min(cfg.window_keys, context) * kv_bytes_per_token(cfg.mtp_layer(), dtype_bytes)
    parts = dict(
        verify_layers=target,
        lm_head=lm_head,
        kv=plain["kv"],
        draft_layers=k * (mtp_layer + 2 * h * h * dtype_bytes),
        draft_head=k * h * (draft_vocab or v) * dtype_bytes,
        draft_kv=k * ring,
        logits=logits + k * 2 * batch * v * 4,
    )
    parts["total"] = sum(parts.values())
    return parts


def byte_table(
    cfg: MiMoConfig, name: str, batch: int, k: int, context: int, dtype_bytes: int, fp8: bool, draft_vocab: int
) -> str:
    """A markdown table of `iteration_bytes` (GB) for a plain step and a k-step iteration with and without the
    draft vocabulary, each total also in plain steps (the HBM-bound cost)."""
    cases = [("plain step", 0, 0), (f"k={k}, full vocab", k, 0)]
    if draft_vocab:
        cases.append((f"k={k}, draft vocab {draft_vocab}", k, draft_vocab))
    rows = [iteration_bytes(cfg, batch, kk, context, dtype_bytes, fp8, dv) for _, kk, dv in cases]
    parts = ["verify_layers", "lm_head", "kv", "draft_layers", "draft_head", "draft_kv", "logits", "total"]
    lines = [
        f"# HBM bytes per iteration (GB), {name}, batch {batch}, context {context}, "
        f"{'fp8' if fp8 else f'{dtype_bytes}-byte'} weights, uniform routing",
        "| part | " + " | ".join(c[0] for c in cases) + " |",
        "|---" * (len(cases) + 1) + "|",
    ]
    for part in parts:
        lines.append(f"| {part} | " + " | ".join(f"{r.get(part, 0) / 1e9:.3f}" for r in rows) + " |")
    lines.append(
        "| HBM cost (plain steps) | " + " | ".join(f"{r['total'] / rows[0]['total']:.2f}" for r in rows) + " |"
    )
    return "\n".join(lines)


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


def draft_ids(args, lm_dir: Path | None, size: int, vocab: int) -> np.ndarray:
    """The `size` draft tokens: the demo's most frequent (its draft_vocab.json), or for random weights the first
    `size` ids (nothing is accepted there: only the cost counts)."""
    if lm_dir is not None:
        return read_draft_vocab(lm_dir, size)
    if size > vocab:
        raise SystemExit(f"--draft-vocab {size} exceeds the vocabulary ({vocab})")
    return np.arange(size, dtype=np.int32)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bench/bench_mtp.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo", help="demo, flash-slice-N, flash-layers-N or a config.json path")
    p.add_argument("--scale-down", action="store_true", help="flash-slice: tiny dimensions (CPU smoke test)")
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bf16 (float32 on CPU)")
    p.add_argument(
        "--weights", default="bf16", choices=["bf16", "fp8"], help="random weights: as load_model keeps them"
    )
    p.add_argument("--batch", default="1,8,32")
    p.add_argument("--steps", default="3", help="comma-separated speculative_steps k (k=0 always runs)")
    p.add_argument(
        "--draft-vocab",
        default="0",
        help="comma-separated draft vocabulary sizes, each run for every k > 0 (0: the full vocabulary; demo: the "
        "most frequent tokens of its draft_vocab.json; random weights: the first N ids)",
    )
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
    p.add_argument("--bytes-only", action="store_true", help="print the HBM byte table and exit (no model built)")
    p.add_argument("--json", default=None, help="also write the results to this file")
    args = p.parse_args(argv)

    on_cpu = jax.default_backend() == "cpu"
    dtype = args.dtype or ("float32" if on_cpu else "bfloat16")
    fp8 = args.weights == "fp8"
    dtype_bytes = jnp.dtype(dtype).itemsize
    batches = [int(b) for b in args.batch.split(",")]
    steps = [0] + [int(k) for k in args.steps.split(",") if int(k) > 0]
    vocabs = [int(n) for n in args.draft_vocab.split(",")]
    device = jax.devices()[0]
    lm_dir = None
    if args.model == "demo":
        from mimo_jax.weights.demo import demo_model_dir

        lm_dir = demo_model_dir()
        lm_cfg = MiMoConfig.from_json(lm_dir)
        name = "demo checkpoint (held-out stdlib text, greedy)"
    else:
        lm_cfg = bench_config(args.model, args.scale_down)
        scaled = " (scaled down)" if args.scale_down else ""
        name = f"{args.model}{scaled} random {args.weights} weights, context {args.context}"
    context = args.prompt_len if args.model == "demo" else args.context
    tables = [
        byte_table(lm_cfg, args.model, b, k, context, dtype_bytes, fp8, max(vocabs))
        for b in batches
        for k in steps
        if k
    ]
    print("\n\n".join(tables) + "\n")
    results = dict(
        model=name, dtype=dtype, weights=args.weights, device=device.device_kind, byte_tables=tables, runs=[]
    )
    if args.bytes_only:
        return _write(args.json, results)

    if args.model == "demo":
        lm = load_model(lm_dir, dtype=dtype, mtp=max(steps), draft_vocab=0)
        prompts = heldout_prompts(str(lm_dir / "tokenizer.json"), max(batches), args.prompt_len)
        model = lm.model
    else:
        model = random_model(lm_cfg, jnp.dtype(dtype), mtp_layers=max(steps), weights=args.weights)
    print(f"# {name}, {dtype}, {device.device_kind} ({jax.default_backend()}), jax {jax.__version__}")
    print(f"# {args.iters} iterations per round, {args.rounds} timed rounds")
    columns = (
        "batch | k | draft vocab | MoE | ms/iteration | tok/s | accept length | speedup | ideal | cost | HBM cost | "
        "HBM-bound"
    )
    print(f"| {columns} |")
    print("|---" * (columns.count("|") + 1) + "|")
    for batch in batches:
        plain = None
        for k, vocab in [(0, 0)] + [(k, n) for k in steps if k for n in vocabs]:
            impl = expert_impl(args.moe_impl, batch * (k + 1))
            # same weights, another expert path, re-laid out for it (the previous view is consumed)
            model = relayout_experts(model.with_options(replace(model.options, moe_impl=impl)))
            view = with_draft_vocab(model, draft_ids(args, lm_dir, vocab, lm_cfg.vocab_size)) if vocab else model
            if args.model == "demo":
                r = run_demo(LanguageModel(view), batch, k, args, prompts)
            else:
                r = run_random(LanguageModel(view), batch, k, args, args.context)
            del view
            r["moe"] = impl
            plain = plain or r
            r.update(batch=batch, k=k, draft_vocab=vocab, speedup=r["tok_s"] / plain["tok_s"])
            r["cost"] = r["ms_per_iter"] / plain["ms_per_iter"]
            nbytes = [
                iteration_bytes(lm_cfg, batch, kk, context, dtype_bytes, fp8, dv) for kk, dv in ((0, 0), (k, vocab))
            ]
            r["bytes"] = nbytes[1]
            r["hbm_cost"] = nbytes[1]["total"] / nbytes[0]["total"]
            print(
                f"| {batch} | {k} | {vocab or 'full'} | {r['moe']} | {r['ms_per_iter']:.2f} | {r['tok_s']:.1f} | "
                f"{r['accept_length']:.2f} | {r['speedup']:.2f}x | {r['accept_length']:.2f}x | {r['cost']:.2f} | "
                f"{r['hbm_cost']:.2f} | {r['accept_length'] / r['hbm_cost']:.2f}x |",
                flush=True,
            )
            results["runs"].append(r)
            _write(args.json, results)  # after every case: a run cut at its time limit keeps what it measured
    return _write(args.json, results)


def _write(path: str | None, results: dict) -> int:
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(path + ".tmp", path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
