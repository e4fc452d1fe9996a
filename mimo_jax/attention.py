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
) -> jax.Array:
    """Reference attention in fp32.

    q [B, T, N, D], k [B, S, KV, D], v [B, S, KV, Dv], positions [B, T] / [B, S] -> [B, T, N, Dv].
    `sink` [N] is an extra logit per head that takes probability mass but carries no value.
    `slot_is_position`: key slot i holds position i (a full-layer cache), so keys past the
    largest query position are never visible; long caches then go through `attention_blockwise`,
    which reads only the blocks up to that position and never holds T x S scores.
    """
    block = key_block_size(q.shape[1], q.shape[2], k.shape[1]) if slot_is_position else None
    if block is not None:
        needed = (jnp.max(q_pos) + block) // block  # blocks holding positions 0 .. max(q_pos)
        num_blocks = jnp.clip(needed, 1, k.shape[1] // block)
        return attention_blockwise(
            q, k, v, q_pos, k_pos, window_keys=window_keys, sink=sink, scale=scale, block=block, num_blocks=num_blocks
        )
    b, t, n, d = q.shape
    kv = k.shape[2]
    g = n // kv
    qg = q.reshape(b, t, kv, g, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
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
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, v.shape[-1]).astype(q.dtype)


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

    Same contract as `attention`; scores exist for one block at a time, and the loop runs only
    over the blocks that can hold visible keys.
    """
    b, t, n, d = q.shape
    kv = k.shape[2]
    g = n // kv
    qg = q.reshape(b, t, kv, g, d)

    def body(j, carry):
        row_max, denom, acc = carry
        start = j * block
        kb = jax.lax.dynamic_slice_in_dim(k, start, block, axis=1)
        vb = jax.lax.dynamic_slice_in_dim(v, start, block, axis=1)
        pb = jax.lax.dynamic_slice_in_dim(k_pos, start, block, axis=1)
        scores = jnp.einsum("btkgd,bskd->bkgts", qg, kb, preferred_element_type=jnp.float32) * scale
        scores = jnp.where(visible_mask(q_pos, pb, window_keys)[:, None, None], scores, _MASKED)
        new_max = jnp.maximum(row_max, scores.max(axis=-1))
        probs = jnp.exp(scores - new_max[..., None])
        correction = jnp.exp(row_max - new_max)
        denom = denom * correction + probs.sum(axis=-1)
        pv = jnp.einsum("bkgts,bskd->bkgtd", probs.astype(v.dtype), vb, preferred_element_type=jnp.float32)
        return new_max, denom, acc * correction[..., None] + pv

    init = (
        jnp.full((b, kv, g, t), _MASKED, jnp.float32),
        jnp.zeros((b, kv, g, t), jnp.float32),
        jnp.zeros((b, kv, g, t, v.shape[-1]), jnp.float32),
    )
    row_max, denom, acc = jax.lax.fori_loop(0, num_blocks, body, init)
    if sink is not None:
        sink_logit = sink.astype(jnp.float32).reshape(1, kv, g, 1)
        new_max = jnp.maximum(row_max, sink_logit)
        correction = jnp.exp(row_max - new_max)
        denom = denom * correction + jnp.exp(sink_logit - new_max)
        acc = acc * correction[..., None]
    out = acc / denom[..., None]  # [b, kv, g, t, dv]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, v.shape[-1]).astype(q.dtype)
