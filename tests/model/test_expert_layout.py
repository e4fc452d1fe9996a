"""Expert weights re-laid out for an implementation that reads them transposed ("out_in", the GPU kernel's
layout): the same logits on one device and on meshes, FP8 blocks included, whether the weights were re-laid
out (`relayout_experts`) or are handed over transposed per call; saved checkpoints keep the stored layout.

On CPU the out_in reader is the dense reference behind a transpose (the GPU kernel itself is compared with
the plain path by tests/kernels/test_moe_kernel.py in interpret mode and bench/bench_moe_kernel.py on a GPU).
"""

import jax
import numpy as np
import pytest

import mimo_jax
from mimo_jax import quant
from mimo_jax.model import moe
from mimo_jax.model.mimo import relayout_experts
from mimo_jax.sharding import make_mesh
from tests.fixtures import SHARDABLE, make_hf_model, release_fixture, save_hf_checkpoint

IDS = np.random.RandomState(1).randint(0, 96, (4, 7))
OUT_IN = mimo_jax.RunOptions(moe_impl="dense_out_in")
RAGGED = mimo_jax.RunOptions(moe_impl="ragged")


def dense_out_in(x, weights, ids, w_gate, w_up, w_down):
    """experts_dense reading [E, out, in] weights (FP8 blocks dequantized as they are laid out)."""
    as_in_out = [
        moe.swap_expert_axes(w.dequantize(x.dtype) if isinstance(w, quant.BlockQuantized) else w)
        for w in (w_gate, w_up, w_down)
    ]
    return moe.experts_dense(x, weights, ids, *as_in_out)


@pytest.fixture(autouse=True)
def out_in_impl(monkeypatch):
    monkeypatch.setitem(moe.EXPERT_IMPLS, "dense_out_in", dense_out_in)
    monkeypatch.setattr(moe, "_OUT_IN_IMPLS", moe._OUT_IN_IMPLS | {"dense_out_in"})
    monkeypatch.setattr(moe, "QUANTIZED_IMPLS", moe.QUANTIZED_IMPLS | {"dense_out_in"})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_hf_checkpoint(make_hf_model(seed=5, **SHARDABLE), str(tmp_path_factory.mktemp("layout")))


def rel_err(a, b):
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


def logits(lm_or_model, mesh=None):
    model = getattr(lm_or_model, "model", lm_or_model)
    return np.asarray(mimo_jax.LanguageModel(model, mesh=mesh).logits(IDS))


@pytest.mark.parametrize("mesh_sizes", [None, dict(tensor=2, expert=4), dict(tensor=4, expert=2), dict(expert=8)])
def test_relayout_gives_the_same_logits(checkpoint, mesh_sizes):
    mesh = make_mesh(**mesh_sizes) if mesh_sizes else None
    lm = mimo_jax.load_model(checkpoint, mesh=mesh)
    want = logits(lm, mesh)
    layer = lm.model.moe_layers()[0]
    gate_before = layer.gate_proj.get_value()
    e, h, i = gate_before.shape
    spec_before = tuple(getattr(gate_before.sharding, "spec", ())) + (None,) * 3

    model = relayout_experts(lm.model.with_options(OUT_IN))
    layer = model.moe_layers()[0]
    gate = layer.gate_proj.get_value()
    assert layer.layout == "out_in" and gate.shape == (e, i, h) and layer.down_proj.get_value().shape == (e, h, i)
    assert gate_before.is_deleted()  # transposed where it lived, the old buffer freed
    if mesh is not None:
        spec = tuple(gate.sharding.spec) + (None,) * 3
        assert spec[:3] == (spec_before[0], spec_before[2], spec_before[1])
    assert rel_err(logits(model, mesh), want) < 1e-5

    model = relayout_experts(model.with_options(RAGGED))  # back to the stored layout
    layer = model.moe_layers()[0]
    assert layer.layout == "in_out" and layer.gate_proj.get_value().shape == (e, h, i)
    assert rel_err(logits(model, mesh), want) < 1e-5


@pytest.mark.parametrize("mesh_sizes", [None, dict(tensor=2, expert=4)])
def test_weights_not_relaid_out_are_transposed_per_call(checkpoint, mesh_sizes):
    mesh = make_mesh(**mesh_sizes) if mesh_sizes else None
    lm = mimo_jax.load_model(checkpoint, mesh=mesh)
    want = logits(lm, mesh)
    view = lm.with_options(OUT_IN)  # not re-laid out: the weights stay [E, in, out]
    assert {(layer.impl, layer.layout) for layer in view.model.moe_layers()} == {("dense_out_in", "in_out")}
    assert rel_err(logits(view, mesh), want) < 1e-5
    # a view shares the placed weights (no copy) and leaves the model it came from as it was
    assert view.model.embed_tokens.get_value() is lm.model.embed_tokens.get_value()
    assert {layer.impl for layer in lm.model.moe_layers()} == {"ragged"}
    assert rel_err(logits(lm, mesh), want) == 0


def test_fp8_blocks_are_relaid_out_with_their_scales(tmp_path):
    """Flash-like FP8 checkpoint (16x16 blocks, partial edge blocks): values, scales and block transpose together."""
    directory = release_fixture(str(tmp_path), "flash")[0]
    lm = mimo_jax.load_model(directory, weights="fp8")
    layer = lm.model.moe_layers()[0]
    before = layer.gate_proj.get_value()
    assert isinstance(before, quant.BlockQuantized)
    want_gate = np.swapaxes(np.asarray(before.dequantize(np.float32)), 1, 2)
    want = logits(lm)
    model = relayout_experts(lm.model.with_options(OUT_IN))
    after = model.moe_layers()[0].gate_proj.get_value()
    assert after.block == (before.block[0], before.block[2], before.block[1])
    np.testing.assert_array_equal(np.asarray(after.dequantize(np.float32)), want_gate)
    assert rel_err(logits(model), want) < 1e-5


def test_load_model_relayouts_for_its_implementation(checkpoint):
    """load_model hands the model over in the layout its MoE implementation reads."""
    lm = mimo_jax.load_model(checkpoint, options=OUT_IN)
    assert {(layer.impl, layer.layout) for layer in lm.model.moe_layers()} == {("dense_out_in", "out_in")}
    assert lm.options == OUT_IN


def test_saved_checkpoint_keeps_the_stored_layout(checkpoint, tmp_path):
    """A model re-laid out at load (here: for an out_in implementation) converts to an Orbax checkpoint in
    the stored layout, and exports the same hub tensors."""
    from mimo_jax.tools.convert import convert
    from mimo_jax.weights.export import hub_tensors

    lm = mimo_jax.load_model(checkpoint)
    want, hub_before = logits(lm), hub_tensors(lm.model)
    relaid = mimo_jax.load_model(checkpoint, options=OUT_IN)
    hub_after = hub_tensors(relaid.model)
    assert hub_after.keys() == hub_before.keys()
    for name, value in hub_before.items():
        np.testing.assert_array_equal(hub_after[name], value, err_msg=name)
    dst = convert(checkpoint, str(tmp_path / "orbax"), weights="bf16", dtype="float32", progress=False, options=OUT_IN)
    restored = mimo_jax.load_model(dst, options=OUT_IN)  # restored as stored, then re-laid out for its implementation
    assert {layer.layout for layer in restored.model.moe_layers()} == {"out_in"}
    assert rel_err(logits(restored), want) < 1e-5


def test_unknown_layout_is_named(checkpoint):
    lm = mimo_jax.load_model(checkpoint)
    with pytest.raises(ValueError, match="expert layout"):
        relayout_experts(lm.model, "kn")
    assert jax.numpy.ndim(lm.model.moe_layers()[0].gate_proj.get_value()) == 3
