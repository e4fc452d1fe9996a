"""Bad checkpoints fail with a message naming the file and tensor."""

import json
import os

import numpy as np
import pytest

import mimo_jax
from mimo_jax.weights import CheckpointError
from mimo_jax.weights.safetensors_io import SafetensorsFile, save_file
from tests.fixtures import make_hf_model, save_hf_checkpoint


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(seed=3), str(tmp_path_factory.mktemp("good")))


def rewrite(directory, dst, edit):
    """Copy a single-file checkpoint, letting `edit(tensors)` change the tensor dict."""
    os.makedirs(dst, exist_ok=True)
    st = SafetensorsFile(os.path.join(directory, "model.safetensors"))
    tensors = {k: np.array(st.get(k)) for k in st.keys()}
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(directory, "config.json")) as f:
        cfg = f.read()
    with open(os.path.join(dst, "config.json"), "w") as f:
        f.write(cfg)
    return dst


def test_missing_tensor(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: t.pop("model.layers.2.mlp.experts.5.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'model\.layers\.2\.mlp\.experts\.5\.up_proj\.weight'"):
        mimo_jax.load_model(d)


def test_unexpected_tensor(good, tmp_path):
    d = rewrite(
        good, tmp_path, lambda t: t.__setitem__("model.layers.9.self_attn.q_proj.weight", np.zeros(3, np.float32))
    )
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor 'model\.layers\.9"):
        mimo_jax.load_model(d)


def test_mtp_tensors_are_ignored(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: t.__setitem__("model.mtp.layers.0.enorm.weight", np.ones(32, np.float32)))
    mimo_jax.load_model(d)


def test_wrong_shape(good, tmp_path):
    def edit(t):
        t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:-1]

    d = rewrite(good, tmp_path, edit)
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor 'model\.layers\.1\.self_attn\.k_proj\.weight' has shape \[47, 32\] but the config implies \[48, 32\]",
    ):
        mimo_jax.load_model(d)


def test_wrong_dtype(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: t.__setitem__("model.norm.weight", np.ones(32, np.int32)))
    with pytest.raises(CheckpointError, match=r"'model\.norm\.weight' has dtype int32"):
        mimo_jax.load_model(d)


def test_truncated_file(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: None)
    path = os.path.join(d, "model.safetensors")
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated file: tensor '.*' ends at byte"):
        mimo_jax.load_model(d)


def test_corrupt_header(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: None)
    with open(os.path.join(d, "model.safetensors"), "r+b") as f:
        f.seek(9)
        f.write(b"\xff\xfe garbage")
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt safetensors header"):
        mimo_jax.load_model(d)


def test_index_names_missing_file(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: None)
    st = SafetensorsFile(os.path.join(d, "model.safetensors"))
    weight_map = {k: "model.safetensors" for k in st.keys()}
    weight_map["lm_head.weight"] = "model-00002-of-00002.safetensors"
    with open(os.path.join(d, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    with pytest.raises(CheckpointError, match=r"names file 'model-00002-of-00002\.safetensors'.*does not exist"):
        mimo_jax.load_model(d)


def test_config_disagrees_with_tensors(good, tmp_path):
    d = rewrite(good, tmp_path, lambda t: None)
    with open(os.path.join(d, "config.json")) as f:
        cfg = json.load(f)
    cfg["moe_intermediate_size"] = 20
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    with pytest.raises(
        CheckpointError,
        match=r"'model\.layers\.1\.mlp\.experts\.0\.gate_proj\.weight' has shape \[16, 32\] but the config implies \[20, 32\]",
    ):
        mimo_jax.load_model(d)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        mimo_jax.load_model(tmp_path / "nope")
