"""Attention math: partial NeoX RoPE and grouped-query attention with sinks and windows.

Masks are computed from stored key positions (never guessed from slot order), so the same
function serves a full forward, a ring-buffer SWA cache and a fixed-slot full cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

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
    positions [B, T] / [B, S] -> [B, T, N, Dv].
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
    probs = jnp.exp(scores - row_max)
    denom = probs.sum(axis=-1, keepdims=True)
    if sink is not None:
        denom = denom + jnp.exp(sink_logit - row_max)
    probs = probs / denom
    # [b, kv, g, t, dv] first: XLA:CPU has no bf16 x bf16 -> f32 dot that writes [b, t, kv, g, dv] directly
    out = jnp.einsum("bkgts,bksd->bkgtd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def key_block_size(queries: int, heads: int, keys: int) -> int | None:
    """Keys per block for `attention_blockwise` over `keys` slots, or None when one pass is as good
    (a short cache whose scores are small: a loop would only add per-block overhead)."""
    if keys <= KEY_BLOCK_MAX and queries * heads * keys <= SCORE_BLOCK_ELEMENTS:
        return None
    target = max(KEY_BLOCK_MIN, min(KEY_BLOCK_MAX, SCORE_BLOCK_ELEMENTS // max(queries * heads, 1)))
    block = 1 << (target.bit_length() - 1)
    while block >= KEY_BLOCK_MIN and keys % block:
        block //= 2
    return block if KEY_BLOCK_MIN <= block < keys else None


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


def _blockwise_partial(qg, k, v, q_pos, k_pos, window_keys, scale, block, num_blocks) -> tuple:
    """Softmax pieces over the first `num_blocks` blocks of `block` keys (an online softmax)."""
    b, t, kv, g, _ = qg.shape

    def body(j, carry):
        piece = lambda x, axis: jax.lax.dynamic_slice_in_dim(x, j * block, block, axis=axis)
        keys, values, key_pos = piece(k, 2), piece(v, 2), piece(k_pos, 1)
        return _merge(carry, _partial_softmax(qg, keys, values, q_pos, key_pos, window_keys, scale))

    init = (
        jnp.full((b, kv, g, t), _MASKED, jnp.float32),
        jnp.zeros((b, kv, g, t), jnp.float32),
        jnp.zeros((b, kv, g, t, v.shape[-1]), jnp.float32),
    )
    return jax.lax.fori_loop(0, num_blocks, body, init)


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
    g = n // kv
    qg = q.reshape(b, t, kv, g, d)
    row_max, denom, acc = _blockwise_partial(qg, k, v, q_pos, k_pos, window_keys, scale, block, num_blocks)
    if sink is not None:
        sink_logit = sink.astype(jnp.float32).reshape(1, kv, g, 1)
        row_max, denom, acc = _merge((row_max, denom, acc), (sink_logit, jnp.ones_like(denom), jnp.zeros_like(acc)))
    out = acc / jnp.where(denom > 0, denom, 1.0)[..., None]  # [b, kv, g, t, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, v.shape[-1]).astype(q.dtype)


def attention_chunk(
    q: jax.Array,
    k_chunk: jax.Array,
    v_chunk: jax.Array,
    q_pos: jax.Array,
    prefix: tuple[jax.Array, jax.Array, jax.Array] | None,
    *,
    window_keys: int | None,
    sink: jax.Array | None,
    scale: float,
    prefix_slot_is_position: bool = False,
    implementation: str = "xla",
) -> jax.Array:
    """Prefill attention of a chunk as two parts merged by their log-sum-exp.

    The chunk against its own keys (causal and windowed by index, which is by position: the real
    tokens sit at consecutive positions, padding only at the end) runs in
    `jax.nn.dot_product_attention` (`implementation="cudnn"`: flash attention on GPU). The chunk
    against the keys before it, `prefix` = (k, v, positions) of a ring or a full-layer cache
    (k/v [B, KV, S, D] as the cache stores them; keys at or past the chunk's first position are
    ignored), runs in plain XLA, blockwise over a long full-layer cache. The chunk's own k/v come
    [B, T, KV, D] as projected (cuDNN's BTNH layout). Same result as `attention` over both key sets. (cuDNN returns the
    log-sum-exp in the activation dtype, so in bf16 the merge weights carry bf16 rounding.)
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
    if prefix is not None and prefix[0].shape[2]:
        pk, pv, ppos = prefix
        first = jnp.min(jnp.where(q_pos >= 0, q_pos, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        before = jnp.where(ppos < first, ppos, -1)
        qg = q.reshape(b, t, kv, g, d)
        slots = pk.shape[2]
        block = key_block_size(t, n, slots) if prefix_slot_is_position else None
        if block is None:
            row_max, denom, acc = _partial_softmax(qg, pk, pv, q_pos, before, window_keys, scale)
        else:
            num_blocks = jnp.clip((jnp.max(first) + block - 1) // block, 0, slots // block)
            row_max, denom, acc = _blockwise_partial(qg, pk, pv, q_pos, before, window_keys, scale, block, num_blocks)
        to_btn = lambda x: jnp.moveaxis(x, 3, 1).reshape((b, t, n) + x.shape[4:])
        row_max, denom, acc = to_btn(row_max), to_btn(denom), to_btn(acc)
        prefix_lse = jnp.where(denom > 0, row_max + jnp.log(jnp.where(denom > 0, denom, 1.0)), -jnp.inf)
        total = jnp.logaddexp(total, prefix_lse)
        parts.append((acc, row_max))  # acc = out * exp(lse - row_max): weighted by exp(row_max - total)
    if sink is not None:
        total = jnp.logaddexp(total, sink.astype(jnp.float32)[None, None, :])
    out = sum(x * jnp.exp(log_scale - total)[..., None] for x, log_scale in parts)
    return out.astype(q.dtype)
