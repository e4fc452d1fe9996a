"""Bad FP8 / fused-qkv checkpoints: each fails before anything is placed, naming the file and tensor."""

import json
import os

import numpy as np
import pytest

import mimo_jax
from mimo_jax.weights import CheckpointError, loader
from mimo_jax.weights.safetensors_io import save_file
from tests.fixtures import read_all, release_fixture


@pytest.fixture(scope="module")
def flash(tmp_path_factory):
    return release_fixture(str(tmp_path_factory.mktemp("flash")), "flash", 2, max_file_bytes=40_000)[0]


@pytest.fixture(scope="module")
def fused(tmp_path_factory):
    return release_fixture(str(tmp_path_factory.mktemp("fused")), "fused", 4)[0]


@pytest.fixture(autouse=True)
def nothing_placed(monkeypatch):
    """Every error below must come before the first parameter reaches a device."""
    calls = []
    real = loader._place
    monkeypatch.setattr(loader, "_place", lambda *a: calls.append(1) or real(*a))
    yield calls


def rewrite(src, dst, edit=None, edit_config=None):
    """Copy a checkpoint into one file, letting `edit(tensors)` / `edit_config(config)` change it."""
    os.makedirs(dst, exist_ok=True)
    tensors = read_all(src)
    if edit:
        edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    if edit_config:
        edit_config(cfg)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(cfg, f)
    return str(dst)


def expect(directory, pattern, nothing_placed, **kwargs):
    with pytest.raises(CheckpointError, match=pattern):
        mimo_jax.load_model(directory, **kwargs)
    assert not nothing_placed


def test_scale_shape_does_not_fit_weight(flash, tmp_path, nothing_placed):
    name = "model.layers.2.mlp.experts.3.up_proj.weight_scale_inv"
    d = rewrite(flash, tmp_path, lambda t: t.__setitem__(name, t[name][:-1]))
    expect(
        d,
        rf"model\.safetensors: scale '{name}' has shape \[1, 3\], which does not fit its weight .* \(expected \[2, 3\]\)",
        nothing_placed,
    )


def test_fused_qkv_scale_rounded_over_whole_tensor_instead_of_per_shard(fused, tmp_path, nothing_placed):
    name = "model.layers.0.self_attn.qkv_proj.weight_scale_inv"  # shards of 88 rows: 24 vs 22 blocks

    def edit(t):
        rows = t[name.removesuffix("_scale_inv")].shape[0]
        t[name] = np.ones((-(-rows // 16), t[name].shape[1]), np.float32)

    d = rewrite(fused, tmp_path, edit)
    expect(d, rf"scale '{name}' has shape \[\d+, 3\], which does not fit its weight", nothing_placed)


def test_missing_scale(flash, tmp_path, nothing_placed):
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    d = rewrite(flash, tmp_path, lambda t: t.pop(name))
    expect(
        d,
        rf"model\.safetensors: FP8 tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has no scale '{name}'",
        nothing_placed,
    )


def test_scale_with_nan(flash, tmp_path, nothing_placed):
    name = "model.layers.1.self_attn.q_proj.weight_scale_inv"

    def edit(t):
        t[name] = t[name].copy()
        t[name][0, 0] = np.nan

    d = rewrite(flash, tmp_path, edit)
    expect(d, rf"scale '{name}' has non-finite or negative values", nothing_placed)


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("quant_method", "awq", r"quantization_config\.quant_method='awq' is not supported"),
        ("fmt", "e5m2", r"quantization_config\.fmt='e5m2' is not supported"),
        ("weight_block_size", None, r"quantization_config\.weight_block_size=None"),
    ],
)
def test_unsupported_quantization_config(flash, tmp_path, nothing_placed, key, value, pattern):
    d = rewrite(flash, tmp_path, edit_config=lambda c: c["quantization_config"].__setitem__(key, value))
    expect(d, r"config\.json: " + pattern, nothing_placed)


def test_fp8_tensor_without_quantization_config(flash, tmp_path, nothing_placed):
    d = rewrite(flash, tmp_path, edit_config=lambda c: c.pop("quantization_config"))
    expect(
        d,
        r"tensor 'model\.layers\.0\.self_attn\.q_proj\.weight' has dtype float8_e4m3fn; .*need a quantization_config",
        nothing_placed,
    )


def test_unquantizable_tensor_stored_as_fp8(flash, tmp_path, nothing_placed):
    name = "model.layers.3.self_attn.o_proj.weight"
    d = rewrite(
        flash,
        tmp_path,
        lambda t: t.__setitem__(name, t[name].astype(np.float32).astype(t["model.layers.0.mlp.up_proj.weight"].dtype)),
    )
    expect(d, rf"tensor '{name}' has dtype float8_e4m3fn; expected a float type", nothing_placed)


def test_wrong_dtype_of_fused_qkv(fused, tmp_path, nothing_placed):
    name = "model.layers.2.self_attn.qkv_proj.weight"
    d = rewrite(fused, tmp_path, lambda t: t.__setitem__(name, t[name].view(np.int8)))
    expect(d, rf"model\.safetensors: tensor '{name}' has dtype int8", nothing_placed)


def test_wrong_shape_of_fused_qkv(fused, tmp_path, nothing_placed):
    name = "model.mtp.layers.2.self_attn.qkv_proj.weight"
    d = rewrite(fused, tmp_path, lambda t: t.__setitem__(name, t[name][:-1]))
    expect(d, rf"tensor '{name}' has shape \[\d+, 40\] but the config implies", nothing_placed, mtp=True)


def test_mixed_quantization_of_k_and_v(flash, tmp_path, nothing_placed):
    v = "model.layers.1.self_attn.v_proj.weight"

    def edit(t):
        t[v] = t[v].astype(np.float32)
        t.pop(v + "_scale_inv")

    d = rewrite(flash, tmp_path, edit)
    expect(d, r"must be all FP8 or all unquantized", nothing_placed)


def test_truncated_shard_of_multi_file_checkpoint(flash, tmp_path, nothing_placed):
    import shutil

    d = str(tmp_path / "ckpt")
    shutil.copytree(flash, d)
    shards = sorted(f for f in os.listdir(d) if f.startswith("model-"))
    assert len(shards) > 2
    path = os.path.join(d, shards[-1])
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 7)
    expect(d, rf"{shards[-1]}: truncated file: tensor '.*' ends at byte", nothing_placed)


def test_index_names_missing_shard(flash, tmp_path, nothing_placed):
    import shutil

    d = str(tmp_path / "ckpt")
    shutil.copytree(flash, d)
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[1]
    os.remove(os.path.join(d, shard))
    expect(d, rf"model\.safetensors\.index\.json: names file '{shard}'.*does not exist", nothing_placed)


def test_corrupt_header(flash, tmp_path, nothing_placed):
    import shutil

    d = str(tmp_path / "ckpt")
    shutil.copytree(flash, d)
    shard = sorted(f for f in os.listdir(d) if f.startswith("model-"))[0]
    with open(os.path.join(d, shard), "r+b") as f:
        f.seek(12)
        f.write(b"\x00\xff{{")
    expect(d, rf"{shard}: corrupt safetensors header", nothing_placed)
