"""Block-FP8 w8a8 GEMMs (mimo_jax.kernels.fp8_gemm_gpu) in interpreter mode on CPU, against a numpy float64
reference of block-quantized w8a8 math: activations quantized per (row, 128 columns) as the kernels define it
(float32 amax / 448), then dequantized activations and weights multiplied in float64.

The GPU-compiled kernels are checked and timed by `bench/bench_moe_kernel.py --w8a8` on a GPU.
"""

import dataclasses

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax import export

from mimo_jax.kernels import fp8_gemm_gpu, moe_gpu

TINY = fp8_gemm_gpu.W8A8Config(fp8_gemm_gpu.GemmTiles(16, 128, 4, 3), fp8_gemm_gpu.GemmTiles(16, 128, 4, 3))
WIDE_DOWN = fp8_gemm_gpu.W8A8Config(fp8_gemm_gpu.GemmTiles(32, 128, 4, 3), fp8_gemm_gpu.GemmTiles(16, 256, 4, 3))
FP8 = ml_dtypes.float8_e4m3fn


def np_quantize_groups(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """a [n, d] -> (e4m3 values, float32 scales [n, d / 128]): scale = amax / 448 in float32, values rounded."""
    groups = np.asarray(a, np.float32).reshape(a.shape[0], -1, 128)
    scale = np.maximum(np.abs(groups).max(axis=2), np.float32(1e-30)) / np.float32(448.0)
    values = np.clip(groups / scale[:, :, None], -448, 448).astype(FP8)
    return values.reshape(a.shape), scale.astype(np.float32)


def np_dequantize_groups(values: np.ndarray, scale: np.ndarray) -> np.ndarray:
    return values.astype(np.float64) * np.repeat(scale.astype(np.float64), 128, axis=1)


def np_weight(values, scales, out_in: bool) -> np.ndarray:
    """Block-scaled e4m3 weights ([E, in, out], or [E, out, in] when out_in) -> float64 [E, in, out]."""
    values, scales = np.asarray(values), np.asarray(scales, np.float64)
    if out_in:
        values, scales = values.transpose(0, 2, 1), scales.transpose(0, 2, 1)
    full = np.repeat(np.repeat(scales, 128, axis=1), 128, axis=2)[:, : values.shape[1], : values.shape[2]]
    return values.astype(np.float64) * full


def np_moe_w8a8(x, routing, ids, wg, wu, wd) -> np.ndarray:
    """The w8a8 MoE in float64: x quantized per group, h = silu(x Wg) * (x Wu) quantized per group (from its
    float32 value, as the kernel holds it), y = sum over a token's experts of routing * (h Wd); ids outside
    [0, E) add nothing."""
    x_deq = np_dequantize_groups(*np_quantize_groups(np.asarray(x, np.float32)))
    out = np.zeros(x_deq.shape, np.float64)
    for t, (row_ids, row_w) in enumerate(zip(np.asarray(ids), np.asarray(routing, np.float64), strict=True)):
        for e, w in zip(row_ids, row_w, strict=True):
            if not 0 <= e < wg.shape[0]:
                continue
            g, u = x_deq[t] @ wg[e], x_deq[t] @ wu[e]
            with np.errstate(over="ignore"):  # exp(-g) = inf: silu(g) = -0
                h = (g / (1 + np.exp(-g)) * u).astype(np.float32)[None]
            out[t] += w * (np_dequantize_groups(*np_quantize_groups(h))[0] @ wd[e])
    return out


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def fp8_experts(seed: int, e: int, h: int, i: int, out_in: bool):
    """Random experts quantized to e4m3 blocks with a scale ramp across blocks (a wrong block index shows):
    (kernel operands in `layout`, float64 [E, in, out] references)."""
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    shapes = ((e, h, i), (e, h, i), (e, i, h))
    quantized, reference = [], []
    for key, shape in zip(keys, shapes, strict=True):
        ramp = jnp.linspace(0.5, 2.0, e * (shape[1] // 128) * (shape[2] // 128))
        ramp = jnp.repeat(jnp.repeat(ramp.reshape(e, shape[1] // 128, shape[2] // 128), 128, 1), 128, 2)
        values, scales = moe_gpu.quantize_fp8_blocks(jax.random.normal(key, shape) / np.sqrt(shape[1]) * ramp)
        if out_in:
            values, scales = values.transpose(0, 2, 1), scales.transpose(0, 2, 1)
        quantized.append((values, scales))
        reference.append(np_weight(values, scales, out_in))
    return quantized, reference


def ragged_ids(n: int, e: int) -> np.ndarray:
    """Top-2 ids with expert 0 chosen by no token, 1 by one, 2 by an odd count, and other shards' ids."""
    first = np.where(np.arange(n) % 2, 3, e - 1)
    first[0] = 1
    first[1:8] = 2  # 7 rows
    second = np.full(n, 3)
    second[::5] = -1  # another shard's expert
    second[3::7] = e + 2
    return np.stack([first, second], axis=1).astype(np.int32)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("config", [TINY, WIDE_DOWN], ids=["tiny", "wide_down"])
def test_moe_w8a8_matches_float64_reference(layout, config):
    e, h, i, n = 5, 256, 256, 23
    q, ref_w = fp8_experts(0, e, h, i, layout == "out_in")
    ids = ragged_ids(n, e)
    routing = jax.random.uniform(jax.random.PRNGKey(1), ids.shape, minval=0.1, maxval=1.0)
    row_scale = jnp.geomspace(1e-3, 1e3, n)[:, None]  # rows of any magnitude: each has its own scales
    x = jax.random.normal(jax.random.PRNGKey(2), (n, h)) * row_scale
    got = moe_gpu.experts_grouped(x, routing, jnp.asarray(ids), *q, config=config, layout=layout, interpret=True)
    want = np_moe_w8a8(x, routing, ids, *ref_w)
    assert got.dtype == x.dtype and np.all(np.isfinite(np.asarray(got)))
    per_row = [rel_err(got[t], want[t]) for t in range(n)]
    # float32 sums (2.5e-7 here); one h value rounded to its other fp8 neighbour would move a row ~1e-4
    assert max(per_row) < 1e-5, per_row
    assert np.all(np.asarray(got)[0] != 0)  # expert 1's single row


def test_moe_w8a8_rows_with_only_foreign_experts_are_zero():
    e, h, i = 4, 128, 128
    q, _ = fp8_experts(3, e, h, i, True)
    ids = jnp.asarray([[-1, e], [e + 5, 2], [1, -3]], jnp.int32)
    x = jax.random.normal(jax.random.PRNGKey(4), (3, h))
    got = np.asarray(
        moe_gpu.experts_grouped(x, jnp.ones((3, 2)), ids, *q, config=TINY, layout="out_in", interpret=True)
    )
    assert np.all(got[0] == 0) and np.all(got[1] != 0) and np.all(got[2] != 0)


def test_moe_w8a8_bf16_activations_against_the_widened_kernel():
    """bf16 in and out: within the activation rounding of the exact-weight (widened) kernel's result."""
    e, h, i, n = 4, 256, 256, 16
    q, _ = fp8_experts(5, e, h, i, True)
    ids = jnp.asarray(ragged_ids(n, e))
    routing = jax.random.uniform(jax.random.PRNGKey(6), ids.shape, minval=0.1, maxval=1.0)
    x = jax.random.normal(jax.random.PRNGKey(7), (n, h)).astype(jnp.bfloat16)
    w8a8 = moe_gpu.experts_grouped(x, routing, ids, *q, config=TINY, layout="out_in", interpret=True)
    widened = moe_gpu.experts_grouped(x, routing, ids, *q, config=moe_gpu.PREFILL_FP8, layout="out_in", interpret=True)
    assert w8a8.dtype == jnp.bfloat16
    assert 0 < rel_err(w8a8, widened) < 0.08  # e4m3 keeps 3 mantissa bits (x and h each rounded once)


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
@pytest.mark.parametrize("block_out", [128, 1], ids=["blocks", "columns"])
def test_matmul_w8a8_matches_float64_reference(layout, block_out):
    """One weight with 128 x 128 block scales or one scale per (128 inputs, column) (attention q/k/v); rows
    not a multiple of the row tile."""
    m, k, n = 37, 384, 256
    w = jax.random.normal(jax.random.PRNGKey(8), (k, n)) / np.sqrt(k)
    n_blocks = n // block_out
    scales = jnp.linspace(0.5, 2.0, (k // 128) * n_blocks).reshape(k // 128, n_blocks) / 200.0
    col_scales = fp8_gemm_gpu.column_scales(scales, block_out, n)
    values = jnp.clip(w / jnp.repeat(col_scales, 128, axis=0), -448, 448).astype(jnp.float8_e4m3fn)
    x = jax.random.normal(jax.random.PRNGKey(9), (m, k)) * jnp.geomspace(1e-2, 1e2, m)[:, None]
    operand = values.T if layout == "out_in" else values
    tiles = fp8_gemm_gpu.GemmTiles(16, 128, 4, 3)
    got = fp8_gemm_gpu.matmul_w8a8(x, operand, col_scales, layout=layout, tiles=tiles, interpret=True)
    w_ref = np.asarray(values, np.float64) * np.repeat(np.asarray(col_scales, np.float64), 128, axis=0)
    want = np_dequantize_groups(*np_quantize_groups(np.asarray(x))) @ w_ref
    assert got.shape == (m, n) and got.dtype == x.dtype
    assert max(rel_err(got[r], want[r]) for r in range(m)) < 1e-5


def test_quantize_groups_matches_numpy_and_pads_rows():
    x = jax.random.normal(jax.random.PRNGKey(10), (5, 256)) * jnp.asarray([1e-6, 1.0, 1e4, 0.0, 3.0])[:, None]
    values, scales = fp8_gemm_gpu.quantize_groups(x, rows=8)
    want_values, want_scales = np_quantize_groups(np.asarray(x))
    assert values.shape == (8, 256) and scales.shape == (2, 8)
    np.testing.assert_array_equal(np.asarray(values[:5]).astype(np.float32), want_values.astype(np.float32))
    np.testing.assert_allclose(np.asarray(scales[:, :5]).T, want_scales, rtol=1e-6)  # XLA: x * (1 / 448)
    assert np.all(np.asarray(values[5:]).astype(np.float32) == 0)


def test_default_config_picks_w8a8_at_prefill_only():
    e, inter = 256, 2048
    for tokens, want in ((1, moe_gpu.FusedConfig), (32, moe_gpu.KernelConfig), (2048, moe_gpu.KernelConfig)):
        assert isinstance(moe_gpu.default_config(tokens * 8, e, True, inter, w8a8=True), want), tokens
    assert moe_gpu.default_config(8192 * 8, e, True, inter, w8a8=True) == fp8_gemm_gpu.W8A8_LARGE
    assert moe_gpu.default_config(4096 * 8, e, True, inter, w8a8=True) == fp8_gemm_gpu.W8A8_SMALL
    assert moe_gpu.default_config(8192 * 8, e, True, inter) == moe_gpu.PREFILL_FP8  # w8a8 not asked
    assert moe_gpu.default_config(8192 * 8, e, False, inter, w8a8=True) == moe_gpu.PREFILL  # bf16 experts


def test_bad_w8a8_inputs_are_named():
    e, h, i = 2, 128, 128
    q, _ = fp8_experts(11, e, h, i, False)
    x, ids, routing = jnp.ones((2, h)), jnp.zeros((2, 1), jnp.int32), jnp.ones((2, 1))
    wide_gate_up = dataclasses.replace(TINY, gate_up=fp8_gemm_gpu.GemmTiles(16, 256, 4, 3))
    with pytest.raises(ValueError, match="block_cols=256 must be 128"):
        moe_gpu.experts_grouped(x, routing, ids, *q, config=wide_gate_up, interpret=True)
    bf16 = [v.astype(jnp.bfloat16) for v, _ in q]
    with pytest.raises(ValueError, match="need fp8"):
        moe_gpu.experts_grouped(x, routing, ids, *bf16, config=TINY, interpret=True)
    values, scales = jnp.zeros((h, 256), jnp.float8_e4m3fn), jnp.ones((1, 256))
    with pytest.raises(ValueError, match="disagree"):
        fp8_gemm_gpu.matmul_w8a8(jnp.ones((4, 256)), values, scales, interpret=True)
    with pytest.raises(ValueError, match="column scales"):
        fp8_gemm_gpu.matmul_w8a8(jnp.ones((4, h)), values, jnp.ones((1, 2)), interpret=True)
    with pytest.raises(ValueError, match="multiple of block_cols"):
        tiles = fp8_gemm_gpu.GemmTiles(16, 512, 4, 3)
        fp8_gemm_gpu.matmul_w8a8(jnp.ones((4, h)), values, scales, tiles=tiles, interpret=True)


def triton_dots(fn, *args) -> dict[str, list[str]]:
    """Lower `fn` for CUDA on this host; the tt.dot lines of each Triton kernel (by kernel name)."""
    from jax._src.lib import triton
    from jax._src.lib.mlir import ir

    module = jax.jit(fn).trace(*args).lower(lowering_platforms=("cuda",)).compiler_ir("stablehlo")
    dots = {}

    def walk(op):
        for region in op.regions:
            for block in region.blocks:
                for inner in block.operations:
                    attrs = inner.operation.attributes
                    if inner.operation.name == "stablehlo.custom_call" and "triton" in str(attrs["call_target_name"]):
                        config = attrs["mhlo.backend_config"]
                        context = ir.Context()
                        triton.dialect.register_dialect(context)
                        with context:
                            text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
                        dots[ir.StringAttr(config["name"]).value] = [s for s in text.splitlines() if "tt.dot" in s]
                    walk(inner.operation)

    walk(module.operation)
    return dots


@pytest.mark.parametrize("layout", ["in_out", "out_in"])
def test_lowers_to_triton_fp8_dots_accumulating_in_the_mma(layout):
    """Every w8a8 kernel lowers for CUDA on this CPU host with tt.dot on two e4m3 operands (wgmma on sm_90), and
    maxNumImpreciseAcc set (else Triton adds each K=32 MMA into a separate fp32 accumulator)."""
    e, h, i, n = 4, 256, 256, 64
    q, _ = fp8_experts(12, e, h, i, layout == "out_in")
    ids = jnp.asarray(ragged_ids(n, e))
    x = jnp.ones((n, h), jnp.bfloat16)

    def moe(x, routing, ids, q):
        return moe_gpu.experts_grouped(x, routing, ids, *q, config=fp8_gemm_gpu.W8A8_LARGE, layout=layout)

    def dense(x, values, scales):
        return fp8_gemm_gpu.matmul_w8a8(x, values, scales, layout=layout)

    values = jnp.zeros((i, h), jnp.float8_e4m3fn)
    dots = {**triton_dots(moe, x, jnp.ones(ids.shape), ids, q), **triton_dots(dense, x, values, jnp.ones((2, i)))}
    assert sorted(dots) == ["matmul_w8a8", "moe_w8a8_down", "moe_w8a8_gate_up"]
    assert {name: len(lines) for name, lines in dots.items()} == {
        "matmul_w8a8": 1,
        "moe_w8a8_down": 1,
        "moe_w8a8_gate_up": 2,
    }
    for lines in dots.values():
        for line in lines:
            assert line.count("xf8E4M3FN>") == 2 and "-> tensor<" in line and "xf32>" in line.split("->")[1], line
            assert f"maxNumImpreciseAcc = {fp8_gemm_gpu.MMA_IMPRECISE_ACC}" in line, line


def test_other_dots_keep_the_default_accumulation():
    """The lowering change touches fp8 x fp8 dots only: bf16 dots lower exactly as before."""
    fn = lambda x, q: moe_gpu.experts_grouped(x, jnp.ones((64, 2)), jnp.zeros((64, 2), jnp.int32), *q)
    q, _ = fp8_experts(13, 2, 256, 256, False)
    bf16 = [v.astype(jnp.bfloat16) for v, _ in q]
    for lines in triton_dots(fn, jnp.ones((64, 256), jnp.bfloat16), bf16).values():
        assert lines and all("maxNumImpreciseAcc" not in line and "bf16>" in line for line in lines)


def test_export_for_cuda():
    """jax.export for "cuda" (what the GPU engine serializes) accepts the w8a8 kernels."""
    q, _ = fp8_experts(14, 4, 256, 256, True)
    ids = jnp.asarray(ragged_ids(256, 4))  # 128 rows per expert: prefill-sized

    def fn(x, q):
        return moe_gpu.experts_grouped(x, jnp.ones(ids.shape), ids, *q, layout="out_in", w8a8="prefill")

    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(jax.jit(fn), platforms=["cuda"], disabled_checks=[triton])(
        jnp.ones((256, 256), jnp.bfloat16), q
    ).mlir_module()
    assert 'name = "moe_w8a8_gate_up"' in text and 'name = "moe_w8a8_down"' in text
