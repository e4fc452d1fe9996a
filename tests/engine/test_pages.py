"""The page allocator and SWA-aware prefix cache (`mimo_jax.engine.pages`) against a model of the device.

`Device` stands in for the engine: it records what each page and snapshot slot would hold (the tokens written
into it), so every hit is checked against the prompt it serves, and every reference against the page tables
the sequences hold.
"""

import collections
import os
import random
import subprocess
import sys

import numpy as np
import pytest

from mimo_jax.engine import pages as pages_module
from mimo_jax.engine.pages import KVPages, PrefixHit, ShardedKVPages


class Device:
    """What the engine would do with a `KVPages`, and what its pages and snapshot slots would hold."""

    def __init__(self, kv: KVPages):
        self.kv = kv
        self.page_tokens: dict[int, tuple[int, ...]] = {}  # page -> tokens written into it
        self.snapshot_tokens: dict[int, tuple[int, ...]] = {}  # slot -> the prefix its rings were taken after
        self.tables: dict[int, tuple[list[int], list[int]]] = {}  # sequence -> (tokens, page table)
        self.next_id = 0

    def write(self, tokens: list[int], table: list[int], start: int) -> None:
        ps = self.kv.page_size
        for i in range(start // ps, self.kv.pages_for(len(tokens))):
            self.page_tokens[table[i]] = tuple(tokens[i * ps : (i + 1) * ps])

    def check_hit(self, tokens: list[int], hit: PrefixHit, min_tail: int) -> None:
        ps = self.kv.page_size
        assert hit.num_tokens == len(hit.pages) * ps
        assert hit.num_tokens <= len(tokens) - min_tail or hit.num_tokens == 0
        for i, page in enumerate(hit.pages):
            assert self.page_tokens[page] == tuple(tokens[i * ps : (i + 1) * ps]), f"page {page} holds other tokens"
        if self.kv.needs_snapshot and hit.num_tokens:
            assert self.snapshot_tokens[hit.snapshot] == tuple(tokens[: hit.num_tokens])
        else:
            assert hit.snapshot is None

    def admit(self, tokens: list[int], reserve: int = 0, min_tail: int = 1) -> tuple[int, PrefixHit] | None:
        """Match, allocate the rest (plus `reserve` tokens of room), prefill, publish and snapshot the prompt's
        full pages; None (nothing held) when the pages are not there."""
        kv = self.kv
        hit = kv.match(tokens, min_tail)
        self.check_hit(tokens, hit, min_tail)
        new = kv.allocate(kv.pages_for(len(tokens) + reserve) - len(hit.pages))
        if new is None:
            kv.undo_match(hit)
            return None
        for page in new:
            assert kv.refcount(page) == 1
            assert all(page not in table for _, table in self.tables.values()), f"page {page} handed out twice"
        if hit.snapshot is not None:
            kv.unpin_snapshot(hit.snapshot)  # restored into the sequence's rings
        table = list(hit.pages) + new
        self.write(tokens, table, hit.num_tokens)
        kv.publish(tokens, table)
        boundary = len(tokens) // kv.page_size * kv.page_size
        if boundary:
            slot = kv.snapshot_slot(tokens, boundary)
            if slot is not None:
                self.snapshot_tokens[slot] = tuple(tokens[:boundary])
        seq = self.next_id
        self.next_id += 1
        self.tables[seq] = (list(tokens), table)
        return seq, hit

    def extend(self, seq: int, more: list[int]) -> bool:
        """Decode `more` tokens into the sequence (False when it needs a page and none is available)."""
        tokens, table = self.tables[seq]
        grow = self.kv.pages_for(len(tokens) + len(more)) - len(table)
        if grow > 0:
            new = self.kv.allocate(grow)
            if new is None:
                return False
            table.extend(new)
        start = len(tokens)
        tokens.extend(more)
        self.write(tokens, table, start)
        return True

    def finish(self, seq: int, publish: bool = True) -> None:
        tokens, table = self.tables.pop(seq)
        if publish:
            self.kv.publish(tokens, table)
        self.kv.release(table)

    def check(self) -> None:
        kv = self.kv
        held = collections.Counter(page for _, table in self.tables.values() for page in table)
        for page in range(kv.num_pages):
            assert kv.refcount(page) == held[page], f"page {page}"
        stats = kv.stats()
        assert stats.free + stats.used + stats.cached == kv.num_pages
        assert stats.used == len(held) == kv.used
        assert kv.available == stats.free + stats.cached
        assert stats.usage == pytest.approx(len(held) / kv.num_pages)
        assert stats.snapshots <= kv.num_snapshots and stats.pinned_snapshots == 0


def tokens_of(*pages_values, page_size=4) -> list[int]:
    """A prompt whose i-th page is filled with pages_values[i] (an int) or is the given list."""
    out = []
    for value in pages_values:
        out.extend(value if isinstance(value, list) else [value] * page_size)
    return out


def test_pages_for_and_construction_errors():
    kv = KVPages(10, 16, 2)
    assert [kv.pages_for(n) for n in (0, 1, 16, 17, 32)] == [0, 1, 1, 2, 2]
    for args, name in [((0, 16, 2), "num_pages"), ((4, 0, 2), "page_size"), ((4, 16, -1), "num_snapshots")]:
        with pytest.raises(ValueError, match=name):
            KVPages(*args)
    with pytest.raises(ValueError, match="tokens"):
        kv.pages_for(-1)


def test_allocate_and_release_keep_every_page_in_one_place():
    kv = KVPages(6, 4, 0, prefix_cache=False)
    a = kv.allocate(4)
    assert sorted(a) == [0, 1, 2, 3] and kv.used == 4 and kv.usage == pytest.approx(4 / 6)
    assert kv.allocate(3) is None and kv.used == 4  # a failed allocation changes nothing
    b = kv.allocate(2)
    assert set(a).isdisjoint(b) and kv.available == 0 and kv.allocate(1) is None
    assert kv.allocate(0) == []
    kv.release(a)
    assert kv.num_free == 4 and kv.available == 4 and kv.num_cached == 0
    with pytest.raises(ValueError, match=f"page {a[0]} released 1 time"):
        kv.release([a[0]])
    with pytest.raises(ValueError, match="page 6 is not a page id"):
        kv.release([6])
    with pytest.raises(ValueError, match=f"page {b[0]} released 2 time"):
        kv.release([b[0], b[0]])
    assert kv.refcount(b[0]) == 1  # the failed release changed nothing
    with pytest.raises(ValueError, match="n must be an integer"):
        kv.allocate(-1)


def test_random_operations_keep_the_invariants():
    """A seeded random mix of admissions (with shared prefixes), decode, finishes, resets and aborted
    admissions, in a pool far too small: references match the page tables, pages are conserved, and every
    hit's pages and snapshot hold exactly the prompt's tokens."""
    rng = random.Random(1234)
    kv = KVPages(40, 4, 5)
    device = Device(kv)
    bases = [[rng.randrange(50) for _ in range(rng.randrange(4, 40))] for _ in range(6)]
    hits = 0
    for _ in range(1500):
        op = rng.random()
        if op < 0.4:
            tokens = list(rng.choice(bases))[: rng.randrange(1, 40)] + [
                rng.randrange(50) for _ in range(rng.randrange(1, 9))
            ]
            admitted = device.admit(tokens, reserve=rng.randrange(0, 6), min_tail=rng.randrange(1, 6))
            hits += bool(admitted and admitted[1].num_tokens)
        elif op < 0.7 and device.tables:
            device.extend(rng.choice(list(device.tables)), [rng.randrange(50) for _ in range(rng.randrange(1, 7))])
        elif op < 0.97 and device.tables:
            device.finish(rng.choice(list(device.tables)), publish=rng.random() < 0.7)
        elif op >= 0.99:
            kv.reset_prefix_cache()
            assert kv.num_cached == 0 and kv.stats().snapshots == 0
        device.check()
    assert hits > 40 and kv.stats().evicted_pages > 50 and kv.stats().evicted_snapshots > 10
    for seq in list(device.tables):
        device.finish(seq)
    device.check()
    assert kv.used == 0 and kv.available == kv.num_pages


def test_unreferenced_pages_are_evicted_least_recently_released_first_tail_first():
    kv = KVPages(8, 4, 0, needs_snapshot=False)
    a, b = tokens_of(1, 2), tokens_of(3, 4)
    pa, pb = kv.allocate(2), kv.allocate(2)
    kv.publish(a, pa)
    kv.publish(b, pb)
    kv.release(pa)
    kv.release(pb)
    assert kv.num_cached == 4 and kv.available == 8
    assert kv.allocate(4) == [4, 5, 6, 7]  # free pages go first: nothing evicted
    assert kv.stats().evicted_pages == 0
    assert kv.allocate(1) == [pa[1]]  # then a's tail, released before b
    assert kv.lookup(a + [0], 1) == 4 and kv.lookup(b + [0], 1) == 8
    hit = kv.match(b + [0], 1)  # a hit takes b's pages out of the cache; released again they are the newest
    kv.release(hit.pages)
    assert kv.allocate(1) == [pa[0]]
    assert kv.lookup(a + [0], 1) == 0
    assert kv.allocate(1) == [pb[1]]
    assert kv.stats().evicted_pages == 3


def test_publishing_a_cached_prefix_again_keeps_it_longer():
    kv = KVPages(4, 4, 0, needs_snapshot=False)
    a, b = tokens_of(1), tokens_of(2)
    pa, pb = kv.allocate(1), kv.allocate(1)
    kv.publish(a, pa)
    kv.publish(b, pb)
    kv.release(pa)
    kv.release(pb)
    duplicate = kv.allocate(1)  # a request prefilled a's tokens again without a hit
    kv.publish(a, duplicate)
    kv.release(duplicate)
    assert kv.allocate(3) == [3, duplicate[0], pb[0]]  # b is now the least recently seen


def test_evicting_a_page_frees_the_pages_indexed_after_it():
    kv = KVPages(6, 4, 0, needs_snapshot=False)
    a, b = tokens_of(1, 2), tokens_of(1, 3)
    pa, pb = kv.allocate(2), kv.allocate(2)  # b was prefilled without a hit: its first page duplicates a's
    kv.publish(a, pa)
    kv.release(pa)
    kv.publish(b, pb)  # b's second page is indexed after a's first page
    kv.release(pb)
    assert kv.num_cached == 3 and kv.num_free == 3
    assert kv.match(b + [0], 1).pages == (pa[0], pb[1])
    kv.release([pa[0], pb[1]])  # now pa[1] is the oldest, then pb[1], then pa[0]
    assert kv.allocate(4) == [4, 5, pb[0], pa[1]]  # the free list first (in release order), then the LRU page
    assert kv.allocate(1) == [pb[1]]
    assert kv.allocate(1) == [pa[0]]  # evicting a's first page frees what was indexed after it
    assert kv.lookup(b + [0], 1) == 0 and kv.stats().evicted_pages == 3


def test_only_whole_pages_match_and_a_hit_can_end_inside_a_prompt_page():
    kv = KVPages(10, 4, 0, needs_snapshot=False)
    tokens = list(range(12))
    pages = kv.allocate(3)
    kv.publish(tokens + [99, 98], pages + kv.allocate(1))  # the partial fourth page is not published
    assert kv.lookup(tokens[:10] + [50], 1) == 8  # differs inside page 3: pages 1-2 match
    assert kv.lookup(tokens[:6] + [50, 51, 52], 1) == 4  # differs inside page 2
    assert kv.lookup([7] + tokens[1:], 1) == 0  # differs in the first token
    assert kv.lookup(tokens + [99, 98, 97], 1) == 12  # nothing beyond the full pages is indexed
    assert kv.lookup(np.array(tokens[:10] + [50], np.int32), 1) == 8  # numpy ids hash as lists do
    hit = kv.match(tokens[:10] + [50], 1)
    assert hit == PrefixHit(tuple(pages[:2]), 8, None, 11)
    assert [kv.refcount(p) for p in pages] == [2, 2, 1]


def test_hits_end_at_a_snapshot_and_leave_min_tail_tokens():
    kv = KVPages(10, 4, 4)
    tokens = tokens_of(1, 2, 3, 4)
    pages = kv.allocate(4)
    kv.publish(tokens, pages)
    assert kv.lookup(tokens + [0], 1) == 0  # pages but no snapshot: no usable hit
    slot8 = kv.snapshot_slot(tokens, 8)
    assert slot8 == 0
    hit = kv.match(tokens + [0], 1)
    assert (hit.num_tokens, hit.pages, hit.snapshot) == (8, tuple(pages[:2]), slot8)
    kv.unpin_snapshot(hit.snapshot)
    slot16 = kv.snapshot_slot(tokens, 16)
    assert kv.lookup(tokens + [0], 1) == 16
    assert kv.lookup(tokens, 1) == 8  # the whole prompt is cached, but one token must be prefilled
    assert kv.lookup(tokens + [0] * 4, 5) == 8  # 20 tokens, 5 left to prefill: at most 3 pages, snapshot at 2
    assert kv.lookup(tokens + [0] * 4, 4) == 16
    hit = kv.match(tokens + [0], 1)
    assert hit.snapshot == slot16 and hit.num_tokens == 16
    assert kv.stats().pinned_snapshots == 1
    with pytest.raises(ValueError, match="min_tail"):
        kv.match(tokens, 0)


def test_colliding_keys_never_give_a_false_hit(monkeypatch):
    monkeypatch.setattr(pages_module, "page_key", lambda parent, page_tokens: b"same key")
    kv = KVPages(10, 4, 0, needs_snapshot=False)
    a = tokens_of(1, 2)
    b = tokens_of(3, 2)  # the same second page after another first page
    c = tokens_of(1, 5)
    pa = kv.allocate(2)
    kv.publish(a, pa)
    assert kv.lookup(b + [0], 1) == 0
    assert kv.lookup(c + [0], 1) == 4
    pb = kv.allocate(2)
    kv.publish(b, pb)
    pc = kv.allocate(2)
    kv.publish(c, pc)
    assert kv.match(a + [0], 1).pages == tuple(pa)
    assert kv.match(b + [0], 1).pages == tuple(pb)
    assert kv.match(c + [0], 1).pages == (pa[0], pc[1])


def test_publishing_an_indexed_prefix_keeps_the_existing_pages():
    kv = KVPages(6, 4, 2)
    tokens = tokens_of(1, 2)
    first, second = kv.allocate(2), kv.allocate(2)  # two requests prefilled the same prompt side by side
    kv.publish(tokens, first)
    kv.publish(tokens, second)
    assert kv.snapshot_slot(tokens, 8) == 0
    assert kv.snapshot_slot(tokens, 8) is None  # already saved: no second copy
    kv.release(second)
    assert kv.num_free == 4 and kv.num_cached == 0  # the duplicates were not indexed
    kv.release(first)
    assert kv.num_cached == 2
    assert kv.match(tokens + [0], 1).pages == tuple(first)
    with pytest.raises(ValueError, match=f"page {first[0]} is already indexed"):
        kv.publish(tokens_of(7, 7), first)
    with pytest.raises(ValueError, match="page 5 is not allocated"):
        kv.publish(tokens, [5, 4])
    with pytest.raises(ValueError, match="8 tokens fill 2 pages but the page table has 1"):
        kv.publish(tokens, first[:1])
    with pytest.raises(ValueError, match="token ids must lie"):
        kv.publish([-1, 2, 3, 4], first)
    with pytest.raises(ValueError, match="integer ids"):
        kv.lookup([0.5] * 8, 1)


def test_snapshot_slots_are_reused_lru_first_and_never_while_pinned():
    kv = KVPages(20, 4, 2)
    prompts = {name: tokens_of(value) for name, value in zip("ABCDE", range(1, 6), strict=True)}
    for tokens in prompts.values():
        kv.publish(tokens, kv.allocate(1))
    assert kv.snapshot_slot(prompts["A"], 4) == 0
    assert kv.snapshot_slot(prompts["B"], 4) == 1
    assert kv.snapshot_slot(prompts["C"], 4) == 0  # A's was the oldest
    assert kv.lookup(prompts["A"] + [0], 1) == 0
    hit_b = kv.match(prompts["B"] + [0], 1)
    assert hit_b.snapshot == 1
    assert kv.snapshot_slot(prompts["D"], 4) == 0  # C's: B's is pinned
    hit_d = kv.match(prompts["D"] + [0], 1)
    assert kv.snapshot_slot(prompts["E"], 4) is None  # both pinned
    kv.unpin_snapshot(hit_b.snapshot)
    assert kv.snapshot_slot(prompts["E"], 4) == 1
    assert kv.stats().evicted_snapshots == 3
    kv.unpin_snapshot(hit_d.snapshot)
    with pytest.raises(ValueError, match="snapshot slot 0 is not pinned"):
        kv.unpin_snapshot(hit_d.snapshot)
    with pytest.raises(ValueError, match="not a multiple of the page size 4"):
        kv.snapshot_slot(prompts["A"] * 2, 6)
    with pytest.raises(ValueError, match="boundary 8 is past the 4 tokens"):
        kv.snapshot_slot(prompts["A"], 8)
    with pytest.raises(ValueError, match="boundary"):
        kv.snapshot_slot(prompts["A"], 0)
    assert kv.snapshot_slot(tokens_of(9), 4) is None  # never published


def test_evicting_a_chain_page_drops_its_snapshots():
    kv = KVPages(4, 4, 2)
    tokens = tokens_of(1, 2, 3)
    pages = kv.allocate(3)
    kv.publish(tokens, pages)
    assert kv.snapshot_slot(tokens, 4) == 0 and kv.snapshot_slot(tokens, 12) == 1
    kv.release(pages)
    held = kv.allocate(1)
    assert kv.lookup(tokens + [0], 1) == 12
    assert kv.allocate(1) == [pages[2]]  # the tail: the snapshot at 12 goes with it
    assert kv.stats().snapshots == 1 and kv.lookup(tokens + [0], 1) == 4
    hit = kv.match(tokens + [0], 1)  # pins slot 0; the caller then releases its pages before unpinning
    assert hit.snapshot == 0
    kv.release(hit.pages)
    assert kv.allocate(2) == [pages[1], pages[0]]  # evicts the whole chain: the pinned snapshot is dropped
    assert kv.stats().snapshots == 0 and kv.stats().pinned_snapshots == 1
    kv.publish(tokens_of(5), held)
    assert kv.snapshot_slot(tokens_of(5), 4) == 1  # slot 0 stays taken while pinned
    kv.unpin_snapshot(0)
    kv.publish(tokens_of(6), [pages[2]])
    assert kv.snapshot_slot(tokens_of(6), 4) == 0
    assert kv.stats().snapshots == 2 and kv.stats().pinned_snapshots == 0


def test_undo_match_gives_back_pages_pin_and_stats():
    kv = KVPages(4, 4, 1)
    tokens = tokens_of(1, 2)
    pages = kv.allocate(2)
    kv.publish(tokens, pages)
    kv.snapshot_slot(tokens, 8)
    kv.release(pages)
    hit = kv.match(tokens + [0] * 30, 1)
    assert hit.num_tokens == 8 and kv.num_cached == 0
    assert kv.allocate(kv.pages_for(38) - 2) is None  # needs 8 pages, 2 are there
    kv.undo_match(hit)
    stats = kv.stats()
    assert (stats.queries, stats.hits, stats.pinned_snapshots, stats.cached) == (0, 0, 0, 2)
    with pytest.raises(ValueError, match="not pinned"):
        kv.undo_match(hit)
    assert kv.num_cached == 2  # the failed undo changed nothing


def test_prefix_cache_off():
    kv = KVPages(4, 4, 2, prefix_cache=False)
    tokens = tokens_of(1, 2)
    pages = kv.allocate(2)
    kv.publish(tokens, pages)
    assert kv.snapshot_slot(tokens, 8) is None
    assert kv.match(tokens + [0], 1) == PrefixHit()
    kv.release(pages)
    assert kv.num_free == 4 and kv.num_cached == 0
    assert (kv.stats().queries, kv.stats().hits) == (0, 0)


def test_without_swa_layers_hits_need_no_snapshot():
    kv = KVPages(4, 4, 2, needs_snapshot=False)
    tokens = tokens_of(1, 2)
    pages = kv.allocate(2)
    kv.publish(tokens, pages)
    assert kv.snapshot_slot(tokens, 8) is None
    kv.release(pages)
    hit = kv.match(tokens + [0], 1)
    assert hit == PrefixHit(tuple(pages), 8, None, 9)
    stats = kv.stats()
    assert (stats.queries, stats.hits, stats.hit_rate) == (9, 8, pytest.approx(8 / 9))


def test_reset_prefix_cache_forgets_everything_but_what_sequences_hold():
    kv = KVPages(6, 4, 2)
    device = Device(kv)
    seq, _ = device.admit(tokens_of(1, 2, [3]))
    done, _ = device.admit(tokens_of(4, 5, [6]))
    device.finish(done)
    assert kv.num_cached == 2 and kv.stats().snapshots == 2
    assert kv.reset_prefix_cache() == 2
    assert kv.num_cached == 0 and kv.stats().snapshots == 0 and kv.lookup(tokens_of(1, 2, [3]), 1) == 0
    device.check()
    device.finish(seq, publish=False)
    assert kv.num_free == 6


def trace(kv: KVPages, seed: int) -> list:
    """A seeded run of mixed calls; what it returns is everything the calls answered."""
    rng = random.Random(seed)
    device = Device(kv)
    out = []
    for _ in range(300):
        if rng.random() < 0.5 or not device.tables:
            tokens = [rng.randrange(3) for _ in range(rng.randrange(1, 30))]
            admitted = device.admit(tokens, reserve=rng.randrange(4))
            out.append(admitted and (admitted[1], device.tables[admitted[0]][1]))
        else:
            seq = rng.choice(list(device.tables))
            out.append((seq, device.extend(seq, [rng.randrange(3)] * 5)))
            if rng.random() < 0.5:
                device.finish(seq)
    out.append(kv.stats())
    return out


def test_two_instances_fed_the_same_calls_agree():
    assert trace(KVPages(24, 4, 3), seed=7) == trace(KVPages(24, 4, 3), seed=7)
    assert trace(KVPages(24, 4, 3), seed=7) != trace(KVPages(24, 4, 3), seed=8)


def test_processes_with_different_hash_seeds_agree():
    """Keys and decisions do not depend on Python's salted hash (as on several hosts)."""
    path = pages_module.__file__
    script = (
        "import importlib.util, random, sys\n"
        f"spec = importlib.util.spec_from_file_location('pages', {path!r})\n"  # the module alone: no jax import
        "pages = importlib.util.module_from_spec(spec); sys.modules['pages'] = pages; spec.loader.exec_module(pages)\n"
        "kv, rng, out = pages.KVPages(16, 4, 2, needs_snapshot=False), random.Random(0), []\n"
        "for _ in range(200):\n"
        "    t = [rng.randrange(3) for _ in range(rng.randrange(1, 20))]\n"
        "    h = kv.match(t, 1); p = kv.allocate(kv.pages_for(len(t)) - len(h.pages))\n"
        "    if p is None: kv.undo_match(h); continue\n"
        "    kv.publish(t, list(h.pages) + p); kv.release(list(h.pages) + p); out.append(h)\n"
        "print(out, kv.stats(), pages.page_key(b'', bytes(range(16))).hex())\n"
    )
    outputs = {
        subprocess.run(
            [sys.executable, "-c", script],
            env={**os.environ, "PYTHONHASHSEED": str(seed)},
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        for seed in (1, 2)
    }
    assert len(outputs) == 1 and "num_tokens=4" in outputs.pop()


@pytest.mark.parametrize("num_pages, num_snapshots", [(2400, 160), (600, 16)])
def test_multi_turn_agent_trace(num_pages, num_snapshots):
    """16 conversations, each turn = the previous conversation + ~200 tokens (a reply and a new user message),
    4 running at a time in a random order. With room for everything, every turn reuses its previous prompt's
    full pages; in a pool a quarter of that size, hits still happen, pages are evicted, and nothing leaks."""
    rng = random.Random(0)
    kv = KVPages(num_pages, 16, num_snapshots)
    device = Device(kv)
    histories = [[rng.randrange(1000) for _ in range(rng.randrange(100, 300))] for _ in range(16)]
    turns = [0] * 16
    previous_boundary = [0] * 16
    waiting, running = list(range(16)), {}
    hit_tokens = prompt_tokens = waits = 0
    while waiting or running:
        while waiting and len(running) < 4:
            conv = waiting.pop(rng.randrange(len(waiting)))
            prompt = histories[conv]
            admitted = device.admit(prompt, reserve=1)
            if admitted is None:
                waits += 1
                waiting.append(conv)
                break
            seq, hit = admitted
            hit_tokens += hit.num_tokens
            prompt_tokens += len(prompt)
            if num_pages == 2400:
                assert hit.num_tokens == previous_boundary[conv]
            previous_boundary[conv] = len(prompt) // 16 * 16
            running[conv] = seq
        for conv, seq in list(running.items()):  # one round: every running conversation decodes up to 8 tokens
            reply = [rng.randrange(1000) for _ in range(8)]
            if not device.extend(seq, reply):
                continue
            if len(device.tables[seq][0]) - len(histories[conv]) >= rng.randrange(40, 60):
                del running[conv]
                histories[conv] = device.tables[seq][0] + [rng.randrange(1000) for _ in range(rng.randrange(140, 160))]
                device.finish(seq)
                turns[conv] += 1
                if turns[conv] < 8:
                    waiting.append(conv)
        device.check()
    stats = kv.stats()
    assert stats.used == 0 and kv.available == num_pages and stats.pinned_snapshots == 0
    assert (stats.queries, stats.hits) == (prompt_tokens, hit_tokens)
    if num_pages == 2400:
        assert stats.evicted_pages == 0 and stats.hit_rate > 0.75
    else:
        assert stats.evicted_pages > 100 and stats.hit_rate > 0.3


def test_sharded_pages_keep_each_shard_to_its_own_range():
    """`ShardedKVPages`: shard d allocates, indexes, matches and snapshots only in its own page and snapshot-slot
    ranges (global ids), a hit on one shard is nothing on another, and the stats are the shards' sums."""
    kv = ShardedKVPages(12, 4, 4, shards=2, needs_snapshot=True)
    assert (kv.pages_per_shard, kv.snapshots_per_shard) == (6, 2)
    a = kv.allocate(4, shard=1)
    assert a == [6, 7, 8, 9] and kv.available(1) == 2 and kv.available(0) == 6
    assert kv.allocate(3, shard=1) is None and kv.available(1) == 2  # shard 1 full, shard 0 untouched
    tokens = list(range(1, 14))  # 3 whole pages and one token
    kv.publish(tokens, a)
    assert kv.snapshot_slot(tokens, 8, shard=1) == 2  # shard 1's first snapshot slot
    assert kv.lookup(tokens, 1, shard=1) == 8 and kv.lookup(tokens, 1, shard=0) == 0
    hit = kv.match(tokens, 1, shard=1)
    assert (hit.pages, hit.num_tokens, hit.snapshot, hit.shard) == ((6, 7), 8, 2, 1)
    assert kv.refcount(6) == 2
    kv.undo_match(hit)
    assert kv.refcount(6) == 1 and kv.stats().hits == 0 and kv.stats().queries == 0
    hit = kv.match(tokens, 1, shard=1)
    kv.unpin_snapshot(hit.snapshot)
    b = kv.allocate(2, shard=0)
    assert b == [0, 1]
    with pytest.raises(ValueError, match="on one shard"):
        kv.release([1, 6])
    kv.release(b)
    kv.release(hit.pages)
    kv.release(a)
    stats = kv.stats()
    assert (stats.num_pages, stats.used, stats.cached, stats.free, stats.hits, stats.snapshots) == (12, 0, 3, 9, 8, 1)
    assert kv.reset_prefix_cache() == 3 and kv.stats().free == 12
    with pytest.raises(ValueError, match="split evenly"):
        ShardedKVPages(13, 4, 4, shards=2)
    with pytest.raises(ValueError, match="shard 2"):
        kv.allocate(1, shard=2)


def test_one_shard_is_one_kvpages():
    """With one shard the wrapper makes exactly the calls of a `KVPages` (the engine on one device or a
    tensor-only mesh)."""
    random.seed(7)
    one, plain = ShardedKVPages(16, 4, 3, shards=1), KVPages(16, 4, 3)
    held = []
    for _ in range(200):
        if held and random.random() < 0.4:
            pages = held.pop(random.randrange(len(held)))
            one.release(pages)
            plain.release(pages)
            continue
        tokens = [random.randrange(3) for _ in range(random.randrange(2, 14))]
        hit, want = one.match(tokens, 1), plain.match(tokens, 1)
        assert hit == want
        pages = one.allocate(one.pages_for(len(tokens)) - len(hit.pages))
        assert pages == plain.allocate(plain.pages_for(len(tokens)) - len(want.pages))
        if pages is None:
            one.undo_match(hit)
            plain.undo_match(want)
            continue
        if hit.snapshot is not None:
            one.unpin_snapshot(hit.snapshot)
            plain.unpin_snapshot(want.snapshot)
        table = list(hit.pages) + pages
        one.publish(tokens, table)
        plain.publish(tokens, table)
        boundary = len(tokens) // 4 * 4
        if boundary:
            assert one.snapshot_slot(tokens, boundary) == plain.snapshot_slot(tokens, boundary)
        held.append(table)
        assert one.stats() == plain.stats()
