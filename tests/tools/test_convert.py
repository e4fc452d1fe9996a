"""Orbax conversion: atomic, restorable onto meshes of other shapes, same parameters as a direct load."""

import json
import os
import re

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax.quant import BlockQuantized
from mimo_jax.sharding import make_mesh
from mimo_jax.tools import convert as convert_mod
from mimo_jax.weights import CheckpointError
from mimo_jax.weights.export import hub_tensors
from tests.fixtures import release_fixture


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    d = release_fixture(str(tmp_path_factory.mktemp("src")), "fused", kv_heads=2)[0]
    with open(os.path.join(d, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 512}, f)
    return d


@pytest.fixture(scope="module")
def converted(source, tmp_path_factory):
    dst = str(tmp_path_factory.mktemp("out") / "orbax")
    convert_mod.main([source, dst, "--weights", "fp8", "--mtp", "--dtype", "float32", "--mesh", "tensor=2,expert=4"])
    return dst


def test_converted_directory(converted):
    assert sorted(os.listdir(converted)) == ["config.json", "mimo_jax.json", "params", "tokenizer_config.json"]
    meta = json.load(open(os.path.join(converted, "mimo_jax.json")))
    assert meta == {"format": "orbax", "weights": "fp8", "dtype": "float32", "mtp_layers": 3}
    assert not [f for f in os.listdir(os.path.dirname(converted)) if ".partial-" in f]


@pytest.mark.parametrize(("tensor", "expert", "weights"), [(8, 1, "fp8"), (1, 4, "bf16"), (1, 1, "fp8")])
def test_restores_onto_other_mesh_shapes_with_same_parameters(source, converted, tensor, expert, weights):
    mesh = make_mesh(tensor=tensor, expert=expert, devices=jax.devices()[: tensor * expert])
    direct = mimo_jax.load_model(source, weights="bf16", mtp=True)
    restored = mimo_jax.load_model(converted, weights=weights, mtp=True, mesh=mesh)
    want, got = hub_tensors(direct.model), hub_tensors(restored.model)
    assert set(want) == set(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    q = restored.model.layers[1].self_attn.q_proj.get_value()
    assert isinstance(q, BlockQuantized) == (weights == "fp8")
    q_array = q.values if weights == "fp8" else q
    assert q_array.sharding.mesh.shape == mesh.shape
    ids = np.arange(10).reshape(1, 10)
    np.testing.assert_allclose(restored.logits(ids), direct.logits(ids), rtol=1e-5, atol=1e-5)


def test_restore_without_mtp_and_bf16_dtype(converted):
    lm = mimo_jax.load_model(converted, dtype="bfloat16", weights="fp8")
    assert len(lm.model.mtp) == 0
    assert lm.model.embed_tokens.get_value().dtype == jax.numpy.bfloat16
    assert np.isfinite(lm.logits(np.arange(5).reshape(1, 5))).all()


def test_fp8_from_bf16_conversion_is_refused(source, tmp_path):
    dst = convert_mod.convert(source, tmp_path / "bf16", weights="bf16", progress=False)
    with pytest.raises(CheckpointError, match="converted with --weights bf16"):
        mimo_jax.load_model(dst, weights="fp8")


def test_failed_conversion_leaves_nothing(source, tmp_path, monkeypatch):
    def boom(model, directory):
        with open(os.path.join(directory, "partial-file"), "w") as f:
            f.write("x")
        raise KeyboardInterrupt  # as if interrupted mid-write

    monkeypatch.setattr(convert_mod, "save_params", boom)
    with pytest.raises(KeyboardInterrupt):
        convert_mod.convert(source, tmp_path / "dst", progress=False)
    assert os.listdir(tmp_path) == []


def test_bad_source_writes_nothing(source, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(source, bad)
    with open(bad / "config.json") as f:
        cfg = json.load(f)
    cfg["quantization_config"]["quant_method"] = "gptq"
    with open(bad / "config.json", "w") as f:
        json.dump(cfg, f)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"config\.json: quantization_config\.quant_method='gptq'"):
        convert_mod.convert(bad, out / "dst", progress=False)
    assert not out.exists()


def test_existing_destination_is_refused(source, converted):
    with pytest.raises(FileExistsError):
        convert_mod.convert(source, converted, progress=False)


def test_stale_partial_directories_are_removed(source, tmp_path, monkeypatch):
    """A killed conversion leaves `.DST.partial-HOST-PID-*`; the next one removes those of dead processes on
    this host, and keeps those still in use, of other hosts, or of other destinations."""
    import socket
    import subprocess

    host = socket.gethostname()
    dead = subprocess.Popen(["true"])
    dead.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale = [f".dst.partial-{host}-{dead.pid}-abc_1", f".dst.partial-{host}-{dead.pid}-xyz"]
        kept = [
            f".dst.partial-{host}-{alive.pid}-def",  # a conversion still running
            f".dst.partial-other-host-{dead.pid}-ghi",  # maybe running elsewhere (shared filesystem)
            f".other.partial-{host}-{dead.pid}-jkl",  # another destination's
        ]
        for name in stale + kept:
            (tmp_path / name).mkdir()
        (tmp_path / stale[1] / "half-written").write_text("x")
        used = []
        real = convert_mod.save_params
        monkeypatch.setattr(convert_mod, "save_params", lambda model, d: used.append(d) or real(model, d))
        convert_mod.convert(source, tmp_path / "dst", progress=False)
        assert sorted(os.listdir(tmp_path)) == sorted(kept + ["dst"])
        assert os.path.basename(used[0]).startswith(f".dst.partial-{host}-{os.getpid()}-")
    finally:
        alive.kill()
        alive.wait()


def bad_config_source(source, tmp_path):
    import shutil

    bad = tmp_path / "bad-config"
    shutil.copytree(source, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["rope_theta"] = "big"
    (bad / "config.json").write_text(json.dumps(cfg))
    return str(bad)


@pytest.mark.parametrize(
    ("make_src", "message"),
    [
        (lambda source, tmp: str(tmp / "missing"), r"missing: not a checkpoint directory"),
        (bad_config_source, r"bad-config/config\.json: rope_theta='big': expected a positive number"),
    ],
    ids=["missing-source", "bad-config"],
)
def test_main_bad_source_is_a_one_line_error(source, tmp_path, capsys, make_src, message):
    src = make_src(source, tmp_path)
    assert convert_mod.main([src, str(tmp_path / "out" / "dst")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("mimo_jax.tools.convert: ")
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()


def test_main_existing_destination_is_a_one_line_error(source, converted, capsys):
    assert convert_mod.main([source, converted]) == 2
    err = capsys.readouterr().err
    assert err == f"mimo_jax.tools.convert: {converted} already exists; remove it or choose another destination\n"
