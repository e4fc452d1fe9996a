"""The model on 8 fake CPU devices: every mesh and MoE dispatch gives the single-device logits."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import mimo_jax
from mimo_jax import sharding
from mimo_jax.model import moe
from mimo_jax.model.cache import CACHE_AXES, empty_layer_kv
from mimo_jax.sharding import logical_to_spec, make_mesh, model_shardings
from tests.fixtures import SHARDABLE, make_hf_model, save_hf_checkpoint

MESHES = {
    "expert8": dict(expert=8),
    "tensor2-expert4": dict(tensor=2, expert=4),
    "tensor4-expert2": dict(tensor=4, expert=2),
    "data2-tensor2-expert2": dict(data=2, tensor=2, expert=2),
    "tensor8": dict(tensor=8),
}
STRATEGIES = ("replicated", "all_to_all")
# Batch 4: split over data x expert where that divides it (expert <= 4, data-parallel attention),
# replicated over expert=8; 4 x 7 = 28 tokens, so replicated tokens need padding on 8 shards.
IDS = np.random.RandomState(0).randint(0, 96, (4, 7))


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def on_mesh(directory, mesh_sizes, strategy="auto", capacity_factor=None):
    options = mimo_jax.RunOptions(moe_strategy=strategy, capacity_factor=capacity_factor)
    return mimo_jax.load_model(directory, mesh=make_mesh(**mesh_sizes), options=options)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    directory = save_hf_checkpoint(make_hf_model(seed=11, **SHARDABLE), str(tmp_path_factory.mktemp("shardable")))
    return directory, mimo_jax.load_model(directory).logits(IDS)


@pytest.fixture(scope="module")
def adversarial_checkpoint(tmp_path_factory):
    """Every token's two experts are 2 and 3 (one shard's worth); the other 14 receive nothing."""
    hf = make_hf_model(seed=12, **{**SHARDABLE, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1})
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf[3] += 1000.0
                buf[2] += 500.0
    directory = save_hf_checkpoint(hf, str(tmp_path_factory.mktemp("adversarial")))
    return directory, mimo_jax.load_model(directory).logits(IDS)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_mesh_logits_equal_single_device(checkpoint, mesh, strategy):
    directory, single = checkpoint
    ours = on_mesh(directory, MESHES[mesh], strategy).logits(IDS)
    assert ours.shape == single.shape and ours.dtype == np.float32
    assert rel_err(ours, single) < 1e-5


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("mesh", ["expert8", "tensor2-expert4"])
def test_adversarial_routing_same_on_every_strategy(adversarial_checkpoint, mesh, strategy):
    directory, single = adversarial_checkpoint
    assert rel_err(on_mesh(directory, MESHES[mesh], strategy).logits(IDS), single) < 1e-5


def test_decode_with_cache_on_mesh_equals_single_device(checkpoint):
    """Prefill then one-token decode steps (the "few tokens" case) through the KV cache."""
    directory, _ = checkpoint
    prompt, steps = IDS[:, :5], IDS[:, 5:7]
    batch = IDS.shape[0]

    def run(lm):
        cfg = lm.config

        @jax.jit
        def step(params, ids, positions, cache):
            from flax import nnx

            return nnx.merge(lm.graphdef, params)(ids, positions, cache)

        cache = [empty_layer_kv(spec, batch, 16, jnp.float32) for spec in cfg.layers]
        if lm.mesh is not None:  # batch over data x expert, kv heads over tensor where they divide
            cache = jax.device_put(cache, [cache_sharding(kv, lm.mesh) for kv in cache])
        out = []
        with lm.mesh_context():
            positions = jnp.broadcast_to(jnp.arange(prompt.shape[1], dtype=jnp.int32), prompt.shape)
            logits, cache = step(lm.params, jnp.asarray(prompt), positions, cache)
            out.append(np.asarray(logits[:, -1]))
            for t in range(steps.shape[1]):
                positions = jnp.full((batch, 1), prompt.shape[1] + t, jnp.int32)
                logits, cache = step(lm.params, jnp.asarray(steps[:, t : t + 1]), positions, cache)
                out.append(np.asarray(logits[:, -1]))
        return np.stack(out)

    single = run(mimo_jax.load_model(directory))
    sharded = run(on_mesh(directory, MESHES["data2-tensor2-expert2"]))
    assert rel_err(sharded, single) < 1e-5


def cache_sharding(kv, mesh):
    def named(axes, a):
        return NamedSharding(mesh, logical_to_spec(axes, a.shape, mesh))

    return dataclasses.replace(
        kv, k=named(CACHE_AXES, kv.k), v=named(CACHE_AXES, kv.v), pos=named(("batch", None), kv.pos)
    )


def test_rules_place_parameters(checkpoint):
    directory, _ = checkpoint
    lm = mimo_jax.load_model(directory)
    specs = {k: v.spec for k, v in model_shardings(lm.model, make_mesh(tensor=4, expert=2)).items()}
    assert specs[("embed_tokens",)] == P("tensor", None)
    assert specs[("lm_head",)] == P(None, "tensor")
    assert specs[("layers", 0, "self_attn", "q_proj")] == P(None, "tensor", None)
    assert specs[("layers", 0, "self_attn", "k_proj")] == P(None, None, None)  # 2 kv heads on 4 shards
    assert specs[("layers", 1, "self_attn", "k_proj")] == P(None, "tensor", None)  # SWA: 4 kv heads
    assert specs[("layers", 0, "mlp", "gate_proj")] == P(None, "tensor")
    assert specs[("layers", 1, "mlp", "gate_proj")] == P("expert", None, "tensor")
    assert specs[("layers", 1, "mlp", "down_proj")] == P("expert", "tensor", None)
    assert specs[("layers", 1, "mlp", "router")] == P(None, None)


def test_batch_splits_over_data_then_expert_as_far_as_it_divides():
    mesh = make_mesh(data=2, tensor=2, expert=2)
    assert logical_to_spec(("batch", None), (8, 3), mesh) == P(("data", "expert"), None)
    assert logical_to_spec(("batch", None), (2, 3), mesh) == P("data", None)
    assert logical_to_spec(("batch", None), (3, 3), mesh) == P(None, None)
    assert logical_to_spec(("batch", None), (4, 3), make_mesh(tensor=1, expert=8)) == P(None, None)
    assert logical_to_spec(("batch", None, "kv_heads"), (4, 3, 2), mesh) == P(("data", "expert"), None, "tensor")
    assert sharding.batch_axes(mesh, 8) == ("data", "expert") and sharding.batch_axes(mesh, 6) == ("data",)
    assert sharding.batch_axes(None, 8) == () and sharding.axes_size(mesh, ("data", "expert")) == 4


def test_inside_a_shard_map_logical_axes_skip_its_manual_axes():
    """Inside `jax.shard_map` over (data, expert) the batch is split already: logical axes map to the free tensor
    axis only, and with no free axis of size > 1 there is no mesh to constrain on (per-device math)."""
    mesh = make_mesh(data=2, tensor=2, expert=2)
    seen = {}

    def local(x):
        inner = sharding.current_mesh()
        seen["manual"] = sharding.manual_axes(inner)
        seen["spec"] = logical_to_spec(("batch", "kv_heads"), (4, 2), inner)
        return sharding.constrain(x, ("batch", "kv_heads"))

    def only_tensor(x):
        seen["none"] = sharding.current_mesh()
        return x

    x = jnp.ones((8, 2))
    with jax.set_mesh(mesh):
        spec = P(("data", "expert"))
        jax.jit(jax.shard_map(local, in_specs=spec, out_specs=spec, axis_names={"data", "expert"}))(x)
        whole = {"data", "tensor", "expert"}
        jax.jit(jax.shard_map(only_tensor, in_specs=spec, out_specs=spec, axis_names=whole))(x)
    assert seen["manual"] == ("data", "expert") and seen["spec"] == P(None, "tensor") and seen["none"] is None


# --- experts_sharded directly: dispatch, padding, capacity ----------------------------------

E, H, MLP, K = 16, 8, 4, 2


def _moe_inputs(tokens, seed=0, bias=None):
    rng = np.random.RandomState(seed)
    x = jnp.asarray(rng.randn(tokens, H), jnp.float32)
    router = jnp.asarray(rng.randn(E, H), jnp.float32)
    bias = jnp.zeros(E, jnp.float32) if bias is None else jnp.asarray(bias, jnp.float32)
    w_gate, w_up = (jnp.asarray(rng.randn(E, H, MLP) / 3, jnp.float32) for _ in range(2))
    w_down = jnp.asarray(rng.randn(E, MLP, H) / 2, jnp.float32)
    return x, router, bias, w_gate, w_up, w_down


ROUTE = functools.partial(moe.route, top_k=K, n_group=1, topk_group=1, norm_topk_prob=True, scaling=1.0)


def _sharded(inputs, mesh_sizes, strategy, capacity_factor=None, impl="ragged", token_axes=None):
    mesh = make_mesh(**mesh_sizes)
    gate_spec = P("expert" if mesh.shape["expert"] > 1 else None, None, "tensor" if mesh.shape["tensor"] > 1 else None)
    fn = functools.partial(
        moe.experts_sharded,
        route_fn=ROUTE,
        top_k=K,
        mesh=mesh,
        gate_spec=gate_spec,
        token_axes=token_axes,
        impl=impl,
        strategy=strategy,
        capacity_factor=capacity_factor,
    )
    with jax.set_mesh(mesh):
        out, dropped = jax.jit(fn)(*inputs)
    return np.asarray(out), int(dropped)


def _reference(inputs):
    x, router, bias, *experts = inputs
    return np.asarray(moe.experts_dense(x, *ROUTE(x, router, bias), *experts))


# The GPU kernel is checked in interpret mode by tests/kernels/test_moe_kernel.py (same contract).
@pytest.mark.parametrize("impl", sorted(set(moe.EXPERT_IMPLS) - {"pallas_gpu", "pallas_gpu_w8a8"}))
def test_every_expert_impl_ignores_experts_not_here(impl):
    """The local-compute contract: ids >= E contribute nothing (how a shard skips others' experts)."""
    x, router, bias, *experts = _moe_inputs(12)
    weights, ids = ROUTE(x, router, bias)
    absent = (ids % 3) == 0
    ours = moe.EXPERT_IMPLS[impl](x, jnp.where(absent, 7.0, weights), jnp.where(absent, E, ids), *experts)
    ref = moe.experts_dense(x, jnp.where(absent, 0.0, weights), ids, *experts)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize(
    "tokens, mesh, token_axes",
    [
        (1, dict(tensor=2, expert=4), None),  # decode: one token on every shard
        (5, dict(tensor=2, expert=4), None),  # replicated tokens that 4 shards do not divide
        (24, dict(data=2, tensor=2, expert=2), ("data", "expert")),  # tokens split over data x expert
    ],
)
def test_both_dispatches_equal_reference(strategy, tokens, mesh, token_axes):
    inputs = _moe_inputs(tokens, seed=tokens)
    out, dropped = _sharded(inputs, mesh, strategy, token_axes=token_axes)
    assert dropped == 0
    np.testing.assert_allclose(out, _reference(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("token_axes", [None, "expert"])
def test_replicated_dispatch_with_split_routing_equals_reference(monkeypatch, token_axes):
    """Many replicated tokens: each expert shard routes a slice and the routing is all-gathered (21 tokens
    over 4 shards: padded to 24); tokens split over the expert axis are gathered first, then routed so."""
    monkeypatch.setattr(moe, "SPLIT_ROUTING_MIN_TOKENS", 8)
    tokens = 24 if token_axes else 21
    inputs = _moe_inputs(tokens, seed=5)
    out, dropped = _sharded(inputs, dict(tensor=2, expert=4), "replicated", token_axes=token_axes)
    assert dropped == 0
    np.testing.assert_allclose(out, _reference(inputs), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_capacity_drops_are_counted(strategy):
    """All tokens to experts 0 and 1 (shard 0 of 8): a buffer of 1/4 of the tokens drops the rest."""
    bias = np.zeros(E)
    bias[:2] = 1000.0
    inputs = _moe_inputs(32, bias=bias)
    full, none_dropped = _sharded(inputs, dict(expert=8), strategy, capacity_factor=8.0)
    assert none_dropped == 0
    np.testing.assert_allclose(full, _reference(inputs), rtol=1e-5, atol=1e-6)
    out, dropped = _sharded(inputs, dict(expert=8), strategy, capacity_factor=1.0)
    if strategy == "replicated":  # shard 0 sees all 32 tokens, keeps ceil(32 * 2 / 8) = 8
        kept_tokens = 8
    else:  # each of 8 shards routes 4 tokens, keeps ceil(4 * 2 / 8) = 1 per destination
        kept_tokens = 8 * 1
    assert dropped == 32 - kept_tokens
    computed = np.abs(out).sum(-1) > 0
    assert computed.sum() == kept_tokens
    np.testing.assert_allclose(out[computed], _reference(inputs)[computed], rtol=1e-5, atol=1e-6)


def test_strategy_choice():
    assert moe.choose_strategy("auto", moe.ALL_TO_ALL_MIN_TOKENS - 1, 4) == "replicated"
    assert moe.choose_strategy("auto", moe.ALL_TO_ALL_MIN_TOKENS, 4) == "all_to_all"
    assert moe.choose_strategy("all_to_all", 8192, 1) == "replicated"  # no expert axis: nothing to send
    with pytest.raises(ValueError, match="unknown MoE strategy"):
        moe.choose_strategy("scatter", 1, 2)
    with pytest.raises(ValueError, match="capacity_factor"):
        moe.buffer_capacity(4, 2, 2, 0.0)


def test_model_reports_dropped_tokens_only_with_a_capacity(adversarial_checkpoint):
    from flax import nnx

    directory, _ = adversarial_checkpoint
    for capacity_factor, expect_drops in ((None, False), (1.0, True)):
        lm = on_mesh(directory, MESHES["expert8"], "all_to_all", capacity_factor)

        @jax.jit
        def forward(params, ids, graphdef=lm.graphdef):
            return nnx.capture(nnx.merge(graphdef, params), nnx.Intermediate)(ids)[1]

        with lm.mesh_context():
            sown = [int(v) for v in jax.tree.leaves(forward(lm.params, jnp.asarray(IDS)))]
        if expect_drops:  # 28 tokens, 4 per source shard (7 real sources), all to shard 1 (experts 2, 3),
            assert sown == [21, 21]  # which takes ceil(1.0 * 4 * 2 / 8) = 1 per source; 2 MoE layers
        else:
            assert sown == []


# --- release layouts (fused qkv, FP8 blocks kept on the devices) ----------------------------


@pytest.fixture(scope="module")
def release_checkpoints(checkpoint, tmp_path_factory):
    """The shardable model written as V2.5/Pro release files: fused qkv in float32, and FP8 (16x16 blocks)."""
    from mimo_jax.weights.export import export_release
    from tests.fixtures import read_all, to_hub_config

    directory, single = checkpoint
    tensors, hub = read_all(directory), to_hub_config(directory)
    root = tmp_path_factory.mktemp("release")
    fused = export_release(tensors, hub, root / "fused", layout="fused_qkv", fp8=False, float_dtype="float32")
    fp8 = export_release(tensors, hub, root / "fp8", layout="fused_qkv", block_size=16)
    return str(fused), str(fp8), single


@pytest.mark.parametrize("mesh", ["tensor8", "data2-tensor2-expert2"])
def test_fused_qkv_checkpoint_on_mesh_equals_single_device(release_checkpoints, mesh):
    fused, _, single = release_checkpoints
    assert rel_err(on_mesh(fused, MESHES[mesh]).logits(IDS), single) < 1e-5


def test_fp8_weights_on_mesh_equal_single_device(release_checkpoints):
    _, fp8, _ = release_checkpoints
    single = mimo_jax.load_model(fp8, weights="fp8").logits(IDS)
    lm = mimo_jax.load_model(fp8, weights="fp8", mesh=make_mesh(**MESHES["tensor4-expert2"]))
    assert rel_err(lm.logits(IDS), single) < 1e-5


def test_sharded_model_traced_without_its_mesh_raises(checkpoint):
    """Parameters on a mesh, traced with no mesh active: an error naming the fix, never the one-device branch."""
    from flax import nnx

    from mimo_jax.sharding import MeshNotActive

    directory, want = checkpoint
    lm = mimo_jax.load_model(directory, mesh=make_mesh(tensor=2, expert=4))
    graphdef, params = nnx.split(lm.model)
    forward = jax.jit(lambda params, ids: nnx.merge(graphdef, params)(ids)[0])
    ids = jnp.asarray(IDS, jnp.int32)
    with pytest.raises(MeshNotActive, match=r"jax\.set_mesh"):
        forward(params, ids)
    with pytest.raises(MeshNotActive, match="expert=4"):
        lm.model(ids)  # eager too
    with jax.set_mesh(lm.mesh):  # the fix the message names
        assert rel_err(np.asarray(forward(params, ids)), want) < 1e-5
