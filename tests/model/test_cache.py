"""Incremental forward through the KV cache (full slots + SWA rings) equals the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.model.cache import LayerKV, _write, empty_layer_kv, remap_ring
from mimo_jax.model.mimo import MiMoModel
from tests.fixtures import TINY


@nnx.jit
def run(model, ids, pos=None, cache=None):
    return model(ids, pos, cache)


def test_chunked_cache_forward_matches_full_forward():
    cfg = MiMoConfig.from_dict(TINY)
    model = MiMoModel(cfg, rngs=nnx.Rngs(0))
    batch, total = 2, 29
    ids = jax.random.randint(jax.random.key(1), (batch, total), 0, cfg.vocab_size)
    full_logits, _ = run(model, ids)
    cache = [empty_layer_kv(spec, batch, 32, jnp.float32) for spec in cfg.layers]
    assert cache[1].slots == cfg.window_keys  # the ring does not grow with the sequence
    pieces, start = [], 0
    for chunk in (7, 1, 1, 9, 1, 3, 7):  # chunks longer than the ring, and single steps
        pos = jnp.broadcast_to(jnp.arange(start, start + chunk, dtype=jnp.int32), (batch, chunk))
        logits, cache = run(model, ids[:, start : start + chunk], pos, cache)
        pieces.append(logits)
        start += chunk
    np.testing.assert_allclose(np.concatenate(pieces, 1), full_logits, rtol=2e-5, atol=2e-5)


def test_padding_positions_are_not_written():
    cfg = MiMoConfig.from_dict(TINY)
    model = MiMoModel(cfg, rngs=nnx.Rngs(0))
    ids = jnp.array([[5, 6, 7, 8], [9, 10, 0, 0]])
    pos = jnp.array([[0, 1, 2, 3], [0, 1, -1, -1]])
    cache = [empty_layer_kv(spec, 2, 16, jnp.float32) for spec in cfg.layers]
    _, cache = run(model, ids, pos, cache)
    assert (np.asarray(cache[0].pos[1]) >= 0).sum() == 2
    assert (np.asarray(cache[1].pos[1]) >= 0).sum() == 2
    # Each row continues after its real tokens exactly as an unpadded run would.
    nxt, _ = run(model, jnp.array([[1], [11]]), jnp.array([[4], [2]]), cache)
    ref0, _ = run(model, jnp.array([[5, 6, 7, 8, 1]]))
    ref1, _ = run(model, jnp.array([[9, 10, 11]]))
    np.testing.assert_allclose(nxt[0, 0], ref0[0, 4], rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(nxt[1, 0], ref1[0, 2], rtol=2e-5, atol=2e-5)


def _random_ring(rng: np.random.RandomState, batch: int, slots: int, newest: int) -> LayerKV:
    """A ring as writes leave it: slot p % slots holds the newest written p <= newest, some slots empty."""
    pos = np.full((batch, slots), -1, np.int32)
    for b in range(batch):
        for q in range(max(0, newest - slots + 1), newest + 1):
            if rng.rand() < 0.8:  # empty slots: never written (or cleared)
                pos[b, q % slots] = q
    k = rng.randn(batch, 2, slots, 3).astype(np.float32)
    v = rng.randn(batch, 2, slots, 4).astype(np.float32)
    return LayerKV(k=jnp.asarray(k), v=jnp.asarray(v), pos=jnp.asarray(pos), ring=True)


def _remap_reference(ring: LayerKV, slots: int, end: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """remap_ring in loops: every position q in [end - slots, end) the source holds goes to slot q % slots."""
    pos, k, v = (np.asarray(x) for x in (ring.pos, ring.k, ring.v))
    batch, src_slots = pos.shape
    out_pos = np.full((batch, slots), -1, np.int32)
    out_k = np.zeros(k.shape[:2] + (slots, k.shape[3]), k.dtype)
    out_v = np.zeros(v.shape[:2] + (slots, v.shape[3]), v.dtype)
    for b in range(batch):
        for q in range(max(0, end - slots), end):
            if pos[b, q % src_slots] == q:
                out_pos[b, q % slots] = q
                out_k[b, :, q % slots], out_v[b, :, q % slots] = k[b, :, q % src_slots], v[b, :, q % src_slots]
    return out_pos, out_k, out_v


def test_remap_ring_matches_a_numpy_reference():
    """Widening, narrowing and shifting `end` (wrap-around, positions below 0, empty slots, stale entries)."""
    rng = np.random.RandomState(0)
    for src_slots, slots, newest, end in [
        (8, 13, 20, 21),
        (8, 13, 3, 4),
        (13, 8, 30, 27),
        (13, 8, 30, 31),
        (8, 8, 17, 18),
        (5, 9, 40, 35),
        (6, 10, 2, -1),
    ]:
        ring = _random_ring(rng, 3, src_slots, newest)
        got = remap_ring(ring, slots, jnp.int32(end))
        want_pos, want_k, want_v = _remap_reference(ring, slots, end)
        np.testing.assert_array_equal(np.asarray(got.pos), want_pos)
        np.testing.assert_array_equal(np.asarray(got.k), want_k)
        np.testing.assert_array_equal(np.asarray(got.v), want_v)
        assert got.ring and got.slots == slots


def test_a_chunk_through_a_widened_ring_leaves_the_narrow_ring_at_its_end_and_at_a_mark():
    """Widen by `spare`, write a chunk, narrow back: as of the chunk's end the ring a narrow write leaves, and as of
    a mark inside the chunk the ring a write of the chunk's part before the mark leaves."""
    rng = np.random.RandomState(1)
    slots, spare, start, length = 8, 6, 19, 9
    ring = _random_ring(rng, 2, slots, start - 1)
    k, v = rng.randn(2, length, 2, 3).astype(np.float32), rng.randn(2, length, 2, 4).astype(np.float32)
    positions = np.broadcast_to(np.arange(start, start + length, dtype=np.int32), (2, length))
    wide = _write(remap_ring(ring, slots + spare, jnp.int32(start)), jnp.asarray(k), jnp.asarray(v), positions)
    for mark in range(start + length - spare, start + length + 1):
        cut = mark - start
        narrow = _write(ring, jnp.asarray(k[:, :cut]), jnp.asarray(v[:, :cut]), positions[:, :cut])
        want = remap_ring(narrow, slots, jnp.int32(mark))  # drops nothing a narrow ring's window needs
        got = remap_ring(wide, slots, jnp.int32(mark))
        np.testing.assert_array_equal(np.asarray(got.pos), np.asarray(narrow.pos))
        for a, b in ((got.pos, want.pos), (got.k, want.k), (got.v, want.v)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
