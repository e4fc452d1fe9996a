"""Per-layer KV cache: fixed slots for full-attention layers, a ring buffer for SWA layers.

Each cache stores the absolute position of every slot (-1 = empty), so attention masks are
computed from positions. Full layers keep slot = position (capacity = max context); SWA
layers keep slot = position % ring_size, where ring_size >= window_keys, so their memory
does not grow with the sequence.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mimo_jax.config import LayerSpec


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerKV:
    k: jax.Array  # [B, S, KV, D]
    v: jax.Array  # [B, S, KV, Dv], already multiplied by the value scale
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
        k=jnp.zeros((batch, slots, spec.num_kv_heads, spec.head_dim), dtype),
        v=jnp.zeros((batch, slots, spec.num_kv_heads, spec.v_head_dim), dtype),
        pos=jnp.full((batch, slots), -1, jnp.int32),
        ring=ring,
    )


def kv_bytes_per_token(spec: LayerSpec, dtype_bytes: int = 2) -> int:
    return spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * dtype_bytes


def _write(cache: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array) -> LayerKV:
    """Scatter new k/v at their slots; positions < 0 (padding) are dropped."""
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
    return LayerKV(
        k=cache.k.at[rows, slot].set(k.astype(cache.k.dtype), mode="drop"),
        v=cache.v.at[rows, slot].set(v.astype(cache.v.dtype), mode="drop"),
        pos=cache.pos.at[rows, slot].set(positions, mode="drop"),
        ring=cache.ring,
    )


def update_and_read(
    cache: LayerKV, k: jax.Array, v: jax.Array, positions: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array, LayerKV]:
    """Add this step's keys/values; return (keys, values, key_positions) to attend over, and the new cache.

    Full layers write first and read the slots (slot = position, nothing is overwritten).
    Rings are read before the write, concatenated with the new keys, because a long chunk may
    overwrite ring slots that its own earlier queries still see.
    """
    new_cache = _write(cache, k, v, positions)
    if cache.ring:
        # Slots at or past this chunk's first position are stale (e.g. rejected drafts).
        first = jnp.min(jnp.where(positions >= 0, positions, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        old_pos = jnp.where(cache.pos >= first, -1, cache.pos)
        keys = jnp.concatenate([cache.k, k.astype(cache.k.dtype)], axis=1)
        values = jnp.concatenate([cache.v, v.astype(cache.v.dtype)], axis=1)
        key_pos = jnp.concatenate([old_pos, positions], axis=1)
        return keys, values, key_pos, new_cache
    return new_cache.k, new_cache.v, new_cache.pos, new_cache
