"""Speculative decoding on a (data, tensor, expert) mesh of 8 CPU devices gives the single-device tokens."""

import mimo_jax
from mimo_jax.engine.host import Engine
from mimo_jax.sharding import make_mesh
from tests.fixtures import predictable_model


def test_sharded_speculative_engine_equals_single_device():
    plain = mimo_jax.LanguageModel(predictable_model(noise=100.0, mtp_noise=300.0))
    model = predictable_model(noise=100.0, mtp_noise=300.0)
    mesh = make_mesh(data=2, tensor=2, expert=2)
    sharded = mimo_jax.LanguageModel(model, mesh=mesh)
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9], [4, 6], [50, 1, 2], [7] * 5]
    kwargs = dict(max_new_tokens=12, temperature=0.8, seed=3, speculative_steps=2, prefill_chunk=4)
    engine = Engine(sharded, max_batch=4, max_context=24, prefill_chunk=4, max_round_tokens=4, speculative_steps=2)
    num_swa = sum(s.sliding for s in sharded.config.layers)
    mtp_k, swa_k = engine.cache.rings[num_swa].k, engine.cache.rings[0].k
    assert mtp_k.sharding.spec == swa_k.sharding.spec  # MTP rings sharded like the target's SWA rings
    assert "tensor" in mtp_k.sharding.spec
    want = mimo_jax.generate(plain, prompts, **kwargs)
    got = mimo_jax.generate(sharded, prompts, engine=engine, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    assert [r.accepted_per_forward for r in got] == [r.accepted_per_forward for r in want]
