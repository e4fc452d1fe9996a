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
) -> jax.Array:
    """Reference attention in fp32.

    q [B, T, N, D], k [B, S, KV, D], v [B, S, KV, Dv], positions [B, T] / [B, S] -> [B, T, N, Dv].
    `sink` [N] is an extra logit per head that takes probability mass but carries no value.
    """
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
