"""Attention math: partial NeoX RoPE and grouped-query attention with sinks and windows.

Masks are computed from key positions (never guessed from slot order), so the same functions
serve a full forward, a ring-buffer SWA cache, a fixed-slot full cache and a paged full cache.
Long caches are read in blocks by one online softmax (`_online_softmax`) whose only knowledge of
the storage is a block reader: block j -> (keys, values, key positions).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax import kernels, sharding
from mimo_jax.model.cache import (
    CACHE_AXES,
    POOL_AXES,
    SCALE_AXES,
    LayerKV,
    PagedKV,
    on_page_shards,
    page_key_positions,
    read_pages,
)

# Finite, so a row with no visible key gives zeros instead of NaN.
_MASKED = -1e30

# Keys per block of `attention_blockwise`: as many as keep one block's fp32 scores within
# SCORE_BLOCK_ELEMENTS per batch row, within these bounds (powers of two).
KEY_BLOCK_MIN, KEY_BLOCK_MAX = 256, 8192
SCORE_BLOCK_ELEMENTS = 1 << 26

# "xla": the reference above (blockwise over long caches); "cudnn": prefill chunks through
# `attention_chunk` with cuDNN flash attention (GPU, bf16/fp16); "split": the same math in XLA.
ATTENTION_IMPLS = ("xla", "split", "cudnn")
SPLIT_MIN_QUERIES = 128  # decode steps, verifies and short chunks (cheap anyway) stay on the reference path

# Decode rows over a paged cache (`attention_paged`): "xla" gathers each block of pages into a copy before the
# dot; "pallas_gpu" reads them in place (`mimo_jax.kernels.paged_attention_gpu`, Triton); "pallas_interpret" is
# that kernel in the Pallas interpreter (any backend, slow: tests and CPU dry runs).
PAGED_IMPLS = ("xla", "pallas_gpu", "pallas_interpret")
PAGED_KERNEL_MAX_QUERIES = 8  # queries per row (decode, MTP verify) the kernel takes; longer chunks stay on XLA

# Decode rows over an SWA ring: "xla" (`attention` over the ring read before the write, concatenated with the new
# keys); "pallas_gpu" reads the ring after the write in one kernel (`mimo_jax.kernels.ring_attention_gpu`, Triton)
# where `cache.ring_holds_window` (on a mesh in `jax.shard_map`, `ring_kernel`); "pallas_interpret": that kernel in
# the interpreter.
RING_IMPLS = ("xla", "pallas_gpu", "pallas_interpret")


def rope_inv_freq(rotary_dim: int, theta: float) -> np.ndarray:
    """Inverse frequencies as transformers computes them (float32)."""
    exponents = np.arange(0, rotary_dim, 2, dtype=np.float32) / np.float32(rotary_dim)
    return (1.0 / (np.float32(theta) ** exponents)).astype(np.float32)


def rope_cos_sin(positions: jax.Array, rotary_dim: int, theta: float, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables [batch, seq, rotary_dim] for integer positions [batch, seq]."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inv_freq(rotary_dim, theta))
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """NeoX (rotate-half) RoPE on the first `cos.shape[-1]` dims of each head of x [B, T, N, D]."""
    rotary_dim = cos.shape[-1]
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    half = rotary_dim // 2
    rotated_half = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([rot * cos + rotated_half * sin, rest], axis=-1)


def visible_mask(q_pos: jax.Array, k_pos: jax.Array, window_keys: int | None) -> jax.Array:
    """[B, T, S] True where query at q_pos may read key at k_pos (k_pos < 0 marks an empty slot)."""
    q = q_pos[:, :, None]
    k = k_pos[:, None, :]
    mask = (k >= 0) & (k <= q)
    if window_keys is not None:
        mask &= q - k < window_keys
    return mask


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    window_keys: int | None,
    sink: jax.Array | None,
    scale: float,
    slot_is_position: bool = False,
    impl: str = "xla",
    chunk_kv: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """Reference attention in fp32.

    q [B, T, N, D], k [B, KV, S, D], v [B, KV, S, Dv] (heads-major, as the cache stores them),
    positions [B, T] / [B, S] -> [B, T, N, Dv]; a row that sees no key gives zeros.
    `sink` [N] is an extra logit per head that takes probability mass but carries no value.
    `slot_is_position`: key slot i holds position i (a full-layer cache), so keys past the
    largest query position are never visible; long caches then go through `attention_blockwise`,
    which reads only the blocks up to that position and never holds T x S scores.
    `impl` "cudnn" / "split" with `chunk_kv` (the chunk's own keys/values [B, T, KV, D], which `k`/`v` end with
    or, in a full-layer cache, hold at their positions): prefill chunks of at least
    SPLIT_MIN_QUERIES queries go through `attention_chunk` (cuDNN flash attention on GPU; "split"
    is the same math with XLA's implementation, the reference for it on any backend).
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
    if impl != "xla" and chunk_kv is not None and q.shape[1] >= SPLIT_MIN_QUERIES:
        t = q.shape[1]
        # Full-layer cache: every slot may precede the chunk. Else keys = [ring before the chunk; chunk].
        before = k.shape[2] - t
        prefix = (k, v, k_pos) if slot_is_position else (k[:, :, :before], v[:, :, :before], k_pos[:, :before])
        return attention_chunk(
            q,
            *chunk_kv,
            q_pos,
            prefix,
            window_keys=window_keys,
            sink=sink,
            scale=scale,
            prefix_slot_is_position=slot_is_position,
            implementation="cudnn" if impl == "cudnn" else "xla",
        )
    block = key_block_size(q.shape[1], q.shape[2], k.shape[2]) if slot_is_position else None
    if block is not None:
        needed = (jnp.max(q_pos) + block) // block  # blocks holding positions 0 .. max(q_pos)
        num_blocks = jnp.clip(needed, 1, k.shape[2] // block)
        return attention_blockwise(
            q, k, v, q_pos, k_pos, window_keys=window_keys, sink=sink, scale=scale, block=block, num_blocks=num_blocks
        )
    b, t, n, d = q.shape
    kv = k.shape[1]
    g = n // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = visible_mask(q_pos, k_pos, window_keys)[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    row_max = scores.max(axis=-1, keepdims=True)
    if sink is not None:
        sink_logit = sink.astype(jnp.float32).reshape(1, kv, g, 1, 1)
        row_max = jnp.maximum(row_max, sink_logit)
    probs = jnp.where(mask, jnp.exp(scores - row_max), 0.0)  # a row that sees no key: no weight, not uniform
    denom = probs.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink_logit - row_max)
    probs = probs / jnp.where(denom > 0, denom, 1.0)
    # [b, kv, g, t, dv] first: XLA:CPU has no bf16 x bf16 -> f32 dot that writes [b, t, kv, g, dv] directly
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def _one_pass(queries: int, heads: int, keys: int) -> bool:
    """A short cache whose scores are small: a loop over blocks would only add per-block overhead."""
    return keys <= KEY_BLOCK_MAX and queries * heads * keys <= SCORE_BLOCK_ELEMENTS


def _block_target(queries: int, heads: int) -> int:
    """Keys per block (a power of two in [KEY_BLOCK_MIN, KEY_BLOCK_MAX]) keeping a block's scores small."""
    target = max(KEY_BLOCK_MIN, min(KEY_BLOCK_MAX, SCORE_BLOCK_ELEMENTS // max(queries * heads, 1)))
    return 1 << (target.bit_length() - 1)


def key_block_size(queries: int, heads: int, keys: int) -> int | None:
    """Keys per block for `attention_blockwise` over `keys` slots, or None when one pass is as good."""
    if _one_pass(queries, heads, keys):
        return None
    block = _block_target(queries, heads)
    while block >= KEY_BLOCK_MIN and keys % block:
        block //= 2
    return block if KEY_BLOCK_MIN <= block < keys else None


def pages_per_block(queries: int, heads: int, page_size: int, max_pages: int) -> int:
    """Pages per block of `attention_paged`: the whole table when `key_block_size` would take one pass over
    that many keys, else about as many keys as its blocks (at least one page; the table is padded to blocks)."""
    if _one_pass(queries, heads, max_pages * page_size):
        return max_pages
    return max(1, min(max_pages, _block_target(queries, heads) // page_size))


def _partial_softmax(
    qg: jax.Array, k: jax.Array, v: jax.Array, q_pos: jax.Array, k_pos: jax.Array, window_keys: int | None, scale: float
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Softmax pieces over some keys k/v [b, kv, s, d]: (row max, sum of exp, exp-weighted values) [b, kv, g, t](, dv).

    Keys a query may not see add nothing (a row that sees none has sum 0).
    """
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = visible_mask(q_pos, k_pos, window_keys)[:, None, None]
    scores = jnp.where(mask, scores, _MASKED)
    row_max = scores.max(axis=-1)
    probs = jnp.where(mask, jnp.exp(scores - row_max[..., None]), 0.0)
    pv = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return row_max, probs.sum(axis=-1), pv


def _merge(a: tuple, b: tuple) -> tuple:
    """Combine the softmax pieces of two disjoint key sets."""
    new_max = jnp.maximum(a[0], b[0])
    ca, cb = jnp.exp(a[0] - new_max), jnp.exp(b[0] - new_max)
    return new_max, a[1] * ca + b[1] * cb, a[2] * ca[..., None] + b[2] * cb[..., None]


def _merge_over(pieces: tuple, axes: tuple[str, ...]) -> tuple:
    """Inside `jax.shard_map`: combine the softmax pieces of disjoint key sets held by the shards of `axes` (the
    keys of one row split over page shards); the same on every shard after. No axes: the pieces as they are."""
    if not axes:
        return pieces
    row_max, denom, acc = pieces
    new_max = jax.lax.pmax(row_max, axes)
    weight = jnp.exp(row_max - new_max)
    return new_max, jax.lax.psum(denom * weight, axes), jax.lax.psum(acc * weight[..., None], axes)


# block index -> (keys [B, KV, S, D], values [B, KV, S, Dv], key positions [B, S]) of one block of a cache
BlockReader = Callable[[jax.Array | int], tuple[jax.Array, jax.Array, jax.Array]]


def _online_softmax(
    qg: jax.Array,
    read_block: BlockReader,
    num_blocks: jax.Array | int,
    max_blocks: int,
    q_pos: jax.Array,
    window_keys: int | None,
    scale: float,
) -> tuple:
    """Softmax pieces over blocks 0 .. num_blocks-1 of a cache (an online softmax). Block 0 is always read: when
    `num_blocks` is 0 its keys are all invisible (they add nothing), so the loop starts from its pieces (the
    carry then has the blocks' type, also inside a `jax.shard_map` where they vary over manual axes)."""

    def block_pieces(j):
        keys, values, key_pos = read_block(j)
        return _partial_softmax(qg, keys, values, q_pos, key_pos, window_keys, scale)

    first = block_pieces(0)
    if max_blocks == 1:
        return first
    body = lambda j, carry: _merge(carry, block_pieces(j))
    return jax.lax.fori_loop(1, jnp.maximum(num_blocks, 1), body, first)


def _slice_blocks(k: jax.Array, v: jax.Array, k_pos: jax.Array, block: int) -> BlockReader:
    """Blocks of `block` consecutive slots of a contiguous cache (k/v [B, KV, S, D], k_pos [B, S])."""

    def read(j):
        piece = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)
        return piece(k, 2), piece(v, 2), piece(k_pos, 1)

    return read


def _page_blocks(cache: PagedKV, pages: int, dtype: jnp.dtype, num_q_heads: int) -> tuple[BlockReader, int]:
    """(reader, number of blocks) over a paged cache in blocks of `pages` table entries (the table padded with -1
    to whole blocks); each block's pages are gathered by id and laid out for q heads split over the tensor axis."""
    table = cache.page_table
    max_blocks = -(-cache.max_pages // pages)
    table = jnp.pad(table, ((0, 0), (0, max_blocks * pages - cache.max_pages)), constant_values=-1)

    def read(j):
        ids = jax.lax.dynamic_slice_in_dim(table, j * pages, pages, axis=1)
        keys, values = read_pages(cache.pool, ids, dtype)
        keys, values = sharding.spread_kv_heads(keys, values, num_q_heads)
        return keys, values, page_key_positions(ids, j * pages, cache.page_size)

    return read, max_blocks


def _finish(pieces: tuple, sink: jax.Array | None, q_shape: tuple, dtype: jnp.dtype) -> jax.Array:
    """Online-softmax pieces [b, kv, g, t](, dv) (+ the sink) -> attention output [B, T, N, Dv]."""
    row_max, denom, acc = pieces
    b, kv, g, t = row_max.shape
    if sink is not None:
        sink_logit = sink.astype(jnp.float32).reshape(1, kv, g, 1)
        row_max, denom, acc = _merge((row_max, denom, acc), (sink_logit, jnp.ones_like(denom), jnp.zeros_like(acc)))
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [b, kv, g, t, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, q_shape[2], acc.shape[-1]).astype(dtype)


def attention_blockwise(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    q_pos: jax.Array,
    k_pos: jax.Array,
    *,
    window_keys: int | None,
    sink: jax.Array | None,
    scale: float,
    block: int,
    num_blocks: jax.Array | int,
) -> jax.Array:
    """`attention` over the first `num_blocks` blocks of `block` keys, with an online softmax (fp32).

    Same contract as `attention` (a row that sees no key gives zeros); scores exist for one block
    at a time, and the loop runs only over the blocks that can hold visible keys.
    """
    b, t, n, d = q.shape
    kv = k.shape[1]
    qg = q.reshape(b, t, kv, n // kv, d)
    read = _slice_blocks(k, v, k_pos, block)
    pieces = _online_softmax(qg, read, num_blocks, k.shape[2] // block, q_pos, window_keys, scale)
    return _finish(pieces, sink, q.shape, q.dtype)


def attention_paged(
    q: jax.Array,
    cache: PagedKV,
    q_pos: jax.Array,
    *,
    window_keys: int | None,
    sink: jax.Array | None,
    scale: float,
    impl: str = "xla",
    chunk_kv: tuple[jax.Array, jax.Array] | None = None,
    block_pages: int | None = None,
    paged_impl: str = "xla",
    merge_axes: tuple[str, ...] = (),
) -> jax.Array:
    """`attention` over a paged cache already holding this step's keys (`write_pages` first): q [B, T, N, D],
    q_pos [B, T] -> [B, T, N, Dv], fp32 softmax, a row that sees no key gives zeros.

    A pool split over page shards (`cache.shard_axes`) is read where it lies (`_paged_on_shards`): rows on their
    own shards attend there; rows seen by every shard (a prefill) attend over each shard's pages and combine the
    softmax pieces over the shards (`merge_axes`, inside that shard_map: the mesh axes the row's keys split over).

    `paged_impl` (PAGED_IMPLS) "pallas_gpu" / "pallas_interpret": rows of at most PAGED_KERNEL_MAX_QUERIES queries
    with no window (full layers) go through the Pallas kernel, which reads each row's pages where they lie
    (`_paged_kernel`); everything else takes the XLA path below.

    An online softmax over blocks of `block_pages` table entries (default `pages_per_block`), each gathered
    by page id (FP8 dequantized after the gather), looping only over the blocks up to the batch's largest
    query position: the cost follows the longest running row, not the table's length. Decode rows
    (T = 1 .. k+1) and prefill chunks alike; `impl` "split" / "cudnn" with `chunk_kv` sends chunks of at
    least SPLIT_MIN_QUERIES queries through `attention_chunk` with the pages before the chunk as its prefix.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
    if paged_impl not in PAGED_IMPLS:
        raise ValueError(f"unknown paged attention implementation {paged_impl!r}; choose from {PAGED_IMPLS}")
    options = dict(window_keys=window_keys, sink=sink, scale=scale, impl=impl, block_pages=block_pages)
    if cache.shard_axes:
        return _paged_on_shards(q, cache, q_pos, chunk_kv=chunk_kv, paged_impl=paged_impl, **options)
    kernel = paged_impl != "xla" and not merge_axes  # the kernel returns outputs, not pieces to merge
    if kernel and window_keys is None and q.shape[1] <= PAGED_KERNEL_MAX_QUERIES:
        return _paged_kernel(q, cache, q_pos, sink=sink, scale=scale, interpret=paged_impl == "pallas_interpret")
    if impl != "xla" and chunk_kv is not None and q.shape[1] >= SPLIT_MIN_QUERIES:
        return attention_chunk(
            q,
            *chunk_kv,
            q_pos,
            cache,
            window_keys=window_keys,
            sink=sink,
            scale=scale,
            implementation="cudnn" if impl == "cudnn" else "xla",
            prefix_block_pages=block_pages,
            prefix_merge_axes=merge_axes,
        )
    b, t, n, d = q.shape
    pages = block_pages or pages_per_block(t, n, cache.page_size, cache.max_pages)
    read, max_blocks = _page_blocks(cache, pages, q.dtype, n)
    keys_per_block = pages * cache.page_size
    num_blocks = jnp.clip(jnp.max(q_pos) // keys_per_block + 1, 1, max_blocks)  # blocks holding 0 .. max(q_pos)
    kv = cache.pool.k.shape[1] * sharding.kv_head_repeat(cache.pool.k.shape[1], n)  # as the blocks are read
    qg = q.reshape(b, t, kv, n // kv, d)
    pieces = _online_softmax(qg, read, num_blocks, max_blocks, q_pos, window_keys, scale)
    return _finish(_merge_over(pieces, merge_axes), sink, q.shape, q.dtype)


def _paged_on_shards(
    q: jax.Array,
    cache: PagedKV,
    q_pos: jax.Array,
    *,
    chunk_kv: tuple[jax.Array, jax.Array] | None,
    sink: jax.Array | None,
    **options,
) -> jax.Array:
    """`attention_paged` over a pool split over page shards, in a `jax.shard_map` over them: each shard reads only
    its own pages (local ids). Rows on their shards (`cache.rows_on_shards`: decode rounds) attend locally, no
    communication; otherwise every shard sees the rows, attends over its pages (other shards' entries are -1) and
    the softmax pieces are combined over the shards (a psum of outputs-sized pieces, never of pages)."""
    axes = cache.shard_axes
    merge = () if cache.rows_on_shards else axes

    def local(pool, table, q, q_pos, *extra):
        chunk = tuple(extra[:2]) if chunk_kv is not None else None
        local_sink = extra[-1] if sink is not None else None
        local_cache = PagedKV(pool, table)
        return attention_paged(q, local_cache, q_pos, chunk_kv=chunk, sink=local_sink, merge_axes=merge, **options)

    rows = (q, q_pos) + (tuple(chunk_kv) if chunk_kv is not None else ())
    returns = "rows" if cache.rows_on_shards else "replicated"
    check_vma = options.get("paged_impl") != "pallas_interpret"
    return on_page_shards(local, cache, rows, () if sink is None else (sink,), returns=returns, check_vma=check_vma)


def _paged_kernel(
    q: jax.Array, cache: PagedKV, q_pos: jax.Array, *, sink: jax.Array | None, scale: float, interpret: bool
) -> jax.Array:
    """`attention_paged` through the Pallas kernel. On a mesh it runs inside `jax.shard_map`: each device on its
    rows (batch shard) and q heads (tensor shard) with the pool as placed (kv heads split over the tensor axis, or
    replicated where they do not divide it: then each shard's groups of q heads name the kv heads they read)."""
    pool = cache.pool
    call = functools.partial(kernels.paged_attention_pallas_gpu, scale=scale, interpret=interpret)
    mesh = sharding.current_mesh()
    if mesh is None:
        return call(q, pool.k, pool.v, cache.page_table, q_pos, sink=sink, k_scale=pool.k_scale, v_scale=pool.v_scale)
    num_kv, num_q = pool.k.shape[1], q.shape[2]
    spec = lambda axes, x: sharding.logical_to_spec(axes, x.shape, mesh)
    q_spec = spec(("batch", None, "q_heads", None), q)
    heads_axis, kv_split = q_spec[2], spec(POOL_AXES, pool.k)[1] is not None
    repeat = sharding.kv_head_repeat(num_kv, num_q)  # > 1: q heads split, kv heads replicated
    scales = (pool.k_scale, pool.v_scale) if pool.fp8 else ()
    extra = scales + (() if sink is None else (sink,))
    extra_specs = tuple(spec(SCALE_AXES, x) for x in scales) + (() if sink is None else (spec(("q_heads",), sink),))

    def local(q, k, v, table, pos, *extra):
        k_scale, v_scale = extra[:2] if pool.fp8 else (None, None)
        kv_heads = None  # every kv head of the local pool, in order
        if heads_axis is not None and not kv_split:
            groups = num_kv * repeat // mesh.shape[heads_axis]  # groups of q heads on this shard
            first = jax.lax.axis_index(heads_axis) * groups
            kv_heads = (first + jnp.arange(groups, dtype=jnp.int32)) // repeat
        local_sink = extra[-1] if sink is not None else None
        return call(q, k, v, table, pos, sink=local_sink, k_scale=k_scale, v_scale=v_scale, kv_heads=kv_heads)

    in_specs = (
        q_spec,
        spec(POOL_AXES, pool.k),
        spec(POOL_AXES, pool.v),
        spec(("batch", None), cache.page_table),
        spec(("batch", None), q_pos),
        *extra_specs,
    )
    args = (q, pool.k, pool.v, cache.page_table, q_pos, *extra)
    return _on_row_and_head_shards(local, mesh, args, in_specs, (*q.shape[:3], pool.v.shape[-1]), interpret)


def _on_row_and_head_shards(local, mesh, args: tuple, in_specs: tuple, out_shape: tuple, interpret: bool) -> jax.Array:
    """`local(*args)` in `jax.shard_map` over the mesh's axes not already manual (inside a page shard_map): a decode
    kernel on each device's rows and q heads, its output [B, T, N, Dv] (`out_shape`) laid out so."""
    out_spec = sharding.logical_to_spec(("batch", None, "q_heads", None), out_shape, mesh)
    free = frozenset(a for a in mesh.axis_names if a not in sharding.manual_axes(mesh))
    mapped = jax.shard_map(
        local, mesh=mesh, in_specs=in_specs, out_specs=out_spec, axis_names=free, check_vma=not interpret
    )
    return mapped(*args)


def ring_kernel_fits(q_shape: tuple, cache: LayerKV) -> bool:
    """Whether `ring_kernel` can run these rows on the current mesh: one device, or kv heads split over the same
    mesh axis as the q heads (or neither split), so every shard holds whole groups of q heads with their kv head."""
    mesh = sharding.current_mesh()
    if mesh is None:
        return True
    q_heads = sharding.logical_to_spec(("batch", None, "q_heads", None), q_shape, mesh)[2]
    kv_heads = sharding.logical_to_spec(CACHE_AXES, cache.k.shape, mesh)[1]
    return q_heads == kv_heads


def ring_kernel(
    q: jax.Array,
    cache: LayerKV,
    q_pos: jax.Array,
    *,
    window: int,
    sink: jax.Array | None,
    scale: float,
    interpret: bool,
) -> jax.Array:
    """Decode attention over an SWA ring that already holds this step's keys (`cache.write_ring`) through the Pallas
    ring kernel (`mimo_jax.kernels.ring_attention_gpu`): q [B, T, N, D] -> [B, T, N, Dv]. On a mesh it runs inside
    `jax.shard_map`, each device on its rows and its q heads with their kv heads (`ring_kernel_fits`)."""
    call = functools.partial(kernels.ring_attention_pallas_gpu, window=window, scale=scale, interpret=interpret)
    mesh = sharding.current_mesh()
    if mesh is None:
        return call(q, cache.k, cache.v, cache.pos, q_pos, sink=sink)
    spec = lambda axes, x: sharding.logical_to_spec(axes, x.shape, mesh)
    rows = (q, cache.k, cache.v, cache.pos, q_pos) + (() if sink is None else (sink,))
    in_specs = (
        spec(("batch", None, "q_heads", None), q),
        spec(CACHE_AXES, cache.k),
        spec(CACHE_AXES, cache.v),
        spec(("batch", None), cache.pos),
        spec(("batch", None), q_pos),
    ) + (() if sink is None else (spec(("q_heads",), sink),))

    def local(q, k, v, pos, q_pos, *sink):
        return call(q, k, v, pos, q_pos, sink=sink[0] if sink else None)

    return _on_row_and_head_shards(local, mesh, rows, in_specs, (*q.shape[:3], cache.v.shape[-1]), interpret)


def attention_chunk(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    q_pos: jax.Array,
    prefix: tuple[jax.Array, jax.Array, jax.Array] | PagedKV | None,
    *,
    window_keys: int | None,
    sink: jax.Array | None,
    scale: float,
    prefix_slot_is_position: bool = False,
    implementation: str = "xla",
    prefix_block_pages: int | None = None,
    prefix_merge_axes: tuple[str, ...] = (),
) -> jax.Array:
    """Prefill attention of a chunk as two parts merged by their log-sum-exp.

    The chunk against its own keys (causal and windowed by index, which is by position: the real
    tokens sit at consecutive positions, padding only at the end) runs in
    `jax.nn.dot_product_attention` (`implementation="cudnn"`: flash attention on GPU). The chunk
    against the keys before it runs in plain XLA: `prefix` = (k, v, positions) of a ring or a full-layer
    cache (k/v [B, KV, S, D] as the cache stores them), blockwise over a long full-layer cache, or a
    `PagedKV` read in blocks of `prefix_block_pages` pages; keys at or past the chunk's first position are
    ignored (inside a page shard_map, `prefix_merge_axes` combines the shards' pieces of a paged prefix). The
    chunk's own k/v come [B, T, KV, D] as projected (cuDNN's BTNH layout). Same result as
    `attention` over both key sets. (cuDNN returns the log-sum-exp in the activation dtype, so in bf16 the
    merge weights carry bf16 rounding.)
    """
    b, t, n, d = q.shape
    dv = v_chunk.shape[-1]
    kv = k_chunk.shape[2]
    g = n // kv
    # cuDNN wants equal q/k and v head dims: pad v, slice the output back.
    v_in = jnp.pad(v_chunk, ((0, 0), (0, 0), (0, 0), (0, d - dv))) if dv < d else v_chunk
    own_out, own_lse = jax.nn.dot_product_attention(
        q,
        k_chunk,
        v_in.astype(q.dtype),
        scale=scale,
        is_causal=True,  # cuDNN applies a sliding window only together with its causal mask
        local_window_size=None if window_keys is None else (window_keys - 1, 0),
        implementation=None if implementation == "xla" else implementation,
        return_residual=True,
    )
    total = own_lse.astype(jnp.float32)  # [b, t, n]
    parts = [(own_out[..., :dv].astype(jnp.float32), total)]
    blocks = _prefix_blocks(prefix, t, n, q.dtype, prefix_slot_is_position, prefix_block_pages)
    if blocks is not None:
        read, block, max_blocks = blocks
        none = jnp.iinfo(jnp.int32).max
        first = jnp.min(jnp.where(q_pos >= 0, q_pos, none), axis=1, keepdims=True)
        latest_first = jnp.max(jnp.where(first < none, first, 0))  # a row of padding only needs no keys

        def read_before(j):  # the keys before each row's chunk
            keys, values, key_pos = read(j)
            return keys, values, jnp.where(key_pos < first, key_pos, -1)

        num_blocks = jnp.clip((latest_first + block - 1) // block, 0, max_blocks)
        qg = q.reshape(b, t, kv, g, d)
        pieces = _online_softmax(qg, read_before, num_blocks, max_blocks, q_pos, window_keys, scale)
        pieces = _merge_over(pieces, prefix_merge_axes)
        to_btn = lambda x: jnp.moveaxis(x, 3, 1).reshape((b, t, n) + x.shape[4:])
        row_max, denom, acc = (to_btn(x) for x in pieces)
        prefix_lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
        total = jnp.logaddexp(total, prefix_lse)
        parts.append((acc, row_max))  # acc = out * exp(lse - row_max): weighted by exp(row_max - total)
    if sink is not None:
        total = jnp.logaddexp(total, sink.astype(jnp.float32)[None, None, :])
    out = sum(x * jnp.exp(log_scale - total)[..., None] for x, log_scale in parts)
    return out.astype(q.dtype)


def _prefix_blocks(
    prefix: tuple[jax.Array, jax.Array, jax.Array] | PagedKV | None,
    queries: int,
    heads: int,
    dtype: jnp.dtype,
    slot_is_position: bool,
    block_pages: int | None,
) -> tuple[BlockReader, int, int] | None:
    """(reader, keys per block, number of blocks) of `attention_chunk`'s prefix, or None when it has no keys.
    Blocks of a paged or full-layer prefix hold positions j*block .. (j+1)*block-1; a ring is one block."""
    if isinstance(prefix, PagedKV):
        pages = block_pages or pages_per_block(queries, heads, prefix.page_size, prefix.max_pages)
        read, max_blocks = _page_blocks(prefix, pages, dtype, heads)
        return read, pages * prefix.page_size, max_blocks
    if prefix is None or not prefix[0].shape[2]:
        return None
    slots = prefix[0].shape[2]
    block = key_block_size(queries, heads, slots) if slot_is_position else None
    if block is None:
        return (lambda j: prefix), slots, 1
    return _slice_blocks(*prefix, block), block, slots // block
