"""Engine v2's memory model against its oracles: prefix-cache hits equal cold runs, preempted requests equal
uninterrupted ones, many requests in a pool far smaller than slots x context, FP8 pages near model-dtype pages,
and decode rounds over buckets of the running slots.

Model: TINY (window of 5 keys; full, SWA, SWA, full layers) with 3 MTP layers bent to be predictable, so
speculation accepts some drafts; pages of 4 tokens, so prompts span many pages and windows.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import mimo_jax
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from tests.fixtures import predictable_model

PAGE = 4
PROMPT = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6, 50, 1, 2, 3, 4, 5, 60, 61, 62, 7]  # 27 tokens
GREEDY = SamplingOptions(max_new_tokens=12, temperature=0.0)
SAMPLED = SamplingOptions(max_new_tokens=12, temperature=1.0, seed=11)


@pytest.fixture(scope="module")
def lm():
    return mimo_jax.LanguageModel(predictable_model(noise=100.0, mtp_noise=300.0))


_ENGINES: dict = {}


def engine(lm, **kw) -> Engine:
    """An engine of these settings, built (and compiled) once per module; its prefix cache starts empty."""
    key = (id(lm), tuple(sorted(kw.items())))
    if key not in _ENGINES:
        args = dict(max_batch=4, max_context=96, prefill_chunk=8, max_round_tokens=4, page_size=PAGE)
        _ENGINES[key] = Engine(lm, **{**args, **kw})
    eng = _ENGINES[key]
    assert not eng.has_work()
    eng.pages.reset_prefix_cache()
    return eng


def run(eng: Engine, requests: dict) -> dict:
    """{id: (prompt, options)}: add as slots free up, step to the end -> {id: (tokens, reason, cached_tokens)}."""
    out = {rid: [[], None, None] for rid in requests}
    pending = list(requests.items())
    while pending or eng.has_work():
        while pending and eng.free_slots:
            rid, (prompt, options) = pending.pop(0)
            eng.add(rid, prompt, options)
        for o in eng.step(max_tokens_per_round=3):
            r = out[o.request_id]
            r[0] += o.token_ids
            if o.cached_tokens is not None:
                r[2] = o.cached_tokens
            if o.finished:
                r[1] = o.finish_reason
    return {rid: tuple(v) for rid, v in out.items()}


@pytest.mark.parametrize("speculative_steps", [0, 2])
@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_prefix_hit_equals_cold(lm, options, speculative_steps):
    """A multi-turn conversation: turn 2 = turn 1's prompt + its answer + new tokens. With the prefix cache the
    second turn starts from turn 1's pages and ring snapshot (a boundary inside a page and inside a window) and
    decodes token for token what an engine without the cache decodes."""
    cold = engine(lm, speculative_steps=speculative_steps)
    warm = engine(lm, speculative_steps=speculative_steps, prefix_cache=True)
    before = warm.pages.stats()
    turn1 = run(warm, {"t1": (PROMPT, options)})["t1"]
    assert turn1[2] == 0  # nothing cached yet
    assert turn1[0] == run(cold, {"t1": (PROMPT, options)})["t1"][0]
    turn2_prompt = PROMPT + turn1[0] + [17, 18, 19, 20, 21]
    got = run(warm, {"t2": (turn2_prompt, options)})["t2"]
    want = run(cold, {"t2": (turn2_prompt, options)})["t2"]
    k = speculative_steps
    boundary = (len(PROMPT) - max(k, 1)) // PAGE * PAGE  # turn 1's snapshot
    assert got[2] == boundary > 0 and want[2] == 0
    assert got[0] == want[0] and got[1] == want[1]
    again = run(warm, {"t1-again": (PROMPT, options)})["t1-again"]  # the same prompt: its own snapshot
    assert again[2] == boundary and again[0] == turn1[0]
    stats = warm.pages.stats()
    assert stats.hits - before.hits == 2 * boundary
    assert stats.queries - before.queries == 2 * len(PROMPT) + len(turn2_prompt)


def test_prefix_hits_end_at_snapshots(lm):
    """Prompts sharing a prefix with an earlier one: a hit ends at the earlier prompt's ring snapshot (24) when
    they agree past it; one that diverges before it (at 22) has full pages in common but no ring state there,
    so it misses. Both decode what a cold engine decodes."""
    warm, cold = engine(lm, prefix_cache=True), engine(lm)
    run(warm, {"a": (PROMPT, GREEDY)})
    for shared, cached in ((25, 24), (22, 0)):
        other = PROMPT[:shared] + [40, 41, 42, 43, 44]
        got = run(warm, {shared: (other, GREEDY)})[shared]
        assert got[2] == cached
        assert got[0] == run(cold, {shared: (other, GREEDY)})[shared][0]


@pytest.mark.parametrize("overlap", [False, True], ids=["serial", "overlap"])
@pytest.mark.parametrize("speculative_steps", [0, 2])
def test_preemption_resumes_exactly(lm, speculative_steps, overlap):
    """Four requests whose pages cannot all fit: the engine preempts the newest (also one admitted in the same
    step, its first token not yet read), recomputes it later, and every output equals an engine with room for all
    (greedy and seeded)."""
    prompts = [PROMPT[i : i + 10] for i in range(4)]
    options = [GREEDY, SAMPLED, GREEDY, SAMPLED]
    long = [dataclasses.replace(o, max_new_tokens=30) for o in options]
    requests = {f"r{i}": (p, o) for i, (p, o) in enumerate(zip(prompts, long, strict=True))}
    roomy = run(engine(lm, speculative_steps=speculative_steps), requests)
    tight = engine(lm, speculative_steps=speculative_steps, num_pages=24)  # one request needs up to 11 pages
    tight.overlap = overlap
    try:
        got = run(tight, requests)
    finally:
        tight.overlap = False
    assert tight.num_preemptions > 0
    assert {rid: v[:2] for rid, v in got.items()} == {rid: v[:2] for rid, v in roomy.items()}
    assert tight.pages.stats().used == 0  # every page went back


def test_many_requests_in_a_small_pool(lm):
    """64 concurrent requests in 64 slots whose pool holds far less than 64 x max_context (and less than all of
    them at once), the prefix cache on (so cached pages are evicted as the pool fills): everything finishes,
    equal to a roomy 4-slot engine without the cache."""
    prompts = [[(7 * i + j) % 60 + 1 for j in range(3 + i % 9)] for i in range(64)]
    requests = {i: (p, SamplingOptions(max_new_tokens=6, temperature=0.0)) for i, p in enumerate(prompts)}
    small = engine(lm, max_batch=64, num_pages=40, prefix_cache=True)  # 64 x 96 context would be 1536 pages
    got = run(small, requests)
    ref = run(engine(lm), requests)  # 4 slots, room for each request
    assert {i: v[:2] for i, v in got.items()} == {i: v[:2] for i, v in ref.items()}
    stats = small.pages.stats()
    assert stats.used == 0 and stats.evicted_pages > 0


def test_a_request_larger_than_the_pool_is_refused(lm):
    with pytest.raises(ValueError, match="more than the whole pool of 4"):
        engine(lm, num_pages=4).add("x", PROMPT, GREEDY)


def test_round_rows_are_a_bucket_of_distinct_slots(lm):
    steps = engine(lm, max_batch=6).steps
    assert steps.decode_buckets == (1, 2, 4, 6)
    assert steps.round_rows([4]).tolist() == [4]
    rows = steps.round_rows([5, 1, 3])
    assert rows.size == 4 and rows[:3].tolist() == [5, 1, 3] and len(set(rows.tolist())) == 4


def test_fp8_pages_track_model_dtype_pages(lm):
    """FP8 (e4m3, a scale per token and head) full-layer pages: the first greedy tokens agree with the model-dtype
    cache and the logprobs stay close."""
    opts = SamplingOptions(max_new_tokens=8, temperature=0.0, logprobs=1)
    results = []
    for dtype in (None, "fp8_e4m3"):
        eng = Engine(
            lm, max_batch=2, max_context=96, prefill_chunk=8, page_size=PAGE, max_top_logprobs=1, kv_cache_dtype=dtype
        )
        eng.add("x", PROMPT, opts)
        toks, lps = [], []
        while eng.has_work():
            for o in eng.step():
                toks += o.token_ids
                lps += o.logprobs
        results.append((toks, np.array(lps)))
    (ref_toks, ref_lp), (fp8_toks, fp8_lp) = results
    assert fp8_toks[:4] == ref_toks[:4]
    agree = next((i for i, (a, b) in enumerate(zip(ref_toks, fp8_toks, strict=True)) if a != b), len(ref_toks))
    np.testing.assert_allclose(fp8_lp[:agree], ref_lp[:agree], atol=0.1)


@pytest.mark.parametrize("speculative_steps", [0, 2])
@pytest.mark.parametrize("options", [GREEDY, SAMPLED], ids=["greedy", "seeded"])
def test_a_hit_runs_its_tail_past_the_snapshot_boundary_in_one_chunk(lm, options, speculative_steps):
    """Turn 2 hits turn 1's snapshot; its tail (8 tokens: one chunk) crosses turn 2's own snapshot boundary and
    runs as ONE prefill launch, which also returns the rings as of that boundary (two launches when a chunk
    ended there). Turn 3 hits that snapshot (taken inside a chunk, not at a chunk's end) and decodes what a cold
    engine decodes, token for token; so do turns 1 and 2."""
    options = dataclasses.replace(options, max_new_tokens=3)
    cold = engine(lm, speculative_steps=speculative_steps)
    warm = engine(lm, speculative_steps=speculative_steps, prefix_cache=True)
    k = max(speculative_steps, 1)
    launches = []
    prefill = warm.prefill_fn

    def counting_prefill(*args):
        launches.append((int(args[5]), int(args[6]), int(args[8])))  # start, length, mark
        return prefill(*args)

    warm.prefill_fn = counting_prefill
    try:
        prompt, turns = [], []
        for new_tokens in (PROMPT[:14], [17, 18, 19], [20]):  # tails of 8 tokens after turn 1
            prompt = prompt + new_tokens
            launches.clear()
            got = run(warm, {"t": (prompt, options)})["t"]
            turns.append((prompt, got, list(launches)))
            prompt = prompt + got[0]
    finally:
        warm.prefill_fn = prefill
    hit = 0
    for turn, (prompt, got, calls) in enumerate(turns):
        assert got[:2] == run(cold, {"t": (prompt, options)})["t"][:2]
        boundary = (len(prompt) - k) // PAGE * PAGE  # the snapshot this turn leaves
        assert got[2] == hit and (turn == 0) == (hit == 0)  # turns 2 and 3 hit the previous turn's snapshot
        chunks = [
            (s, min(8, len(prompt) - s), boundary if s < boundary <= s + 8 else -1) for s in range(hit, len(prompt), 8)
        ]
        assert calls == chunks  # no chunk ends at the boundary; the one crossing it marks it
        if turn:
            assert len(calls) == 1 and hit < boundary < len(prompt)  # the tail: one launch across the boundary
        hit = boundary


@pytest.mark.parametrize("speculative_steps", [0, 2])
def test_prefill_returns_the_slot_as_of_its_mark(lm, speculative_steps):
    """The steps-level oracle of the snapshot row: a chunk [8, 16) run with mark 13 returns the rings (every SWA
    and MTP layer) and history that a chunk ending at 13 leaves in the slot; its cache as of 16 equals two chunks
    split at 13; a chunk without a mark (-1) returns empty rings."""

    eng = engine(lm, speculative_steps=speculative_steps, prefix_cache=True)
    tables = np.arange(eng.pages.num_pages, dtype=np.int32)[: 3 * eng.steps.max_pages].reshape(3, -1)
    prompt = np.asarray(PROMPT[:20], np.int32)

    def prefill(slot: int, chunks: list[tuple[int, int, int]]):
        history = jnp.asarray(eng.empty_history())
        for start, length, mark in chunks:
            tokens = eng.prefill_tokens(prompt, start, length, 8)
            args = (jnp.int32(slot), tables[slot], tokens, jnp.int32(start), jnp.int32(length), history)
            eng.cache, history, row = eng.prefill_fn(eng.params, eng.cache, *args, jnp.int32(mark))
        return history, row

    split_history, _ = prefill(0, [(0, 8, -1), (8, 5, -1)])  # slot 0 as of 13
    as_of_13 = [jax.tree.map(lambda x: np.asarray(x[:1]), r) for r in eng.cache.rings]
    prefill(0, [(13, 3, -1)])  # then on to 16
    one_history, row = prefill(1, [(0, 8, -1), (8, 8, 13)])
    np.testing.assert_allclose(np.asarray(row.history[0]), np.asarray(split_history), rtol=1e-5, atol=1e-5)
    assert len(row.rings) == len(as_of_13) == len(eng.cache.rings)
    for got, want, now in zip(row.rings, as_of_13, eng.cache.rings, strict=True):
        np.testing.assert_array_equal(np.asarray(got.pos), want.pos)
        assert (want.pos >= 0).sum() == want.pos.shape[1]  # a full ring: every slot checked
        np.testing.assert_allclose(np.asarray(got.k), want.k, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.asarray(got.v), want.v, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(np.asarray(now.pos[1]), np.asarray(now.pos[0]))  # as of 16: one chunk == two
        np.testing.assert_allclose(np.asarray(now.k[1]), np.asarray(now.k[0]), rtol=1e-5, atol=1e-5)
    _, unmarked = prefill(2, [(0, 8, -1)])
    assert all((np.asarray(r.pos) == -1).all() for r in unmarked.rings)
