"""RunOptions.w8a8 in the model: which projections and experts meet fp8-quantized activations, the XLA rounding
against the GPU kernels' math (interpreter), and the GPU path lowering for CUDA on this host."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mimo_jax import quant
from mimo_jax.config import RunOptions
from mimo_jax.kernels import fp8_gemm_gpu, moe_gpu
from mimo_jax.model import moe
from mimo_jax.model.mimo import project


def block_fp8(seed: int, shape: tuple, block: tuple, dtype: str = "float32") -> quant.BlockQuantized:
    values = (4.0 * jax.random.normal(jax.random.PRNGKey(seed), shape)).astype(jnp.float8_e4m3fn)
    n_scales = quant.scale_shape(shape, block)
    scales = jnp.linspace(0.002, 0.01, int(np.prod(n_scales))).reshape(n_scales)
    return quant.BlockQuantized(values, scales, block, dtype)


def test_modes_by_platform_and_bad_mode():
    assert RunOptions(platform="gpu").w8a8_mode == "off"  # opt-in until the GPU check passes
    assert RunOptions(platform="gpu", w8a8="prefill").w8a8_mode == "prefill"
    assert RunOptions(platform="cpu").w8a8_mode == RunOptions(platform="tpu").w8a8_mode == "off"
    assert RunOptions(platform="tpu", w8a8="always").w8a8_mode == "always"
    with pytest.raises(ValueError, match="unknown w8a8 mode 'fp8'"):
        RunOptions(w8a8="fp8")


def test_ready_weights():
    assert quant.w8a8_ready(block_fp8(0, (256, 384), (128, 128)))  # dense MLP
    assert quant.w8a8_ready(block_fp8(0, (256, 2, 64), (128, 1, 1)))  # q/k/v: a scale per output element
    assert not quant.w8a8_ready(block_fp8(0, (2, 64, 256), (1, 1, 128)))  # o_proj: scales per input row
    assert not quant.w8a8_ready(block_fp8(0, (256, 3, 32), (128, 1, 1)))  # 96 outputs: no 128-column tile
    assert not quant.w8a8_ready(jnp.ones((256, 256)))


def test_model_projection_follows_the_platform():
    """`mimo.project` hands the model's platform to `quant.project`: a GPU model's dense fp8 MLP projection at decode
    rows never writes the dequantized weight; a CPU model's does (XLA would hoist the widening out of the loop)."""
    x = jnp.ones((1, 2, 256), jnp.bfloat16)
    w = block_fp8(4, (256, 384), (128, 128), "bfloat16")
    jaxpr = lambda platform: str(jax.make_jaxpr(lambda x, w: project(x, w, "off", platform))(x, w))
    assert "bf16[256,384]" not in jaxpr("gpu") and "bf16[256,384]" in jaxpr("cpu")


def test_project_rounds_activations_where_asked():
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 256))
    w = block_fp8(2, (256, 2, 64), (128, 1, 1))
    off = project(x, w)
    always = project(x, w, "always")
    np.testing.assert_array_equal(always, quant.project(quant.round_activations(x), w))
    rel = float(jnp.linalg.norm(always - off) / jnp.linalg.norm(off))
    assert 0.005 < rel < 0.06  # e4m3 activations: a few percent
    np.testing.assert_array_equal(project(x, w, "prefill"), off)  # "prefill" leaves dense projections as they are
    per_input_row = block_fp8(3, (256, 256), (1, 128))  # o_proj's kind of scales: not w8a8-ready
    np.testing.assert_array_equal(project(x, per_input_row, "always"), project(x, per_input_row))


def test_xla_rounding_matches_the_w8a8_kernels():
    """experts_ragged with w8a8 computes what the Pallas w8a8 kernels compute (float32 throughout)."""
    e, h, i, n, k = 4, 256, 256, 40, 2  # 20 rows per expert: "prefill" needs > 96, "always" rounds anyway
    gate, up = block_fp8(4, (e, h, i), (1, 128, 128)), block_fp8(5, (e, h, i), (1, 128, 128))
    down = block_fp8(6, (e, i, h), (1, 128, 128))
    ids = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(7), (n, e)), axis=1)[:, :k].astype(jnp.int32)
    routing = jax.random.uniform(jax.random.PRNGKey(8), (n, k), minval=0.1, maxval=1.0)
    x = jax.random.normal(jax.random.PRNGKey(9), (n, h))
    xla = moe.expert_fn("ragged", "always")(x, routing, ids, gate, up, down)
    config = fp8_gemm_gpu.W8A8Config(fp8_gemm_gpu.GemmTiles(16, 128, 4, 3), fp8_gemm_gpu.GemmTiles(16, 128, 4, 3))
    kernel = moe_gpu.experts_grouped(x, routing, ids, gate, up, down, config=config, interpret=True)
    assert float(jnp.linalg.norm(xla - kernel) / jnp.linalg.norm(kernel)) < 1e-5
    plain = moe.experts_ragged(x, routing, ids, gate, up, down)
    assert float(jnp.linalg.norm(plain - kernel) / jnp.linalg.norm(kernel)) > 1e-3
    np.testing.assert_array_equal(moe.expert_fn("ragged", "prefill")(x, routing, ids, gate, up, down), plain)
    # by mode, without a config: "always" runs the w8a8 kernels even for one token (as the XLA rounding does),
    # "prefill" keeps a widening kernel there (exact to the weights)
    one = (x[:1], routing[:1], ids[:1], gate, up, down)
    rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
    always = moe_gpu.experts_grouped(*one, w8a8="always", interpret=True)
    assert rel(always, moe.expert_fn("ragged", "always")(*one)) < 1e-5
    prefill = moe_gpu.experts_grouped(*one, w8a8="prefill", interpret=True)
    assert rel(prefill, plain[:1]) < 1e-3 < rel(always, plain[:1])


def test_gpu_projection_lowers_to_the_w8a8_kernel_for_cuda():
    x = jnp.ones((1, 1024, 256), jnp.bfloat16)
    w = block_fp8(10, (256, 384), (128, 128), "bfloat16")
    text = jax.jit(lambda x, w: project(x, w, "always", "gpu")).trace(x, w).lower(lowering_platforms=("cuda",))
    assert 'name = "matmul_w8a8"' in text.as_text()
    prefill = jax.jit(lambda x, w: project(x, w, "prefill", "gpu")).trace(x, w)  # dense stays on XLA
    assert "matmul_w8a8" not in prefill.lower(lowering_platforms=("cuda",)).as_text()
