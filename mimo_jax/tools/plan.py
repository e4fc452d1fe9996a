"""Memory plan without the weights: parameter bytes per device, KV bytes per token, and whether it fits.

    python -m mimo_jax.tools.plan --config configs/mimo-v2.5-pro.json --mesh tensor=8,expert=8 \\
        --context 131072 --batch 8 --hbm-gb 80

Uses the importer's tensor table (`parameter_sources`) for the checkpoint side and the model's
own parameter shapes, logical axes and `mimo_jax.sharding.RULES` for placement, so the numbers
are what `load_model` will place (a test checks them against a loaded model).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from mimo_jax.config import MiMoConfig
from mimo_jax.engine.state import DEFAULT_PAGE_SIZE
from mimo_jax.model.cache import kv_bytes_per_token, kv_plan, page_bytes
from mimo_jax.quant import scale_shape
from mimo_jax.sharding import MESH_AXES, batch_axes, logical_to_spec, parse_mesh_arg
from mimo_jax.weights.loader import abstract_model, quantization_block
from mimo_jax.weights.table import (
    EXPERTS,
    F32,
    HEADS_IN,
    TRANSPOSE,
    CheckpointTensor,
    checkpoint_tensors,
    fp8_param_block,
    parameter_sources,
)

_KEEP_FP8 = (TRANSPOSE, EXPERTS, HEADS_IN)  # as in the loader: the kinds whose FP8 form stays on device


@dataclasses.dataclass(frozen=True)
class StoredTensor:
    """A tensor as a release stores it (FP8 weights and their scales separately)."""

    name: str
    shape: tuple[int, ...]
    dtype: str


def release_tensors(cfg: MiMoConfig, mtp_layers: int = 0) -> list[StoredTensor]:
    """The checkpoint's tensors (names, shapes, dtypes) as the release of this config stores them."""
    block = quantization_block(cfg)
    out = []
    for t in checkpoint_tensors(parameter_sources(cfg, mtp_layers)):
        if block and t.quantizable:
            out.append(StoredTensor(t.name, t.shape, "float8_e4m3fn"))
            out.append(StoredTensor(t.scale_name, t.scale_shape(block), "float32"))
        else:
            out.append(StoredTensor(t.name, t.shape, "float32" if t.dtype == F32 else "bfloat16"))
    return out


def abstract_mesh(sizes: dict[str, int]) -> AbstractMesh:
    return AbstractMesh(tuple(sizes.get(a, 1) for a in MESH_AXES), MESH_AXES)


def _per_device(shape: tuple[int, ...], spec: PartitionSpec, mesh: AbstractMesh) -> int:
    n = math.prod(shape)
    for axis in spec:
        if axis is not None:
            n //= mesh.shape[axis]
    return n


def _placed_params(cfg: MiMoConfig, mesh: AbstractMesh, dtype: Any, mtp_layers: int):
    """(source, parameter variable, shape, logical axes, PartitionSpec on `mesh`) for every parameter
    the loader places, in the tensor table's order."""
    model = abstract_model(cfg, dtype, mtp_layers)
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    for src in parameter_sources(cfg, mtp_layers):
        var = params[src.path]
        shape = tuple(var.get_value().shape)
        axes = tuple(var.get_metadata().get("logical_axes") or (None,) * len(shape))
        yield src, var, shape, axes, logical_to_spec(axes, shape, mesh)


def _kept_fp8(src, block) -> bool:
    return bool(block) and src.kind in _KEEP_FP8 and src.tensors[0].quantizable


def param_bytes_per_device(
    cfg: MiMoConfig, mesh_sizes: dict[str, int], weights: str = "bf16", dtype_bytes: int = 2, mtp_layers: int = 0
) -> int:
    """Bytes of parameters on each device (the fullest one) after `load_model(..., weights=weights)`."""
    mesh = abstract_mesh(mesh_sizes)
    block = quantization_block(cfg) if weights == "fp8" else None
    total = 0
    dtype = jnp.bfloat16 if dtype_bytes == 2 else jnp.float32
    for src, var, shape, axes, spec in _placed_params(cfg, mesh, dtype, mtp_layers):
        if _kept_fp8(src, block):
            scales = scale_shape(shape, fp8_param_block(src.kind, len(shape), block))
            total += _per_device(shape, spec, mesh) + 4 * _per_device(scales, logical_to_spec(axes, scales, mesh), mesh)
        else:
            itemsize = np.dtype(var.get_value().dtype).itemsize  # router, bias and sinks stay float32
            total += itemsize * _per_device(shape, spec, mesh)
    return total


def dequantized_working_set_per_device(
    cfg: MiMoConfig, mesh_sizes: dict[str, int], weights: str = "bf16", mtp_layers: int = 0
) -> int:
    """Bytes of FP8 weights dequantized at once on a device: the two largest kept-FP8 parameters (per
    device) in bf16, e.g. a MoE projection's local experts and the lm_head. Each weight is dequantized
    only when its layer runs (`quant.weight(p, after=x)`), so this, not the sum, is what is live."""
    block = quantization_block(cfg) if weights == "fp8" else None
    mesh = abstract_mesh(mesh_sizes)
    sizes = [
        2 * _per_device(shape, spec, mesh)
        for src, _, shape, _, spec in _placed_params(cfg, mesh, jnp.bfloat16, mtp_layers)
        if _kept_fp8(src, block)
    ]
    return sum(sorted(sizes)[-2:])


@dataclasses.dataclass(frozen=True)
class DeviceKVPlan:
    full_bytes_per_token: int  # all full-attention layers, one token, whole model (grows with context)
    swa_bytes_per_token: int  # all SWA layers, one token
    swa_slots: int  # tokens an SWA layer keeps (window); its memory stops growing there

    def bytes_per_sequence(self, context: int) -> int:
        return self.full_bytes_per_token * context + self.swa_bytes_per_token * min(context, self.swa_slots)


def kv_plan_per_device(
    cfg: MiMoConfig, mesh_sizes: dict[str, int], dtype_bytes: int = 2, mtp_layers: int = 0
) -> DeviceKVPlan:
    """KV bytes per token on one device (kv heads split over the tensor axis when it divides them).

    The per-sequence plan of the cache the engine allocates is `mimo_jax.model.cache.kv_plan`.
    """
    tensor = mesh_sizes.get("tensor", 1)
    specs = list(cfg.layers) + [cfg.mtp_layer()] * mtp_layers

    def on_device(spec) -> int:
        b = kv_bytes_per_token(spec, dtype_bytes)
        return b // tensor if spec.num_kv_heads % tensor == 0 else b

    full = sum(on_device(s) for s in specs if not s.sliding)
    swa = sum(on_device(s) for s in specs if s.sliding)
    return DeviceKVPlan(full, swa, cfg.window_keys)


def _gb(n: float) -> str:
    return f"{n / 1e9:,.2f} GB ({n / 2**30:,.2f} GiB)"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mimo_jax.tools.plan", description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True, help="config.json of the model (or its directory)")
    ap.add_argument("--mesh", default="", help="axis=size,... over data, tensor, expert (e.g. tensor=8,expert=8)")
    ap.add_argument("--context", type=int, default=None, help="tokens per sequence (default: the config's context)")
    ap.add_argument("--batch", type=int, default=1, help="sequences held at once")
    ap.add_argument("--hbm-gb", type=float, default=None, help="memory of one device, GB (1e9 bytes)")
    ap.add_argument("--mtp", action="store_true", help="include the MTP layers (weights and KV)")
    ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (2: bf16)")
    ap.add_argument("--extra-ring-slots", type=int, default=0, help="SWA ring slots beyond the window (drafts)")
    ap.add_argument(
        "--kv-cache-gb", type=float, default=None, help="the engine's KV page budget (--kv-cache-memory), all devices"
    )
    ap.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="tokens per KV page")
    args = ap.parse_args(argv)

    cfg = MiMoConfig.from_json(args.config)
    sizes = parse_mesh_arg(args.mesh)
    devices = math.prod(sizes.values()) if sizes else 1
    mtp = cfg.num_mtp_layers if args.mtp else 0
    stored = release_tensors(cfg, mtp)
    numel = sum(math.prod(t.shape) for t in stored)
    disk = sum(math.prod(t.shape) * np.dtype(_np_dtype(t.dtype)).itemsize for t in stored)
    print(f"model: {cfg.architecture}, {cfg.num_layers} layers (+{mtp} MTP), mesh {sizes or {'devices': 1}}")
    print(f"checkpoint: {len(stored)} tensors, {numel:,} parameters (scales included), {_gb(disk)}")
    per_device = {}
    for weights in ("bf16", "fp8"):
        per_device[weights] = param_bytes_per_device(cfg, sizes, weights, 2, mtp)
        print(f"parameters per device, weights={weights}: {_gb(per_device[weights])}")
    context = args.context or cfg.context_len
    print(kv_plan(cfg, context, args.kv_bytes, args.extra_ring_slots).report())
    kv = kv_plan_per_device(cfg, sizes, args.kv_bytes, mtp)
    print(
        f"KV per token per device: full layers {kv.full_bytes_per_token:,} B, SWA layers {kv.swa_bytes_per_token:,} B"
    )
    print(
        f"  (SWA layers keep {kv.swa_slots} tokens: at most {kv.swa_bytes_per_token * kv.swa_slots:,} B per sequence)"
    )
    # the slots (their rings and full-layer pages) split over data, then expert, as far as the batch divides
    shards = math.prod(sizes.get(a, 1) for a in batch_axes(abstract_mesh(sizes), args.batch))
    seqs = args.batch // shards  # sequences per device
    kv_bytes = seqs * kv.bytes_per_sequence(context)
    print(f"KV per device for batch {args.batch} x {context:,} tokens ({seqs} per device): {_gb(kv_bytes)}")
    page = page_bytes(cfg, args.page_size, args.kv_bytes)
    if args.kv_cache_gb is not None:  # the engine's pool: pages of every full layer, sized by the budget
        pages = int(args.kv_cache_gb * 1e9) // page
        tokens = pages * args.page_size
        print(
            f"KV pages for {args.kv_cache_gb:g} GB: {pages:,} pages of {args.page_size} tokens ({page:,} B each, all "
            f"full layers) = {tokens:,} tokens: {tokens / context:.1f} sequences of {context:,}, or any mix of that "
            f"many tokens (SWA rings: {_gb(kv_plan(cfg, context, args.kv_bytes).swa_bytes)} per slot besides)"
        )
    if args.hbm_gb is not None:
        hbm = args.hbm_gb * 1e9
        for weights in ("bf16", "fp8"):
            need = per_device[weights] + kv_bytes
            verdict = "fits" if need <= hbm else "does not fit"
            print(f"weights={weights}: {_gb(need)} of {_gb(hbm)} per device on {devices} devices: {verdict}")
    return 0


def _np_dtype(name: str) -> Any:
    return {"bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn}.get(name, name)


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["CheckpointTensor", "DeviceKVPlan", "kv_plan_per_device", "param_bytes_per_device", "release_tensors"]
