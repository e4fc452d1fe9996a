"""The serving steps compile for a real TPU slice (v5e:2x2) at MiMo-V2-Flash's real layer dimensions.

No TPU is needed: libtpu's compiler runs on the CPU host against a described topology. This
catches what only the TPU compiler rejects: a GPU-only kernel or custom call, a sharding it
cannot partition, a program that does not fit HBM. The models are built as on a GPU host
(Pallas GPU MoE kernel, cuDNN attention): the kernels must follow the target, not the host.
"""

import concurrent.futures
import importlib.util
import os
import re

import jax
import jax.numpy as jnp
import pytest

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.sharding import make_mesh
from mimo_jax.tools import aot
from mimo_jax.weights.loader import abstract_params
from tests.fixtures import ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason=f'libtpu is not installed (pip install "jax[tpu]=={jax.__version__}"); TPU compilation untested',
)

FLASH = os.path.join(ROOT, "configs", "mimo-v2-flash.json")
TOPOLOGY = "v5e:2x2"
# Layer 0: full attention + dense MLP; layer 1: sliding window with sinks + 256-expert MoE.
LAYERS, BATCH, CONTEXT, CHUNK = 2, 4, 1024, 128
IN_PLACE_CONTEXT = 16384  # two blocks of blockwise attention (test_decode_step_reads_the_full_attention_cache_in_place)


# MTP speculation: the engine with this many draft steps (as many of Flash's 3 MTP layers)
SPECULATIVE_STEPS = 2

# The released weights are FP8 (served as `weights="fp8"`); bf16 prefill covers the plain-array path;
# "speculative" is the MTP draft-verify-accept loop (and its prefill also fills the MTP layers' caches).
CASES = [("fp8", "prefill"), ("fp8", "decode"), ("bf16", "prefill"), ("fp8", "speculative")]


# The model as a GPU host builds it by default: Pallas GPU MoE kernel (experts in its layout), cuDNN attention.
ON_A_GPU_HOST = RunOptions(platform="gpu", attention_impl="cudnn")


def _flash_slice_compile(devices, weights: str, step_name: str):
    """(report, hlo text, planner estimate) of one serving step of the Flash slice on tensor=2, expert=2."""
    cfg = MiMoConfig.from_json(FLASH).first_layers(LAYERS)
    mesh = make_mesh(tensor=2, expert=2, devices=devices)
    k = SPECULATIVE_STEPS if step_name == "speculative" else 0
    graphdef, params = abstract_params(cfg, jnp.bfloat16, mesh, weights, mtp_layers=k, options=ON_A_GPU_HOST)
    steps = aot.serving_steps(
        cfg, graphdef, params, batch=BATCH, context=CONTEXT, chunk=CHUNK, round_tokens=4, mesh=mesh, speculative_steps=k
    )
    assert [s.name for s in steps] == ["prefill", "speculative" if k else "decode"]
    (step,) = [s for s in steps if s.name == step_name]
    report, hlo = aot.compile_step(step, keep_hlo=True)
    return report, hlo, aot.planner_estimate(cfg, mesh, weights, BATCH, CONTEXT, mtp_layers=k)


def _in_place_compile(devices):
    """(decode step, report, hlo) of Flash's layer 0 (full attention, dense MLP) on tensor=4 at a 16K context."""
    cfg = MiMoConfig.from_json(FLASH).first_layers(1)
    mesh = make_mesh(tensor=4, devices=devices)
    graphdef, params = abstract_params(cfg, jnp.bfloat16, mesh, "bf16")
    steps = aot.serving_steps(
        cfg, graphdef, params, batch=1, context=IN_PLACE_CONTEXT, chunk=CHUNK, round_tokens=4, mesh=mesh
    )
    report, hlo = aot.compile_step(steps[1], keep_hlo=True)
    return steps[1], report, hlo


@pytest.fixture(scope="module")
def compiled():
    """Every TPU program of this module, compiled once, as many at a time as the host has cores: the TPU compiler
    uses about one core per program, and these compiles are most of the module's time. name -> future."""
    devices = aot.tpu_devices(TOPOLOGY)
    cfg = MiMoConfig.from_json(FLASH).first_layers(LAYERS)
    assert cfg.sliding == (False, True) and cfg.moe == (False, True) and cfg.hidden_size == 4096
    assert cfg.num_mtp_layers >= SPECULATIVE_STEPS
    with concurrent.futures.ThreadPoolExecutor(max(1, min(os.cpu_count() or 1, 4))) as pool:
        # longest first (speculative, then decode), so the last to start are the shortest
        cases = sorted(CASES, key=lambda case: ("speculative", "decode", "prefill").index(case[1]))
        futures = {case: pool.submit(_flash_slice_compile, devices, *case) for case in cases}
        futures["in_place"] = pool.submit(_in_place_compile, devices)
        yield futures
        for future in futures.values():
            future.cancel()


@pytest.fixture(scope="module")
def flash_slice(compiled):
    """compile(weights, step) -> (report, hlo text, planner estimate), each compiled once."""

    def compile(weights, step_name):
        return compiled[weights, step_name].result()

    compile.hbm = aot.hbm_bytes(aot.tpu_devices(TOPOLOGY)[0])
    return compile


@pytest.mark.parametrize("weights,step", CASES)
def test_flash_slice_compiles_for_tpu(flash_slice, weights, step):
    report, _, estimate = flash_slice(weights, step)
    assert report.error is None, report.error
    # Every argument arrives sharded as the rules say: parameters + cache per chip are what the planner predicts.
    expected = estimate["params"] + estimate["kv_cache"]
    assert abs(report.argument_bytes - expected) <= 0.01 * expected
    # The cache is donated and updated in place.
    assert report.alias_bytes >= estimate["kv_cache"]
    assert report.peak_bytes <= flash_slice.hbm


@pytest.mark.parametrize("weights,step", CASES)
def test_tpu_path_has_no_gpu_only_ops_and_uses_native_grouped_matmul(flash_slice, weights, step):
    report, hlo, _ = flash_slice(weights, step)
    gpu_only = [t for t in report.custom_calls if aot.GPU_ONLY_TARGETS.search(t)]
    assert not gpu_only, f"GPU-only custom calls in the TPU program: {gpu_only}"
    # jax.lax.ragged_dot becomes the TPU compiler's own grouped-matmul kernel.
    assert re.search(r"ragged-dot\S* = .*custom_call_target=\"tpu_custom_call\"", hlo)


def test_speculative_loop_drafts_with_the_mtp_layers(flash_slice):
    """The compiled speculative round holds the MTP layers' work: their weights are arguments
    (the planner counts them) and its program is not the plain decode loop's."""
    spec, spec_hlo, spec_estimate = flash_slice("fp8", "speculative")
    plain, _, plain_estimate = flash_slice("fp8", "decode")
    assert spec_estimate["params"] > plain_estimate["params"]
    assert spec.argument_bytes > plain.argument_bytes
    assert spec_hlo.count("while(") >= 1 and "ragged-dot" in spec_hlo


def test_kernels_follow_the_target_platform():
    assert ON_A_GPU_HOST.expert_impl == ON_A_GPU_HOST.paged_attention_impl == "pallas_gpu"  # a GPU host's default...
    assert ON_A_GPU_HOST.ring_attention_impl == "pallas_gpu"
    tpu = {"moe": "ragged", "attention": "xla", "paged": "xla", "ring": "xla"}
    assert aot.kernel_choices("tpu") == tpu  # ...not the target's
    gpu = aot.kernel_choices("gpu")
    assert gpu["moe"] == gpu["paged"] == gpu["ring"] == "pallas_gpu"


def test_gpu_only_targets_are_recognised():
    gpu = [
        "__cudnn$fmha",
        "__cublas$gemm",
        "__gpu$xla.gpu.triton",
        "mosaic_gpu",
        "cu_threefry2x32",
        "__cub$DeviceRadixSort",
    ]
    tpu = ["tpu_custom_call", "AllocateBuffer", "Sharding", "SPMDFullToShardShape", "AssumeGatherIndicesInBound"]
    assert all(aot.GPU_ONLY_TARGETS.search(t) for t in gpu)
    assert not any(aot.GPU_ONLY_TARGETS.search(t) for t in tpu)


@pytest.mark.parametrize("topology", ["v5e:2x2", "v5p:2x2x1", "v6e:2x2"])
def test_hbm_table_matches_the_compiler(topology):
    """The TPU compiler states the HBM it allows when a program exceeds it; our table must agree."""
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = aot.tpu_devices(topology)
    mesh = Mesh(devices, ("x",))
    too_big = jax.ShapeDtypeStruct(
        (len(devices), 200 * 2**30), jnp.int8, sharding=NamedSharding(mesh, PartitionSpec("x"))
    )
    with pytest.raises(Exception, match="RESOURCE_EXHAUSTED") as info:
        jax.jit(lambda x: x + 1).lower(too_big).compile()
    available = float(re.search(r"available HBM \(([\d.]+)G\)", str(info.value)).group(1))
    assert abs(aot.hbm_bytes(devices[0]) / aot.GiB - available) < 0.01


def test_cli_exit_status_says_whether_it_fits(capsys):
    common = ["--config", FLASH, "--topology", TOPOLOGY, "--mesh", "tensor=2,expert=2", "--layers", "1"]
    assert aot.main([*common, "--steps", "prefill", "--batch", "2", "--context", "512"]) == 0
    assert "fits" in capsys.readouterr().out
    # 64 sequences x 1M tokens of full-attention KV cannot fit 4 chips of 16 GiB.
    assert aot.main([*common, "--steps", "prefill", "--batch", "64", "--context", str(2**20)]) == 1
    assert "DOES NOT FIT" in capsys.readouterr().out
    assert aot.main([*common, "--topology", "v9z:1x1"]) == 2


def test_decode_step_reads_the_full_attention_cache_in_place(compiled):
    """One KV head and one sequence per chip (Flash's full layers on tensor=4, as on v5e-64): each
    decode step must write and read the full-attention cache where it lies. With the cache stored
    [batch, slots, kv_heads, head_dim] the TPU compiler copied every full layer's whole K and V into
    another layout inside the decode loop, every step (0.43 GiB per chip on v5e-64)."""
    step, report, hlo = compiled["in_place"].result()
    context = IN_PLACE_CONTEXT
    pool = step.args[1].pools[0]  # decode's (params, cache, ...): the full layer's page pool
    assert report.error is None, report.error
    shards = [x.sharding.shard_shape(x.shape) for x in (pool.k, pool.v)]
    assert all(shape[1] == 1 and shape[0] * shape[2] > context for shape in shards)  # one kv head, every page
    per_chip = {"bf16[" + ",".join(map(str, shape)) + "]" for shape in shards}
    # Copies in the entry computation run once per decode round (a layout change of K at the round's
    # start and end); inside the loop's computations they would run every step.
    loop_code = hlo[: hlo.index("\nENTRY")]
    copied = {s for s in per_chip if re.search(re.escape(s) + r"\{[^}]*\} copy\(", loop_code)}
    assert not copied, f"the decode loop copies the whole full-attention cache every step: {sorted(copied)}"
