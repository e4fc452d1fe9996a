"""Sliding-window decode attention over a ring for GPU in Pallas (Triton backend): one kernel per layer instead of
XLA's ~15 small ones (concatenations, scores, mask, max, exp, sums, value product, normalization).

Contract of `mimo_jax.model.attention.attention` over an SWA layer's ring *after* this step's keys were written
(`mimo_jax.model.cache.write_ring`): q [B, T, N, D] at positions q_pos [B, T] (-1: padding, sees nothing), the ring
k [B, KV, S, D] / v [B, KV, S, Dv] with its key positions pos [B, S] (-1: empty slot), a query at p sees the keys
at positions k with p - window < k <= p, optional sink logits [N] (exp(sink) joins each head's denominator), an
fp32 softmax -> [B, T, N, Dv] in q's dtype; a row that sees no key gives zeros. Reading after the write is exact
when the ring holds `window + T - 1` slots or more: the entries the write replaced are then outside every query's
window (`mimo_jax.model.cache.ring_holds_window`).

Grid (row, kv head): a program holds one row's queries for the q heads of one kv head (G = N / KV x T MMA rows,
padded to a power of two >= 16, as the paged kernel) and streams the ring in blocks of `ring_block(S)` slots through
an online softmax; where S is no multiple of it, the last block ends at S and skips the slots it shares with the
one before (every load in bounds: 129 slots are blocks at 0 and 64, then 65 .. 128 keeping only slot 128). Head dims
in power-of-two column chunks (192 = 128 + 64).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mimo_jax.kernels import manual_axes
from mimo_jax.kernels.paged_attention_gpu import (
    MAX_ROWS,
    MIN_ROWS,
    _next_pow2,
    from_mma_rows,
    online_softmax_step,
    pow2_chunks,
    softmax_start,
    store_output,
    to_mma_rows,
)

BLOCK_KEYS = 64  # ring slots per step of the online softmax
NUM_WARPS = 4
NUM_STAGES = 1


def ring_block(slots: int) -> int:
    """Ring slots per online-softmax step: BLOCK_KEYS, or the largest power of two a shorter ring holds."""
    return min(BLOCK_KEYS, 1 << (slots.bit_length() - 1))


def block_starts(slots: int) -> list[tuple[int, int]]:
    """(first slot, first slot not read before) of each block: whole blocks, then one ending at the ring's end."""
    block = ring_block(slots)
    starts = [(s, s) for s in range(0, slots - block + 1, block)]
    if slots % block:
        starts.append((slots - block, slots - slots % block))
    return starts


def _kernel(
    pos_ref,
    qpos_ref,
    q_ref,
    k_ref,
    v_ref,
    *refs,
    scale: float,
    window: int,
    slots: int,
    has_sink: bool,
    d_chunks: tuple,
    dv_chunks: tuple,
):
    """One program: row pl.program_id(0), kv head pl.program_id(1)."""
    refs = list(refs)
    sink_ref = refs.pop(0) if has_sink else None
    (out_ref,) = refs
    row, head = pl.program_id(0), pl.program_id(1)
    dtype = q_ref.dtype
    row_pos = qpos_ref[...]  # [M] position of each MMA row's query (-1: padding)
    queries = [q_ref[:, pl.ds(c0, w)] for c0, w in d_chunks]
    carry = softmax_start(row_pos.shape[0], dv_chunks)
    block = ring_block(slots)
    for start, fresh in block_starts(slots):  # a ring is a few blocks: unrolled
        key_pos = pos_ref[row, pl.ds(start, block)]
        key_pos = jnp.where(start + jnp.arange(block, dtype=jnp.int32) >= fresh, key_pos, -1)  # read before
        k, p = key_pos[None, :], row_pos[:, None]
        visible = (k >= 0) & (k <= p) & (p - k < window)

        def load(ref, c0, w, start=start):  # [block, w] of this block's slots
            return ref[row, head, pl.ds(start, block), pl.ds(c0, w)].astype(dtype)

        carry = online_softmax_step(carry, queries, load, k_ref, v_ref, visible, scale, d_chunks, dv_chunks)
    row_max, denom, accs = carry
    store_output(out_ref, row_max, denom, accs, sink_ref[...] if has_sink else None, dv_chunks)


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    pos: jax.Array,
    q_pos: jax.Array,
    *,
    window: int,
    scale: float,
    sink: jax.Array | None = None,
    interpret: bool = False,
) -> jax.Array:
    """Sliding-window decode attention over a ring holding this step's keys (module docstring):
    q [B, T, N, D] -> [B, T, N, Dv] in q's dtype. `interpret=True` runs the Pallas interpreter (tests)."""
    b, t, n, d = q.shape
    kv, slots, dv = k.shape[1], k.shape[2], v.shape[-1]
    if k.shape != (b, kv, slots, d) or v.shape[:3] != (b, kv, slots) or pos.shape != (b, slots):
        raise ValueError(f"ring k {k.shape} / v {v.shape} / pos {pos.shape} do not match q {q.shape}")
    if q_pos.shape != (b, t) or n % kv:
        raise ValueError(f"q {q.shape} / q_pos {q_pos.shape}: {n} q heads over {kv} kv heads")
    if sink is not None and sink.shape != (n,):
        raise ValueError(f"sink {sink.shape}: expected one logit per q head ({n},)")
    g = n // kv
    rows = max(MIN_ROWS, _next_pow2(t * g))
    if not interpret and (rows > MAX_ROWS or d % 16 or dv % 16 or slots < 16):
        raise ValueError(
            f"{t * g} MMA rows / head dims {d}, {dv} / {slots} ring slots: the GPU kernel takes <= {MAX_ROWS} rows, "
            "multiples of 16, >= 16 slots"
        )
    q_rows, row_pos, sink_rows = to_mma_rows(q, q_pos, sink, kv, rows)
    whole = lambda x: pl.BlockSpec(x.shape, lambda *_: (0,) * x.ndim)
    inputs = [pos.astype(jnp.int32), row_pos, q_rows, k, v]
    in_specs = [
        whole(inputs[0]),
        pl.BlockSpec((None, rows), lambda i, h: (i, 0)),
        pl.BlockSpec((None, None, rows, d), lambda i, h: (i, h, 0, 0)),
        whole(k),
        whole(v),
    ]
    if sink is not None:
        inputs.append(sink_rows)
        in_specs.append(pl.BlockSpec((None, rows), lambda i, h: (h, 0)))
    kernel = functools.partial(
        _kernel,
        scale=float(scale),
        window=int(window),
        slots=slots,
        has_sink=sink is not None,
        d_chunks=pow2_chunks(d),
        dv_chunks=pow2_chunks(dv),
    )
    args = manual_axes.match_varying(tuple(inputs))  # inside `jax.shard_map` (a mesh): one varying type for all
    out = pl.pallas_call(
        kernel,
        out_shape=manual_axes.out_struct((b, kv, rows, dv), q.dtype, args[2]),
        grid=(b, kv),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, rows, dv), lambda i, h: (i, h, 0, 0)),
        compiler_params=plgpu.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
        name="ring_attention",
    )(*args)
    return from_mma_rows(out, t, n)
