"""Logits of `load_model(...)` against transformers' MiMoV2FlashForCausalLM (the oracle)."""

import json
import os
import shutil

import numpy as np
import pytest

import mimo_jax
from tests.fixtures import hf_logits, make_hf_model, save_hf_checkpoint, to_hub_config

# Together these use every feature: windows far shorter than the sequence, SWA/full kv head
# counts that differ, custom layer patterns, dense and MoE layers, grouped routing,
# norm_topk_prob false, a scaling factor, batch > 1.
CASES = {
    "default-pattern": dict(),
    "custom-pattern-grouped": dict(
        num_hidden_layers=5,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention", "sliding_attention"],
        mlp_layer_types=["dense", "sparse", "dense", "sparse", "sparse"],
        n_group=4,
        topk_group=2,
        norm_topk_prob=False,
        routed_scaling_factor=2.5,
        num_key_value_heads=2,
    ),
    "wide-heads-short-window": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        sliding_window=3,
        num_experts_per_tok=3,
        attention_value_scale=0.612,
    ),
}
SEQ = {"default-pattern": (2, 23), "custom-pattern-grouped": (3, 31), "wide-heads-short-window": (2, 17)}


def rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    name = request.param
    hf = make_hf_model(seed=len(name), **CASES[name])
    directory = str(tmp_path_factory.mktemp(name))
    save_hf_checkpoint(hf, directory)
    ids = np.random.RandomState(1).randint(0, hf.config.vocab_size, SEQ[name])
    return name, hf, directory, ids, hf_logits(hf, ids)


def test_logits_match_transformers_fp32(case):
    _, _, directory, ids, ref = case
    ours = mimo_jax.load_model(directory).logits(ids)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    assert rel_err(ours, ref) < 1e-5
    assert (ours.argmax(-1) == ref.argmax(-1)).all()


def test_hub_spelling_gives_same_logits(case, tmp_path):
    _, _, directory, ids, ref = case
    hub_dir = tmp_path / "hub"
    shutil.copytree(directory, hub_dir)
    (hub_dir / "config.json").write_text(json.dumps(to_hub_config(directory)))
    native = mimo_jax.load_model(directory)
    hub = mimo_jax.load_model(hub_dir)
    assert hub.config.replace(architecture="", quantization=None, context_len=0) == native.config.replace(
        architecture="", quantization=None, context_len=0
    )
    np.testing.assert_array_equal(hub.logits(ids), native.logits(ids))


def test_bfloat16_within_transformers_bf16_error(case):
    """bf16 rounding may flip routing in random models; we must be no further from fp32 than transformers' bf16."""
    import copy

    import torch

    _, hf, directory, ids, ref = case
    ours = mimo_jax.load_model(directory, dtype="bfloat16").logits(ids)
    hf_bf16 = hf_logits(copy.deepcopy(hf).to(torch.bfloat16), ids)
    assert rel_err(ours, ref) <= max(1.2 * rel_err(hf_bf16, ref), 0.02)


def test_moe_ragged_equals_dense_reference(case):
    _, _, directory, ids, ref = case
    lm = mimo_jax.load_model(directory)
    ragged = lm.logits(ids)
    dense = lm.with_options(mimo_jax.RunOptions(moe_impl="dense")).logits(ids)
    assert rel_err(ragged, dense) < 1e-6


def test_multi_file_checkpoint_with_index(tmp_path):
    hf = make_hf_model(seed=7)
    directory = save_hf_checkpoint(hf, str(tmp_path / "sharded"), max_shard_size="20KB")
    assert os.path.exists(os.path.join(directory, "model.safetensors.index.json"))
    assert len([f for f in os.listdir(directory) if f.endswith(".safetensors")]) > 2
    ids = np.arange(20).reshape(1, 20) % hf.config.vocab_size
    assert rel_err(mimo_jax.load_model(directory).logits(ids), hf_logits(hf, ids)) < 1e-5
