"""Engine v2 benchmarks (issue 22): what a lone request gets from a many-slot engine, a multi-turn agent trace with
and without the prefix cache, and how many sequences a fixed KV budget holds (paged vs one max_context per slot).

    python bench/bench_engine.py lone  --model demo --slots 1,32            # CPU: the demo in float32
    python bench/bench_engine.py agent --model demo --conversations 4 --history 1024 --turns 3
    python bench/bench_engine.py agent --model flash-slice-4 --dtype bfloat16 --conversations 16 --history 8192 \
        --turns 3 --chunk 2048                                              # one GPU
    python bench/bench_engine.py capacity --model flash-slice-4 --budget-gb 40
    python bench/bench_engine.py lone --model flash-slice-4 --dtype bfloat16 --slots 1,64   # one GPU

`lone`: one greedy request (no stop token) in engines of each slot count; decode tok/s after the first token
through `Engine.step` (the server's path, host included) and the ratio to the 1-slot engine. It runs on the
engine before v2 too: `PYTHONPATH=OLD_TREE python bench/bench_engine.py lone ...`.
`agent`: `--conversations` conversations run at once; each starts from its own `--history` tokens, and every turn
sends the whole conversation so far plus `--new-tokens` new ones and generates `--output-tokens`. A turn starts
when every conversation has its previous answer: the first conversation alone (its time to first token is its
own prefill, nothing queued), then the others at once. Per turn the mean time to first token (from `add` to the
first output) and the lone one's; generated tokens per second; prefix cache off and on, each engine warmed up as
the server does (`mimo_jax.engine.driver.warm_up`), programs compiled during the timed run counted (expected 0).
`constrained`: `--conversations` unconstrained greedy requests decoding alone, then beside one request constrained
to a JSON schema that outlasts them (the demo's tokenizer and llguidance), `--reps` times: their tok/s from the
step where the last of them has its first token (every one decodes, no prefill left) to their last, and the
ratios (median and range).
`capacity`: concurrent sequences of a mixed workload (`--mix`, e.g. 60x2048,4x131072: its proportions, repeated)
that fit `--budget-gb` of KV: the old cache (every slot reserves max_context of the longest) against pages for
the tokens each sequence holds (plus its rings in both).
"""

from __future__ import annotations

import argparse
import dataclasses
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
from mimo_jax.serve.metrics import COMPILE_EVENT
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
    """`turns` turns of `conversations` conversations, as the server runs them (overlap on, its warm-up first);
    per turn the mean time to first token, and that of a conversation alone (its prefill, no queue)."""
    from mimo_jax.engine.driver import Driver, warm_up  # engine v2 (`lone` runs on older trees too)
    from mimo_jax.engine.state import DEFAULT_PAGE_SIZE, max_pages

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
    engine.overlap = True  # as the server runs it: a step's first tokens are read before its decode round
    warm_up(Driver(engine), args.round, prompt_scoring=False)
    compiled = []

    def listener(event: str, seconds: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name"))

    history = {i: prompt_ids(lm, args.history, i) for i in range(c)}
    ttft = [[] for _ in range(args.turns)]  # per turn, per conversation
    alone = []  # per turn: the first conversation's TTFT, submitted alone (nothing else queued or running)
    generated, cached = 0, []
    started, first_at, outputs = {}, {}, {}

    def submit(i: int, turn: int) -> None:
        history[i] = history[i] + prompt_ids(lm, args.new_tokens, 1000 * i + turn)
        engine.add((i, turn), history[i], greedy(args.output_tokens))
        started[(i, turn)] = time.perf_counter()

    def step() -> None:
        nonlocal generated
        for out in engine.step(max_tokens_per_round=args.round, prefill_tokens=args.chunk):
            rid = out.request_id
            if out.token_ids and rid not in first_at:
                first_at[rid] = time.perf_counter()
                ttft[rid[1]].append(first_at[rid] - started[rid])
            if out.cached_tokens is not None:
                cached.append(out.cached_tokens)
            outputs.setdefault(rid, []).extend(out.token_ids)
            generated += len(out.token_ids)
            if out.finished:
                history[rid[0]] = history[rid[0]] + outputs.pop(rid)

    jax.monitoring.register_event_duration_secs_listener(listener)
    t0 = time.perf_counter()
    try:
        for turn in range(args.turns):  # a turn starts when every conversation has its previous answer
            submit(0, turn)
            while (0, turn) not in first_at:
                step()
            alone.append(first_at[(0, turn)] - started[(0, turn)])
            for i in range(1, c):
                submit(i, turn)
            while engine.has_work():
                step()
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)
    wall = time.perf_counter() - t0
    stats = engine.pages.stats()
    row = dict(
        prefix_cache=prefix_cache,
        conversations=c,
        history=args.history,
        turns=args.turns,
        ttft_s=[float(np.mean(t)) for t in ttft],
        ttft_alone_s=alone,
        tok_s=generated / wall,
        wall_s=wall,
        cached_tokens_mean=float(np.mean(cached)) if cached else 0.0,
        hit_rate=stats.hit_rate,
        preemptions=engine.num_preemptions,
        compiled=compiled,
    )
    turns = ", ".join(f"{t:.3f} s (alone {a:.3f} s)" for t, a in zip(row["ttft_s"], alone, strict=True))
    print(
        f"agent trace, prefix cache {'on ' if prefix_cache else 'off'}: mean TTFT per turn {turns}; "
        f"{row['tok_s']:.1f} generated tok/s ({wall:.1f} s); "
        f"cached tokens per request {row['cached_tokens_mean']:.0f}; "
        f"hit rate {row['hit_rate']:.2f}; preemptions {row['preemptions']}; compiled after warm-up: {len(compiled)}"
        + (f" {sorted(set(compiled))}" if compiled else "")
    )
    return row


def agent_ratios(off: dict, on: dict) -> dict:
    """TTFT and lone TTFT cache off / on per turn, their mean over the turns after the first, the throughput ratio;
    printed as two markdown tables."""
    turns = range(len(off["ttft_s"]))
    ratios = dict(
        ttft=[off["ttft_s"][t] / on["ttft_s"][t] for t in turns],
        alone=[off["ttft_alone_s"][t] / on["ttft_alone_s"][t] for t in turns],
        tok_s=on["tok_s"] / off["tok_s"],
    )
    print("| turn | mean TTFT, cache off | cache on | off / on | alone, cache off | cache on | off / on |")
    print("|---|---|---|---|---|---|---|")
    for t in turns:
        print(
            f"| {t + 1} | {off['ttft_s'][t]:.3f} s | {on['ttft_s'][t]:.3f} s | {ratios['ttft'][t]:.2f}x "
            f"| {off['ttft_alone_s'][t]:.3f} s | {on['ttft_alone_s'][t]:.3f} s | {ratios['alone'][t]:.2f}x |"
        )
    if len(turns) > 1:
        ratios["ttft_later_mean"] = float(np.mean(ratios["ttft"][1:]))
        ratios["alone_later_mean"] = float(np.mean(ratios["alone"][1:]))
        later, alone = ratios["ttft_later_mean"], ratios["alone_later_mean"]
        print(f"| >= 2 (mean of ratios) | | | {later:.2f}x | | | {alone:.2f}x |")
    print("\n| prefix cache | generated tok/s | wall | cached tokens per request | hit rate | compiled after warm-up |")
    print("|---|---|---|---|---|---|")
    for row in (off, on):
        print(
            f"| {'on' if row['prefix_cache'] else 'off'} | {row['tok_s']:.1f} | {row['wall_s']:.1f} s "
            f"| {row['cached_tokens_mean']:.0f} | {row['hit_rate']:.2f} | {len(row['compiled'])} |"
        )
    return ratios


def run_constrained(lm: LanguageModel, args: argparse.Namespace) -> dict:
    """Unconstrained requests' decode rate alone and beside one JSON-constrained request (demo tokenizer), in
    `--reps` pairs one after the other (the ratio of each pair: a shared machine drifts between pairs)."""
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
    # an array of at least 32 objects: the constrained request outlasts the others (a bare json_object closes within
    # a few tokens), so every step of theirs runs beside it
    rows = {"type": "object", "properties": {"name": {"type": "string"}, "count": {"type": "integer"}}}
    table = {"type": "array", "items": rows, "minItems": 32}
    schema = {"type": "object", "properties": {"rows": table}, "required": ["rows"]}
    json_request = SamplingOptions(
        max_new_tokens=args.output, temperature=1.0, seed=1, constraint={"json_schema": schema}
    )

    def decode_rate(label: str, constrained: bool, trace_dir: str | None = None) -> tuple[float, int]:
        """The unconstrained requests' tok/s once every one of them decodes (their prefills done) to their last,
        and the constrained one's tokens meanwhile (added first, so its prefill precedes theirs; cancelled after).
        With `trace_dir`, that window is traced by the profiler."""
        if constrained:
            engine.add((label, "json"), prompt_ids(lm, args.prompt, 99), json_request)
        for i in range(n):
            engine.add((label, i), prompt_ids(lm, args.prompt, i), greedy(args.output))
        tokens, json_tokens, t0, running, started = 0, 0, None, n, set()
        while running:
            for out in engine.step(max_tokens_per_round=args.round):
                if out.request_id[1] == "json":
                    json_tokens += len(out.token_ids) if t0 is not None else 0
                    continue
                if t0 is not None:
                    tokens += len(out.token_ids)
                elif out.token_ids:
                    started.add(out.request_id)
                    if len(started) == n:  # every free request decodes: no prefill left in the timed window
                        t0 = time.perf_counter()
                        if trace_dir:
                            jax.profiler.start_trace(trace_dir)
                running -= out.finished
        elapsed = time.perf_counter() - t0
        if trace_dir:
            jax.profiler.stop_trace()
        engine.cancel((label, "json"))
        while engine.has_work():
            engine.step(max_tokens_per_round=args.round)
        return tokens / elapsed, json_tokens

    decode_rate("warm-up", True)
    pairs = []
    for rep in range(args.reps):
        alone, _ = decode_rate(f"alone-{rep}", False)
        beside, json_tokens = decode_rate(f"beside-{rep}", True)
        pairs.append((alone, beside))
        print(
            f"{n} unconstrained requests, alone: {alone:.1f} tok/s, beside one constrained ({json_tokens} tokens): "
            f"{beside:.1f} tok/s, ratio {beside / alone:.3f}"
        )
    ratios = sorted(b / a for a, b in pairs)
    median = float(np.median(ratios))
    spread = f"median of {len(ratios)}; {ratios[0]:.3f} .. {ratios[-1]:.3f}"
    print(f"beside one constrained / alone = {median:.3f}x ({spread})")
    profiles = {}
    if args.profile:
        profiles = {label: profile_window(decode_rate, label, label == "beside") for label in ("alone", "beside")}
    return dict(
        profiles=profiles,
        requests=n,
        alone_tok_s=[a for a, _ in pairs],
        beside_tok_s=[b for _, b in pairs],
        json_tokens=json_tokens,
        ratio=median,
        ratio_range=(ratios[0], ratios[-1]),
    )


def profile_window(decode_rate, label: str, constrained: bool) -> dict:
    """One more timed window under the profiler: the device's busy share of it and its time per XLA program
    (where the free requests' loss goes: the constrained rows' own round, or the device waiting for the host)."""
    import tempfile

    from mimo_jax.tools.profiling import device_activity

    with tempfile.TemporaryDirectory() as trace_dir:
        rate, _ = decode_rate(f"profile-{label}", constrained, trace_dir)
        activity = device_activity(trace_dir)
    print(
        f"\nprofiled window, {label}: {rate:.1f} tok/s; device busy {activity.busy_s * 1e3:.1f} ms of "
        f"{activity.window_s * 1e3:.1f} ms ({1 - activity.idle_fraction:.1%}); idle: launch gaps "
        f"{activity.launch_gaps_s * 1e3:.1f} ms, waits for the host {activity.waits_s * 1e3:.1f} ms; "
        f"{activity.kernels} kernels"
    )
    if not activity.programs:
        print(f"(no modules line in the trace; its lines: {activity.lines})")
    print("| program | device ms | runs | ms per run |\n|---|---|---|---|")
    for name, (seconds, runs) in sorted(activity.programs.items(), key=lambda kv: -kv[1][0])[:8]:
        print(f"| {name[:60]} | {seconds * 1e3:.1f} | {runs} | {seconds * 1e3 / runs:.3f} |")
    return dict(tok_s=rate, **dataclasses.asdict(activity))


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
    p.add_argument("--conversations", type=int, help="default: 16 (agent, the issue's trace), 4 (constrained)")
    p.add_argument("--history", type=int, default=8192)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--chunk", type=int, default=512)
    p.add_argument("--mix", default="60x2048,4x131072")
    p.add_argument("--budget-gb", type=float, default=40.0)
    p.add_argument("--profile", action="store_true", help="constrained: trace one more window of each kind")
    p.add_argument("--json")
    args = p.parse_args(argv)
    args.conversations = args.conversations or (16 if args.mode == "agent" else 4)
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
            result["agent_ratios"] = agent_ratios(*rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
