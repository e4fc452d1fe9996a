"""Paged decode attention for GPU in Pallas (Triton backend): keys and values read from their pages in place.

Contract of `mimo_jax.model.attention.attention_paged` (a full layer: causal, no window) for decode-sized
queries: q [B, T, N, D] at positions q_pos [B, T] (a query at p sees the keys at positions <= p; -1 marks
padding, which sees nothing), a pool k [P, KV, page_size, D] / v [P, KV, page_size, Dv] shared by every row,
a page table [B, max_pages] (position p of row b is in page table[b, p // page_size]; -1 = no page,
nothing visible), optional sink logits [N] (exp(sink) joins each head's denominator), an fp32 online
softmax -> [B, T, N, Dv] in q's dtype; a row that sees no key gives zeros. FP8 pools (float8_e4m3fn values,
float32 scales [P, KV, page_size], one per token and head) are dequantized in the kernel: the key scale
multiplies the scores' columns, the value scale the probabilities before the value product.

Grid (row, kv head group, split). A program holds one row's queries for the q heads of one kv head
(G = N / KV heads x T queries, padded to a power of two >= 16: the MMA's rows), reads the row's page ids
a block at a time (`pages_per_block` pages, about BLOCK_KEYS keys) and streams those pages' keys and values
through an online softmax. Only the pages up to the row's largest query position are read, so the cost
follows each row's length, not the table's. With splits > 1 (split-K "flash decoding": rows x kv heads
alone leave most SMs idle at small batch) a row's blocks are shared among that many programs, each
returning (running max, sum, unnormalized output), which a small XLA step combines with the sink.
Head dims need not be powers of two (Triton tiles must be): they are handled in power-of-two column chunks,
192 = 128 + 64, each a separate MMA accumulated into the same scores.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mimo_jax.kernels import manual_axes

# Launch defaults (not tuned on a GPU yet: bench/check_paged_kernel.py --time sweeps the splits).
BLOCK_KEYS = 128  # keys per loop iteration: pages_per_block = BLOCK_KEYS // page_size pages (at least one)
NUM_WARPS = 4
NUM_STAGES = 2
TARGET_PROGRAMS = 264  # about two programs per SM of an H100 / H200 (132 SMs): splits fill up to this many
MIN_BLOCKS_PER_SPLIT = 4  # a split shorter than this many blocks costs more in its combine than it saves
# MMA rows per program (q heads of a group x queries), padded to a power of two; past MAX_ROWS a kv head's q heads
# are shared among programs (each reads the kv head's pages)
MIN_ROWS, MAX_ROWS = 16, 128

_MASKED = -1e30  # finite: a row with no visible key keeps a zero sum instead of NaN


@dataclasses.dataclass(frozen=True)
class PagedConfig:
    """Launch of `paged_attention`: keys per loop iteration, splits of each row's pages (None: `default_splits`),
    Triton warps and pipeline stages."""

    block_keys: int = BLOCK_KEYS
    splits: int | None = None
    num_warps: int = NUM_WARPS
    num_stages: int = NUM_STAGES


def pow2_chunks(dim: int) -> tuple[tuple[int, int], ...]:
    """(first column, width) power-of-two chunks covering `dim`, widest first: 192 -> ((0, 128), (128, 64))."""
    chunks, start = [], 0
    for bit in reversed(range(dim.bit_length())):
        if dim & (1 << bit):
            chunks.append((start, 1 << bit))
            start += 1 << bit
    return tuple(chunks)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def pages_per_block(page_size: int, max_pages: int, block_keys: int = BLOCK_KEYS) -> int:
    """Pages per loop iteration: about `block_keys` keys, at least one page, no more than the table pads to."""
    return max(1, min(block_keys // page_size, _next_pow2(max_pages)))


def default_splits(programs: int, table_blocks: int) -> int:
    """Splits of each row's blocks: programs x splits up to TARGET_PROGRAMS, each split at least
    MIN_BLOCKS_PER_SPLIT blocks of the longest row the table holds (`table_blocks`)."""
    return max(1, min(TARGET_PROGRAMS // max(programs, 1), table_blocks // MIN_BLOCKS_PER_SPLIT))


def _dot(a: jax.Array, b: jax.Array, b_transposed: bool = False) -> jax.Array:
    """a [M, K] @ b [K, N] (or b [N, K] transposed) with fp32 accumulation."""
    dims = (((1,), (1 if b_transposed else 0,)), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _masked_gather(ref, index: tuple, mask: jax.Array, interpret: bool) -> jax.Array:
    """ref[index] (page ids gathered on the first axis) where `mask`, else 0: a masked load skips the dead pages'
    bytes on the GPU; the interpreter's masked load takes no gather, so there the mask applies after a plain one."""
    if interpret:
        return jnp.where(mask, ref[index], 0).astype(ref.dtype)
    return plgpu.load(ref.at[index], mask=mask, other=jnp.zeros((), ref.dtype))


def _kernel(
    kv_head_ref,
    table_ref,
    pos_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    scale: float,
    pages_per_block: int,
    splits: int,
    fp8: bool,
    has_sink: bool,
    d_chunks: tuple,
    dv_chunks: tuple,
    interpret: bool,
):
    """One program: row pl.program_id(0), q heads of group pl.program_id(1), split pl.program_id(2)."""
    refs = list(refs)
    k_scale_ref, v_scale_ref = (refs.pop(0), refs.pop(0)) if fp8 else (None, None)
    sink_ref = refs.pop(0) if has_sink else None
    page_size = k_ref.shape[2]
    block_keys = pages_per_block * page_size
    kv_head = kv_head_ref[pl.program_id(1)]
    row_pos = pos_ref[...]  # [M] position of each MMA row's query (-1: padding)
    last = jnp.max(row_pos)
    needed = jnp.where(last >= 0, jax.lax.div(last, page_size) + 1, 0)  # table entries up to the last query
    num_blocks = jnp.minimum(pl.cdiv(needed, pages_per_block), table_ref.shape[0] // pages_per_block)
    per_split = pl.cdiv(num_blocks, splits)
    start = pl.program_id(2) * per_split
    end = jnp.minimum(start + per_split, num_blocks)
    dtype = q_ref.dtype
    queries = [q_ref[:, pl.ds(c0, w)] for c0, w in d_chunks]
    offsets = jnp.arange(page_size, dtype=jnp.int32)

    def body(j, carry):
        entry = j * pages_per_block + jnp.arange(pages_per_block, dtype=jnp.int32)
        ids = table_ref[pl.ds(j * pages_per_block, pages_per_block)]
        live = (ids >= 0) & (entry < needed)  # pages past the row's last query are not read
        page = jnp.where(live, ids, 0)
        live_keys = jnp.broadcast_to(live[:, None], (pages_per_block, page_size))

        def load(ref, c0, w):  # [block_keys, w] of this block's pages, in q's dtype
            mask = jnp.broadcast_to(live[:, None, None], (pages_per_block, page_size, w))
            x = _masked_gather(ref, (page, kv_head, slice(None), pl.ds(c0, w)), mask, interpret)
            return x.reshape(block_keys, w).astype(dtype)

        def token_scales(ref):  # [block_keys] float32
            return _masked_gather(ref, (page, kv_head, slice(None)), live_keys, interpret).reshape(block_keys)

        key_pos = (entry[:, None] * page_size + offsets[None, :]).reshape(block_keys)
        visible = live_keys.reshape(block_keys)[None, :] & (key_pos[None, :] <= row_pos[:, None])
        scales = (token_scales(k_scale_ref), token_scales(v_scale_ref)) if fp8 else (None, None)
        return online_softmax_step(carry, queries, load, k_ref, v_ref, visible, scale, d_chunks, dv_chunks, *scales)

    init = softmax_start(row_pos.shape[0], dv_chunks)
    row_max, denom, accs = jax.lax.fori_loop(start, end, body, init)
    if splits == 1:
        (out_ref,) = refs
        store_output(out_ref, row_max, denom, accs, sink_ref[...] if has_sink else None, dv_chunks)
    else:
        acc_ref, max_ref, denom_ref = refs
        for acc, (c0, w) in zip(accs, dv_chunks, strict=True):
            acc_ref[:, pl.ds(c0, w)] = acc
        max_ref[...] = row_max
        denom_ref[...] = denom


def softmax_start(rows: int, dv_chunks: tuple) -> tuple:
    """The online softmax's empty carry for `rows` MMA rows: (running max, sum, value chunks)."""
    return (
        jnp.full((rows,), _MASKED, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        tuple(jnp.zeros((rows, w), jnp.float32) for _, w in dv_chunks),
    )


def online_softmax_step(
    carry: tuple,
    queries: list,
    load,
    k_ref,
    v_ref,
    visible,
    scale: float,
    d_chunks: tuple,
    dv_chunks: tuple,
    k_scale=None,
    v_scale=None,
) -> tuple:
    """One block of keys through the online softmax: `load(ref, c0, w)` gives the block's [keys, w] columns of
    k_ref / v_ref in q's dtype, `visible` [M, keys] which a row may see; fp8 blocks' per-key scales (k_scale,
    v_scale [keys]) multiply the scores' columns and the probabilities. carry -> carry (`softmax_start`)."""
    m_prev, l_prev, accs = carry
    scores = _dot(queries[0], load(k_ref, *d_chunks[0]), b_transposed=True)
    for q, (c0, w) in zip(queries[1:], d_chunks[1:], strict=True):
        scores += _dot(q, load(k_ref, c0, w), b_transposed=True)
    if k_scale is not None:
        scores *= k_scale[None, :]
    scores = jnp.where(visible, scores * scale, _MASKED)
    m_new = jnp.maximum(m_prev, scores.max(axis=1))
    correction = jnp.exp(m_prev - m_new)
    probs = jnp.where(visible, jnp.exp(scores - m_new[:, None]), 0.0)
    l_new = l_prev * correction + probs.sum(axis=1)
    if v_scale is not None:
        probs *= v_scale[None, :]
    probs = probs.astype(queries[0].dtype)
    accs = tuple(
        acc * correction[:, None] + _dot(probs, load(v_ref, c0, w))
        for acc, (c0, w) in zip(accs, dv_chunks, strict=True)
    )
    return m_new, l_new, accs


def to_mma_rows(q: jax.Array, q_pos: jax.Array, sink: jax.Array | None, groups: int, rows: int) -> tuple:
    """q [B, T, N, D] -> (q rows [B, groups, rows, D], their positions [B, rows], sink per row [groups, rows] or
    None): a group's N / groups q heads x T queries as MMA rows (row t * G + h), padded to `rows` (position -1)."""
    b, t, n, d = q.shape
    g = n // groups
    pad_rows = ((0, 0), (0, rows - t * g))
    row_pos = jnp.pad(jnp.repeat(q_pos.astype(jnp.int32), g, axis=1), pad_rows, constant_values=-1)
    q_rows = q.reshape(b, t, groups, g, d).transpose(0, 2, 1, 3, 4).reshape(b, groups, t * g, d)
    q_rows = jnp.pad(q_rows, ((0, 0), (0, 0), (0, rows - t * g), (0, 0)))
    sink_rows = None
    if sink is not None:
        sink_rows = jnp.pad(jnp.tile(sink.astype(jnp.float32).reshape(groups, g), (1, t)), pad_rows)
    return q_rows, row_pos, sink_rows


def from_mma_rows(out: jax.Array, t: int, n: int) -> jax.Array:
    """Outputs [B, groups, rows, Dv] in `to_mma_rows`' order -> [B, T, N, Dv]."""
    b, groups, _, dv = out.shape
    g = n // groups
    return out[:, :, : t * g].reshape(b, groups, t, g, dv).transpose(0, 2, 1, 3, 4).reshape(b, t, n, dv)


def store_output(out_ref, row_max, denom, accs, sink, dv_chunks: tuple) -> None:
    """Write a program's normalized output: the online softmax's pieces (running max, sum, unnormalized value
    chunks [M, w]) with the sink logits [M] (or None) joining the denominator; a row with no mass writes zeros."""
    if sink is not None:
        total_max = jnp.maximum(row_max, sink)
        kept = jnp.exp(row_max - total_max)
        denom = denom * kept + jnp.exp(sink - total_max)
    else:
        kept = jnp.ones_like(denom)
    weight = kept / jnp.where(denom > 0, denom, 1.0)
    for acc, (c0, w) in zip(accs, dv_chunks, strict=True):
        out_ref[:, pl.ds(c0, w)] = (acc * weight[:, None]).astype(out_ref.dtype)


def _combine(acc: jax.Array, row_max: jax.Array, denom: jax.Array, sink: jax.Array | None) -> jax.Array:
    """The splits' pieces acc [B, KV, S, M, Dv], row_max / denom [B, KV, S, M] (+ sink [KV, M]) -> normalized
    output [B, KV, M, Dv]."""
    total_max = row_max.max(axis=2)
    if sink is not None:
        total_max = jnp.maximum(total_max, sink[None])
    weights = jnp.exp(row_max - total_max[:, :, None])
    total = (denom * weights).sum(axis=2)
    if sink is not None:
        total = total + jnp.exp(sink[None] - total_max)
    out = (acc * weights[..., None]).sum(axis=2)
    return out / jnp.where(total > 0, total, 1.0)[..., None]


def _check(q, k_pages, v_pages, page_table, q_pos, sink, k_scale, v_scale, kv_heads) -> None:
    b, t, n, d = q.shape
    if k_pages.ndim != 4 or v_pages.shape[:3] != k_pages.shape[:3]:
        raise ValueError(f"pools k {k_pages.shape} / v {v_pages.shape}: expected [P, KV, page_size, D] alike")
    if k_pages.shape[3] != d:
        raise ValueError(f"q head dim {d} != the key pool's {k_pages.shape[3]}")
    if page_table.ndim != 2 or page_table.shape[0] != b or q_pos.shape != (b, t):
        raise ValueError(f"page_table {page_table.shape} / q_pos {q_pos.shape} do not match q {q.shape}")
    if (k_scale is None) != (v_scale is None):
        raise ValueError("an fp8 pool needs both k_scale and v_scale")
    if k_scale is not None and (k_scale.shape != k_pages.shape[:3] or v_scale.shape != k_pages.shape[:3]):
        raise ValueError(f"scales {k_scale.shape} / {v_scale.shape}: expected {k_pages.shape[:3]}")
    if n % kv_heads.shape[0]:
        raise ValueError(f"{n} q heads do not split into {kv_heads.shape[0]} groups (one per kv head read)")
    if sink is not None and sink.shape != (n,):
        raise ValueError(f"sink {sink.shape}: expected one logit per q head ({n},)")


def _check_triton(rows: int, page_size: int, block_keys: int, d: int, dv: int) -> None:
    """Triton's limits on tiles (the interpreter has none)."""
    if rows > MAX_ROWS:
        raise ValueError(f"{rows} MMA rows (q heads per kv head x queries) exceed {MAX_ROWS}: too many queries")
    if page_size & (page_size - 1) or block_keys < 16:
        raise ValueError(f"page_size {page_size}: the GPU kernel needs a power of two, and >= 16 keys per block")
    if d % 16 or dv % 16:
        raise ValueError(f"head dims {d} / {dv}: the GPU kernel needs multiples of 16 (MMA chunks)")


def paged_attention(
    q: jax.Array,
    k_pages: jax.Array,
    v_pages: jax.Array,
    page_table: jax.Array,
    q_pos: jax.Array,
    *,
    scale: float,
    sink: jax.Array | None = None,
    k_scale: jax.Array | None = None,
    v_scale: jax.Array | None = None,
    kv_heads: jax.Array | None = None,
    config: PagedConfig | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Decode attention over a paged pool (module docstring): q [B, T, N, D] -> [B, T, N, Dv] in q's dtype.

    `kv_heads` [groups] int32: the pool head each consecutive group of N / groups q heads reads (default: head
    i for group i, groups = the pool's KV); on a mesh whose q heads split over more shards than there are kv
    heads, a shard's groups read heads of a replicated pool. `interpret=True` runs the Pallas interpreter
    (any backend; tests). `config`: launch (default PagedConfig()).
    """
    config = config or PagedConfig()
    b, t, n, d = q.shape
    page_size, dv = k_pages.shape[2], v_pages.shape[-1]
    if kv_heads is None:
        kv_heads = jnp.arange(k_pages.shape[1], dtype=jnp.int32)
    _check(q, k_pages, v_pages, page_table, q_pos, sink, k_scale, v_scale, kv_heads)
    g = n // kv_heads.shape[0]
    while t * g > MAX_ROWS and g % 2 == 0:  # too many MMA rows: each program takes half of a kv head's q heads
        kv_heads, g = jnp.repeat(kv_heads, 2), g // 2
    groups = kv_heads.shape[0]
    rows = max(MIN_ROWS, _next_pow2(t * g))
    per_block = pages_per_block(page_size, page_table.shape[1], config.block_keys)
    if not interpret:
        _check_triton(rows, page_size, per_block * page_size, d, dv)
    table_blocks = -(-page_table.shape[1] // per_block)
    splits = max(1, min(config.splits or default_splits(b * groups, table_blocks), table_blocks))
    fp8 = k_scale is not None

    table_pad = ((0, 0), (0, table_blocks * per_block - page_table.shape[1]))
    table = jnp.pad(page_table.astype(jnp.int32), table_pad, constant_values=-1)
    q_rows, row_pos, sink_rows = to_mma_rows(q, q_pos, sink, groups, rows)

    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    inputs = [kv_heads.astype(jnp.int32), table, row_pos, q_rows, k_pages, v_pages]
    in_specs = [
        whole(kv_heads),
        pl.BlockSpec((None, table.shape[1]), lambda i, h, s: (i, 0)),
        pl.BlockSpec((None, rows), lambda i, h, s: (i, 0)),
        pl.BlockSpec((None, None, rows, d), lambda i, h, s: (i, h, 0, 0)),
        whole(k_pages),
        whole(v_pages),
    ]
    if fp8:
        inputs += [k_scale, v_scale]
        in_specs += [whole(k_scale), whole(v_scale)]
    if sink is not None:
        inputs.append(sink_rows)
        in_specs.append(pl.BlockSpec((None, rows), lambda i, h, s: (h, 0)))
    args = manual_axes.match_varying(tuple(inputs))
    like = args[3]
    if splits == 1:
        out_shape = [manual_axes.out_struct((b, groups, rows, dv), q.dtype, like)]
        out_specs = [pl.BlockSpec((None, None, rows, dv), lambda i, h, s: (i, h, 0, 0))]
    else:
        out_shape = [
            manual_axes.out_struct((b, groups, splits, rows, dv), jnp.float32, like),
            manual_axes.out_struct((b, groups, splits, rows), jnp.float32, like),
            manual_axes.out_struct((b, groups, splits, rows), jnp.float32, like),
        ]
        out_specs = [
            pl.BlockSpec((None, None, None, rows, dv), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec((None, None, None, rows), lambda i, h, s: (i, h, s, 0)),
        ]
    kernel = functools.partial(
        _kernel,
        scale=float(scale),
        pages_per_block=per_block,
        splits=splits,
        fp8=fp8,
        has_sink=sink is not None,
        d_chunks=pow2_chunks(d),
        dv_chunks=pow2_chunks(dv),
        interpret=interpret,
    )
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(b, groups, splits),
        in_specs=in_specs,
        out_specs=out_specs,
        compiler_params=plgpu.CompilerParams(num_warps=config.num_warps, num_stages=config.num_stages),
        interpret=interpret,
        name="paged_attention",
    )(*args)
    if splits == 1:
        out = outs[0]
    else:
        with jax.named_scope("paged_attention_combine"):
            out = _combine(*outs, sink_rows).astype(q.dtype)
    return from_mma_rows(out, t, n)
