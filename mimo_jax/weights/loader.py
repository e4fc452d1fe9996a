"""Checkpoint tensors -> model parameters, validated first, then streamed onto the devices.

Every parameter comes from `parameter_sources` (the tensor table). Loading has two phases:

1. `validate`: every tensor and FP8 scale of the table is checked (present, shape, dtype, scale
   shape and values, nothing unexpected) from the file headers and the small scale tensors.
   Nothing is placed on a device before the whole checkpoint passed.
2. Streaming: for each parameter, each process asks its sharding which slices its own devices
   hold (`addressable_devices_indices_map`), reads only the checkpoint rows those slices need
   (`pread`, no memory map, consecutive rows in one call), puts each slice on its devices and
   assembles the global array. Several parameters stream at once (`workers` threads).

Host memory bound: what the process holds beyond the placed parameters is at most `workers`
read groups at a time, where a read group is the rows one parameter needs on this process (at
most one checkpoint tensor; for experts, the experts of one device slice) plus small scales.
`tests/weights/test_importer_streaming.py` measures it.

FP8 (`quant_method: fp8`, e4m3, `weight_block_size` blocks): values and scales are placed as a
`mimo_jax.quant.BlockQuantized` (layouts in its docstring). `weights="bf16"` dequantizes them on
the device right away (float32 multiply, cast to the model dtype); `weights="fp8"` keeps them, and
the model dequantizes inside its jitted matmuls.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import dataclasses
import functools
import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec, Sharding, SingleDeviceSharding
from tqdm.auto import tqdm

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.model.mimo import MiMoModel, relayout_experts
from mimo_jax.quant import FP8, BlockQuantized, scale_shape
from mimo_jax.sharding import logical_to_spec, model_shardings
from mimo_jax.weights.checkpoint import Checkpoint
from mimo_jax.weights.safetensors_io import CheckpointError
from mimo_jax.weights.table import (
    COPY,
    EXPERTS,
    HEADS_IN,
    HEADS_OUT,
    TRANSPOSE,
    ParamSource,
    attention_rows,
    expected_scale_shapes,
    fp8_param_block,
    parameter_sources,
)

WEIGHT_MODES = ("bf16", "fp8")
_FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(ml_dtypes.bfloat16), np.dtype(np.float64)}
# V2.5's checkpoint also carries vision and audio towers; the text model ignores them.
_OTHER_MODALITY_PREFIXES = ("visual.", "vision_model.", "audio_", "model.visual.", "model.vision_tower.")
# Kinds whose FP8 form the model consumes; any other quantized tensor is dequantized at load.
_KEEP_FP8 = (TRANSPOSE, EXPERTS, HEADS_IN)

__all__ = [
    "WEIGHT_MODES",
    "abstract_model",
    "abstract_params",
    "load_params",
    "parameter_sources",
    "quantization_block",
    "validate",
]


def quantization_block(cfg: MiMoConfig, where: str = "config.json") -> tuple[int, int] | None:
    """The FP8 block shape from `quantization_config`, None without one; anything else is an error."""
    q = cfg.quantization
    if not q:
        return None
    if not isinstance(q, dict):
        raise CheckpointError(f"{where}: quantization_config must be an object, got {q!r}")
    method = q.get("quant_method")
    if method != "fp8":
        raise CheckpointError(f"{where}: quantization_config.quant_method={method!r} is not supported (only 'fp8')")
    fmt = q.get("fmt", "e4m3")
    if fmt not in ("e4m3", "float8_e4m3fn"):
        raise CheckpointError(f"{where}: quantization_config.fmt={fmt!r} is not supported (only 'e4m3')")
    block = q.get("weight_block_size")
    if (
        not isinstance(block, list | tuple)
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)
    ):
        raise CheckpointError(
            f"{where}: quantization_config.weight_block_size={block!r}: expected two positive integers "
            "(per-tensor or per-channel FP8 is not supported)"
        )
    return int(block[0]), int(block[1])


def abstract_model(cfg: MiMoConfig, dtype: Any, mtp_layers: int = 0, options: RunOptions | None = None) -> MiMoModel:
    """The model's structure with shape-only parameters (no memory), experts in the stored "in_out" layout."""
    return nnx.eval_shape(lambda: MiMoModel(cfg, dtype=dtype, rngs=None, mtp_layers=mtp_layers, options=options))


@dataclasses.dataclass
class ParamPlan:
    """One validated parameter: where its values and (if FP8) scales come from."""

    src: ParamSource
    quantized: bool
    block: tuple[int, int] | None
    value_rows: np.ndarray | None = None  # heads_in: checkpoint row of each param row (head-major)
    scale_rows: np.ndarray | None = None  # heads_in: row of the stacked scales of each param row

    @property
    def value_tensor(self) -> str:
        src = self.src
        return src.tensors[1 if src.kind == HEADS_IN and src.part == "v" and len(src.tensors) == 2 else 0].name


def abstract_params(
    cfg: MiMoConfig,
    dtype: Any,
    mesh: jax.sharding.Mesh,
    weights: str = "bf16",
    mtp_layers: int = 0,
    options: RunOptions | None = None,
):
    """(graphdef, params) where params are ShapeDtypeStructs with the model's shardings (and `mtp_layers`
    MTP layers); no memory is used. The model is built with `options` (default: for the mesh's platform),
    its experts in the layout that implementation reads, as `load_model` places them.

    `weights="fp8"`: what `load_model(..., weights="fp8")` places for a checkpoint with this config's
    `quantization_config`: float8 values and float32 block scales (`quant.BlockQuantized`), each
    sharded by the parameter's logical axes, for the kinds the loader keeps in FP8.
    """
    if weights not in ("bf16", "fp8"):
        raise ValueError(f"--weights {weights!r}: expected 'bf16' or 'fp8'")
    block = quantization_block(cfg) if weights == "fp8" else None
    if weights == "fp8" and block is None:
        raise ValueError("--weights fp8 needs a config with an fp8 quantization_config (weight_block_size)")
    options = options or RunOptions.for_platform(mesh.devices.flat[0].platform)
    model = abstract_model(cfg, dtype, mtp_layers, options)
    shardings = model_shardings(model, mesh)
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    for path, var in params.items():
        value = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=shardings[path]))
    if block is not None:
        # The same choice as the loader and the planner: these kinds stay FP8 when their tensor is quantized.
        for src in parameter_sources(cfg, mtp_layers):
            if src.kind not in _KEEP_FP8 or not src.tensors[0].quantizable:
                continue
            var = params[src.path]
            value = var.get_value()
            axes = tuple(var.get_metadata().get("logical_axes") or (None,) * value.ndim)
            param_block = fp8_param_block(src.kind, value.ndim, block)
            scales = scale_shape(value.shape, param_block)
            var.set_value(
                BlockQuantized(
                    jax.ShapeDtypeStruct(value.shape, FP8, sharding=shardings[src.path]),
                    jax.ShapeDtypeStruct(
                        scales, np.float32, sharding=NamedSharding(mesh, logical_to_spec(axes, scales, mesh))
                    ),
                    param_block,
                    np.dtype(value.dtype).name,
                )
            )
    return nnx.split(relayout_experts(model))


def _check_tensor(ckpt: Checkpoint, name: str, shape: tuple[int, ...], dtypes: set, what: str) -> np.dtype:
    if name not in ckpt:
        raise CheckpointError(f"{ckpt.directory}: missing tensor {name!r}")
    got = ckpt.shape(name)
    if got != shape:
        raise CheckpointError(
            f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(got)} but the config implies {list(shape)}"
        )
    dtype = ckpt.dtype(name)
    if dtype not in dtypes:
        raise CheckpointError(f"{ckpt.file_of(name)}: tensor {name!r} has dtype {dtype}; expected {what}")
    return dtype


def validate(ckpt: Checkpoint, sources: list[ParamSource], mtp_layers: int) -> list[ParamPlan]:
    """Check every tensor of the table against the checkpoint; raise `CheckpointError` naming file and tensor."""
    cfg = ckpt.config
    block = quantization_block(cfg, os.path.join(ckpt.directory, "config.json"))
    used: set[str] = set()
    quantized: dict[str, bool] = {}
    scale_checked: set[str] = set()
    plans = []
    float_or_fp8 = _FLOAT_DTYPES | {FP8}
    for src in sources:
        for t in src.tensors:
            if t.name in quantized:
                continue
            allowed = float_or_fp8 if t.quantizable and block else _FLOAT_DTYPES
            what = (
                "a float type or float8_e4m3fn (with a weight_scale_inv)" if allowed is float_or_fp8 else "a float type"
            )
            if t.quantizable and not block and t.name in ckpt and ckpt.dtype(t.name) == FP8:
                what += " (float8 tensors need a quantization_config in config.json)"
            dtype = _check_tensor(ckpt, t.name, t.shape, allowed, what)
            quantized[t.name] = dtype == FP8
            used.add(t.name)
        flags = {quantized[t.name] for t in src.tensors}
        if len(flags) > 1:
            names = ", ".join(repr(t.name) for t in src.tensors)
            raise CheckpointError(f"{ckpt.directory}: tensors {names} must be all FP8 or all unquantized")
        plan = ParamPlan(src, flags.pop(), block)
        if plan.quantized:
            scale_names = [t.scale_name for t in src.tensors]
            k_rows = ckpt.shape(scale_names[0])[0] if scale_names[0] in ckpt else None
            for t, sname, shape in zip(
                src.tensors, scale_names, expected_scale_shapes(src, block, k_rows), strict=True
            ):
                if sname in scale_checked:
                    continue
                if sname not in ckpt:
                    raise CheckpointError(
                        f"{ckpt.file_of(t.name)}: FP8 tensor {t.name!r} has no scale {sname!r} in the checkpoint"
                    )
                if ckpt.shape(sname) != shape:
                    raise CheckpointError(
                        f"{ckpt.file_of(sname)}: scale {sname!r} has shape {list(ckpt.shape(sname))}, which does not "
                        f"fit its weight {t.name!r} {list(t.shape)} with {block[0]}x{block[1]} blocks "
                        f"(expected {list(shape)})"
                    )
                if ckpt.dtype(sname) not in _FLOAT_DTYPES:
                    raise CheckpointError(f"{ckpt.file_of(sname)}: scale {sname!r} has dtype {ckpt.dtype(sname)}")
                values = ckpt.read_rows(sname).astype(np.float32)
                if not np.isfinite(values).all() or (values < 0).any():
                    raise CheckpointError(f"{ckpt.file_of(sname)}: scale {sname!r} has non-finite or negative values")
                scale_checked.add(sname)
                used.add(sname)
        if src.kind == HEADS_IN:
            rows = None
            if plan.quantized:
                rows = tuple(ckpt.shape(t.scale_name)[0] for t in src.tensors)
            plan.value_rows, plan.scale_rows = attention_rows(src, block[0] if block else 1, rows)
        plans.append(plan)
    for name in ckpt.names():
        if name in used or name.startswith(_OTHER_MODALITY_PREFIXES):
            continue
        if name.startswith("model.mtp.layers.") and int(name.split(".")[3]) >= mtp_layers:
            continue
        raise CheckpointError(f"{ckpt.file_of(name)}: unexpected tensor {name!r} (not part of this config's model)")
    return plans


# ----------------------------------------------------------------------------- reading slices
def _ranges(index: tuple[slice, ...], shape: tuple[int, ...]) -> tuple[range, ...]:
    return tuple(range(*s.indices(n)) for s, n in zip(index, shape, strict=True))


def _needed_rows(plan: ParamPlan, r: tuple[range, ...]) -> dict[str, np.ndarray]:
    """Checkpoint rows (per tensor) that the parameter slice with index ranges `r` is made of."""
    src = plan.src
    if src.kind == COPY:
        return {src.tensors[0].name: np.arange(r[0].start, r[0].stop) if r else None}
    if src.kind == TRANSPOSE:
        return {src.tensors[0].name: np.arange(r[1].start, r[1].stop)}
    if src.kind == HEADS_OUT:
        return {src.tensors[0].name: np.arange(r[2].start, r[2].stop)}
    if src.kind == HEADS_IN:
        rows = plan.value_rows.reshape(src.heads, src.head_dim)[r[1].start : r[1].stop, r[2].start : r[2].stop]
        return {plan.value_tensor: np.unique(rows)}
    return {src.tensors[e].name: np.arange(r[2].start, r[2].stop) for e in r[0]}


# param = transpose(staged, STAGED_PERM[kind]): slices are staged in the checkpoint's row order so
# the host only selects rows and column ranges (no element-wise transposes, slow for 1-byte FP8);
# the device does the transpose.
STAGED_PERM = {COPY: None, TRANSPOSE: (1, 0), EXPERTS: (0, 2, 1), HEADS_IN: (2, 0, 1), HEADS_OUT: (1, 2, 0)}


def staged_shape(kind: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    perm = STAGED_PERM[kind]
    if perm is None:
        return shape
    out = [0] * len(shape)
    for i, p in enumerate(perm):
        out[p] = shape[i]
    return tuple(out)


def _cut(plan: ParamPlan, r: tuple[range, ...], read: dict[str, tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """The staged slice of parameter ranges `r` from rows already read (`read[name] = (rows, data)`)."""

    def rows_of(name: str, rows: np.ndarray | None) -> np.ndarray:
        have, data = read[name]
        if rows is None or (len(rows) == len(have) and (rows == have).all()):
            return data
        return data[np.searchsorted(have, rows)]

    def span(x: range) -> slice:
        return slice(x.start, x.stop)

    src = plan.src
    if src.kind == COPY:
        data = rows_of(src.tensors[0].name, np.arange(r[0].start, r[0].stop))
        return data[(slice(None), *(span(x) for x in r[1:]))]
    if src.kind == TRANSPOSE:  # staged [out, in]
        return rows_of(src.tensors[0].name, np.arange(r[1].start, r[1].stop))[:, span(r[0])]
    if src.kind == HEADS_OUT:  # staged [H, heads, head_dim]
        n, dv = src.heads, src.head_dim
        data = rows_of(src.tensors[0].name, np.arange(r[2].start, r[2].stop)).reshape(-1, n, dv)
        return data[:, span(r[0]), span(r[1])]
    if src.kind == HEADS_IN:  # staged [heads, head_dim, H]
        rows = plan.value_rows.reshape(src.heads, src.head_dim)[span(r[1]), span(r[2])]
        data = rows_of(plan.value_tensor, rows.ravel())[:, span(r[0])]
        return data.reshape(len(r[1]), len(r[2]), len(r[0]))
    rows = np.arange(r[2].start, r[2].stop)  # experts, staged [E, out, in]
    return np.stack([rows_of(src.tensors[e].name, rows)[:, span(r[1])] for e in r[0]])


def _param_scales(ckpt: Checkpoint, plan: ParamPlan) -> tuple[np.ndarray, tuple[int, ...]]:
    """Full (small) scale array of a quantized parameter in its own layout, and its block shape."""
    src = plan.src
    br, bc = plan.block
    scales = [ckpt.read_rows(t.scale_name).astype(np.float32) for t in src.tensors]
    if src.kind == COPY:
        return scales[0], (br, bc)
    if src.kind == TRANSPOSE:
        return np.ascontiguousarray(scales[0].T), (bc, br)
    if src.kind == HEADS_IN:  # one scale per output row: [ceil(H/bc), heads, head_dim]
        per_row = np.concatenate(scales)[plan.scale_rows]
        return np.ascontiguousarray(per_row.reshape(src.heads, src.head_dim, -1).transpose(2, 0, 1)), (bc, 1, 1)
    if src.kind == HEADS_OUT:  # one scale per input column: [heads, head_dim, ceil(H/br)]
        n, dv = src.heads, src.head_dim
        per_col = scales[0][:, np.arange(n * dv) // bc]
        return np.ascontiguousarray(per_col.reshape(-1, n, dv).transpose(1, 2, 0)), (1, 1, br)
    return np.stack([s.T for s in scales]), (1, bc, br)


def _place(shape, sharding: Sharding, make: Any) -> jax.Array:
    """A global array whose addressable shards come from `make(list of index ranges) -> list of numpy slices`."""
    by_index: dict[tuple, list] = {}
    for device, index in sharding.addressable_devices_indices_map(tuple(shape)).items():
        by_index.setdefault(tuple((x.start, x.stop) for x in _ranges(index, shape)), []).append(device)
    keys = list(by_index)
    host = make([tuple(range(a, b) for a, b in key) for key in keys])
    buffers = {}
    for key, arr in zip(keys, host, strict=True):
        for device in by_index[key]:
            buffers[device] = jax.device_put(np.ascontiguousarray(arr), device)
    ordered = [buffers[d] for d in sharding.addressable_devices_indices_map(tuple(shape))]
    return jax.make_array_from_single_device_arrays(tuple(shape), sharding, ordered)


@functools.cache
def _dequantizer(sharding: Sharding, dtype: str):
    return jax.jit(lambda q: q.dequantize(dtype), out_shardings=sharding)


class _Streamer:
    """Reads and places one parameter at a time (called from worker threads)."""

    def __init__(self, ckpt: Checkpoint, weights: str, mesh: jax.sharding.Mesh | None, progress: Any):
        self.ckpt = ckpt
        self.weights = weights
        self.mesh = mesh
        self.progress = progress
        self.single = SingleDeviceSharding(jax.devices()[0]) if mesh is None else None

    def sharding(self, axes: tuple | None, shape: tuple[int, ...]) -> Sharding:
        if self.mesh is None:
            return self.single

        return NamedSharding(self.mesh, logical_to_spec(tuple(axes or (None,) * len(shape)), shape, self.mesh))

    def read_values(self, plan: ParamPlan, staged: list[tuple[range, ...]]) -> list[np.ndarray]:
        """Staged slices (checkpoint dtype) for the given staged index ranges."""
        perm = STAGED_PERM[plan.src.kind]
        ranges = staged if perm is None else [tuple(r[p] for p in perm) for r in staged]
        groups: dict[tuple[str, ...], list[int]] = {}
        needs = [_needed_rows(plan, r) for r in ranges]
        for i, need in enumerate(needs):
            groups.setdefault(tuple(need), []).append(i)
        out: list[np.ndarray | None] = [None] * len(ranges)
        for members in groups.values():  # one read of the union of rows per group, then cut per slice
            read = {}
            for name in needs[members[0]]:
                parts = [needs[i][name] for i in members]
                rows = None if parts[0] is None else np.unique(np.concatenate(parts))
                data = self.ckpt.read_rows(name, rows)
                read[name] = (rows, data)
                if self.progress is not None:
                    self.progress.update(data.nbytes)
            for i in members:
                out[i] = _cut(plan, ranges[i], read)
            del read
        return out

    def place_values(self, plan: ParamPlan, shape: tuple[int, ...], sharding: Sharding, dtype: Any) -> jax.Array:
        """The parameter's values with `sharding`, read in staged layout and finished (transposed, cast) on device."""
        kind = plan.src.kind
        perm = STAGED_PERM[kind]
        staged_sharding = sharding
        if perm is not None and isinstance(sharding, NamedSharding):
            spec = tuple(sharding.spec) + (None,) * (len(shape) - len(sharding.spec))
            staged_spec = [None] * len(shape)
            for i, p in enumerate(perm):
                staged_spec[p] = spec[i]
            staged_sharding = NamedSharding(sharding.mesh, PartitionSpec(*staged_spec))
        staged = _place(staged_shape(kind, shape), staged_sharding, lambda ranges: self.read_values(plan, ranges))
        if perm is None and staged.dtype == dtype:
            return staged
        return _finisher(perm, np.dtype(dtype).name, sharding)(staged)

    def load(self, plan: ParamPlan, var: nnx.Variable, value_sharding: Sharding) -> Any:
        target = var.get_value()
        shape, dtype = tuple(target.shape), np.dtype(target.dtype)
        if not plan.quantized:
            return self.place_values(plan, shape, value_sharding, dtype)
        values = self.place_values(plan, shape, value_sharding, FP8)
        scales, block = _param_scales(self.ckpt, plan)
        axes = var.get_metadata().get("logical_axes")
        scale_sharding = self.sharding(axes, scales.shape)
        scales = _place(
            scales.shape,
            scale_sharding,
            lambda ranges: [scales[tuple(slice(x.start, x.stop) for x in r)] for r in ranges],
        )
        q = BlockQuantized(values, scales, block, dtype.name)
        if self.weights == "fp8" and plan.src.kind in _KEEP_FP8:
            return q
        return _dequantizer(value_sharding, dtype.name)(q)


@functools.cache
def _finisher(perm: tuple[int, ...] | None, dtype: str, sharding: Sharding):
    def finish(x: jax.Array) -> jax.Array:
        return (x if perm is None else jnp.transpose(x, perm)).astype(dtype)

    return jax.jit(finish, out_shardings=sharding)


def _return_freed_buffers_to_os() -> None:
    """glibc keeps freed multi-MB buffers in per-thread arenas (its mmap threshold grows with use), so
    streaming GBs through worker threads would ratchet RSS up; a fixed 1 MiB threshold maps every
    slice buffer on its own and unmaps it when freed. Process-wide and harmless elsewhere; no-op off glibc."""
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def load_params(
    directory: str | os.PathLike,
    dtype: Any = jnp.float32,
    *,
    weights: str = "bf16",
    mtp_layers: int = 0,
    mesh: jax.sharding.Mesh | None = None,
    progress: bool = True,
    workers: int = 4,
    options: RunOptions | None = None,
) -> MiMoModel:
    """Read a checkpoint into a `MiMoModel` built with `options`, placed on `mesh` (None: the first device),
    its experts in the stored "in_out" layout (`relayout_experts` makes the kernel's).

    `weights`: "bf16" dequantizes FP8 tensors into `dtype`; "fp8" keeps them block-quantized.
    `mtp_layers`: how many `model.mtp.layers.*` to load (0: ignore them).
    """
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: expected one of {WEIGHT_MODES}")
    ckpt = Checkpoint(directory)
    cfg = ckpt.config
    if mtp_layers > cfg.num_mtp_layers:
        raise CheckpointError(
            f"{ckpt.directory}: asked for {mtp_layers} MTP layers, config.json declares {cfg.num_mtp_layers}"
        )
    model = abstract_model(cfg, dtype, mtp_layers, options)
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    try:
        sources = parameter_sources(cfg, mtp_layers)
    except ValueError as e:
        raise CheckpointError(f"{os.path.join(ckpt.directory, 'config.json')}: {e}") from None
    missing = set(params) - {s.path for s in sources}
    if missing:
        raise AssertionError(f"parameters without a checkpoint source: {sorted(missing)}")
    plans = validate(ckpt, sources, mtp_layers)  # everything checked before anything is placed

    if mesh is None:
        shardings = dict.fromkeys(params, SingleDeviceSharding(jax.devices()[0]))
    else:
        shardings = model_shardings(model, mesh)
    bar = None
    if progress:
        total = _planned_bytes(ckpt, plans, params, shardings)
        bar = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading weights", smoothing=0.1)
    _return_freed_buffers_to_os()
    streamer = _Streamer(ckpt, weights, mesh, bar)
    try:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            futures = {
                pool.submit(streamer.load, plan, params[plan.src.path], shardings[plan.src.path]): plan.src.path
                for plan in plans
            }
            for future in concurrent.futures.as_completed(futures):
                params[futures[future]].set_value(future.result())
    finally:
        if bar is not None:
            bar.close()
        ckpt.close()
    return model


def _planned_bytes(ckpt: Checkpoint, plans: list[ParamPlan], params: dict, shardings: dict) -> int:
    """Bytes this process will read (for the progress bar): the union of rows its devices need, per parameter."""
    total = 0
    for plan in plans:
        shape = tuple(params[plan.src.path].get_value().shape)
        ranges = [_ranges(i, shape) for i in shardings[plan.src.path].addressable_devices_indices_map(shape).values()]
        unique = list({tuple((x.start, x.stop) for x in r): r for r in ranges}.values())
        needs = [_needed_rows(plan, r) for r in unique]
        groups: dict[tuple, list] = {}
        for need in needs:
            groups.setdefault(tuple(need), []).append(need)
        for members in groups.values():
            for name in members[0]:
                full = ckpt.shape(name)
                row_bytes = ckpt.nbytes(name) // max(1, full[0] if full else 1)
                parts = [m[name] for m in members]
                rows = (full[0] if full else 1) if parts[0] is None else len(np.unique(np.concatenate(parts)))
                total += rows * row_bytes
    return total


def param_bytes(model: MiMoModel) -> int:
    """Bytes of all parameters (global, counting FP8 values and scales)."""
    total = 0
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param):
            v = var.get_value()
            total += v.nbytes if isinstance(v, BlockQuantized) else math.prod(v.shape) * np.dtype(v.dtype).itemsize
    return total
