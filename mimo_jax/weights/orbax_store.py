"""Imported parameters as an Orbax checkpoint: written once by `python -m mimo_jax.tools.convert`, restored anywhere.

Layout of a converted directory:
- `params/`: Orbax (StandardCheckpointer) tree {"layers.0.self_attn.q_proj": array | {"values", "scales"}, ...};
- `mimo_jax.json`: {"format": "orbax", "weights": "bf16"|"fp8", "dtype": ..., "mtp_layers": k};
- `config.json` and the tokenizer files of the source checkpoint.
FP8 parameters are stored as their values and scales; their block shapes follow from the config
(`quantization_config`) and the tensor table, so restoring needs nothing else.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, SingleDeviceSharding

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.quant import FP8, BlockQuantized
from mimo_jax.sharding import logical_to_spec
from mimo_jax.weights.loader import _dequantizer, abstract_model, quantization_block
from mimo_jax.weights.safetensors_io import CheckpointError
from mimo_jax.weights.table import fp8_param_block, parameter_sources

META_NAME = "mimo_jax.json"
PARAMS_DIR = "params"


def is_converted(path: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(path, META_NAME))


def read_meta(path: str | os.PathLike) -> dict:
    with open(os.path.join(path, META_NAME)) as f:
        meta = json.load(f)
    if meta.get("format") != "orbax":
        raise CheckpointError(f"{os.path.join(path, META_NAME)}: unknown format {meta.get('format')!r}")
    return meta


def _key(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def save_params(model: Any, directory: str) -> None:
    """Write every parameter of `model` (sharded arrays stay sharded) under `directory`/params.

    Expert weights are written in the stored layout ("in_out"); a model re-laid out for a kernel
    (`relayout_experts`) has its experts turned back for the write and again after it, on their devices.
    """
    import orbax.checkpoint as ocp

    layouts = [(layer, layer.layout) for layer in model.moe_layers()]
    for layer, _ in layouts:
        layer._store_in("in_out")
    try:
        tree = {_key(path): var.get_value() for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(os.path.join(os.path.abspath(directory), PARAMS_DIR), tree)
        checkpointer.wait_until_finished()
    finally:
        for layer, layout in layouts:
            layer._store_in(layout)


def restore_params(
    path: str | os.PathLike,
    dtype: Any,
    weights: str,
    mtp_layers: int,
    mesh: jax.sharding.Mesh | None,
    options: RunOptions | None = None,
) -> Any:
    """A `MiMoModel` built with `options`, restored from a converted directory onto `mesh` (any shape)."""
    import orbax.checkpoint as ocp

    path = os.path.abspath(os.fspath(path))
    meta = read_meta(path)
    cfg = MiMoConfig.from_json(path)
    stored_mtp = int(meta.get("mtp_layers", 0))
    if mtp_layers > stored_mtp:
        raise CheckpointError(f"{path}: converted with {stored_mtp} MTP layers, {mtp_layers} asked for")
    if weights == "fp8" and meta.get("weights") != "fp8":
        raise CheckpointError(
            f"{path}: converted with --weights {meta.get('weights')}; convert again with --weights fp8"
        )
    # Restore the whole stored tree (its MTP layers too), then keep what this model has.
    stored_model = abstract_model(cfg, dtype, stored_mtp)
    params = {path_: var for path_, var in nnx.iter_graph(stored_model) if isinstance(var, nnx.Param)}
    sources = {s.path: s for s in parameter_sources(cfg, stored_mtp)}
    block = quantization_block(cfg)
    checkpointer = ocp.StandardCheckpointer()
    stored = checkpointer.metadata(os.path.join(path, PARAMS_DIR)).item_metadata.tree
    single = SingleDeviceSharding(jax.devices()[0])

    def sharding(var, shape):
        if mesh is None:
            return single

        axes = tuple(var.get_metadata().get("logical_axes") or (None,) * len(shape))
        return NamedSharding(mesh, logical_to_spec(axes, tuple(shape), mesh))

    target = {}
    for p, var in params.items():
        key = _key(p)
        if key not in stored:
            raise CheckpointError(f"{path}: parameter {key!r} is missing from the converted checkpoint")
        shape = tuple(var.get_value().shape)
        entry = stored[key]
        if isinstance(entry, dict):  # FP8 values + scales
            scales_shape = tuple(entry["scales"].shape)
            target[key] = BlockQuantized(
                jax.ShapeDtypeStruct(shape, FP8, sharding=sharding(var, shape)),
                jax.ShapeDtypeStruct(scales_shape, np.float32, sharding=sharding(var, scales_shape)),
                fp8_param_block(sources[p].kind, len(shape), block),
                np.dtype(dtype).name,
            )
        else:
            if tuple(entry.shape) != shape:
                raise CheckpointError(f"{path}: parameter {key!r} has shape {entry.shape}, the config implies {shape}")
            target[key] = jax.ShapeDtypeStruct(shape, var.get_value().dtype, sharding=sharding(var, shape))
    restored = checkpointer.restore(os.path.join(path, PARAMS_DIR), target)
    model = abstract_model(cfg, dtype, mtp_layers, options)
    for p, var in nnx.iter_graph(model):
        if not isinstance(var, nnx.Param):
            continue
        value = restored[_key(p)]
        if isinstance(value, BlockQuantized) and weights != "fp8":
            value = _dequantizer(value.values.sharding, np.dtype(dtype).name)(value)
        var.set_value(value)
    return model
