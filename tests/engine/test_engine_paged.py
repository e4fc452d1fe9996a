"""Engine v2's memory model against its oracles: prefix-cache hits equal cold runs, preempted requests equal
uninterrupted ones, many requests in a pool far smaller than slots x context, FP8 pages near model-dtype pages,
and decode rounds over buckets of the running slots.

Model: TINY (window of 5 keys; full, SWA, SWA, full layers) with 3 MTP layers bent to be predictable, so
speculation accepts some drafts; pages of 4 tokens, so prompts span many pages and windows.
"""

import dataclasses

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
