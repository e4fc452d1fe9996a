"""Host-side bookkeeping of the paged KV cache: a page allocator and an SWA-aware prefix cache (no JAX).

What it manages (the device arrays live in the engine): the full-attention layers share one pool of
`num_pages` pages of `page_size` tokens (a sequence's page table lists its pages; position p lives in page
p // page_size); SWA layers (and the MTP layers, also SWA) keep a ring of the last window per slot, not
paged; a store of `num_snapshots` copies of one slot's SWA rings keeps their state at page boundaries.

Reusing full-layer pages is exact only if the SWA rings are restored to their state at the hit's end too:
each SWA layer reads a window of the layer below, so what one key depends on grows by a window per layer,
and recomputing the last window is not exact. So a hit ends where a snapshot was taken, unless the model
has no SWA layer (`needs_snapshot=False`).

The index is a hashed page chain (as vLLM's): page i's key is a hash of page i-1's key and page i's token
ids. Each entry also keeps its tokens and its parent entry, and a lookup compares both, so colliding keys
never give a false hit. Lookups walk from the first page, so evicting a page also drops what was indexed
after it (its unreferenced pages are freed at once) and the snapshots at their ends. Unreferenced cached
pages are evicted least recently released first; `release` frees a page table back to front so that a
chain's tail goes before its head.

Everything is deterministic (no clock, no salted `hash()`, ordered containers): on several hosts every
process makes the same calls and reaches the same state.

On a mesh whose slots split over D (data x expert) shards, the pools' pages split the same way and each shard
has its own pages, snapshot slots, LRU and index (`ShardedKVPages`: one `KVPages` per shard, global ids): a
slot's pages come from its shard, and a prefix hit reuses pages of one shard only.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import heapq
from collections.abc import Sequence

import numpy as np

KEY_BYTES = 16
TOKEN_BYTES = np.dtype("<i4")  # the bytes a page's tokens are hashed and compared as
MAX_TOKEN_ID = 2**31 - 1


def page_key(parent_key: bytes, page_tokens: bytes) -> bytes:
    """A page's chain key: blake2b of the previous page's key (b"" for the first page) and its token bytes."""
    return hashlib.blake2b(parent_key + page_tokens, digest_size=KEY_BYTES).digest()


@dataclasses.dataclass(frozen=True)
class PrefixHit:
    """Cached pages that a prompt can start from; the caller owns `pages` (release them) and the pin on
    `snapshot` (unpin it once restored). Empty when `num_tokens` is 0."""

    pages: tuple[int, ...] = ()
    num_tokens: int = 0  # tokens covered by `pages` (a multiple of the page size)
    snapshot: int | None = None  # store slot of the SWA rings at `num_tokens`; None without SWA layers or hit
    query_tokens: int = 0  # prompt tokens looked up (what `undo_match` takes back from the stats)
    shard: int = 0  # the page shard `pages` and `snapshot` are on (`ShardedKVPages`)


@dataclasses.dataclass(frozen=True)
class PageStats:
    """Counts for /metrics. `queries` and `hits` count tokens (vLLM's prefix_cache_queries / _hits)."""

    num_pages: int
    used: int  # pages referenced by at least one sequence
    cached: int  # unreferenced pages kept in the prefix index (evictable)
    free: int
    usage: float  # used / num_pages
    queries: int  # prompt tokens looked up
    hits: int  # prompt tokens served from the cache
    evicted_pages: int  # cached pages evicted to make room (and the pages indexed after them)
    snapshots: int  # store slots holding a usable snapshot
    pinned_snapshots: int
    evicted_snapshots: int  # snapshots overwritten by newer ones

    @property
    def hit_rate(self) -> float:
        return self.hits / self.queries if self.queries else 0.0


@dataclasses.dataclass(eq=False, slots=True)
class _Entry:
    """One indexed page: its tokens, the entry before it in the chain, and the entries indexed after it."""

    key: bytes
    tokens: bytes
    page: int
    parent: _Entry | None
    children: dict[int, _Entry] = dataclasses.field(default_factory=dict)  # by page id
    snapshot: int | None = None  # store slot of the SWA rings at the end of this page


@dataclasses.dataclass(eq=False, slots=True)
class _Snapshot:
    entry: _Entry | None  # None: dropped while pinned; the slot is freed on the last unpin
    pins: int = 0


def _check_count(name: str, value: int, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


class KVPages:
    """Page allocator (reference counts, free list, LRU cache of unreferenced pages), prefix index and
    snapshot-slot bookkeeping for one engine. See the module docstring for the memory model."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_snapshots: int,
        *,
        prefix_cache: bool = True,
        needs_snapshot: bool = True,
    ) -> None:
        self.num_pages = _check_count("num_pages", num_pages, 1)
        self.page_size = _check_count("page_size", page_size, 1)
        self.num_snapshots = _check_count("num_snapshots", num_snapshots, 0)
        self.prefix_cache = bool(prefix_cache)
        self.needs_snapshot = bool(needs_snapshot)
        self._refs = [0] * self.num_pages
        self._free: collections.deque[int] = collections.deque(range(self.num_pages))
        self._cached: collections.OrderedDict[int, None] = collections.OrderedDict()  # LRU first
        self._index: dict[bytes, list[_Entry]] = {}  # key -> entries (more than one only on a hash collision)
        self._entry_of: dict[int, _Entry] = {}  # indexed page -> its entry
        self._snapshots: collections.OrderedDict[int, _Snapshot] = collections.OrderedDict()  # LRU first
        self._free_slots = list(range(self.num_snapshots))  # a heap: the lowest free slot first
        self._queries = self._hits = self._evicted_pages = self._evicted_snapshots = 0

    # allocation

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` positions."""
        return -(-_check_count("tokens", tokens, 0) // self.page_size)

    @property
    def available(self) -> int:
        """Pages `allocate` can hand out: free ones and unreferenced cached ones."""
        return len(self._free) + len(self._cached)

    @property
    def used(self) -> int:
        return self.num_pages - self.available

    @property
    def usage(self) -> float:
        return self.used / self.num_pages

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_cached(self) -> int:
        return len(self._cached)

    def refcount(self, page: int) -> int:
        return self._refs[self._check_page(page)]

    def allocate(self, n: int) -> list[int] | None:
        """n pages with reference count 1, evicting unreferenced cached pages (LRU first) only as needed;
        None (and nothing changed) when fewer than n are available."""
        n = _check_count("n", n, 0)
        if n > self.available:
            return None
        while len(self._free) < n:
            self._unindex(self._entry_of[next(iter(self._cached))], evicting=True)
        pages = [self._free.popleft() for _ in range(n)]
        for page in pages:
            self._refs[page] = 1
        return pages

    def release(self, pages: Sequence[int]) -> None:
        """Drop one reference to each page (all checked first: on error nothing changes). A page at 0 stays
        cached if it is indexed, else it is free. Released back to front: a chain's tail is evicted first."""
        counts = collections.Counter(self._check_page(page) for page in pages)
        for page, count in counts.items():
            if self._refs[page] < count:
                held = self._refs[page]
                raise ValueError(f"page {page} released {count} time(s) but holds {held} reference(s): double release?")
        for page in reversed(pages):
            page = int(page)
            self._refs[page] -= 1
            if self._refs[page] == 0:
                if page in self._entry_of:
                    self._cached[page] = None
                else:
                    self._free.append(page)

    # prefix index

    def publish(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """Index the full pages of a sequence (tokens[: full pages * page_size], held by the caller) so later
        prompts can match them. A page whose prefix is already indexed keeps the existing entry (the caller's
        duplicate is not indexed and is freed on its last release)."""
        num_full = len(tokens) // self.page_size
        if len(pages) < num_full:
            raise ValueError(f"{len(tokens)} tokens fill {num_full} pages but the page table has {len(pages)}")
        for page in pages[:num_full]:
            if self._refs[self._check_page(page)] == 0:
                raise ValueError(f"page {page} is not allocated: only pages the caller holds can be published")
        if not self.prefix_cache:
            return
        parent: _Entry | None = None
        for i, page_tokens in enumerate(self._page_bytes(tokens, num_full)):
            page = int(pages[i])
            key = page_key(parent.key if parent else b"", page_tokens)
            entry = self._find(key, parent, page_tokens)
            own = self._entry_of.get(page)
            if entry is None and own is None:
                entry = _Entry(key, page_tokens, page, parent)
                self._index.setdefault(key, []).append(entry)
                self._entry_of[page] = entry
                if parent is not None:
                    parent.children[page] = entry
            elif own is not None and own is not entry:
                end = (i + 1) * self.page_size
                raise ValueError(f"page {page} is already indexed under another prefix than tokens[:{end}]")
            elif entry.page in self._cached:
                self._cached.move_to_end(entry.page)  # seen again: keep it longer
            parent = entry

    def lookup(self, tokens: Sequence[int], min_tail: int) -> int:
        """Tokens `match` would reuse now (no references taken, no stats counted)."""
        return len(self._usable_chain(tokens, min_tail)) * self.page_size

    def match(self, tokens: Sequence[int], min_tail: int) -> PrefixHit:
        """The longest usable cached prefix of a prompt: whole indexed pages, ending at a snapshot (when the
        model needs one), leaving at least `min_tail` >= 1 tokens to prefill. Its pages get a reference and
        its snapshot a pin, both the caller's. Empty hit when nothing is usable or the cache is off."""
        chain = self._usable_chain(tokens, min_tail)
        if not self.prefix_cache:
            return PrefixHit()
        self._queries += len(tokens)
        if not chain:
            return PrefixHit(query_tokens=len(tokens))
        for entry in chain:
            if self._refs[entry.page] == 0:
                del self._cached[entry.page]
            self._refs[entry.page] += 1
        snapshot = chain[-1].snapshot if self.needs_snapshot else None
        if snapshot is not None:
            self._snapshots[snapshot].pins += 1
            self._snapshots.move_to_end(snapshot)
        num_tokens = len(chain) * self.page_size
        self._hits += num_tokens
        return PrefixHit(tuple(entry.page for entry in chain), num_tokens, snapshot, len(tokens))

    def undo_match(self, hit: PrefixHit) -> None:
        """Give a hit back unused (e.g. its request could not get the rest of its pages): release its pages,
        unpin its snapshot and take it out of the stats, so a retry is not counted twice."""
        if hit.snapshot is not None:
            self._check_pinned(hit.snapshot)
        self.release(hit.pages)
        if hit.snapshot is not None:
            self.unpin_snapshot(hit.snapshot)
        if self.prefix_cache:
            self._queries -= hit.query_tokens
            self._hits -= hit.num_tokens

    # snapshots

    def snapshot_slot(self, tokens: Sequence[int], boundary: int) -> int | None:
        """The store slot to copy a slot's SWA rings into, as the state after tokens[:boundary] (a multiple of
        the page size, its pages already published); the LRU unpinned snapshot makes room. None (copy nothing)
        when snapshots are off, all slots are pinned, the chain is not (or no longer) indexed, or a snapshot
        of that boundary exists already. The snapshot is matchable at once: copy before the next restore."""
        boundary = _check_count("boundary", boundary, 1)
        if boundary % self.page_size:
            raise ValueError(f"boundary {boundary} is not a multiple of the page size {self.page_size}")
        if boundary > len(tokens):
            raise ValueError(f"boundary {boundary} is past the {len(tokens)} tokens given")
        if not (self.prefix_cache and self.needs_snapshot and self.num_snapshots):
            return None
        chain = self._indexed_chain(tokens, boundary // self.page_size)
        if len(chain) < boundary // self.page_size:
            return None
        entry = chain[-1]
        if entry.snapshot is not None:
            self._snapshots.move_to_end(entry.snapshot)
            return None
        if not self._free_slots:
            victim = next((slot for slot, snap in self._snapshots.items() if snap.pins == 0), None)
            if victim is None:
                return None
            self._drop_snapshot(victim)
            self._evicted_snapshots += 1
        slot = heapq.heappop(self._free_slots)
        entry.snapshot = slot
        self._snapshots[slot] = _Snapshot(entry)
        return slot

    def unpin_snapshot(self, slot: int) -> None:
        """The caller restored the hit's snapshot (or gave up on it): it may be overwritten again."""
        snap = self._check_pinned(slot)
        snap.pins -= 1
        if snap.pins == 0 and snap.entry is None:
            del self._snapshots[slot]
            heapq.heappush(self._free_slots, slot)

    # maintenance and metrics

    def reset_prefix_cache(self) -> int:
        """Forget the whole index (vLLM's /reset_prefix_cache): unreferenced cached pages return to the free
        list (their count is returned), referenced ones stay with their owners until released, and every
        snapshot is dropped (a pinned one keeps its slot until unpinned)."""
        freed = list(self._cached)
        self._free.extend(freed)
        self._cached.clear()
        self._index.clear()
        self._entry_of.clear()
        for slot in list(self._snapshots):
            self._drop_snapshot(slot)
        return len(freed)

    def stats(self) -> PageStats:
        live = [snap for snap in self._snapshots.values() if snap.entry is not None]
        return PageStats(
            num_pages=self.num_pages,
            used=self.used,
            cached=len(self._cached),
            free=len(self._free),
            usage=self.usage,
            queries=self._queries,
            hits=self._hits,
            evicted_pages=self._evicted_pages,
            snapshots=len(live),
            pinned_snapshots=sum(snap.pins > 0 for snap in self._snapshots.values()),
            evicted_snapshots=self._evicted_snapshots,
        )

    # internals

    def _check_page(self, page: int) -> int:
        if isinstance(page, bool) or not isinstance(page, int | np.integer) or not 0 <= page < self.num_pages:
            raise ValueError(f"page {page!r} is not a page id in [0, {self.num_pages})")
        return int(page)

    def _check_pinned(self, slot: int) -> _Snapshot:
        snap = self._snapshots.get(slot) if isinstance(slot, int | np.integer) else None
        if snap is None or snap.pins == 0:
            raise ValueError(f"snapshot slot {slot!r} is not pinned (unpinned twice, or never returned by match)")
        return snap

    def _page_bytes(self, tokens: Sequence[int], num_pages: int) -> list[bytes]:
        """The token bytes of the first `num_pages` pages of `tokens`."""
        ids = np.asarray(tokens[: num_pages * self.page_size])
        if ids.size == 0:
            return []
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"tokens must be a flat sequence of integer ids, got {ids.dtype} of shape {ids.shape}")
        if ids.min() < 0 or ids.max() > MAX_TOKEN_ID:
            bad = int(ids.min()) if ids.min() < 0 else int(ids.max())
            raise ValueError(f"token ids must lie in [0, {MAX_TOKEN_ID}], got {bad}")
        data = ids.astype(TOKEN_BYTES).tobytes()
        size = self.page_size * TOKEN_BYTES.itemsize
        return [data[i * size : (i + 1) * size] for i in range(num_pages)]

    def _find(self, key: bytes, parent: _Entry | None, page_tokens: bytes) -> _Entry | None:
        for entry in self._index.get(key, ()):
            if entry.parent is parent and entry.tokens == page_tokens:
                return entry
        return None

    def _indexed_chain(self, tokens: Sequence[int], max_pages: int) -> list[_Entry]:
        """The indexed entries of tokens' first pages, up to the first page not indexed."""
        chain: list[_Entry] = []
        parent: _Entry | None = None
        for page_tokens in self._page_bytes(tokens, max_pages):
            entry = self._find(page_key(parent.key if parent else b"", page_tokens), parent, page_tokens)
            if entry is None:
                break
            chain.append(entry)
            parent = entry
        return chain

    def _usable_chain(self, tokens: Sequence[int], min_tail: int) -> list[_Entry]:
        min_tail = _check_count("min_tail", min_tail, 1)
        if not self.prefix_cache:
            return []
        chain = self._indexed_chain(tokens, max(0, len(tokens) - min_tail) // self.page_size)
        if self.needs_snapshot:
            while chain and chain[-1].snapshot is None:
                chain.pop()
        return chain

    def _unindex(self, root: _Entry, evicting: bool) -> None:
        """Remove an entry and everything indexed after it; unreferenced pages among them become free."""
        if root.parent is not None:
            del root.parent.children[root.page]
        stack = [root]
        while stack:
            entry = stack.pop()
            stack.extend(entry.children.values())
            bucket = self._index[entry.key]
            bucket.remove(entry)
            if not bucket:
                del self._index[entry.key]
            del self._entry_of[entry.page]
            if entry.snapshot is not None:
                self._drop_snapshot(entry.snapshot)
            if self._refs[entry.page] == 0:
                del self._cached[entry.page]
                self._free.append(entry.page)
                if evicting:
                    self._evicted_pages += 1

    def _drop_snapshot(self, slot: int) -> None:
        snap = self._snapshots[slot]
        if snap.entry is not None:
            snap.entry.snapshot = None
            snap.entry = None
        if snap.pins == 0:
            del self._snapshots[slot]
            heapq.heappush(self._free_slots, slot)


class ShardedKVPages:
    """`KVPages` of a pool split into `shards` equal page ranges (shard d owns pages d*P/D .. (d+1)*P/D - 1 and
    snapshot slots d*S/D ..), each with its own free list, LRU, prefix index and snapshots; ids are global. A
    request's pages all lie on one shard (its slot's): `release`, `publish` and `undo_match` take one shard's
    pages at a time. With one shard it is exactly one `KVPages`. Stats are summed over the shards."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_snapshots: int,
        shards: int = 1,
        *,
        prefix_cache: bool = True,
        needs_snapshot: bool = True,
    ) -> None:
        self.num_shards = _check_count("shards", shards, 1)
        self.num_pages = _check_count("num_pages", num_pages, self.num_shards)
        self.num_snapshots = _check_count("num_snapshots", num_snapshots, 0)
        if self.num_pages % self.num_shards or self.num_snapshots % self.num_shards:
            raise ValueError(
                f"{num_pages} pages and {num_snapshots} snapshot slots must split evenly over {shards} shards"
            )
        self.page_size = _check_count("page_size", page_size, 1)
        self.pages_per_shard = self.num_pages // self.num_shards
        self.snapshots_per_shard = self.num_snapshots // self.num_shards
        self.shards = [
            KVPages(
                self.pages_per_shard,
                page_size,
                self.snapshots_per_shard,
                prefix_cache=prefix_cache,
                needs_snapshot=needs_snapshot,
            )
            for _ in range(self.num_shards)
        ]

    @property
    def prefix_cache(self) -> bool:
        return self.shards[0].prefix_cache

    @prefix_cache.setter
    def prefix_cache(self, on: bool) -> None:
        for shard in self.shards:
            shard.prefix_cache = bool(on)

    def pages_for(self, tokens: int) -> int:
        """Pages that hold `tokens` positions."""
        return self.shards[0].pages_for(tokens)

    def shard_of(self, page: int) -> int:
        """The shard owning global page id `page`."""
        if isinstance(page, bool) or not isinstance(page, int | np.integer) or not 0 <= page < self.num_pages:
            raise ValueError(f"page {page!r} is not a page id in [0, {self.num_pages})")
        return int(page) // self.pages_per_shard

    def available(self, shard: int) -> int:
        """Pages `allocate` can hand out on `shard`."""
        return self._shard(shard).available

    @property
    def used(self) -> int:
        return sum(shard.used for shard in self.shards)

    @property
    def usage(self) -> float:
        return self.used / self.num_pages

    def refcount(self, page: int) -> int:
        shard = self.shard_of(page)
        return self.shards[shard].refcount(int(page) - shard * self.pages_per_shard)

    def allocate(self, n: int, shard: int = 0) -> list[int] | None:
        """n pages of `shard` (see `KVPages.allocate`), as global ids; None when that shard has too few."""
        pages = self._shard(shard).allocate(n)
        return None if pages is None else [shard * self.pages_per_shard + p for p in pages]

    def release(self, pages: Sequence[int]) -> None:
        """`KVPages.release` of one shard's pages (global ids)."""
        shard, local = self._local(pages)
        if local:
            self.shards[shard].release(local)

    def publish(self, tokens: Sequence[int], pages: Sequence[int]) -> None:
        """`KVPages.publish` into the index of the shard holding `pages`."""
        num_full = len(tokens) // self.page_size
        if len(pages) < num_full:
            raise ValueError(f"{len(tokens)} tokens fill {num_full} pages but the page table has {len(pages)}")
        shard, local = self._local(pages[:num_full])
        self.shards[shard].publish(tokens[: num_full * self.page_size], local)

    def lookup(self, tokens: Sequence[int], min_tail: int, shard: int = 0) -> int:
        """Tokens `match` on `shard` would reuse now (no references taken, no stats counted)."""
        return self._shard(shard).lookup(tokens, min_tail)

    def match(self, tokens: Sequence[int], min_tail: int, shard: int = 0) -> PrefixHit:
        """`KVPages.match` on `shard`: global page ids and snapshot slot."""
        hit = self._shard(shard).match(tokens, min_tail)
        snapshot = None if hit.snapshot is None else shard * self.snapshots_per_shard + hit.snapshot
        pages = tuple(shard * self.pages_per_shard + p for p in hit.pages)
        return dataclasses.replace(hit, pages=pages, snapshot=snapshot, shard=shard)

    def undo_match(self, hit: PrefixHit) -> None:
        """`KVPages.undo_match` of a hit from `match`."""
        offset = hit.shard * self.pages_per_shard
        local_snapshot = None if hit.snapshot is None else hit.snapshot - hit.shard * self.snapshots_per_shard
        local = dataclasses.replace(hit, pages=tuple(p - offset for p in hit.pages), snapshot=local_snapshot, shard=0)
        self._shard(hit.shard).undo_match(local)

    def snapshot_slot(self, tokens: Sequence[int], boundary: int, shard: int = 0) -> int | None:
        """`KVPages.snapshot_slot` on `shard` (whose index holds the prompt's pages), as a global store slot."""
        slot = self._shard(shard).snapshot_slot(tokens, boundary)
        return None if slot is None else shard * self.snapshots_per_shard + slot

    def unpin_snapshot(self, slot: int) -> None:
        if not isinstance(slot, int | np.integer) or not 0 <= slot < self.num_snapshots:
            raise ValueError(f"snapshot slot {slot!r} is not in [0, {self.num_snapshots})")
        shard = int(slot) // self.snapshots_per_shard
        self.shards[shard].unpin_snapshot(int(slot) - shard * self.snapshots_per_shard)

    def reset_prefix_cache(self) -> int:
        return sum(shard.reset_prefix_cache() for shard in self.shards)

    def stats(self) -> PageStats:
        """The shards' `PageStats` summed (usage over the whole pool)."""
        parts = [shard.stats() for shard in self.shards]
        total = {f.name: sum(getattr(p, f.name) for p in parts) for f in dataclasses.fields(PageStats)}
        total["usage"] = total["used"] / self.num_pages
        return PageStats(**total)

    def _shard(self, shard: int) -> KVPages:
        if isinstance(shard, bool) or not isinstance(shard, int | np.integer) or not 0 <= shard < self.num_shards:
            raise ValueError(f"shard {shard!r} is not in [0, {self.num_shards})")
        return self.shards[int(shard)]

    def _local(self, pages: Sequence[int]) -> tuple[int, list[int]]:
        """(the one shard holding `pages`, their local ids); shard 0 for no pages."""
        shards = {self.shard_of(page) for page in pages}
        if len(shards) > 1:
            raise ValueError(f"pages {list(pages)} lie on shards {sorted(shards)}: a sequence's pages are on one shard")
        shard = shards.pop() if shards else 0
        return shard, [int(p) - shard * self.pages_per_shard for p in pages]
