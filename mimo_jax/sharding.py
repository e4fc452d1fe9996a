"""Device mesh and the one table mapping logical parameter axes to mesh axes.

Layers name logical axes only (`logical_axes` metadata on every `nnx.Param`); this module
decides where they live. A dimension that the mesh axis does not divide is replicated (for
example 4 kv heads on a tensor axis of 8).
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "tensor", "expert")

# logical axis -> mesh axis (None = replicated)
RULES: dict[str, str | None] = {
    "batch": "data",
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "moe_mlp": None,
    "norm": None,
    "experts_replicated": None,
    "embed_replicated": None,
}


def make_mesh(data: int | None = None, tensor: int | None = None, expert: int | None = None, devices=None) -> Mesh:
    """A mesh with axes (data, tensor, expert) whose product is the device count.

    Left-out sizes: experts take what the given sizes leave (expert parallelism is where the
    weights are); with only `expert` given, tensor takes the rest.
    """
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    given = {k: v for k, v in dict(data=data, tensor=tensor, expert=expert).items() if v is not None}
    for k, v in given.items():
        if v < 1:
            raise ValueError(f"mesh axis {k}={v}: sizes must be >= 1")
    known = math.prod(given.values())
    if n % known:
        raise ValueError(f"mesh {given} does not divide the {n} available devices")
    rest = n // known
    sizes = {"data": data or 1, "tensor": tensor, "expert": expert}
    if sizes["expert"] is None and sizes["tensor"] is None:
        sizes["expert"], sizes["tensor"] = rest, 1
    elif sizes["expert"] is None:
        sizes["expert"] = rest
    elif sizes["tensor"] is None:
        sizes["tensor"] = rest
    elif rest != 1:
        raise ValueError(f"mesh {sizes} uses {known} of {n} devices; the product must equal the device count")
    if sizes["data"] * sizes["tensor"] * sizes["expert"] != n:
        raise ValueError(f"mesh {sizes} does not match the {n} available devices")
    shape = tuple(sizes[a] for a in MESH_AXES)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)


def parse_mesh_arg(text: str) -> dict[str, int]:
    """'tensor=4,expert=2' -> {'tensor': 4, 'expert': 2} (the --mesh flag of every CLI)."""
    out: dict[str, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, _, value = part.partition("=")
        if key not in MESH_AXES or not value.isdigit():
            raise ValueError(f"--mesh {text!r}: expected comma-separated axis=size with axes {MESH_AXES}")
        out[key] = int(value)
    return out


def logical_to_spec(axes: tuple[str | None, ...], shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    spec = []
    for name, dim in zip(axes, shape, strict=True):
        mesh_axis = RULES.get(name) if name else None
        if mesh_axis is not None and (mesh.shape[mesh_axis] == 1 or dim % mesh.shape[mesh_axis]):
            mesh_axis = None
        spec.append(mesh_axis)
    return PartitionSpec(*spec)


def param_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
    return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(value.shape), mesh))


def model_shardings(model: Any, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Parameter path -> NamedSharding for every parameter of an (abstract or concrete) model."""
    return {path: param_sharding(var, mesh) for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
