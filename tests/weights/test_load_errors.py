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


def write_raw_safetensors(path, entries, data_len):
    """A safetensors file with a hand-written header: entries = {name: (dtype, shape, start, end)}."""
    import struct

    header = {k: {"dtype": d, "shape": list(s), "data_offsets": [a, b]} for k, (d, s, a, b) in entries.items()}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + bytes(data_len))
    return str(path)


@pytest.mark.parametrize(
    ("entries", "data_len", "pattern"),
    [
        # b starts inside a
        (
            {"a": ("F32", [2], 0, 8), "b": ("F32", [2], 4, 12)},
            12,
            r"tensors 'a' \(bytes 0-8\) and 'b' \(bytes 4-12\) overlap",
        ),
        # b aliases a's bytes exactly (and c fills the rest)
        (
            {"a": ("F32", [2], 0, 8), "b": ("F32", [2], 0, 8), "c": ("F32", [2], 8, 16)},
            16,
            r"tensors 'a' \(bytes 0-8\) and 'b' \(bytes 0-8\) overlap",
        ),
        # bytes 8-12 belong to no tensor
        ({"a": ("F32", [2], 0, 8), "b": ("F32", [2], 12, 20)}, 20, r"bytes 8-12 of the data section .*'a'.*'b'"),
        # the data section does not start with a tensor
        ({"a": ("F32", [2], 4, 12)}, 12, r"bytes 0-4 of the data section .*before 'a'"),
        # bytes after the last tensor
        ({"a": ("F32", [2], 0, 8)}, 12, r"4 bytes after the last tensor 'a'"),
    ],
    ids=["overlap", "alias", "gap", "leading-gap", "trailing-bytes"],
)
def test_data_offsets_must_tile_the_data_section(tmp_path, entries, data_len, pattern):
    """Like the safetensors library: tensors are contiguous, in bounds and non-overlapping."""
    path = write_raw_safetensors(tmp_path / "x.safetensors", entries, data_len)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: " + pattern):
        SafetensorsFile(path)


def test_data_offsets_accept_empty_tensors_and_any_header_order(tmp_path):
    entries = {"c": ("F32", [2], 8, 16), "empty": ("F32", [0], 8, 8), "a": ("F32", [2], 0, 8)}
    st = SafetensorsFile(write_raw_safetensors(tmp_path / "x.safetensors", entries, 16))
    assert st.shape("empty") == (0,) and st.get("c").shape == (2,)


def test_overlapping_tensors_in_checkpoint(good, tmp_path):
    """Two same-shaped tensors pointing at the same bytes: refused, naming the file and both tensors."""
    import struct

    d = rewrite(good, tmp_path, lambda t: None)
    path = os.path.join(d, "model.safetensors")
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
        data = f.read()
    a, b = "model.layers.1.self_attn.k_proj.weight", "model.layers.2.self_attn.k_proj.weight"
    header[b]["data_offsets"] = header[a]["data_offsets"]
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)
    with pytest.raises(
        CheckpointError,
        match=rf"model\.safetensors: tensors '{a}' \(bytes \d+-\d+\) and '{b}' \(bytes \d+-\d+\) overlap",
    ):
        mimo_jax.load_model(d)
