"""Per-layer KV cache: fixed slots for full-attention layers, a ring buffer for SWA layers.

Each cache stores the absolute position of every slot (-1 = empty), so attention masks are
computed from positions. Full layers keep slot = position (capacity = max context); SWA
layers keep slot = position % ring_size, where ring_size >= window_keys, so their memory
does not grow with the sequence.

Keys and values are stored heads-major, [batch, kv_heads, slots, head_dim], on every backend:
each head's slots are one contiguous [slots, head_dim] matrix, the layout the attention matmuls
read. (Stored [batch, slots, kv_heads, head_dim], TPU tiles the last two dims, so one KV head per
chip was padded to a tile, and every decode step copied each full-attention layer's whole cache
into the attention's layout; `tests/tools/test_aot.py` checks the compiled decode loop for that.)
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mimo_jax.config import LayerSpec, MiMoConfig
from mimo_jax.sharding import current_mesh, logical_to_spec


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
