"""The engine on a (data, tensor, expert) mesh of 8 CPU devices gives the single-device tokens."""

import jax
import numpy as np
from flax import nnx

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.sharding import make_mesh
from tests.fixtures import TINY


def test_sharded_engine_equals_single_device():
    cfg = MiMoConfig.from_dict(TINY)
    plain = mimo_jax.LanguageModel(MiMoModel(cfg, rngs=nnx.Rngs(3)))
    model = MiMoModel(cfg, rngs=nnx.Rngs(3))
    mesh = make_mesh(data=2, tensor=2, expert=2)
    sharded = mimo_jax.LanguageModel(model, mesh=mesh)
    prompts = [[3, 14, 15, 9, 2, 6, 5, 35, 8, 9], [4, 6], [50, 1, 2], [7] * 5]
    kwargs = dict(max_new_tokens=10, temperature=0.8, seed=3)
    engine = Engine(sharded, max_batch=4, max_context=24, prefill_chunk=4, max_round_tokens=10)
    # rings: batch 4 on data x expert (data-parallel attention), kv heads on tensor; pools: pages split the same way
    assert tuple(engine.cache.rings[0].k.sharding.spec) == (("data", "expert"), "tensor", None, None)
    assert engine.cache.pools[0].k.sharding.spec[0] == ("data", "expert")
    want = mimo_jax.generate(plain, prompts, prefill_chunk=4, **kwargs)
    got = mimo_jax.generate(sharded, prompts, engine=engine, **kwargs)
    assert [r.token_ids for r in got] == [r.token_ids for r in want]
    # Prompt scores on the mesh (lm_head over a chunk, vocab split over tensor) equal the plain forward's.
    prompt = prompts[0] + prompts[3]  # 15 tokens: chunks of 4, the last padded
    engine.add("scored", prompt, SamplingOptions(max_new_tokens=0, prompt_logprobs=0))
    (out,) = engine.step(prefill_tokens=64)
    ref = np.asarray(jax.nn.log_softmax(plain.logits(np.array([prompt]))[0], axis=-1))
    assert out.finished and out.prompt_logprobs[0] is None
    np.testing.assert_allclose(out.prompt_logprobs[1:], ref[np.arange(14), prompt[1:]], rtol=1e-5, atol=1e-5)
    assert out.prompt_top_logprobs[1:] == [[]] * 14


def test_steps_compile_once_whatever_the_parameter_layout():
    """Parameters placed on a one-device mesh (as the bench's initializers do) must not make the
    decode loop recompile when its outputs come back with differently spelled shardings."""
    cfg = MiMoConfig.from_dict(TINY)
    model = MiMoModel(cfg, rngs=nnx.Rngs(3))
    mesh = make_mesh(data=1, tensor=1, expert=1, devices=jax.devices()[:1])
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            var.set_value(
                jax.device_put(var.get_value(), jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec()))
            )
    engine = Engine(mimo_jax.LanguageModel(model), max_batch=2, max_context=40, prefill_chunk=8, max_round_tokens=2)
    mimo_jax.generate(model, [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11, 12]], max_new_tokens=9, engine=engine)
    for fn in (engine.prefill_fn, engine.admit_fn):
        assert fn._cache_size() == 1
    assert engine.decode_fn._cache_size() <= len(engine.steps.decode_buckets)  # one program per round size


def test_fp8_weights_are_dequantized_inside_the_decode_loop():
    """XLA must not hoist the FP8 dequantization out of the decode while_loop (every weight in bf16 at once)."""
    import re

    lm = mimo_jax.load_model("demo", dtype="bfloat16", weights="fp8", options=mimo_jax.RunOptions(moe_impl="ragged"))
    engine = Engine(lm, max_batch=2, max_context=64, max_round_tokens=4)
    hlo = engine.decode_fn.lower(*engine.abstract_decode_args()).compile().as_text()
    computations = re.split(r"\n(?=\S)", hlo)
    takes_fp8 = [c.split(" ", 1)[0].lstrip("%") for c in computations if "f8e4m3fn" in c.split("\n", 1)[0]]
    entry = next(c for c in computations if c.startswith("ENTRY"))
    assert takes_fp8  # the dequantizing computations exist...
    assert not [name for name in takes_fp8 if f"calls=%{name}" in entry]  # ...and none runs before the loop


def test_prefill_reads_only_the_owner_shard_of_a_batch_split_cache():
    """Prefill reads one slot's ring row: on a mesh that splits the batch (data x expert) only that
    row may cross devices, never a whole layer's rings or pool (a plain dynamic_slice all-gathers them)."""
    import re

    cfg = MiMoConfig.from_dict(TINY)
    model = MiMoModel(cfg, rngs=nnx.Rngs(3))
    mesh = make_mesh(data=2, tensor=2, expert=2)
    lm = mimo_jax.LanguageModel(model, mesh=mesh)
    engine = Engine(lm, max_batch=8, max_context=64, prefill_chunk=8, max_round_tokens=2)
    assert engine.cache.rings[0].k.sharding.spec[0] == ("data", "expert")
    hlo = engine.prefill_fn.lower(*engine.abstract_prefill_args(8)).compile().as_text()  # under the mesh
    gathered = re.findall(r"= (\w+\[[\d,]*\])\S* all-gather(?:-start)?\(", hlo)
    whole = {f"{x.dtype}[{','.join(map(str, x.shape))}]" for c in engine.cache.rings for x in (c.k, c.v, c.pos)}
    whole |= {f"{x.dtype}[{','.join(map(str, x.shape))}]" for c in engine.cache.pools for x in (c.k, c.v)}
    whole = {w.replace("float32", "f32").replace("int32", "s32") for w in whole}
    assert not whole & set(gathered), f"prefill all-gathers whole cache arrays: {sorted(whole & set(gathered))}"
    assert "all-reduce" in hlo  # the owner's row is summed across the batch shards


def test_sharded_engine_prefix_cache_equals_single_device():
    """The prefix cache on a mesh (pages, rings and snapshots split like the slots): a
    second turn restored from the first's pages and ring snapshot decodes the single-device engine's tokens."""
    cfg = MiMoConfig.from_dict(TINY)
    plain = mimo_jax.LanguageModel(MiMoModel(cfg, rngs=nnx.Rngs(3)))
    sharded = mimo_jax.LanguageModel(MiMoModel(cfg, rngs=nnx.Rngs(3)), mesh=make_mesh(data=2, tensor=2, expert=2))
    kwargs = dict(max_new_tokens=6, temperature=0.8, seed=4, ignore_eos=True)
    first = [3, 14, 15, 9, 2, 6, 5, 35, 8, 9, 7, 9, 3, 2, 38, 4, 6, 50, 1, 2]
    engines = [
        Engine(lm, max_batch=2, max_context=48, prefill_chunk=8, page_size=4, prefix_cache=True)
        for lm in (plain, sharded)
    ]
    outs = []
    for engine in engines:
        (turn1,) = mimo_jax.generate(engine.lm, [first], engine=engine, **kwargs)
        (turn2,) = mimo_jax.generate(engine.lm, [first + turn1.token_ids + [7, 8]], engine=engine, **kwargs)
        outs.append((turn1.token_ids, turn2.token_ids))
        assert engine.pages.stats().hits == 16  # turn 2 started from turn 1's snapshot at 16 tokens
    assert outs[0] == outs[1]
