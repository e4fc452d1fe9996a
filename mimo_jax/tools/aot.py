"""Ahead-of-time compilation of the serving steps for a TPU slice, on a machine without a TPU.

With `libtpu` installed, `jax.experimental.topologies` describes the chips of a TPU slice on
any host, and `jax.jit(...).lower(abstract inputs).compile()` runs the real TPU compiler. No
weights are created: parameters and the KV cache are `jax.ShapeDtypeStruct`s carrying the
model's shardings. The compiled executables' memory analysis gives the bytes per chip. The steps
are the engine's prefill and decode loop, or with `--speculative-steps k` its prefill and MTP
speculative loop; their kernels are chosen for the TPU (`kernel_choices`), not for this host.

    python -m mimo_jax.tools.aot --config configs/mimo-v2-flash.json --topology v5p:2x2x2 \\
        --mesh tensor=2,expert=4 --batch 16 --context 32768 [--speculative-steps 3]

Exit status: 0 when every step fits the chip's HBM, 1 when one does not (or the compiler
ran out of HBM), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Sequence
from importlib import metadata
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.engine.state import DEFAULT_PAGE_SIZE, max_pages
from mimo_jax.engine.steps import JitUnderMesh, build_steps
from mimo_jax.model.mimo import relayout_experts
from mimo_jax.sharding import logical_to_spec, make_mesh, parse_mesh_arg
from mimo_jax.tools import plan
from mimo_jax.weights.loader import abstract_params

GiB = 1024**3

# Per chip, by `device.device_kind`: (HBM in the spec sheet, HBM the TPU compiler lets a program use).
# Spec: Cloud TPU docs ("16 GB" v5e, "95 GB" v5p, "32 GB" v6e, "32 GiB" v4). Usable: what libtpu
# 0.0.42.1 reports as "available HBM" when a program does not fit (checked for each kind here).
HBM_BYTES: dict[str, tuple[int, int]] = {
    "TPU v4": (32 * GiB, int(31.25 * GiB)),
    "TPU v5 lite": (16 * GiB, int(15.75 * GiB)),
    "TPU v5": (95 * GiB, int(95.74 * GiB)),
    "TPU v6 lite": (32 * GiB, int(31.25 * GiB)),
}

# Custom-call targets that exist only on GPUs: cuDNN, cuBLAS, CUB, cuSOLVER, jaxlib's cu_* kernels,
# Triton (Pallas GPU), Mosaic GPU, ROCm's hip*.
GPU_ONLY_TARGETS = re.compile(r"^(cu_|cusolver|cusparse|hip|mosaic_gpu)|cudnn|cublas|__cub\$|__gpu\$|triton", re.I)


def tpu_devices(topology: str) -> list[Any]:
    """The chips of a TPU slice such as 'v5e:2x2' or 'v5p:4x4x4' (compile-only devices; no TPU needed)."""
    # No metadata server off Google Cloud: without this libtpu waits on it before giving up.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    # Compiling touches no TPU, so several processes (CI, a table run) may load libtpu at once.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(topology_name=topology, platform="tpu").devices)
    except Exception as e:  # libtpu missing, or a topology name it does not know
        raise ValueError(f"--topology {topology!r}: cannot describe this TPU slice ({e})") from None


def hbm_bytes(device: Any) -> int:
    """HBM a program may use on this chip (the compiler's figure)."""
    kind = device.device_kind
    if kind not in HBM_BYTES:
        raise ValueError(f"no HBM figure for {kind!r}; known: {sorted(HBM_BYTES)}")
    return HBM_BYTES[kind][1]


# ----------------------------------------------------------------------------- kernels for the target


def kernel_choices(platform: str) -> dict[str, str]:
    """The MoE, attention, paged and ring decode attention implementations a program compiled for `platform` uses.

    Decided by the target, never by this host's backend: a TPU program compiled on a GPU host
    must use `jax.lax.ragged_dot` and XLA's attention, not the Pallas GPU kernel or cuDNN.
    """
    options = RunOptions.for_platform(platform)
    return {
        "moe": options.expert_impl,
        "attention": options.attention_impl,
        "paged": options.paged_attention_impl,
        "ring": options.ring_attention_impl,
    }


def for_platform(graphdef, params, platform: str):
    """(graphdef, params) of the same model built with `RunOptions` for `platform` (`kernel_choices`), its
    experts in the layout that implementation reads."""
    model = nnx.merge(graphdef, params)
    return nnx.split(relayout_experts(model.with_options(RunOptions.for_platform(platform))))


# ----------------------------------------------------------------------------- the steps


@dataclasses.dataclass(frozen=True)
class Step:
    """A jitted serving function (donation and shardings as the engine's) and the abstract arguments to compile
    it with."""

    name: str
    fn: JitUnderMesh
    args: tuple
    describe: str


def serving_steps(
    cfg,
    graphdef,
    params,
    *,
    batch: int,
    context: int,
    chunk: int,
    round_tokens: int,
    mesh,
    speculative_steps: int = 0,
    dtype: Any = "bfloat16",
) -> list[Step]:
    """The engine's jitted device functions (`mimo_jax.engine.steps.build_steps`, as `Engine` builds them) with
    their abstract arguments, with the kernels of the mesh's platform (`for_platform`).

    prefill: one chunk of one request's prompt into its cache row (`prefill_step`; with speculation
    also into the MTP layers' caches), returning the row's rings as of the prompt's snapshot boundary;
    decode: a `while_loop` round of up to `round_tokens` tokens for every slot (`decode_round`);
    with `speculative_steps` k > 0 instead speculative: a `while_loop` of up to `round_tokens`
    MTP draft-verify-accept iterations (k drafts each, sampled), what the engine decodes with.
    `params` must then hold k MTP layers. The KV cache (of `dtype`, as the slot state) and the slot
    state are the engine's, as ShapeDtypeStructs sharded over `mesh`; other engine settings are its defaults.
    """
    k = speculative_steps
    graphdef, params = for_platform(graphdef, params, mesh.devices.flat[0].platform)
    steps = build_steps(
        graphdef,
        params,
        cfg,
        mesh=mesh,
        max_batch=batch,
        max_context=context,
        prefill_chunk=chunk,
        max_round_tokens=round_tokens,
        state_dtype=dtype,
        speculative_steps=k,
    )
    per_round = f"draft-verify-accept iterations ({k} MTP drafts)" if k else "tokens"
    decode_step = Step(
        "speculative" if k else "decode",
        steps.decode,
        steps.decode_args(),
        f"round of up to {round_tokens} {per_round} x {batch} slots",
    )
    return [Step("prefill", steps.prefill, steps.prefill_args(chunk), f"{chunk} prompt tokens"), decode_step]


# ----------------------------------------------------------------------------- compile and measure


@dataclasses.dataclass
class StepReport:
    name: str
    describe: str
    compile_s: float
    argument_bytes: int = 0
    output_bytes: int = 0
    alias_bytes: int = 0
    temp_bytes: int = 0
    code_bytes: int = 0
    error: str | None = None  # the compiler's message when it refused (e.g. out of HBM)
    required_bytes: int | None = None  # what the compiler said it needs, when it ran out of HBM
    custom_calls: tuple[str, ...] = ()

    @property
    def peak_bytes(self) -> int:
        """Live at once on one chip: inputs, outputs not written in place of a donated input, temporaries, code."""
        return self.argument_bytes + self.output_bytes - self.alias_bytes + self.temp_bytes + self.code_bytes


def custom_call_targets(hlo_text: str) -> tuple[str, ...]:
    return tuple(sorted(set(re.findall(r'custom_call_target="([^"]+)"', hlo_text))))


def compile_step(step: Step, keep_hlo: bool = False) -> tuple[StepReport, str | None]:
    """Lower and compile one step for the devices its arguments are sharded over."""
    start = time.perf_counter()
    try:
        compiled = step.fn.lower(*step.args).compile()  # traced under the mesh (shard_map MoE reads it there)
    except Exception as e:  # the TPU compiler's refusal (RESOURCE_EXHAUSTED, unsupported op ...)
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        needed = re.search(r"required for HLO temporaries \(([\d.]+)G\) exceeds available HBM", message)
        return StepReport(
            step.name,
            step.describe,
            time.perf_counter() - start,
            error=message,
            required_bytes=int(float(needed.group(1)) * GiB) if needed else None,
        ), None
    seconds = time.perf_counter() - start
    mem = compiled.memory_analysis()
    text = compiled.as_text()
    report = StepReport(
        step.name,
        step.describe,
        seconds,
        argument_bytes=mem.argument_size_in_bytes,
        output_bytes=mem.output_size_in_bytes,
        alias_bytes=mem.alias_size_in_bytes,
        temp_bytes=mem.temp_size_in_bytes,
        code_bytes=mem.generated_code_size_in_bytes,
        custom_calls=custom_call_targets(text),
    )
    return report, text if keep_hlo else None


# ----------------------------------------------------------------------------- estimate


def planner_estimate(cfg, mesh, weights: str, batch: int, context: int, mtp_layers: int = 0) -> dict[str, int]:
    """The memory planner's bytes per chip (`mimo_jax.tools.plan`): parameters, KV cache (with `mtp_layers`
    MTP layers' weights and caches) and the FP8 weights dequantized at once.

    The KV cache is the engine's default: a page pool per full layer with `batch` slots' worth of pages for
    `context` tokens (kv heads split over the tensor axis, the pages over the axes the slots split over), and
    per-slot rings, whose rows per chip follow the sharding rule for "batch" (data, then expert, where it divides).
    """

    sizes = dict(mesh.shape)
    kv = plan.kv_plan_per_device(cfg, sizes, mtp_layers=mtp_layers)
    batch_axes = logical_to_spec(("batch",), (batch,), mesh)[0] or ()
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else batch_axes
    batch_shards = math.prod(sizes[a] for a in batch_axes)
    rows_per_chip = batch // batch_shards
    pool_tokens = rows_per_chip * max_pages(context, DEFAULT_PAGE_SIZE, mtp_layers) * DEFAULT_PAGE_SIZE  # per chip
    rings = kv.swa_bytes_per_token * min(context, kv.swa_slots)
    return {
        "params": plan.param_bytes_per_device(cfg, sizes, weights, mtp_layers=mtp_layers),
        "kv_cache": kv.full_bytes_per_token * pool_tokens + rows_per_chip * rings,
        "dequantized": plan.dequantized_working_set_per_device(cfg, sizes, weights, mtp_layers=mtp_layers),
    }


# ----------------------------------------------------------------------------- CLI


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f}"


def run(args: argparse.Namespace) -> dict[str, Any]:
    devices = tpu_devices(args.topology)
    cfg = MiMoConfig.from_json(args.config)
    cfg = cfg.first_layers(args.layers) if args.layers else cfg
    mesh = make_mesh(**parse_mesh_arg(args.mesh), devices=devices)
    hbm = hbm_bytes(devices[0])
    dtype = jnp.bfloat16
    if args.batch % mesh.shape["data"]:
        raise ValueError(f"--batch {args.batch} is not divisible by the data axis ({mesh.shape['data']})")
    k = args.speculative_steps
    if k > cfg.num_mtp_layers:
        raise ValueError(f"--speculative-steps {k}: the model has {cfg.num_mtp_layers} MTP layers")
    graphdef, params = abstract_params(cfg, dtype, mesh, args.weights, mtp_layers=k)
    steps = serving_steps(
        cfg,
        graphdef,
        params,
        batch=args.batch,
        context=args.context,
        chunk=args.chunk,
        round_tokens=args.round_tokens,
        mesh=mesh,
        speculative_steps=k,
        dtype=dtype,
    )
    estimate = planner_estimate(cfg, mesh, args.weights, args.batch, args.context, mtp_layers=k)
    reports = []
    for step in steps:
        if args.steps and step.name not in args.steps:
            continue
        report, _ = compile_step(step)
        reports.append(report)
    mesh_text = ",".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
    return {
        "config": os.path.basename(args.config),
        "layers": cfg.num_layers,
        "weights": args.weights,
        "topology": args.topology,
        "chips": len(devices),
        "device_kind": devices[0].device_kind,
        "hbm_bytes": hbm,
        "mesh": mesh_text,
        "batch": args.batch,
        "context": args.context,
        "chunk": args.chunk,
        "round_tokens": args.round_tokens,
        "speculative_steps": k,
        "kernels": kernel_choices(devices[0].platform),
        "jax": jax.__version__,
        "libtpu": _libtpu_version(),
        "estimate": estimate,
        "steps": [dataclasses.asdict(r) | {"peak_bytes": r.peak_bytes} for r in reports],
        "fits": all(r.error is None and r.peak_bytes <= hbm for r in reports),
    }


def _libtpu_version() -> str | None:
    try:
        return metadata.version("libtpu")
    except metadata.PackageNotFoundError:
        return None


def print_result(result: dict[str, Any]) -> None:
    hbm = result["hbm_bytes"]
    print(
        f"{result['config']} ({result['layers']} layers, {result['weights']} weights) on {result['topology']}: "
        f"{result['chips']} x {result['device_kind']}, {hbm / GiB:.2f} GiB HBM usable per chip; mesh {result['mesh']}"
    )
    print(
        f"batch {result['batch']} slots, context {result['context']}, prefill chunk {result['chunk']}, "
        f"decode rounds of {result['round_tokens']} "
        + (f"iterations, {k} MTP drafts each" if (k := result.get("speculative_steps", 0)) else "tokens")
        + f"; kernels {result['kernels']}; jax {result['jax']}, libtpu {result['libtpu']}; GiB per chip:"
    )
    columns = ("args", "outputs", "aliased", "temps", "code", "peak")
    print(f"{'step':11} {'compile s':>9} " + " ".join(f"{c:>8}" for c in columns))
    for s in result["steps"]:
        if s["error"]:
            print(f"{s['name']:11} {s['compile_s']:9.1f}  does not compile: {s['error']}")
            continue
        print(
            f"{s['name']:11} {s['compile_s']:9.1f} {_gib(s['argument_bytes'])} {_gib(s['output_bytes'])} "
            f"{_gib(s['alias_bytes'])} {_gib(s['temp_bytes'])} {_gib(s['code_bytes'])} {_gib(s['peak_bytes'])}"
            f"  {'fits' if s['peak_bytes'] <= hbm else 'DOES NOT FIT'}"
        )
        gpu = [t for t in s["custom_calls"] if GPU_ONLY_TARGETS.search(t)]
        if gpu:
            print(f"{'':11} GPU-only custom calls on the TPU path: {gpu}")
    est = result["estimate"]
    print(
        f"planner estimate: params {est['params'] / GiB:.2f} + KV cache {est['kv_cache'] / GiB:.2f} "
        f"+ fp8 dequantized at once {est['dequantized'] / GiB:.2f} = {sum(est.values()) / GiB:.2f} GiB per chip"
    )
    print("fits" if result["fits"] else "DOES NOT FIT")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m mimo_jax.tools.aot", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="config.json or a directory holding one")
    p.add_argument("--topology", required=True, help="TPU slice, e.g. v5e:2x2, v5p:2x2x2, v6e:4x4")
    p.add_argument("--mesh", default="", help="e.g. data=1,tensor=4,expert=16 (product = chips)")
    p.add_argument("--weights", default="bf16", choices=("bf16", "fp8"))
    p.add_argument("--batch", type=int, default=8, help="engine slots: sequences decoded together")
    p.add_argument("--context", type=int, default=32768, help="cache length of full-attention layers")
    p.add_argument("--chunk", type=int, default=512, help="prefill chunk length")
    p.add_argument("--round-tokens", type=int, default=32, help="decode steps per while_loop round")
    p.add_argument("--layers", type=int, default=None, help="only the first N layers (real pattern)")
    p.add_argument(
        "--speculative-steps",
        type=int,
        default=0,
        help="k > 0: the engine with MTP speculation (k MTP layers); compiles prefill and the speculative loop",
    )
    p.add_argument("--steps", nargs="*", default=None, help="compile only these steps (prefill, decode, speculative)")
    p.add_argument("--json", default=None, help="also write the result as JSON to this file")
    args = p.parse_args(argv)
    for name in ("batch", "context", "chunk", "round_tokens"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.speculative_steps < 0:
        p.error("--speculative-steps must be >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)

    # The host only traces and compiles; keep JAX off any local accelerator.
    jax.config.update("jax_platforms", "cpu")
    try:
        result = run(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print_result(result)
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, args.json)
    return 0 if result["fits"] else 1


if __name__ == "__main__":
    sys.exit(main())
