"""Pallas MoE kernel (mimo_jax.kernels.moe_gpu) in interpreter mode on CPU, against `experts_dense`.

The GPU-compiled kernel is checked (and timed) by bench/bench_moe_kernel.py on a GPU.
"""

import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import mimo_jax
from mimo_jax import kernels
from mimo_jax.kernels import moe_gpu
from mimo_jax.model import moe

SMALL = moe_gpu.KernelConfig(moe_gpu.TileConfig(16, 64, 64, 4, 3), moe_gpu.TileConfig(16, 64, 64, 4, 3))
WIDE_FP8 = moe_gpu.KernelConfig(moe_gpu.TileConfig(32, 256, 128, 4, 3), moe_gpu.TileConfig(16, 128, 128, 4, 3))
F16_FP8 = dataclasses.replace(SMALL, fp8_dot="f16")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Fp8Weight:
    """Stand-in for the importer's `BlockQuantized` (values, scales, static block)."""

    values: jax.Array
    scales: jax.Array
    block: tuple = dataclasses.field(metadata=dict(static=True))


def make_weights(seed, e, h, i, dtype=jnp.float32):
    kg, ku, kd = jax.random.split(jax.random.PRNGKey(seed), 3)
    wg = (jax.random.normal(kg, (e, h, i)) / np.sqrt(h)).astype(dtype)
    wu = (jax.random.normal(ku, (e, h, i)) / np.sqrt(h)).astype(dtype)
    wd = (jax.random.normal(kd, (e, i, h)) / np.sqrt(i)).astype(dtype)
    return wg, wu, wd


def make_tokens(seed, n, e, k):
    """Routing of n tokens to k distinct experts each, with positive weights."""
    kr, kw = jax.random.split(jax.random.PRNGKey(seed))
    ids = jnp.argsort(jax.random.uniform(kr, (n, e)), axis=1)[:, :k].astype(jnp.int32)
    weights = jax.random.uniform(kw, (n, k), minval=0.1, maxval=1.0)
    return ids, weights


def activations(seed, n, h, dtype=jnp.float32):
    return jax.random.normal(jax.random.PRNGKey(seed), (n, h)).astype(dtype)


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def ramped(w, e, d_in, d_out):
    """Weights times a scale that differs per 128 x 128 block, so a wrong block-scale index shows."""
    ramp = jnp.linspace(0.5, 2.0, e * (d_in // 128) * (d_out // 128)).reshape(e, d_in // 128, 1, d_out // 128, 1)
    return (w.reshape(e, d_in // 128, 128, d_out // 128, 128) * ramp).reshape(e, d_in, d_out)


def fp8_blocks(weights) -> tuple[list, list]:
    """Weights -> (their fp8 (values, scales) pairs, those dequantized to float32: the reference's weights)."""
    q = [moe_gpu.quantize_fp8_blocks(w) for w in weights]
    return q, [moe_gpu.dequantize_fp8_blocks(v, s) for v, s in q]


def reference(x, weights, ids, wg, wu, wd):
    """experts_dense in float32 with ids outside [0, E) dropped (they belong to other shards)."""
    e = wg.shape[0]
    ok = (ids >= 0) & (ids < e)
    f32 = [a.astype(jnp.float32) for a in (x, wg, wu, wd)]
    return moe.experts_dense(f32[0], jnp.where(ok, weights, 0.0), jnp.where(ok, ids, 0), *f32[1:])


def run_kernel(x, weights, ids, wg, wu, wd, config=SMALL):
    return moe_gpu.experts_grouped(x, weights, ids, wg, wu, wd, config=config, interpret=True)


def test_random_routing_matches_dense():
    e, h, i, n, k = 8, 256, 128, 5, 2
    wg, wu, wd = make_weights(0, e, h, i)
    ids, weights = make_tokens(1, n, e, k)
    x = activations(2, n, h)
    out = run_kernel(x, weights, ids, wg, wu, wd)
    assert out.shape == x.shape and out.dtype == x.dtype
    assert rel_err(out, reference(x, weights, ids, wg, wu, wd)) < 1e-5


def test_adversarial_routing():
    """All assignments on one expert (several unaligned row tiles), empty experts, duplicates, foreign ids."""
    e, h, i, n, k = 8, 256, 128, 21, 2
    wg, wu, wd = make_weights(3, e, h, i)
    x = activations(4, n, h)
    weights = jax.random.uniform(jax.random.PRNGKey(5), (n, k), minval=0.1, maxval=1.0)
    one_expert = jnp.full((n, k), 6, jnp.int32)
    foreign = one_expert.at[::3, 0].set(-1).at[1::4, 1].set(e + 2).at[2::5, 0].set(1)
    for ids in (one_expert, foreign):
        out = run_kernel(x, weights, ids, wg, wu, wd)
        assert rel_err(out, reference(x, weights, ids, wg, wu, wd)) < 1e-5
    single = run_kernel(x[:1], weights[:1], jnp.array([[3, 0]], jnp.int32), wg, wu, wd)
    assert rel_err(single, reference(x[:1], weights[:1], jnp.array([[3, 0]]), wg, wu, wd)) < 1e-5


def test_bf16_within_bf16_tolerance():
    e, h, i, n, k = 8, 256, 128, 12, 4
    wg, wu, wd = make_weights(6, e, h, i, jnp.bfloat16)
    ids, weights = make_tokens(7, n, e, k)
    x = activations(8, n, h, jnp.bfloat16)
    out = run_kernel(x, weights, ids, wg, wu, wd)
    assert out.dtype == jnp.bfloat16
    assert rel_err(out, reference(x, weights, ids, wg, wu, wd)) < 1e-2


@pytest.mark.parametrize("config", [SMALL, WIDE_FP8, F16_FP8], ids=["narrow", "wide", "f16"])
def test_fp8_block_scaled_weights(config):
    """fp8 values with 128x128 block scales, dequantized in the kernel, against the dequantized reference."""
    e, h, i, n, k = 4, 256, 256, 9, 2
    wg, wu, wd = make_weights(9, e, h, i)
    wg = ramped(wg, e, h, i)
    q, deq = fp8_blocks((wg, wu, wd))
    assert rel_err(deq[0], wg) < 0.05  # e4m3 keeps ~3 mantissa bits
    ids, weights = make_tokens(10, n, e, k)
    x = activations(11, n, h, jnp.bfloat16)
    out = run_kernel(x, weights, ids, *q, config=config)
    assert rel_err(out, reference(x, weights, ids, *deq)) < 1e-2


def test_fp8_f16_dot_keeps_activations_past_f16_range():
    """fp8_dot="f16" scales each activation row into f16's range: rows of 1e6 and 1e-6 stay exact."""
    e, h, i, n, k = 4, 256, 256, 6, 2
    q, deq = fp8_blocks(make_weights(12, e, h, i))
    ids, weights = make_tokens(13, n, e, k)
    row_scale = jnp.asarray([1e6, 1e-6, 1.0, 3e4, 1e-3, 70.0])[:, None]
    x = (activations(14, n, h) * row_scale).astype(jnp.bfloat16)
    out = np.asarray(run_kernel(x, weights, ids, *q, config=F16_FP8), np.float64)
    ref = np.asarray(reference(x, weights, ids, *deq), np.float64)
    assert np.isfinite(out).all()
    for row in range(n):  # each row on its own: their magnitudes differ by 1e12
        assert rel_err(out[row], ref[row]) < 1e-2, row


def test_schedule_lists_each_row_tile_once():
    sizes = jnp.array([0, 5, 17, 0, 1], jnp.int32)
    n_tiles = moe_gpu.max_tiles(23, 5, 8)
    table = np.asarray(moe_gpu.schedule(sizes, 8, 2, n_tiles))
    live = table[:, table[1] < table[2]]
    got = sorted(map(tuple, live.T.tolist()))
    want = sorted(
        (ex, s, end, c)
        for ex, s, end in [(1, 0, 5), (2, 5, 22), (2, 13, 22), (2, 21, 22), (4, 22, 23)]
        for c in range(2)
    )
    assert got == want
    assert (table[1:3, table[1] >= table[2]] == 0).all()


def test_jit_compiles_once_for_any_routing():
    e, h, i, n, k = 8, 256, 128, 6, 2
    wg, wu, wd = make_weights(12, e, h, i)
    x = activations(13, n, h)
    fn = jax.jit(run_kernel)
    for seed in (14, 15):
        ids, weights = make_tokens(seed, n, e, k)
        assert rel_err(fn(x, weights, ids, wg, wu, wd), reference(x, weights, ids, wg, wu, wd)) < 1e-5
    assert fn._cache_size() == 1


def expert_parallel(mesh, interpret):
    """Each shard runs the kernel on its local experts (ids shifted; others fall outside) and results are summed."""

    def local(x, weights, ids, wg, wu, wd):
        first = jax.lax.axis_index("expert") * jax.tree.leaves(wg)[0].shape[0]
        out = moe_gpu.experts_grouped(x, weights, ids - first, wg, wu, wd, interpret=interpret)
        return jax.lax.psum(out, "expert")

    specs = (P(), P(), P(), P("expert"), P("expert"), P("expert"))
    # The Pallas interpreter trips over shard_map's varying-axis check; the compiled path passes it (test below).
    return jax.jit(jax.shard_map(local, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=not interpret))


def test_inside_expert_parallel_shard_map():
    e, h, i, n, k = 8, 256, 128, 7, 2
    mesh = Mesh(np.array(jax.devices()[:2]), ("expert",))
    wg, wu, wd = make_weights(16, e, h, i)
    ids, weights = make_tokens(17, n, e, k)
    x = activations(18, n, h)
    out = expert_parallel(mesh, interpret=True)(x, weights, ids, wg, wu, wd)
    assert rel_err(out, reference(x, weights, ids, wg, wu, wd)) < 1e-5


@pytest.mark.parametrize("n,kernel_name", [(7, "moe_fused"), (40, "moe_gate_up")], ids=["fused", "grouped"])
@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
def test_lowers_to_triton_for_cuda_inside_shard_map(fp8, n, kernel_name):
    """The compiled (non-interpreted) kernels lower for CUDA on this CPU machine, varying-axis checks on."""
    e, h, i, k = 8, 256, 128, 2
    mesh = Mesh(np.array(jax.devices()[:2]), ("expert",))
    s = jax.ShapeDtypeStruct
    if fp8:
        wg = (s((e, h, i), jnp.float8_e4m3fn), s((e, h // 128, i // 128), jnp.float32))
        wd = (s((e, i, h), jnp.float8_e4m3fn), s((e, i // 128, h // 128), jnp.float32))
    else:
        wg, wd = s((e, h, i), jnp.bfloat16), s((e, i, h), jnp.bfloat16)
    args = (s((n, h), jnp.bfloat16), s((n, k), jnp.float32), s((n, k), jnp.int32), wg, wg, wd)
    text = expert_parallel(mesh, interpret=False).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert kernel_name in text


def test_registry_and_backend_choice():
    assert moe.EXPERT_IMPLS["pallas_gpu"] is kernels.experts_pallas_gpu
    assert moe.EXPERT_IMPLS["pallas_gpu_w8a8"] is kernels.experts_pallas_gpu_w8a8
    assert {"pallas_gpu", "pallas_gpu_w8a8"} <= moe.QUANTIZED_IMPLS  # fp8 experts reach the kernel as stored
    assert mimo_jax.RunOptions.for_platform("cpu").expert_impl == "ragged"
    assert mimo_jax.RunOptions.for_platform("cuda").expert_impl == "pallas_gpu"
    for impl in (kernels.experts_pallas_gpu, kernels.experts_pallas_gpu_w8a8):
        with pytest.raises(ValueError, match="GPU backend"):
            impl(*([jnp.zeros((1, 1))] * 6))


def test_bad_inputs_are_named():
    wg, wu, wd = make_weights(19, 4, 256, 128)
    ids, weights = make_tokens(20, 3, 4, 2)
    x = activations(21, 3, 256)
    with pytest.raises(ValueError, match="shapes disagree"):
        run_kernel(x, weights, ids, wg, wu, wg)
    with pytest.raises(ValueError, match="not a multiple"):
        run_kernel(x, weights, ids, wg[..., :96], wu[..., :96], wd[:, :96])
    values, scales = moe_gpu.quantize_fp8_blocks(wg)
    with pytest.raises(ValueError, match="block scales"):
        run_kernel(x, weights, ids, (values, scales[:, :1]), wu, wd)
    with pytest.raises(ValueError, match="block"):
        run_kernel(x, weights, ids, Fp8Weight(values, scales, (128, 128, 1)), wu, wd)
    # fp8 activations are the w8a8 kernels' (fp8_gemm_gpu, a W8A8Config), not a way of widening
    fp8 = [moe_gpu.quantize_fp8_blocks(w) for w in (wg, wu, wd)]
    with pytest.raises(ValueError, match="fp8_dot='fp8': choose from \\('bf16', 'f16'\\)"):
        run_kernel(x, weights, ids, *fp8, config=dataclasses.replace(SMALL, fp8_dot="fp8"))


def test_accepts_block_quantized_objects():
    """fp8 weights as objects with .values/.scales/.block (the importer's BlockQuantized shape of things)."""
    e, h, i, n, k = 4, 256, 128, 6, 2
    q = [Fp8Weight(*moe_gpu.quantize_fp8_blocks(w), (1, 128, 128)) for w in make_weights(22, e, h, i)]
    ids, weights = make_tokens(23, n, e, k)
    x = activations(24, n, h, jnp.bfloat16)
    out = run_kernel(x, weights, ids, *q)
    deq = [moe_gpu.dequantize_fp8_blocks(w.values, w.scales) for w in q]
    assert rel_err(out, reference(x, weights, ids, *deq)) < 1e-2


def test_cpu_process_does_not_import_gpu_module_until_called():
    assert "mimo_jax.kernels.moe_gpu" in sys.modules  # imported by this test file itself
    import subprocess

    code = "import mimo_jax.model.mimo, sys; print('mimo_jax.kernels.moe_gpu' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


@pytest.mark.parametrize("fp8_dot", moe_gpu.FP8_DOTS)
def test_kernel_lowers_to_triton_for_cuda_on_any_host(fp8_dot):
    """Pallas -> Triton lowering runs on a CPU host (jax.export for "cuda"): a kernel that would not lower
    for the GPU fails here, before any GPU run."""
    from jax import export

    e, h, i = 8, 512, 256
    q = [moe_gpu.quantize_fp8_blocks(w) for w in make_weights(20, e, h, i)]
    ids, weights = make_tokens(21, 4, e, 2)
    x = activations(22, 4, h, jnp.bfloat16)
    config = dataclasses.replace(moe_gpu.DECODE_FP8, fp8_dot=fp8_dot)
    fn = jax.jit(lambda x, weights, ids, q: moe_gpu.experts_grouped(x, weights, ids, *q, config=config))
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(fn, platforms=["cuda"], disabled_checks=[triton])(x, weights, ids, q).mlir_module()
    assert text.count("xla.gpu.triton") >= 2 and 'name = "moe_gate_up"' in text and 'name = "moe_down"' in text


def out_in(w):
    """[E, in, out] weights (fp8: values and block scales) as checkpoints store them, [E, out, in]."""
    return tuple(map(moe.swap_expert_axes, w)) if isinstance(w, tuple) else moe.swap_expert_axes(w)


SWAP = moe_gpu.KernelConfig(
    moe_gpu.TileConfig(16, 128, 128, 4, 3, swap_ab=True), moe_gpu.TileConfig(16, 256, 128, 4, 3, swap_ab=True)
)


@pytest.mark.parametrize("layout", kernels.EXPERT_LAYOUTS)
@pytest.mark.parametrize(
    "config",
    [SMALL, WIDE_FP8, SWAP, dataclasses.replace(SWAP, fp8_dot="f16")],
    ids=["narrow", "wide", "swap_ab", "swap_ab_f16"],
)
def test_weight_layouts_and_swapped_operands(layout, config):
    """[E, out, in] weights and the swapped matmul (weight tile as the MMA's wide side) give the same
    result as the plain layout, fp8 scales differing per block (a transposed scale index shows)."""
    e, h, i, n, k = 4, 256, 256, 9, 2
    wg, wu, wd = make_weights(30, e, h, i)
    ramp = jnp.linspace(0.5, 2.0, e * (h // 128) * (i // 128)).reshape(e, h // 128, 1, i // 128, 1)
    wg = (wg.reshape(e, h // 128, 128, i // 128, 128) * ramp).reshape(e, h, i)
    wd = (wd.reshape(e, i // 128, 128, h // 128, 128) * ramp[::-1]).reshape(e, i, h)
    q, deq = fp8_blocks((wg, wu, wd))
    ids, weights = make_tokens(31, n, e, k)
    x = activations(32, n, h, jnp.bfloat16)
    given = [out_in(w) for w in q] if layout == "out_in" else q
    out = moe_gpu.experts_grouped(x, weights, ids, *given, config=config, layout=layout, interpret=True)
    assert rel_err(out, reference(x, weights, ids, *deq)) < 1e-2
    bf16 = [w.astype(jnp.bfloat16) for w in (wg, wu, wd)]
    given = [out_in(w) for w in bf16] if layout == "out_in" else bf16
    out = moe_gpu.experts_grouped(x, weights, ids, *given, config=config, layout=layout, interpret=True)
    assert rel_err(out, reference(x, weights, ids, *bf16)) < 1e-2


def test_out_in_layout_shapes_are_checked():
    wg, wu, wd = make_weights(33, 4, 256, 128)
    ids, weights = make_tokens(34, 3, 4, 2)
    x = activations(35, 3, 256)
    with pytest.raises(ValueError, match="shapes disagree \\(out_in\\)"):
        moe_gpu.experts_grouped(x, weights, ids, wg, wu, wd, layout="out_in", interpret=True)
    with pytest.raises(ValueError, match="layout"):
        moe_gpu.experts_grouped(x, weights, ids, wg, wu, wd, layout="kn", interpret=True)


@pytest.mark.parametrize("fp8_dot", moe_gpu.FP8_DOTS)
def test_out_in_swapped_kernel_lowers_to_triton_for_cuda(fp8_dot):
    from jax import export

    e, h, i = 8, 512, 256
    q = [out_in(moe_gpu.quantize_fp8_blocks(w)) for w in make_weights(36, e, h, i)]
    ids, weights = make_tokens(37, 4, e, 2)
    x = activations(38, 4, h, jnp.bfloat16)
    config = dataclasses.replace(SWAP, fp8_dot=fp8_dot)
    fn = jax.jit(
        lambda x, weights, ids, q: moe_gpu.experts_grouped(x, weights, ids, *q, config=config, layout="out_in")
    )
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(fn, platforms=["cuda"], disabled_checks=[triton])(x, weights, ids, q).mlir_module()
    assert text.count("xla.gpu.triton") >= 2


FUSED_VARIANTS = {
    "swap_f16": moe_gpu.FusedConfig(32, 64, 64, 4, 3),
    "rows_f16": moe_gpu.FusedConfig(64, 128, 128, 4, 3, swap_ab=False),
    "swap_bf16": moe_gpu.FusedConfig(128, 128, 64, 4, 3, fp8_dot="bf16"),
    "cuda_cores": moe_gpu.FusedConfig(32, 128, 64, 4, 3, tensor_cores=False),
    "unrolled": moe_gpu.FusedConfig(32, 64, 64, 4, 3, swap_ab=False, unroll=2),
    "split": moe_gpu.FusedConfig(32, 64, 64, 4, 3, swap_ab=False, split=2),  # two launches
    "split_unrolled": moe_gpu.FusedConfig(64, 64, 64, 4, 3, unroll=2, split=2),
    "split_cuda_cores": moe_gpu.FusedConfig(32, 128, 64, 4, 3, tensor_cores=False, split=2),
    "wide_down": moe_gpu.FusedConfig(64, 128, 256, 4, 3, swap_ab=False),  # fp8: two scale blocks per down step
}


@pytest.mark.parametrize("layout", kernels.EXPERT_LAYOUTS)
@pytest.mark.parametrize("variant", FUSED_VARIANTS)
def test_fused_decode_kernel_matches_dense(layout, variant):
    """The single-launch kernel (no sort): fp8 block scales differing per block, bf16 weights, an expert chosen
    by two tokens, foreign ids (other shards' experts), and rows 1e12 apart in magnitude (f16 scaling)."""
    e, h, i = 4, 256, 256
    wg, wu, wd = make_weights(40, e, h, i)
    wg, wd = ramped(wg, e, h, i), ramped(wd, e, i, h)[:, ::-1]
    q, deq = fp8_blocks((wg, wu, wd))
    ids = jnp.asarray([[1, 3], [3, -1], [e + 2, 0]], jnp.int32)
    weights = jnp.asarray([[0.7, 0.2], [0.4, 0.9], [0.5, 0.3]])
    x = (activations(41, 3, h) * jnp.asarray([[1e6], [1e-6], [1.0]])).astype(jnp.bfloat16)
    config = FUSED_VARIANTS[variant]
    for w, want in ((q, deq), ([a.astype(jnp.bfloat16) for a in (wg, wu, wd)], None)):
        given = [out_in(a) for a in w] if layout == "out_in" else w
        got = moe_gpu.experts_grouped(x, weights, ids, *given, config=config, layout=layout, interpret=True)
        ref = reference(x, weights, ids, *(want or w))
        assert got.dtype == x.dtype and np.isfinite(np.asarray(got, np.float32)).all()
        for row in range(3):  # each row on its own: their magnitudes differ by 1e12
            assert rel_err(got[row], ref[row]) < 1e-2, (row, want is None)


def test_fused_kernel_is_the_default_for_few_assignments():
    """At most FUSED_MAX_ASSIGNMENTS(_FP8) (tokens x top-k) take the fused kernel, with block_inter sized so
    that the programs fill the GPU; more take the grouped kernels."""
    limit, limit_fp8 = moe_gpu.FUSED_MAX_ASSIGNMENTS, moe_gpu.FUSED_MAX_ASSIGNMENTS_FP8
    fused = moe_gpu.default_config(8, 256, True, 2048)
    assert isinstance(fused, moe_gpu.FusedConfig) and fused.block_inter == 128  # 8 x 16 programs
    assert fused.split == 2 and fused.num_stages == 3  # fp8 at one program per SM: two launches, 2 x the programs
    assert moe_gpu.default_config(16, 256, True, 2048).split == 1  # two programs per SM already
    assert moe_gpu.default_config(8, 256, False, 2048).split == 1  # bf16 keeps one launch
    assert moe_gpu.default_config(8, 256, True, 512).block_inter == 32  # one tensor=4 shard: 8 x 16 again
    assert moe_gpu.default_config(1, 256, False, 2048).block_inter == 16  # top-1: as many as it can
    assert isinstance(moe_gpu.default_config(limit + 1, 256, False, 2048), moe_gpu.KernelConfig)
    assert isinstance(moe_gpu.default_config(limit_fp8, 256, True, 2048), moe_gpu.FusedConfig)
    assert isinstance(moe_gpu.default_config(limit_fp8 + 1, 256, True, 2048), moe_gpu.KernelConfig)
    assert isinstance(moe_gpu.default_config(8, 256, True), moe_gpu.KernelConfig)  # no size given: grouped
    e, h, i, n, k = 8, 256, 128, 3, 2  # n x k <= limit: the default path is the fused kernel
    wg, wu, wd = make_weights(42, e, h, i)
    ids, weights = make_tokens(43, n, e, k)
    x = activations(44, n, h)
    out = moe_gpu.experts_grouped(x, weights, ids, wg, wu, wd, interpret=True)
    assert rel_err(out, reference(x, weights, ids, wg, wu, wd)) < 1e-5
    jaxpr = str(jax.make_jaxpr(lambda *a: moe_gpu.experts_grouped(*a, interpret=True))(x, weights, ids, wg, wu, wd))
    assert "moe_fused" in jaxpr and "moe_gate_up" not in jaxpr
    # fp8 at a hidden size with one 128-step: the default's 256-wide down steps and split fit themselves to it
    q, deq = fp8_blocks(make_weights(42, e, 128, 128))
    x = activations(44, n, 128)
    out = moe_gpu.experts_grouped(x, weights, ids, *q, interpret=True)
    assert rel_err(out, reference(x, weights, ids, *deq)) < 1e-2


def test_fused_tiles_are_checked():
    wg, wu, wd = make_weights(45, 4, 256, 192)
    ids, weights = make_tokens(46, 2, 4, 2)
    x = activations(47, 2, 256)
    with pytest.raises(ValueError, match="block_inter=128 must be a power of two >= 16 dividing intermediate 192"):
        run_kernel(x, weights, ids, wg, wu, wd, config=moe_gpu.FusedConfig(128, 64, 64, 4, 3))
    q = [moe_gpu.quantize_fp8_blocks(w) for w in make_weights(45, 4, 512, 256)]
    with pytest.raises(ValueError, match="block_k=256 .* at most 128"):
        run_kernel(activations(47, 2, 512), weights, ids, *q, config=moe_gpu.FusedConfig(64, 256, 64, 4, 3))
    with pytest.raises(ValueError, match="unroll=3 must divide hidden 512"):
        run_kernel(activations(47, 2, 512), weights, ids, *q, config=moe_gpu.FusedConfig(64, 128, 64, 4, 3, unroll=3))
    with pytest.raises(ValueError, match=r"split=3 must divide the loop steps over hidden 512 \(4, 8\)"):
        run_kernel(activations(47, 2, 512), weights, ids, *q, config=moe_gpu.FusedConfig(64, 128, 64, 4, 3, split=3))


@pytest.mark.parametrize("fp8", [False, True], ids=["bf16", "fp8"])
@pytest.mark.parametrize(
    "variant",
    [
        dict(swap_ab=True),
        dict(swap_ab=False),
        dict(tensor_cores=False),
        dict(swap_ab=False, unroll=2),
        dict(swap_ab=False, split=2),
        dict(split=2, tensor_cores=False),
        dict(swap_ab=False, block_out=256),
    ],
    ids=["swap_ab", "rows", "fma", "unrolled", "split", "fma_split", "wide_down"],
)
def test_fused_kernel_lowers_to_triton_for_cuda(fp8, variant):
    from jax import export

    e, h, i = 8, 512, 256
    w = make_weights(48, e, h, i, jnp.bfloat16)
    q = [out_in(moe_gpu.quantize_fp8_blocks(a) if fp8 else a) for a in w]
    ids, weights = make_tokens(49, 1, e, 2)
    x = activations(50, 1, h, jnp.bfloat16)
    config = dataclasses.replace(moe_gpu.FusedConfig(64, 128, 128, 4, 4), **variant)
    fn = jax.jit(
        lambda x, weights, ids, q: moe_gpu.experts_grouped(x, weights, ids, *q, config=config, layout="out_in")
    )
    triton = export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")
    text = export.export(fn, platforms=["cuda"], disabled_checks=[triton])(x, weights, ids, q).mlir_module()
    names = ["moe_fused_gate_up", "moe_fused_down"] if variant.get("split", 1) > 1 else ["moe_fused"]
    assert text.count("xla.gpu.triton") == len(names) and all(f'name = "{name}"' in text for name in names)


def test_fused_kernel_with_hidden_not_a_power_of_two():
    """MiMo-V2.5-Pro's hidden size is 6144 = 3 x 2048: the row scale is read in power-of-two chunks."""
    e, h, i = 4, 384, 128
    q, deq = fp8_blocks(make_weights(51, e, h, i))
    ids, weights = make_tokens(52, 2, e, 2)
    x = (activations(53, 2, h) * jnp.asarray([[3e5], [2e-5]])).astype(jnp.bfloat16)
    x = x.at[1, 300].set(40.0)  # the second row's largest value sits in the last chunk
    out = run_kernel(x, weights, ids, *q, config=moe_gpu.FusedConfig(64, 128, 128, 4, 3, swap_ab=False))
    ref = reference(x, weights, ids, *deq)
    for row in range(2):
        assert rel_err(out[row], ref[row]) < 1e-2, row
