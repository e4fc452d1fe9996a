"""The memory planner: the published Pro tensor table, and agreement with what load_model places."""

import math
import os

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax.config import MiMoConfig
from mimo_jax.sharding import make_mesh
from mimo_jax.tools.plan import kv_plan_per_device, main, param_bytes_per_device, release_tensors
from tests.fixtures import ROOT, release_fixture

CONFIGS = os.path.join(ROOT, "configs", "{}.json")


@pytest.fixture(scope="module")
def pro():
    cfg = MiMoConfig.from_json(CONFIGS.format("mimo-v2.5-pro"))
    return {t.name: t for t in release_tensors(cfg, mtp_layers=cfg.num_mtp_layers)}


def test_pro_parameter_count_matches_release(pro):
    assert sum(math.prod(t.shape) for t in pro.values()) == 1_023_244_718_976


@pytest.mark.parametrize(
    ("name", "shape", "dtype"),
    [
        ("model.layers.5.self_attn.qkv_proj.weight", (27136, 6144), "float8_e4m3fn"),
        ("model.layers.5.self_attn.qkv_proj.weight_scale_inv", (216, 48), "float32"),
        ("model.layers.7.self_attn.qkv_proj.weight_scale_inv", (216, 48), "float32"),
        ("model.layers.9.mlp.experts.383.gate_proj.weight", (2048, 6144), "float8_e4m3fn"),
        ("model.layers.9.mlp.experts.383.up_proj.weight_scale_inv", (16, 48), "float32"),
        ("model.layers.9.mlp.experts.0.down_proj.weight", (6144, 2048), "float8_e4m3fn"),
        ("model.layers.9.mlp.experts.0.down_proj.weight_scale_inv", (48, 16), "float32"),
        ("model.layers.9.mlp.gate.weight", (384, 6144), "float32"),
        ("model.layers.9.mlp.gate.e_score_correction_bias", (384,), "float32"),
        ("model.layers.1.self_attn.attention_sink_bias", (128,), "bfloat16"),
        ("model.layers.1.self_attn.o_proj.weight", (6144, 16384), "bfloat16"),
        ("model.layers.0.mlp.down_proj.weight", (6144, 16384), "float8_e4m3fn"),
        ("model.embed_tokens.weight", (152576, 6144), "bfloat16"),
        ("lm_head.weight", (152576, 6144), "bfloat16"),
        ("model.norm.weight", (6144,), "bfloat16"),
        ("model.mtp.layers.2.eh_proj.weight", (6144, 12288), "bfloat16"),
        ("model.mtp.layers.2.pre_mlp_layernorm.weight", (6144,), "bfloat16"),
        ("model.mtp.layers.0.self_attn.qkv_proj.weight_scale_inv", (216, 48), "float32"),
        ("model.mtp.layers.0.self_attn.attention_sink_bias", (128,), "bfloat16"),
        ("model.mtp.layers.1.mlp.gate_proj.weight_scale_inv", (128, 48), "float32"),
    ],
)
def test_pro_tensor_table(pro, name, shape, dtype):
    assert (pro[name].shape, pro[name].dtype) == (shape, dtype)


def test_pro_has_no_sinks_on_full_layers_and_no_scale_for_o_proj(pro):
    assert "model.layers.0.self_attn.attention_sink_bias" not in pro
    assert "model.layers.1.self_attn.o_proj.weight_scale_inv" not in pro
    assert "model.mtp.layers.0.eh_proj.weight_scale_inv" not in pro
    assert not any(n.startswith("model.mtp.layers.3.") for n in pro)


def test_v25_fused_shapes_per_layer_type():
    cfg = MiMoConfig.from_json(CONFIGS.format("mimo-v2.5"))
    t = {x.name: x for x in release_tensors(cfg)}
    assert t["model.layers.0.self_attn.qkv_proj.weight"].shape == (13568, 4096)  # full: 4 x 3392
    assert t["model.layers.0.self_attn.qkv_proj.weight_scale_inv"].shape == (108, 32)
    assert t["model.layers.1.self_attn.qkv_proj.weight"].shape == (14848, 4096)  # SWA: 4 x 3712
    assert t["model.layers.1.self_attn.qkv_proj.weight_scale_inv"].shape == (116, 32)


def test_flash_separate_qkv():
    cfg = MiMoConfig.from_json(CONFIGS.format("mimo-v2-flash"))
    t = {x.name: x for x in release_tensors(cfg)}
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (768, 4096)
    assert t["model.layers.1.self_attn.k_proj.weight"].shape == (1536, 4096)
    assert t["model.layers.1.self_attn.v_proj.weight_scale_inv"].shape == (8, 32)
    assert not any("qkv_proj" in n for n in t)


def test_kv_bytes_per_token():
    cfg = MiMoConfig.from_json(CONFIGS.format("mimo-v2.5-pro"))
    kv = kv_plan_per_device(cfg, {"tensor": 8})
    per_layer = 8 * (192 + 128) * 2 // 8
    assert kv.full_bytes_per_token == 10 * per_layer and kv.swa_bytes_per_token == 60 * per_layer
    assert kv.swa_slots == 129


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return release_fixture(str(tmp_path_factory.mktemp("plan")), "fused", kv_heads=2)[0]


@pytest.mark.parametrize("weights", ["bf16", "fp8"])
def test_plan_equals_what_load_model_places(tiny, weights):
    mesh = make_mesh(tensor=4, expert=2)
    lm = mimo_jax.load_model(tiny, dtype="bfloat16", weights=weights, mtp=True, mesh=mesh)
    device = jax.devices()[0]
    placed = sum(
        s.data.nbytes for leaf in jax.tree.leaves(lm.params) for s in leaf.addressable_shards if s.device == device
    )
    planned = param_bytes_per_device(lm.config, {"tensor": 4, "expert": 2}, weights, 2, mtp_layers=3)
    assert planned == placed


def test_cli(capsys):
    assert (
        main(
            [
                "--config",
                CONFIGS.format("mimo-v2.5-pro"),
                "--mesh",
                "tensor=8,expert=8",
                "--context",
                "65536",
                "--batch",
                "4",
                "--hbm-gb",
                "141",
                "--mtp",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1,023,244,718,976 parameters" in out
    assert "parameters per device, weights=fp8" in out and "KV per token per device" in out
    assert out.count("fits") == 2 or "does not fit" in out
    np.testing.assert_(("weights=bf16" in out) and ("of 141.00 GB" in out))


def test_cli_kv_pages(capsys):
    """The engine's page pool for a KV budget: pages of every full layer, as `page_bytes` counts them."""
    from mimo_jax.config import MiMoConfig
    from mimo_jax.model.cache import page_bytes

    config = CONFIGS.format("mimo-v2-flash")
    assert main(["--config", config, "--context", "262144", "--kv-cache-gb", "40"]) == 0
    out = capsys.readouterr().out
    pages = 40 * 10**9 // page_bytes(MiMoConfig.from_json(config), 64)
    assert f"KV pages for 40 GB: {pages:,} pages of 64 tokens" in out and f"= {pages * 64:,} tokens" in out
