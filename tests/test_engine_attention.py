"""Blockwise attention over a full-layer cache equals the reference attention, alone and inside the engine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_cache import TINY

import mimo_jax
from mimo_jax import attention as attn
from mimo_jax.config import MiMoConfig
from mimo_jax.engine import Engine
from mimo_jax.model import MiMoModel


@pytest.mark.parametrize("window,sink", [(None, False), (None, True), (7, True)])
def test_blockwise_equals_reference(window, sink):
    rs = np.random.RandomState(0)
    b, t, n, kv, d, dv, slots, block = 2, 5, 4, 2, 8, 6, 64, 16
    q = jnp.asarray(rs.randn(b, t, n, d), jnp.float32)
    k = jnp.asarray(rs.randn(b, slots, kv, d), jnp.float32)
    v = jnp.asarray(rs.randn(b, slots, kv, dv), jnp.float32)
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
