"""Page pools split by page over the slots' (data, expert) shards (DP attention): each chip holds P/D pages, a slot's
pages lie on its shard, and the engine gives the single-device tokens (8 fake CPU devices)."""

import re

import numpy as np
from flax import nnx

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.sharding import make_mesh
from tests.fixtures import TINY, run_by_step

CFG = MiMoConfig.from_dict(TINY)
PAGE = 4


def models(**mesh_sizes):
    """(one-device model, the same weights on a mesh of `mesh_sizes`)."""
    plain = mimo_jax.LanguageModel(MiMoModel(CFG, rngs=nnx.Rngs(3)))
    return plain, mimo_jax.LanguageModel(MiMoModel(CFG, rngs=nnx.Rngs(3)), mesh=make_mesh(**mesh_sizes))


def pages_of(engine, request_id) -> list[int]:
    return list(engine._slots[engine._by_id[request_id]].pages)


def test_pages_split_over_expert_shards_equal_single_device():
    """expert=2 (x tensor=4): 8 slots and the pools' pages in 2 shards; 5 seeded requests of several lengths
    (rounds of per-shard buckets, rows of both shards) decode the single-device engine's tokens (greedy ones:
    `test_a_full_shard_preempts_and_waits_while_the_other_admits`)."""
    plain, sharded = models(expert=2, tensor=4)
    options = SamplingOptions(max_new_tokens=9, temperature=0.8, seed=5)
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7], [4, 6], [50, 1, 2], [7] * 5, [9, 8, 7, 6, 5, 4, 3, 2, 1]]
    kwargs = dict(max_batch=8, max_context=32, prefill_chunk=4, max_round_tokens=3, page_size=PAGE)
    engine = Engine(sharded, **kwargs)
    steps = engine.steps
    assert steps.page_shards == ("expert",) and steps.num_page_shards == 2
    assert steps.decode_buckets == (2, 4, 8)  # 2 segments of 1, 2 or 4 rows
    pool = engine.cache.pools[0].k
    assert pool.sharding.spec[0] == "expert"
    assert {s.data.shape[0] for s in pool.addressable_shards} == {steps.num_pages // 2}  # P/D pages per chip
    requests = {f"r{i}": (p, options) for i, p in enumerate(prompts)}
    got = run_by_step(engine, requests)
    want = run_by_step(Engine(plain, **kwargs), requests)
    assert {r: o["tokens"] for r, o in got.items()} == {r: o["tokens"] for r, o in want.items()}
    assert all(len(o["tokens"]) == 9 for o in got.values())
    assert engine.pages.stats().used == 0


def test_round_rows_put_each_shard_in_its_segment():
    _, sharded = models(data=2, tensor=2, expert=2)
    steps = Engine(sharded, max_batch=8, max_context=16, prefill_chunk=4, page_size=PAGE).steps
    assert steps.num_page_shards == 4 and steps.decode_buckets == (4, 8)
    rows = steps.round_rows([5, 0, 4])  # shards 0, 2, 2 (2 slots each): buckets of 2 rows per shard
    assert rows.tolist() == [0, 1, 2, 3, 5, 4, 6, 7]
    assert steps.round_rows([6]).tolist() == [0, 2, 4, 6]
    assert [steps.shard_of_slot(s) for s in range(8)] == [0, 0, 1, 1, 2, 2, 3, 3]
    assert list(steps.shard_pages(3)) == list(range(3 * steps.num_pages // 4, steps.num_pages))


def test_prefix_hit_is_routed_to_the_shard_holding_it():
    """Turn 2 of a conversation goes to the shard holding turn 1's pages and snapshot, although another shard has
    more free pages (a request runs beside the prefix), and decodes what a cold single-device run does."""
    plain, sharded = models(data=2, tensor=2, expert=2)  # 8 slots on 4 shards
    options = SamplingOptions(max_new_tokens=6, temperature=0.8, seed=4)
    first = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6, 50, 1, 2]
    engine = Engine(sharded, max_batch=8, max_context=48, prefill_chunk=8, page_size=PAGE, prefix_cache=True)
    generated = dict(max_new_tokens=6, temperature=0.8, seed=4)
    (turn1,) = mimo_jax.generate(sharded, [first], engine=engine, **generated)
    assert engine.pages.stats().used == 0 and engine.pages.shards[0].stats().cached == 4  # on shard 0 (ties)
    beside = ([1, 2, 3, 4, 5, 6, 7, 8], SamplingOptions(max_new_tokens=20, seed=1))
    got = {"beside": [], "turn2": []}
    assert engine.steps.shard_of_slot(engine.add("beside", *beside)) == 0  # no hit anywhere, all ties
    for out in engine.step(max_tokens_per_round=1):
        got[out.request_id] += out.token_ids
    assert engine.pages.available(0) < engine.pages.available(1)  # shard 1 would win on free pages alone
    second = first + turn1.token_ids + [7, 8]
    assert engine.steps.shard_of_slot(engine.add("turn2", second, options)) == 0
    while engine.has_work():
        for out in engine.step(max_tokens_per_round=3):
            got[out.request_id] += out.token_ids
    assert engine.pages.stats().hits == 16  # turn 2 restored turn 1's 16 tokens (4 pages) and its ring snapshot
    cold = Engine(plain, max_batch=2, max_context=48, prefill_chunk=8, page_size=PAGE)
    want = run_by_step(cold, {"turn2": (second, options), "beside": beside})
    assert got == {r: o["tokens"] for r, o in want.items()}


def test_a_full_shard_preempts_and_waits_while_the_other_admits():
    """5 pages per shard. Shard 0 runs out (a and c): its newest request, c, is preempted (not d, newer but on
    shard 1) and waits for a's pages while shard 1 finishes b and admits e at once; every request's tokens equal
    a roomy single-device run."""
    plain, sharded = models(expert=2, tensor=4)
    kwargs = dict(max_batch=4, max_context=32, prefill_chunk=8, max_round_tokens=3, page_size=PAGE)
    engine = Engine(sharded, num_pages=10, **kwargs)
    assert engine.pages.pages_per_shard == 5
    requests = {  # added in this order: shards 0, 1, 0, 1 (equal free pages: most free slots, then the lowest)
        "a": ([3, 14, 15, 9, 2, 6, 5, 35], SamplingOptions(max_new_tokens=11)),
        "b": ([4, 6, 8], SamplingOptions(max_new_tokens=4)),
        "c": ([50, 1, 2, 9, 8, 7, 6, 5], SamplingOptions(max_new_tokens=8)),
        "d": ([9, 9, 1, 2], SamplingOptions(max_new_tokens=4)),
    }
    victims = []
    preempt = engine._preempt
    engine._preempt = lambda slot: (victims.append(engine._slots[slot].request_id), preempt(slot))[1]
    got = {r: [] for r in requests}

    def step():
        for out in engine.step(max_tokens_per_round=3):
            got[out.request_id] += out.token_ids
            if out.finished:
                done.add(out.request_id)

    done = set()
    assert [engine.steps.shard_of_slot(engine.add(r, *requests[r])) for r in requests] == [0, 1, 0, 1]
    while "b" not in done or "d" not in done:
        step()
        assert len(got["a"]) < 11
    c = engine._slots[engine._by_id["c"]]
    assert victims and set(victims) == {"c"} and not c.decoding and not c.pages  # c waits for a's pages
    requests["e"] = ([7, 7, 3], SamplingOptions(max_new_tokens=3))
    got["e"] = []
    assert engine.steps.shard_of_slot(engine.add("e", *requests["e"])) == 1  # the shard with free pages
    step()
    assert got["e"] and not engine._slots[engine._by_id["c"]].decoding  # e admitted while c still waits
    while engine.has_work():
        step()
    assert set(victims) == {"c"}
    want = run_by_step(Engine(plain, **kwargs), requests)
    assert got == {r: o["tokens"] for r, o in want.items()}
    assert engine.pages.stats().used == 0


def _collective_shapes(hlo: str) -> list[tuple[str, int]]:
    """(op, elements) of every array an all-gather / all-to-all / collective-permute returns in compiled HLO text."""
    found = []
    for match in re.finditer(r"= (\(?[^=]*?\)?) (all-gather|all-to-all|collective-permute)(?:-start)?\(", hlo):
        for dims in re.findall(r"\w+\[([\d,]*)\]", match.group(1)):
            found.append((match.group(2), int(np.prod([int(d) for d in dims.split(",") if d] or [1]))))
    return found


def test_compiled_steps_move_no_pool():
    """The decode round and the prefill chunk on data=2 x tensor=2 x expert=2 gather, exchange or permute nothing
    of a page shard's size (each shard reads and writes its own pages; only rows and outputs move)."""
    _, sharded = models(data=2, tensor=2, expert=2)
    engine = Engine(sharded, max_batch=8, max_context=64, prefill_chunk=8, page_size=PAGE, num_pages=512)
    pool = engine.cache.pools[0].k
    local = min(int(np.prod(s.data.shape)) for s in pool.addressable_shards)
    assert (
        local == pool.size // 4
    )  # pages split over the 4 (data, expert) shards; the one kv head on every tensor shard
    for name, fn, args in [
        ("decode", engine.decode_fn, engine.abstract_decode_args(4)),
        ("prefill", engine.prefill_fn, engine.abstract_prefill_args(8)),
    ]:
        hlo = fn.lower(*args).compile().as_text()
        big = [(op, n) for op, n in _collective_shapes(hlo) if n >= local // 2]
        assert not big, f"{name} moves pool-sized arrays: {big}"
