"""Blockwise attention over a full-layer cache equals the reference attention, alone and inside the engine."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.engine.host import Engine
from mimo_jax.model import attention as attn
from mimo_jax.model.cache import heads_major
from mimo_jax.model.mimo import MiMoModel
from tests.fixtures import TINY


@pytest.mark.parametrize("window,sink", [(None, False), (None, True), (7, True)])
def test_blockwise_equals_reference(window, sink):
    rs = np.random.RandomState(0)
    b, t, n, kv, d, dv, slots, block = 2, 5, 4, 2, 8, 6, 64, 16
    q = jnp.asarray(rs.randn(b, t, n, d), jnp.float32)
    k = jnp.asarray(rs.randn(b, kv, slots, d), jnp.float32)  # heads-major, as the cache stores them
    v = jnp.asarray(rs.randn(b, kv, slots, dv), jnp.float32)
    lengths = np.array([37, 20])  # slot = position; slots past a row's length are empty
    k_pos = jnp.asarray(np.where(np.arange(slots)[None] < lengths[:, None], np.arange(slots)[None], -1), jnp.int32)
    q_pos = jnp.asarray(lengths[:, None] - t + np.arange(t)[None], jnp.int32)
    sinks = jnp.asarray(rs.randn(n), jnp.float32) if sink else None
    kwargs = dict(window_keys=window, sink=sinks, scale=d**-0.5)
    ref = attn.attention(q, k, v, q_pos, k_pos, **kwargs)
    num_blocks = (int(q_pos.max()) + block) // block
    assert num_blocks < slots // block  # the loop stops before the empty blocks
    got = attn.attention_blockwise(q, k, v, q_pos, k_pos, **kwargs, block=block, num_blocks=num_blocks)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sink", [False, True])
def test_a_row_that_sees_no_key_gives_zeros(sink):
    """Padding rows (a query before every key, or a window past every key) give zeros in the reference and the
    blockwise attention, not the values' mean; the other rows still see their keys."""
    rs = np.random.RandomState(1)
    b, t, n, kv, d, slots, block = 1, 3, 4, 2, 8, 32, 16
    q = jnp.asarray(rs.randn(b, t, n, d), jnp.float32)
    k = jnp.asarray(rs.randn(b, kv, slots, d), jnp.float32)
    v = jnp.asarray(rs.randn(b, kv, slots, d), jnp.float32)
    k_pos = jnp.asarray(np.where(np.arange(slots) < 20, np.arange(slots), -1)[None], jnp.int32)
    q_pos = jnp.asarray([[-1, 19, 5]], jnp.int32)  # row 0 precedes every key
    kwargs = dict(window_keys=None, sink=jnp.asarray(rs.randn(n), jnp.float32) if sink else None, scale=d**-0.5)
    ref = attn.attention(q, k, v, q_pos, k_pos, **kwargs)
    np.testing.assert_array_equal(ref[0, 0], 0.0)
    assert np.abs(np.asarray(ref[0, 1:])).min() > 0
    got = attn.attention_blockwise(q, k, v, q_pos, k_pos, **kwargs, block=block, num_blocks=2)
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)
    # a window that ends before the ring's keys: row 1 (position 30, keys up to 19) sees none through a 5-key window
    windowed = attn.attention(q, k, v, jnp.asarray([[-1, 30, 5]], jnp.int32), k_pos, **{**kwargs, "window_keys": 5})
    np.testing.assert_array_equal(windowed[0, :2], 0.0)


def test_block_sizes():
    assert attn.key_block_size(1, 64, 131072) == 8192
    assert attn.key_block_size(2048, 64, 131072) == 512
    assert attn.key_block_size(1, 64, 16384) == 8192
    assert attn.key_block_size(1, 64, 8192) is None  # short cache, small scores: one pass
    assert attn.key_block_size(2048, 64, 8192) == 512  # a prefill chunk: never T x S scores
    assert attn.key_block_size(1, 64, 200) is None  # short caches: one pass
    assert attn.key_block_size(1, 64, 3 * 4096 + 1) is None  # no power-of-two block divides it


def test_engine_with_blockwise_full_layers_equals_full_forward(monkeypatch):
    monkeypatch.setattr(attn, "KEY_BLOCK_MIN", 8)
    monkeypatch.setattr(attn, "KEY_BLOCK_MAX", 16)
    cfg = MiMoConfig.from_dict(TINY)
    lm = mimo_jax.LanguageModel(MiMoModel(cfg, rngs=nnx.Rngs(5)))
    vocab = cfg.vocab_size
    engine = Engine(lm, max_batch=2, max_context=64, prefill_chunk=8, max_round_tokens=16, max_top_logprobs=vocab)
    prompts = [list(range(3, 23)), [7, 8, 9]]
    results = mimo_jax.generate(
        lm, prompts, max_new_tokens=20, temperature=1.0, logprobs=vocab, ignore_eos=True, engine=engine
    )
    for prompt, r in zip(prompts, results, strict=True):
        seq = prompt + r.token_ids
        ref = np.asarray(jax.nn.log_softmax(lm.logits(np.array([seq]))[0, len(prompt) - 1 : -1]))
        ours = np.array([[lp for _, lp in sorted(top)] for top in r.top_logprobs])
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def _chunk_case(rs, slots, start, length, bucket, window, sink, ring):
    """A chunk of `length` real queries (padded to `bucket`) at positions start.., after `start` cached keys."""
    b, n, kv, d, dv = 2, 4, 2, 8, 6
    q = jnp.asarray(rs.randn(b, bucket, n, d), jnp.float32)
    k_chunk = jnp.asarray(rs.randn(b, bucket, kv, d), jnp.float32)
    v_chunk = jnp.asarray(rs.randn(b, bucket, kv, dv), jnp.float32)
    idx = np.arange(bucket)
    q_pos = jnp.asarray(np.broadcast_to(np.where(idx < length, start + idx, -1), (b, bucket)), jnp.int32)
    pk = jnp.asarray(rs.randn(b, kv, slots, d), jnp.float32)  # the cache: heads-major
    pv = jnp.asarray(rs.randn(b, kv, slots, dv), jnp.float32)
    s = np.arange(slots)
    if ring:  # slot s holds the latest position < start with p % slots == s
        ppos = start - 1 - ((start - 1 - s) % slots)
    else:  # full-layer cache: slot = position, the chunk already written at its positions
        ppos = np.where(s < start + length, s, -1)
        pk = pk.at[:, :, start : start + length].set(heads_major(k_chunk[:, :length]))
        pv = pv.at[:, :, start : start + length].set(heads_major(v_chunk[:, :length]))
    ppos = jnp.asarray(np.broadcast_to(np.where(ppos >= 0, ppos, -1), (b, slots)), jnp.int32)
    sinks = jnp.asarray(rs.randn(n), jnp.float32) if sink else None
    return q, k_chunk, v_chunk, q_pos, (pk, pv, ppos), sinks


@pytest.mark.parametrize(
    "ring,start,length,window,sink",
    [(False, 37, 16, None, False), (False, 0, 13, None, True), (True, 37, 16, 7, True), (True, 5, 11, 7, True)],
)
def test_chunk_split_equals_reference(monkeypatch, ring, start, length, window, sink):
    """Chunk-vs-itself (dot_product_attention) + chunk-vs-prefix merged by log-sum-exp = one softmax."""
    monkeypatch.setattr(attn, "SPLIT_MIN_QUERIES", 16)
    rs = np.random.RandomState(start + length)
    slots = 9 if ring else 64
    q, kc, vc, q_pos, (pk, pv, ppos), sinks = _chunk_case(rs, slots, start, length, 16, window, sink, ring)
    kwargs = dict(window_keys=window, sink=sinks, scale=8**-0.5)
    if ring:  # the reference reads [ring; chunk], as update_and_read returns them
        keys, values = jnp.concatenate([pk, heads_major(kc)], 2), jnp.concatenate([pv, heads_major(vc)], 2)
        key_pos = jnp.concatenate([ppos, q_pos], 1)
    else:
        keys, values, key_pos = pk, pv, ppos
    want = attn.attention(q, keys, values, q_pos, key_pos, **kwargs)
    got = attn.attention(q, keys, values, q_pos, key_pos, **kwargs, slot_is_position=not ring, impl="split",
                         chunk_kv=(kc, vc))  # fmt: skip
    real = np.asarray(q_pos[0]) >= 0
    np.testing.assert_allclose(np.asarray(got)[:, real], np.asarray(want)[:, real], rtol=2e-5, atol=2e-5)
    # a long full-layer prefix goes blockwise and still agrees
    monkeypatch.setattr(attn, "KEY_BLOCK_MIN", 8)
    monkeypatch.setattr(attn, "KEY_BLOCK_MAX", 16)
    got_blocks = attn.attention_chunk(q, kc, vc, q_pos, (pk, pv, ppos), **kwargs, prefix_slot_is_position=not ring)
    np.testing.assert_allclose(np.asarray(got_blocks)[:, real], np.asarray(want)[:, real], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("blocks", [False, True])
def test_engine_with_split_prefill_attention_equals_full_forward(monkeypatch, blocks):
    """Prefill chunks through the split (cuDNN-shaped) path: every step's distribution = the full forward's."""
    monkeypatch.setattr(attn, "SPLIT_MIN_QUERIES", 16)
    if blocks:  # full-layer prefixes long enough to go blockwise
        monkeypatch.setattr(attn, "KEY_BLOCK_MIN", 8)
        monkeypatch.setattr(attn, "KEY_BLOCK_MAX", 16)
    cfg = MiMoConfig.from_dict(TINY)
    model = MiMoModel(cfg, rngs=nnx.Rngs(6))
    reference = mimo_jax.LanguageModel(model)
    lm = reference.with_options(dataclasses.replace(model.options, attention_impl="split"))
    vocab = cfg.vocab_size
    engine = Engine(lm, max_batch=2, max_context=64, prefill_chunk=16, max_round_tokens=8, max_top_logprobs=vocab)
    prompts = [list(range(3, 40)), [7, 8, 9] * 6]  # 37 tokens: chunks of 16, 16 and 5 (bucket 16)
    results = mimo_jax.generate(
        lm, prompts, max_new_tokens=6, temperature=1.0, logprobs=vocab, ignore_eos=True, engine=engine
    )
    for prompt, r in zip(prompts, results, strict=True):
        seq = prompt + r.token_ids
        ref = np.asarray(jax.nn.log_softmax(reference.logits(np.array([seq]))[0, len(prompt) - 1 : -1]))
        ours = np.array([[lp for _, lp in sorted(top)] for top in r.top_logprobs])
        np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)
