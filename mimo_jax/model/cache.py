"""Per-layer KV cache: fixed slots or pages for full-attention layers, a ring buffer for SWA layers.

Each contiguous cache (`LayerKV`) stores the absolute position of every slot (-1 = empty), so attention masks are
computed from positions. Full layers keep slot = position (capacity = max context); SWA
layers keep slot = position % ring_size, where ring_size >= window_keys, so their memory
does not grow with the sequence.

Keys and values are stored heads-major, [batch, kv_heads, slots, head_dim], on every backend:
each head's slots are one contiguous [slots, head_dim] matrix, the layout the attention matmuls
read. (Stored [batch, slots, kv_heads, head_dim], TPU tiles the last two dims, so one KV head per
chip was padded to a tile, and every decode step copied each full-attention layer's whole cache
into the attention's layout; `tests/tools/test_aot.py` checks the compiled decode loop for that.)

Paged full layers (`PagedKV`): one `PagePool` per full layer, pages of `page_size` positions shared by all
sequences, and one page table [batch, max_pages] for all full layers: position p of row b lives in page
page_table[b, p // page_size] at offset p % page_size. Key positions follow from the table (no stored
positions): a key is there iff its page id is >= 0. Pools may store FP8 with one scale per token and head.

On a mesh whose batch splits over (data, expert), D shards, the pools' page axis splits the same way
(`PagedKV.shard_axes`, as SGLang's DP attention keeps one pool per DP rank): shard d owns pages
[d*P/D, (d+1)*P/D), and a slot's pages are on the shard holding its batch row. Page tables hold global ids;
`write_pages` and `attention_paged` run in a `jax.shard_map` over those axes, each shard on its own pages
(local id = global - d*P/D, other shards' ids read as -1): no pool moves between devices.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mimo_jax.config import LayerSpec, MiMoConfig
from mimo_jax.sharding import constrain, current_mesh, logical_to_spec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerKV:
    k: jax.Array  # [B, KV, S, D]
    v: jax.Array  # [B, KV, S, Dv], already multiplied by the value scale
    pos: jax.Array  # [B, S] int32, -1 = empty slot
    ring: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def slots(self) -> int:
        return self.pos.shape[1]


def empty_layer_kv(spec: LayerSpec, batch: int, max_len: int, dtype: jnp.dtype, extra_ring_slots: int = 0) -> LayerKV:
    """Cache for one layer. SWA rings hold window_keys + extra_ring_slots (speculative drafts)."""
    if spec.sliding:
        slots, ring = min(spec.window_keys + extra_ring_slots, max_len), True
    else:
        slots, ring = max_len, False
    return LayerKV(
        k=jnp.zeros((batch, spec.num_kv_heads, slots, spec.head_dim), dtype),
        v=jnp.zeros((batch, spec.num_kv_heads, slots, spec.v_head_dim), dtype),
        pos=jnp.full((batch, slots), -1, jnp.int32),
        ring=ring,
    )


def kv_bytes_per_token(spec: LayerSpec, dtype_bytes: int = 2) -> int:
    return spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * dtype_bytes


def _write(cache: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
    """Scatter new k/v [B, T, KV, D] at their slots; positions < 0 (padding) are dropped."""
    slots = cache.slots
    valid = positions >= 0
    if cache.ring:
        # Within one chunk only the last `slots` positions of a row survive in the ring.
        last = jnp.max(jnp.where(valid, positions, -1), axis=1, keepdims=True)
        valid &= positions > last - slots
        slot = positions % slots
    else:
        valid &= positions < slots
        slot = positions
    slot = jnp.where(valid, slot, slots)  # out of range -> dropped by the scatter
    rows = jnp.arange(k.shape[0])[:, None]
    # [rows, :, slot] selects [B, T, KV, D] (the indexed axes first, numpy's rule): the new k/v as they are
    return LayerKV(
        k=cache.k.at[rows, :, slot].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[rows, :, slot].set(v.astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[rows, slot].set(positions, mode="drop"),
        ring=cache.ring,
    )


def ring_holds_window(slots: int, window: int, queries: int) -> bool:
    """Whether a ring of `slots` still holds every key that `queries` consecutive queries see once their own keys
    are written (the entries they replace lie outside every one of their windows): then `write_ring` and reading
    the ring as it is equals `update_and_read`'s read-before-write."""
    return slots >= window + queries - 1


def write_ring(cache: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
    """A ring with this step's k/v [B, T, KV, D] at their slots (positions < 0 dropped): what decode kernels read
    when `ring_holds_window`. Slots of stale positions at or past the step's first (rejected drafts) that the write
    does not replace hold positions past every query: never visible."""
    if not cache.ring:
        raise ValueError("write_ring takes a sliding-window ring")
    return _write(cache, k, v, positions)


def heads_major(x: jax.Array) -> jax.Array:
    """[B, T, KV, D] (as projected) -> [B, KV, T, D] (as the cache stores it)."""
    return jnp.swapaxes(x, 1, 2)


def update_and_read(
    cache: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, LayerKV]:
    """Add this step's keys/values [B, T, KV, D]; return (keys, values, key_positions) to attend over,
    keys/values [B, KV, S, D] as the cache stores them, and the new cache.

    Full layers write first and read the slots (slot = position, nothing is overwritten).
    Rings are read before the write, concatenated with the new keys, because a long chunk may
    overwrite ring slots that its own earlier queries still see.
    """
    new_cache = _write(cache, k, v, positions)
    if cache.ring:
        # Slots at or past this chunk's first position are stale (e.g. rejected drafts).
        first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        old_pos = jnp.where(cache.pos >= first, -1, cache.pos)
        keys = jnp.concatenate([cache.k, heads_major(k).astype(cache.k.dtype)], axis=2)
        values = jnp.concatenate([cache.v, heads_major(v).astype(cache.v.dtype)], axis=2)
        key_pos = jnp.concatenate([old_pos, positions], axis=1)
        return keys, values, key_pos, new_cache
    return new_cache.k, new_cache.v, new_cache.pos, new_cache


def remap_ring(ring: LayerKV, slots: int, end: jax.Array) -> LayerKV:
    """`ring` re-laid in `slots` slots as of position `end` (a scalar): slot i holds the position q in
    [end - slots, end) with q % slots == i, taken from `ring`'s slot q % ring.slots where that holds q (else empty).

    Widening a ring (slots > ring.slots, end = the next position to write) keeps every entry a ring of the wider
    size would hold, so a chunk run through it leaves older positions that the narrow ring would overwrite;
    narrowing it again picks the ring as it was (or would be) at any `end` whose window the wide ring still holds.
    """
    if not ring.ring:
        raise ValueError("remap_ring takes a sliding-window ring; a full layer's slots are its positions")
    base = end - slots
    wanted = base + (jnp.arange(slots, dtype=jnp.int32) - base) % slots  # [slots]: q in [base, end), q % slots == i
    source = wanted % ring.slots
    present = (wanted >= 0)[None] & (jnp.take(ring.pos, source, axis=1) == wanted[None])  # [B, slots]
    pick = lambda x: jnp.where(present[:, None, :, None], jnp.take(x, source, axis=2), jnp.zeros((), x.dtype))
    return LayerKV(k=pick(ring.k), v=pick(ring.v), pos=jnp.where(present, wanted[None], -1), ring=True)


def empty_cache(
    cfg: MiMoConfig, batch: int, max_len: int, dtype: jnp.dtype, extra_ring_slots: int = 0
) -> list[LayerKV]:
    """One LayerKV per decoder layer: full layers hold `max_len` slots, SWA layers a window-sized ring."""
    return [empty_layer_kv(spec, batch, max_len, dtype, extra_ring_slots) for spec in cfg.layers]


CACHE_AXES = ("batch", "kv_heads", None, "head_dim")  # logical axes of LayerKV.k / .v


def cache_shardings(cache: list[LayerKV], mesh: jax.sharding.Mesh) -> list[LayerKV]:
    """NamedShardings for a cache pytree: batch on the data axis, kv heads on the tensor axis."""

    def named(x: jax.Array, axes: tuple) -> jax.sharding.NamedSharding:
        return jax.sharding.NamedSharding(mesh, logical_to_spec(axes[: x.ndim], tuple(x.shape), mesh))

    return [
        LayerKV(k=named(c.k, CACHE_AXES), v=named(c.v, CACHE_AXES), pos=named(c.pos, ("batch", None)), ring=c.ring)
        for c in cache
    ]


def read_slot(cache: list[LayerKV], slot: jax.Array, clear: jax.Array) -> list[LayerKV]:
    """The cache of one batch row (batch axis kept, size 1); `clear` marks every slot empty (a new request).

    Traced under a mesh that splits the batch, each shard reads only its own rows (`_read_row`):
    a plain dynamic_slice would make XLA all-gather every layer's whole cache to pick one row.
    """

    def one(c: LayerKV) -> LayerKV:
        pos = jnp.where(clear, -1, _read_row(c.pos, slot, ("batch", None)))
        return LayerKV(k=_read_row(c.k, slot, CACHE_AXES), v=_read_row(c.v, slot, CACHE_AXES), pos=pos, ring=c.ring)

    return [one(c) for c in cache]


def _read_row(x: jax.Array, slot: jax.Array, axes: tuple) -> jax.Array:
    """x[slot : slot+1] for x laid out by its logical `axes` on the current mesh (if any)."""
    mesh = current_mesh()
    spec = logical_to_spec(axes[: x.ndim], x.shape, mesh) if mesh is not None else None
    if spec is None or spec[0] is None:  # batch not split: every device holds the row
        return jax.lax.dynamic_slice_in_dim(x, slot, 1, axis=0)
    batch_axes = spec[0]
    row_spec = jax.sharding.PartitionSpec(None, *spec[1:])

    def local(x, slot):
        rows = x.shape[0]  # this shard's rows: slot's owner is shard slot // rows
        row = jax.lax.dynamic_slice_in_dim(x, slot % rows, 1, axis=0)
        mine = jax.lax.axis_index(batch_axes) == slot // rows
        # only the owner contributes: the sum over the batch shards moves one row, not the cache
        return jax.lax.psum(jnp.where(mine, row, jnp.zeros_like(row)), batch_axes)

    replicated = jax.sharding.PartitionSpec()
    return jax.shard_map(local, mesh=mesh, in_specs=(spec, replicated), out_specs=row_spec)(x, slot)


def write_slot(cache: list[LayerKV], rows: list[LayerKV], slot: jax.Array) -> list[LayerKV]:
    """Put one row's cache (from `read_slot`) back at batch index `slot`."""

    def one(c: LayerKV, r: LayerKV) -> LayerKV:
        put = lambda x, y: jax.lax.dynamic_update_slice_in_dim(x, y, slot, axis=0)
        return LayerKV(k=put(c.k, r.k), v=put(c.v, r.v), pos=put(c.pos, r.pos), ring=c.ring)

    return [one(c, r) for c, r in zip(cache, rows, strict=True)]


# ------------------------------------------------------------------ paged full-attention layers
FP8_STORAGE = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8_STORAGE).max)  # 448: a token's largest |k| or |v| element maps here

POOL_AXES = (None, "kv_heads", None, "head_dim")  # logical axes of PagePool.k / .v: pages not split
SCALE_AXES = (None, "kv_heads", None)  # of PagePool.k_scale / .v_scale


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagePool:
    """One full-attention layer's pages, shared by every sequence.

    k [P, KV, page_size, D], v [P, KV, page_size, Dv] (already times the value scale) in the storage dtype.
    FP8 pools also hold k_scale / v_scale [P, KV, page_size] float32, one per token and head (amax / 448,
    set when written); other pools hold None there, so a pool's pytree is fixed by how it was made.
    """

    k: jax.Array
    v: jax.Array
    k_scale: jax.Array | None = None
    v_scale: jax.Array | None = None

    @property
    def num_pages(self) -> int:
        return self.k.shape[0]

    @property
    def page_size(self) -> int:
        return self.k.shape[2]

    @property
    def fp8(self) -> bool:
        return self.k_scale is not None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PagedKV:
    """What a paged full layer's attention reads and returns: its pool and the rows' page table.

    page_table [B, max_pages] int32: row b's position p is in page page_table[b, p // page_size] at offset
    p % page_size; -1 = no page (nothing visible there, writes dropped). The host writes every position
    before a query at or after it reads it, and never lets a row write into a page another row reads.
    """

    pool: PagePool
    page_table: jax.Array
    # mesh axes the pool's page axis is split over (shard d owns pages d*P/D ..); () = whole on every device
    shard_axes: tuple[str, ...] = dataclasses.field(metadata=dict(static=True), default=())
    # with shard_axes: the rows are split over them as the slots are (row segment d on shard d, its pages there);
    # else every shard sees every row (one prefilling slot) and only the owner of a page writes or reads it
    rows_on_shards: bool = dataclasses.field(metadata=dict(static=True), default=False)

    @property
    def page_size(self) -> int:
        return self.pool.page_size

    @property
    def max_pages(self) -> int:
        return self.page_table.shape[1]


def empty_page_pool(spec: LayerSpec, num_pages: int, page_size: int, dtype: jnp.dtype, fp8: bool = False) -> PagePool:
    """A zeroed pool for one full layer: `dtype` storage, or FP8 (e4m3) values with float32 scales."""
    if spec.sliding:
        raise ValueError("paged caches are for full-attention layers; sliding-window layers keep rings")
    if num_pages < 1 or page_size < 1:
        raise ValueError(f"a page pool needs num_pages >= 1 and page_size >= 1, got {num_pages} and {page_size}")
    shape, store = (num_pages, spec.num_kv_heads, page_size), FP8_STORAGE if fp8 else dtype
    return PagePool(
        k=jnp.zeros((*shape, spec.head_dim), store),
        v=jnp.zeros((*shape, spec.v_head_dim), store),
        k_scale=jnp.zeros(shape, jnp.float32) if fp8 else None,
        v_scale=jnp.zeros(shape, jnp.float32) if fp8 else None,
    )


def empty_page_pools(
    cfg: MiMoConfig, num_pages: int, page_size: int, dtype: jnp.dtype, fp8: bool = False
) -> list[PagePool]:
    """One pool per full-attention layer, in layer order."""
    return [empty_page_pool(s, num_pages, page_size, dtype, fp8) for s in cfg.layers if not s.sliding]


def page_bytes(cfg: MiMoConfig, page_size: int, dtype_bytes: int = 2, fp8: bool = False) -> int:
    """Bytes of one page in every full-attention layer's pool together (FP8: values + float32 scales)."""
    per_token = 0
    for s in cfg.layers:
        if not s.sliding:
            per_token += kv_bytes_per_token(s, 1 if fp8 else dtype_bytes) + (2 * s.num_kv_heads * 4 if fp8 else 0)
    return per_token * page_size


def page_pool_shardings(
    pools: list[PagePool], mesh: jax.sharding.Mesh, shard_axes: tuple[str, ...] = ()
) -> list[PagePool]:
    """NamedShardings for pools: kv heads on the tensor axis, the page axis split over `shard_axes` (the axes the
    slots split over: each slot's pages on its shard) or whole (every row may use any page)."""

    def named(x: jax.Array | None, axes: tuple) -> jax.sharding.NamedSharding | None:
        if x is None:
            return None
        spec = logical_to_spec(axes, tuple(x.shape), mesh)
        if shard_axes:
            if x.shape[0] % math.prod(mesh.shape[a] for a in shard_axes):
                raise ValueError(f"{x.shape[0]} pages do not split over the mesh axes {shard_axes}")
            spec = jax.sharding.PartitionSpec(shard_axes, *spec[1:])
        return jax.sharding.NamedSharding(mesh, spec)

    return [
        PagePool(
            k=named(p.k, POOL_AXES),
            v=named(p.v, POOL_AXES),
            k_scale=named(p.k_scale, SCALE_AXES),
            v_scale=named(p.v_scale, SCALE_AXES),
        )
        for p in pools
    ]


def paged_layer_caches(
    cfg: MiMoConfig,
    pools: list[PagePool],
    page_table: jax.Array,
    rings: list[LayerKV],
    shard_axes: tuple[str, ...] = (),
    rows_on_shards: bool = False,
) -> list[LayerKV | PagedKV]:
    """The per-layer caches `hidden_states` takes: each full layer its pool with the shared page table,
    each SWA layer its ring (pools and rings in layer order). `shard_axes`, `rows_on_shards`: see `PagedKV`."""
    full = sum(not s.sliding for s in cfg.layers)
    if len(pools) != full or len(rings) != cfg.num_layers - full:
        raise ValueError(
            f"{len(pools)} pools and {len(rings)} rings for {full} full and {cfg.num_layers - full} SWA layers"
        )
    pools_left, rings_left = iter(pools), iter(rings)
    paged = lambda pool: PagedKV(pool, page_table, shard_axes, rows_on_shards)
    return [paged(next(pools_left)) if not s.sliding else next(rings_left) for s in cfg.layers]


def split_layer_caches(caches: list[LayerKV | PagedKV]) -> tuple[list[PagePool], list[LayerKV]]:
    """Inverse of `paged_layer_caches`: (the full layers' pools, the SWA layers' rings), in layer order."""
    pools = [c.pool for c in caches if isinstance(c, PagedKV)]
    return pools, [c for c in caches if not isinstance(c, PagedKV)]


def quantize_fp8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [..., D] -> (FP8 values [..., D], float32 scales [...]): one scale per vector, its amax / 448."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / FP8_MAX
    values = xf / jnp.where(scale > 0, scale, 1.0)[..., None]  # an all-zero vector stays zero
    return jnp.clip(values, -FP8_MAX, FP8_MAX).astype(FP8_STORAGE), scale


def local_page_ids(page_table: jax.Array, shard_axes: tuple[str, ...], pages_per_shard: int) -> jax.Array:
    """Inside `jax.shard_map` over `shard_axes`: a table of global page ids as this shard's local ids (-1 for
    pages of other shards: never written or read here)."""
    local = page_table - jax.lax.axis_index(shard_axes) * pages_per_shard
    return jnp.where((page_table >= 0) & (local >= 0) & (local < pages_per_shard), local, -1)


PAGE_SHARD_OUTPUTS = ("pool", "rows", "replicated")


def on_page_shards(
    fn, cache: PagedKV, row_args: tuple, replicated_args: tuple = (), returns: str = "pool", check_vma: bool = True
):
    """`fn(local pool, local page table, *row_args, *replicated_args)` on every page shard of `cache` (in a
    `jax.shard_map` over its shard axes; the tensor axis stays automatic): the pool as placed, the rows (the page
    table and `row_args`, leading dim B) split like the slots when `cache.rows_on_shards`, else whole on every
    shard. `returns`: what `fn` returns, "pool" (placed as the pool), "rows" (an output laid out as the rows) or
    "replicated" (the same on every shard: combined over the shards inside `fn`). `check_vma` False for the
    Pallas interpreter, whose loops do not keep the manual axes' types (as `_paged_kernel`'s shard_map)."""
    if returns not in PAGE_SHARD_OUTPUTS:
        raise ValueError(f"returns={returns!r}: expected one of {PAGE_SHARD_OUTPUTS}")
    axes = cache.shard_axes
    rows = jax.sharding.PartitionSpec(axes) if cache.rows_on_shards else jax.sharding.PartitionSpec()
    pages = jax.tree.map(lambda _: jax.sharding.PartitionSpec(axes), cache.pool)

    def local(pool, table, *args):
        return fn(pool, local_page_ids(table, axes, pool.num_pages), *args)

    row_specs = jax.tree.map(lambda _: rows, row_args)
    in_specs = (pages, rows, *row_specs, *jax.tree.map(lambda _: jax.sharding.PartitionSpec(), replicated_args))
    out_specs = {"pool": pages, "rows": rows, "replicated": jax.sharding.PartitionSpec()}[returns]
    mapped = jax.shard_map(
        local, in_specs=in_specs, out_specs=out_specs, axis_names=frozenset(axes), check_vma=check_vma
    )
    return mapped(cache.pool, cache.page_table, *row_args, *replicated_args)


def write_pages(cache: PagedKV, k: jax.Array, v: jax.Array, positions: jax.Array) -> PagedKV:
    """Scatter new k/v [B, T, KV, D] into their pages (quantized in an FP8 pool); positions < 0 (padding),
    past the table or in a page-less entry (-1) are dropped. Pools split over page shards: each shard writes
    only its own pages."""
    if cache.shard_axes:

        def local(pool, table, k, v, positions):
            return write_pages(PagedKV(pool, table), k, v, positions).pool

        return dataclasses.replace(cache, pool=on_page_shards(local, cache, (k, v, positions)))
    pool, size = cache.pool, cache.page_size
    index = positions // size
    page = jnp.take_along_axis(cache.page_table, jnp.clip(index, 0, cache.max_pages - 1), axis=1)
    valid = (positions >= 0) & (index < cache.max_pages) & (page >= 0)
    page = jnp.where(valid, page, pool.num_pages)  # out of range -> dropped by the scatter
    offset = positions % size
    # Every batch shard holds the whole pool: each applies all rows' writes (the new tokens move, not pages).
    k = constrain(k, (None, None, "kv_heads", None))
    v = constrain(v, (None, None, "kv_heads", None))
    page, offset = constrain(page, (None, None)), constrain(offset, (None, None))

    def put(store: jax.Array, new: jax.Array) -> jax.Array:
        # [page, :, offset] selects [B, T, KV, ...] (the indexed axes first): the new values as they are
        return store.at[page, :, offset].set(new.astype(store.dtype), mode="drop")

    if not pool.fp8:
        return dataclasses.replace(cache, pool=PagePool(k=put(pool.k, k), v=put(pool.v, v)))
    (k8, k_scale), (v8, v_scale) = quantize_fp8(k), quantize_fp8(v)
    new_pool = PagePool(
        k=put(pool.k, k8), v=put(pool.v, v8), k_scale=put(pool.k_scale, k_scale), v_scale=put(pool.v_scale, v_scale)
    )
    return dataclasses.replace(cache, pool=new_pool)


def read_pages(pool: PagePool, page_ids: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """The keys and values of pages [B, G] (ids < 0 read page 0: the caller masks them) as [B, KV, G*page_size, D]
    in `dtype`, FP8 dequantized after the gather (only the pages read are widened)."""
    safe = jnp.clip(page_ids, 0, pool.num_pages - 1)
    b, g = page_ids.shape

    def gather(store: jax.Array, scale: jax.Array | None) -> jax.Array:
        x = jnp.take(store, safe, axis=0, mode="clip").astype(dtype)  # [B, G, KV, page_size, D]
        if scale is not None:
            x = x * jnp.take(scale, safe, axis=0, mode="clip").astype(dtype)[..., None]
        x = jnp.moveaxis(x, 2, 1).reshape(b, x.shape[2], g * pool.page_size, x.shape[-1])
        return constrain(x, CACHE_AXES)

    return gather(pool.k, pool.k_scale), gather(pool.v, pool.v_scale)


def page_key_positions(page_ids: jax.Array, first_page: jax.Array | int, page_size: int) -> jax.Array:
    """Positions [B, G*page_size] of the keys of table entries first_page .. first_page+G-1 (ids [B, G]); -1 where
    an entry has no page."""
    b, g = page_ids.shape
    pos = (first_page + jnp.arange(g, dtype=jnp.int32))[:, None] * page_size + jnp.arange(page_size, dtype=jnp.int32)
    return jnp.where(page_ids[:, :, None] >= 0, pos[None], -1).reshape(b, g * page_size)


# ------------------------------------------------------------------ memory planning
@dataclasses.dataclass(frozen=True)
class KVPlan:
    """KV cache bytes of one sequence at `context` tokens."""

    context: int
    full_layers: int
    swa_layers: int
    full_bytes_per_token: int  # all full-attention layers together; grows with the context
    swa_bytes_per_token: int  # all SWA layers together, per ring slot
    swa_ring_slots: int
    full_bytes: int  # per sequence
    swa_bytes: int  # per sequence, constant in the context
    all_full_bytes: int  # the same model with every layer full attention (full-layer head shape)

    @property
    def total_bytes(self) -> int:
        return self.full_bytes + self.swa_bytes

    @property
    def saving(self) -> float:
        """How many times smaller than an all-full-attention cache."""
        return self.all_full_bytes / self.total_bytes

    def report(self) -> str:
        gib = 2.0**30
        return "\n".join(
            [
                f"context {self.context} tokens, {self.full_layers} full + {self.swa_layers} SWA layers",
                f"full layers: {self.full_bytes_per_token} B/token -> {self.full_bytes / gib:.3f} GiB per sequence",
                f"SWA layers:  {self.swa_bytes_per_token} B/token x {self.swa_ring_slots} ring slots"
                f" -> {self.swa_bytes / gib:.4f} GiB per sequence (constant)",
                f"total {self.total_bytes / gib:.3f} GiB per sequence;"
                f" all-full-attention {self.all_full_bytes / gib:.3f} GiB ({self.saving:.2f}x more)",
            ]
        )


def kv_plan(cfg: MiMoConfig, context: int, dtype_bytes: int = 2, extra_ring_slots: int = 0) -> KVPlan:
    """KV memory of one sequence of `context` tokens, from the same LayerSpecs the cache is built from."""
    specs = cfg.layers
    full = [s for s in specs if not s.sliding]
    swa = [s for s in specs if s.sliding]
    full_per_token = sum(kv_bytes_per_token(s, dtype_bytes) for s in full)
    swa_per_token = sum(kv_bytes_per_token(s, dtype_bytes) for s in swa)
    ring_slots = min(cfg.window_keys + extra_ring_slots, context) if swa else 0
    all_full_spec = cfg.replace(sliding=(False,) * cfg.num_layers).layers
    all_full_per_token = sum(kv_bytes_per_token(s, dtype_bytes) for s in all_full_spec)
    return KVPlan(
        context=context,
        full_layers=len(full),
        swa_layers=len(swa),
        full_bytes_per_token=full_per_token,
        swa_bytes_per_token=swa_per_token,
        swa_ring_slots=ring_slots,
        full_bytes=full_per_token * context,
        swa_bytes=swa_per_token * ring_slots,
        all_full_bytes=all_full_per_token * context,
    )
