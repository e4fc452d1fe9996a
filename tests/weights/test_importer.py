"""Released layouts (Flash FP8, fused-qkv FP8 with T = 1/2/4/8 shards, transformers bf16) loaded on 1-8 devices.

Oracles: an independent dequantizer of the written files (`tests.fixtures.dequantized_reference`)
for every parameter, and transformers with those dequantized weights for logits.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax.quant import BlockQuantized
from mimo_jax.sharding import make_mesh
from mimo_jax.weights.export import hub_tensors
from tests.fixtures import BLOCK, dequantized_reference, hf_reference_logits, read_all, release_fixture

CASES = {
    "flash": ("flash", 2),
    "fused-T2": ("fused", 2),
    "fused-T4": ("fused", 4),
    "fused-T8": ("fused", 8),
    "bf16": ("bf16", 2),
}


def mesh_of(size: int, expert: int = 1):
    return make_mesh(tensor=size // expert, expert=expert, devices=jax.devices()[:size])


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    layout, kv = CASES[request.param]
    directory, hf, hf_dir = release_fixture(str(tmp_path_factory.mktemp(request.param)), layout, kv)
    if layout == "bf16":
        reference = {k: v.astype(np.float32) for k, v in read_all(directory).items()}
    else:
        reference = dequantized_reference(directory)
    return request.param, directory, hf_dir, reference


@pytest.mark.parametrize(("devices", "weights"), [(1, "fp8"), (2, "bf16"), (4, "fp8"), (8, "fp8")])
def test_every_parameter_equals_dequantized_reference(case, devices, weights):
    name, directory, _, reference = case
    mesh = mesh_of(devices, expert=2 if devices == 8 else 1)
    lm = mimo_jax.load_model(directory, weights=weights, mtp=name != "bf16", mesh=mesh)
    got = hub_tensors(lm.model)
    assert set(got) == set(reference)
    for key, ref in reference.items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)


# Each case's logits on a different mesh size, so that 1, 2, 4 and 8 devices all appear.
LOGIT_MESH = {"flash": 8, "fused-T2": 4, "fused-T4": 2, "fused-T8": 1, "bf16": 4}


def test_logits_equal_transformers_with_dequantized_weights(case):
    name, directory, hf_dir, reference = case
    ids = np.random.RandomState(1).randint(0, 96, (2, 13))
    expected = hf_reference_logits(hf_dir, reference, ids)
    lm = mimo_jax.load_model(directory, weights="fp8", mesh=mesh_of(LOGIT_MESH[name]))
    got = lm.logits(ids)
    assert rel_err(got, expected) < 1e-5
    assert (got.argmax(-1) == expected.argmax(-1)).all()


def test_fp8_mode_keeps_float8_blocks_in_documented_layout(case):
    name, directory, _, _ = case
    lm = mimo_jax.load_model(directory, dtype="bfloat16", weights="fp8", mtp=name != "bf16", mesh=mesh_of(4))
    cfg = lm.config
    layer1 = lm.model.layers[1]
    if name == "bf16":
        assert not isinstance(layer1.mlp.gate_proj.get_value(), BlockQuantized)
        return
    experts = layer1.mlp.gate_proj.get_value()
    assert isinstance(experts, BlockQuantized) and experts.values.dtype == jax.numpy.float8_e4m3fn
    e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
    assert experts.shape == (e, h, i) and experts.block == (1, BLOCK, BLOCK)
    assert experts.scales.shape == (e, -(-h // BLOCK), -(-i // BLOCK))
    down = lm.model.layers[0].mlp.down_proj.get_value()
    assert down.block == (BLOCK, BLOCK) and down.shape == (cfg.intermediate_size, h)
    q = layer1.self_attn.q_proj.get_value()
    n, d = cfg.layers[1].num_heads, cfg.layers[1].head_dim
    assert q.block == (BLOCK, 1, 1) and q.scales.shape == (-(-h // BLOCK), n, d)
    assert q.values.sharding.spec[1] == "tensor" and q.scales.sharding.spec[1] == "tensor"
    assert not isinstance(layer1.self_attn.o_proj.get_value(), BlockQuantized)  # ignored_layers: bf16
    assert isinstance(lm.model.mtp[0].block.self_attn.q_proj.get_value(), BlockQuantized)


def test_fp8_mode_within_bf16_tolerance_of_dequantized_model(case):
    name, directory, _, _ = case
    if name != "fused-T4":
        pytest.skip("one case suffices")
    ids = np.random.RandomState(2).randint(0, 96, (2, 9))
    exact = mimo_jax.load_model(directory, dtype="float32").logits(ids)
    bf16 = mimo_jax.load_model(directory, dtype="bfloat16", weights="bf16").logits(ids)
    fp8 = mimo_jax.load_model(directory, dtype="bfloat16", weights="fp8").logits(ids)
    assert rel_err(fp8, exact) <= max(1.5 * rel_err(bf16, exact), 0.02)


@pytest.fixture(scope="module")
def fused_t4(tmp_path_factory):
    return release_fixture(str(tmp_path_factory.mktemp("t4")), "fused", kv_heads=4)[0]


@pytest.mark.parametrize("tensor", [1, 2, 4, 8])
def test_fused_qkv_placement_on_tensor_axes_other_than_T(fused_t4, tensor):
    """T = 4 checkpoint shards; 8 query heads split over 1..8 devices; 4 full-layer kv heads replicated on 8."""
    directory = fused_t4
    lm = mimo_jax.load_model(directory, weights="fp8", mesh=mesh_of(tensor))
    attn_full, attn_swa = lm.model.layers[0].self_attn, lm.model.layers[1].self_attn
    q = attn_full.q_proj.get_value().values
    assert {s.data.shape[1] for s in q.addressable_shards} == {8 // tensor}
    k_full = attn_full.k_proj.get_value().values  # 4 kv heads
    assert {s.data.shape[1] for s in k_full.addressable_shards} == {4 // tensor if 4 % tensor == 0 else 4}
    k_swa = attn_swa.k_proj.get_value().values  # 8 kv heads
    assert {s.data.shape[1] for s in k_swa.addressable_shards} == {8 // tensor}


def test_mtp_layers_load_and_run(case):
    name, directory, _, _ = case
    if name == "bf16":
        with pytest.raises(mimo_jax.weights.CheckpointError, match=r"missing tensor 'model\.mtp\.layers\.0\."):
            mimo_jax.load_model(directory, mtp=True)
        return
    if name not in ("flash", "fused-T4"):
        pytest.skip("two layouts suffice")
    plain = mimo_jax.load_model(directory)
    assert len(plain.model.mtp) == 0
    lm = mimo_jax.load_model(directory, weights="fp8", mtp=True)
    assert len(lm.model.mtp) == 3
    ids = np.arange(6).reshape(1, 6)
    pos = np.broadcast_to(np.arange(6), (1, 6))
    hidden, _ = lm.model.hidden_states(ids, pos)
    _, logits, _ = lm.model.mtp_forward(2, ids, hidden, pos)
    assert logits.shape == (1, 6, 96) and np.isfinite(np.asarray(logits)).all()


def test_fused_qkv_with_one_shard_round_trips(tmp_path):
    """T = 1 (one kv head in the full layers): qkv_proj is a single [Q | K | V] shard, written and read back."""
    directory = release_fixture(str(tmp_path), "fused", kv_heads=1)[0]
    config = json.loads((Path(directory) / "config.json").read_text())
    assert config["num_key_value_heads"] == 1 and config["attention_projection_layout"] == "fused_qkv"
    reference = dequantized_reference(directory)
    got = hub_tensors(mimo_jax.load_model(directory, weights="fp8", mtp=True).model)
    assert set(got) == set(reference)
    for key, ref in reference.items():
        np.testing.assert_array_equal(got[key], ref, err_msg=key)
