"""Engine v2 benchmarks (issue 22): what a lone request gets from a many-slot engine, a multi-turn agent trace with
and without the prefix cache, and how many sequences a fixed KV budget holds (paged vs one max_context per slot).

    python bench/bench_engine.py lone  --model demo --slots 1,32            # CPU: the demo in float32
    python bench/bench_engine.py agent --model demo --conversations 4 --history 1024 --turns 3
    python bench/bench_engine.py capacity --model flash-slice-4 --budget-gb 40
    python bench/bench_engine.py lone --model flash-slice-4 --dtype bfloat16 --slots 1,64   # one GPU

`lone`: one greedy request (no stop token) in engines of each slot count; decode tok/s after the first token
through `Engine.step` (the server's path, host included) and the ratio to the 1-slot engine. It runs on the
engine before v2 too: `PYTHONPATH=OLD_TREE python bench/bench_engine.py lone ...`.
`agent`: `--conversations` conversations run at once; each starts from its own `--history` tokens, and every turn
sends the whole conversation so far plus `--new-tokens` new ones and generates `--output-tokens`. Time to first
token (from `add` to the first output) and generated tokens per second, prefix cache off and on.
`constrained`: `--conversations` unconstrained greedy requests decoding alone, then beside one JSON-constrained
request (the demo's tokenizer and llguidance): their tok/s and the ratio.
`capacity`: concurrent sequences of a mixed workload (`--mix`, e.g. 60x2048,4x131072: its proportions, repeated)
that fit `--budget-gb` of KV: the old cache (every slot reserves max_context of the longest) against pages for
the tokens each sequence holds (plus its rings in both).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.config import RunOptions
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.lm import LanguageModel, load_model
from mimo_jax.weights.demo import demo_model_dir
from mimo_jax.weights.random import bench_config, random_model


def load(args: argparse.Namespace) -> LanguageModel:
    if args.model == "demo":
        return load_model(str(demo_model_dir()), dtype=args.dtype)
    platform = jax.devices()[0].platform
    cfg = bench_config(args.model, scale_down=args.scale_down)
    model = random_model(cfg, jnp.dtype(args.dtype), RunOptions.for_platform(platform), None)
    return LanguageModel(model, source=f"random:{args.model}")


def prompt_ids(lm: LanguageModel, n: int, seed: int) -> list[int]:
    return np.random.RandomState(seed).randint(10, lm.config.vocab_size - 10, n).tolist()


def greedy(max_new: int) -> SamplingOptions:
    return SamplingOptions(max_new_tokens=max_new, temperature=0.0)


def run_lone(lm: LanguageModel, args: argparse.Namespace) -> list[dict]:
    """A lone request's decode rate in engines of each slot count."""
    rows = []
    context = args.prompt + args.output + 8
    for slots in args.slots:
        engine = Engine(
            lm, max_batch=slots, max_context=context, prefill_chunk=min(512, args.prompt), max_round_tokens=args.round
        )
        rates = []
        for rep in range(args.reps + 1):  # the first compiles
            engine.add(rep, prompt_ids(lm, args.prompt, rep), greedy(args.output))
            tokens, t_first = 0, None
            while engine.has_work():
                for out in engine.step(max_tokens_per_round=args.round):
                    if out.token_ids and t_first is None:
                        t_first, first_count = time.perf_counter(), len(out.token_ids)
                    tokens += len(out.token_ids)
            if rep:
                rates.append((tokens - first_count) / (time.perf_counter() - t_first))
        rows.append(dict(slots=slots, tok_s=float(np.median(rates)), rates=rates))
        print(f"lone request, {slots:3d} slots: {rows[-1]['tok_s']:8.1f} tok/s (runs {np.round(rates, 1).tolist()})")
    base = rows[0]["tok_s"]
    for row in rows:
        row["vs_first"] = row["tok_s"] / base
        print(f"  {row['slots']} slots / {rows[0]['slots']} slots = {row['vs_first']:.3f}x")
    return rows


def run_agent(lm: LanguageModel, args: argparse.Namespace, prefix_cache: bool) -> dict:
    """Conversations of `turns` turns, all running at once; TTFT per turn and generated tokens per second."""
    from mimo_jax.engine.state import DEFAULT_PAGE_SIZE, max_pages  # engine v2 (`lone` runs on older trees too)

    c = args.conversations
    max_context = args.history + args.turns * (args.new_tokens + args.output_tokens) + 8
    per_seq = max_pages(max_context, DEFAULT_PAGE_SIZE) * DEFAULT_PAGE_SIZE
    engine = Engine(
        lm,
        max_batch=c,
        max_context=max_context,
        prefill_chunk=args.chunk,
        max_round_tokens=args.round,
        num_pages=2 * c * per_seq // DEFAULT_PAGE_SIZE,  # room for every conversation and the cached prefixes
        prefix_cache=prefix_cache,
    )
    # warm-up: every prefill bucket and decode bucket this run uses (not timed)
    for n in sorted({b for b in engine.buckets} | {args.new_tokens + args.output_tokens}):
        engine.add(f"w{n}", prompt_ids(lm, min(n, max_context - args.output_tokens - 1), 999), greedy(2))
        while engine.has_work():
            engine.step()
    if prefix_cache:  # the ring snapshot's save and restore, and the tail chunks they leave
        for i in range(2):
            engine.add(f"ws{i}", prompt_ids(lm, 3 * DEFAULT_PAGE_SIZE + 5, 998), greedy(2))
            while engine.has_work():
                engine.step()
    for b in engine.steps.decode_buckets:
        for i in range(b):
            engine.add(f"wb{b}-{i}", prompt_ids(lm, 8, 900 + i), greedy(3))
        while engine.has_work():
            engine.step(max_tokens_per_round=args.round)
    engine.pages.reset_prefix_cache()
    history = {i: prompt_ids(lm, args.history, i) for i in range(c)}
    turn = dict.fromkeys(range(c), 0)
    started, first_at, ttft = {}, {}, []
    ttft_later = []
    generated = 0
    cached = []
    t0 = time.perf_counter()

    def submit(i: int) -> None:
        new = prompt_ids(lm, args.new_tokens, 1000 * i + turn[i])
        history[i] = history[i] + new
        rid = (i, turn[i])
        engine.add(rid, history[i], greedy(args.output_tokens))
        started[rid] = time.perf_counter()

    for i in range(c):
        submit(i)
    outputs: dict = {}
    while engine.has_work():
        for out in engine.step(max_tokens_per_round=args.round, prefill_tokens=args.chunk):
            rid = out.request_id
            if out.cached_tokens is not None:
                cached.append(out.cached_tokens)
            if out.token_ids and rid not in first_at:
                first_at[rid] = time.perf_counter()
                (ttft if rid[1] == 0 else ttft_later).append(first_at[rid] - started[rid])
            outputs.setdefault(rid, []).extend(out.token_ids)
            generated += len(out.token_ids)
            if out.finished:
                i = rid[0]
                history[i] = history[i] + outputs.pop(rid)
                turn[i] += 1
                if turn[i] < args.turns:
                    submit(i)
    wall = time.perf_counter() - t0
    stats = engine.pages.stats()
    row = dict(
        prefix_cache=prefix_cache,
        conversations=c,
        history=args.history,
        turns=args.turns,
        ttft_first_turn_s=float(np.mean(ttft)),
        ttft_later_turns_s=float(np.mean(ttft_later)) if ttft_later else None,
        tok_s=generated / wall,
        wall_s=wall,
        cached_tokens_mean=float(np.mean(cached)) if cached else 0.0,
        hit_rate=stats.hit_rate,
        preemptions=engine.num_preemptions,
    )
    print(
        f"agent trace, prefix cache {'on ' if prefix_cache else 'off'}: TTFT turn 1 {row['ttft_first_turn_s']:.3f} s, "
        f"later turns {row['ttft_later_turns_s']:.3f} s; {row['tok_s']:.1f} tok/s; cached tokens per request "
        f"{row['cached_tokens_mean']:.0f}; hit rate {row['hit_rate']:.2f}; preemptions {row['preemptions']}"
    )
    return row


def run_constrained(lm: LanguageModel, args: argparse.Namespace) -> dict:
    """Unconstrained requests' decode rate alone and beside one JSON-constrained request (demo tokenizer)."""
    from mimo_jax.grammar import GrammarFactory
    from mimo_jax.text import Tokenizer

    factory = GrammarFactory(Tokenizer(str(demo_model_dir())), lm.config.vocab_size)
    n = args.conversations
    engine = Engine(
        lm,
        max_batch=n + 1,
        max_context=args.prompt + args.output + 8,
        prefill_chunk=min(512, args.prompt),
        max_round_tokens=args.round,
        constraint_factory=factory,
    )
    engine.overlap = True  # as the server runs it
    json_request = SamplingOptions(
        max_new_tokens=args.output, temperature=1.0, seed=1, constraint={"json_object": True}
    )
    rates = {}
    for label, constrained in (("warm-up", True), ("alone", False), ("beside one constrained", True)):
        for i in range(n):
            engine.add((label, i), prompt_ids(lm, args.prompt, i), greedy(args.output))
        if constrained:
            engine.add((label, "json"), prompt_ids(lm, args.prompt, 99), json_request)
        tokens, t0 = 0, None
        while engine.has_work():
            for out in engine.step(max_tokens_per_round=args.round):
                if out.request_id[1] == "json":
                    continue
                if out.token_ids and t0 is None:
                    t0 = time.perf_counter()  # from the first tokens on: decode only
                elif t0 is not None:
                    tokens += len(out.token_ids)
        rates[label] = tokens / (time.perf_counter() - t0)
        print(f"{n} unconstrained requests, {label}: {rates[label]:.1f} tok/s")
    ratio = rates["beside one constrained"] / rates["alone"]
    print(f"beside one constrained / alone = {ratio:.3f}x")
    return dict(requests=n, alone_tok_s=rates["alone"], beside_tok_s=rates["beside one constrained"], ratio=ratio)


def run_capacity(lm_config, args: argparse.Namespace) -> dict:
    """Sequences of the mix that fit the budget: one max_context per slot (old) against pages (new)."""
    from mimo_jax.engine.state import DEFAULT_PAGE_SIZE
    from mimo_jax.model.cache import kv_plan, page_bytes

    mix = [(int(n), int(t)) for n, t in (part.split("x") for part in args.mix.split(","))]
    max_context = max(t for _, t in mix)
    dtype_bytes = jnp.dtype(args.dtype).itemsize
    budget = int(args.budget_gb * 1e9)
    old_per_seq = kv_plan(lm_config, max_context, dtype_bytes).total_bytes
    old = budget // old_per_seq
    ring = kv_plan(lm_config, max_context, dtype_bytes).swa_bytes  # rings stay per slot
    page = page_bytes(lm_config, DEFAULT_PAGE_SIZE, dtype_bytes)
    # the mix repeated (its proportions kept, long and short interleaved) until the next sequence does not fit
    per_cycle = sum(n for n, _ in mix)
    cycle = sorted((t for n, t in mix for _ in range(n)), key=lambda t: t)
    cycle = [cycle[(i * 7919) % per_cycle] for i in range(per_cycle)] if per_cycle > 1 else cycle
    held, used = 0, 0
    while True:
        tokens = cycle[held % per_cycle]
        cost = -(-tokens // DEFAULT_PAGE_SIZE) * page + ring
        if used + cost > budget:
            break
        used += cost
        held += 1
    row = dict(budget_gb=args.budget_gb, mix=args.mix, max_context=max_context, old=int(old), paged=held)
    print(
        f"KV budget {args.budget_gb} GB, mix {args.mix} (max_context {max_context}): one max_context per slot "
        f"holds {old} sequences; pages hold {held} ({held / max(old, 1):.1f}x)"
    )
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=["lone", "agent", "capacity", "constrained"])
    p.add_argument("--model", default="demo", help="demo, or flash-slice-N (random weights)")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--scale-down", action="store_true", help="flash-slice-N with tiny dimensions (CPU smoke test)")
    p.add_argument("--slots", default="1,32", type=lambda s: [int(x) for x in s.split(",")])
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--output", type=int, default=256)
    p.add_argument("--round", type=int, default=8, help="decode steps per round (the server's default)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--conversations", type=int, default=4)
    p.add_argument("--history", type=int, default=1024)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--mix", default="60x2048,4x131072")
    p.add_argument("--budget-gb", type=float, default=40.0)
    p.add_argument("--json")
    args = p.parse_args(argv)
    result: dict = dict(mode=args.mode, model=args.model, dtype=args.dtype, device=jax.devices()[0].device_kind)
    if args.mode == "capacity":
        cfg = bench_config(args.model) if args.model != "demo" else load(args).config
        result["capacity"] = run_capacity(cfg, args)
    else:
        lm = load(args)
        if args.mode == "lone":
            result["lone"] = run_lone(lm, args)
        elif args.mode == "constrained":
            result["constrained"] = run_constrained(lm, args)
        else:
            rows = [run_agent(lm, args, False), run_agent(lm, args, True)]
            result["agent"] = rows
            if rows[1]["ttft_later_turns_s"]:
                speedup = rows[0]["ttft_later_turns_s"] / rows[1]["ttft_later_turns_s"]
                print(f"TTFT of later turns, cache off / on: {speedup:.2f}x")
                result["ttft_speedup"] = speedup
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
