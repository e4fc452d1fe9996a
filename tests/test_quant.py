"""quant.project: few rows through per-block partial products on fp8 values equal the dequantized matmul, for the
attention projections' per-output-element scales and the dense MLP's 128 x 128 blocks."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mimo_jax import quant
from mimo_jax.sharding import make_mesh


def heads_weight(seed, hidden=256, heads=4, head_dim=24, block=128, dtype="float32"):
    """An attention projection [H, n, d] quantized as the importer keeps q/k/v: block (128, 1, 1)."""
    rng = np.random.RandomState(seed)
    w = rng.randn(hidden, heads, head_dim).astype(np.float32) * np.linspace(0.1, 3.0, hidden)[:, None, None]
    blocks = w.reshape(hidden // block, block, heads, head_dim)
    scales = np.abs(blocks).max(axis=1) / quant.FP8_MAX
    values = (blocks / scales[:, None]).reshape(w.shape).astype(quant.FP8)
    return quant.BlockQuantized(jnp.asarray(values), jnp.asarray(scales), (block, 1, 1), dtype)


def dense_weight(seed, rows=256, cols=384, dtype="float32"):
    """A dense MLP weight [I, O] in the releases' 128 x 128 blocks."""
    w = np.random.RandomState(seed).randn(rows, cols).astype(np.float32) * np.linspace(0.1, 3.0, rows)[:, None]
    values, scales = quant.quantize_blocks(w)
    return quant.BlockQuantized(jnp.asarray(values), jnp.asarray(scales), (128, 128), dtype)


@pytest.mark.parametrize("rows", [1, 5, quant.BLOCKED_PROJECTION_MAX_ROWS])
@pytest.mark.parametrize("make", [heads_weight, dense_weight])
def test_blocked_projection_equals_dequantized_matmul(rows, make):
    w = make(0)
    x = jnp.asarray(np.random.RandomState(1).randn(1, rows, 256), jnp.float32)
    want = jnp.tensordot(x, w.dequantize(), axes=1, precision="highest")
    got = quant.project(x, w, platform="gpu")
    assert got.shape == (1, rows, *w.shape[1:]) and got.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("make, dequantized_type", [(heads_weight, "bf16[256,4,24]"), (dense_weight, "bf16[256,384]")])
def test_blocked_projection_never_materializes_the_dequantized_weight(make, dequantized_type):
    """Few rows: no dequantized [I, *out] array is written (only the fp8 values feed the dot); many rows: it is."""
    w = make(2, dtype="bfloat16")
    x_few = jnp.ones((1, 4, 256), jnp.bfloat16)
    x_many = jnp.ones((1, quant.BLOCKED_PROJECTION_MAX_ROWS + 1, 256), jnp.bfloat16)
    for x, dequantized in ((x_few, False), (x_many, True)):
        jaxpr = str(jax.make_jaxpr(lambda x, w: quant.project(x, w, platform="gpu"))(x, w))
        assert (dequantized_type in jaxpr) == dequantized, jaxpr


@pytest.mark.parametrize("platform", ["cpu", "tpu"])
def test_dense_blocks_keep_the_dequantized_path_off_a_gpu(platform):
    """On CPU / TPU a 2-d-blocked weight is dequantized (its widening would be hoisted out of a decode loop); the
    attention projections' per-output scales take the blocked path everywhere."""
    x = jnp.ones((1, 4, 256), jnp.bfloat16)
    jaxpr = lambda w: str(jax.make_jaxpr(lambda x, w: quant.project(x, w, platform=platform))(x, w))
    assert "bf16[256,384]" in jaxpr(dense_weight(2, dtype="bfloat16"))
    assert "bf16[256,4,24]" not in jaxpr(heads_weight(2, dtype="bfloat16"))


def test_blocked_projection_in_bf16_and_on_a_tensor_mesh():
    w = heads_weight(3, heads=8)
    x = jnp.asarray(np.random.RandomState(4).randn(2, 3, 256), jnp.bfloat16)
    want = np.asarray(jnp.einsum("bth,hnd->btnd", x.astype(jnp.float32), w.dequantize()))
    plain = np.asarray(quant.project(x, w), np.float32)
    assert np.linalg.norm(plain - want) / np.linalg.norm(want) < 1e-2
    mesh = make_mesh(tensor=4, expert=2)
    heads = NamedSharding(mesh, P(None, "tensor", None))
    sharded = quant.BlockQuantized(jax.device_put(w.values, heads), jax.device_put(w.scales, heads), w.block, w.dtype)
    with jax.set_mesh(mesh):
        got = jax.jit(quant.project)(x, sharded)
    np.testing.assert_allclose(np.asarray(got, np.float32), plain, rtol=1e-2, atol=1e-2)


def test_dense_blocked_projection_on_a_tensor_mesh():
    """The dense MLP's projections as the mesh splits them: gate/up by output columns, down by input rows."""
    mesh = make_mesh(tensor=4, expert=2)
    x = jnp.asarray(np.random.RandomState(6).randn(2, 3, 512), jnp.float32)
    for w, spec in ((dense_weight(7, rows=512, cols=512), P(None, "tensor")), (dense_weight(8, 512, 512), P("tensor"))):
        placed = NamedSharding(mesh, spec)
        sharded = quant.BlockQuantized(jax.device_put(w.values, placed), jax.device_put(w.scales, placed), w.block)
        with jax.set_mesh(mesh):
            got = jax.jit(quant.project, static_argnums=2)(x, sharded, "gpu")
        want = jnp.tensordot(x, w.dequantize(jnp.float32), axes=1, precision="highest")
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want), rtol=1e-4, atol=1e-4)


def test_plain_and_partial_block_weights_take_the_matmul():
    x = jnp.ones((3, 256), jnp.float32)
    w = jnp.asarray(np.random.RandomState(5).randn(256, 100), jnp.float32)
    np.testing.assert_allclose(np.asarray(quant.project(x, w)), np.asarray(x @ w), rtol=1e-6)
    values, scales = quant.quantize_blocks(np.asarray(w))  # 100 columns: one partial 128-wide block
    dense = quant.BlockQuantized(jnp.asarray(values), jnp.asarray(scales), (128, 128), "float32")
    np.testing.assert_allclose(np.asarray(quant.project(x, dense)), np.asarray(x @ dense.dequantize()), rtol=1e-6)
