"""Incremental forward through the KV cache (full slots + SWA rings) equals the full forward."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.model.cache import empty_layer_kv
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
