"""Device mesh and the one table mapping logical axes to mesh axes.

Layers name logical axes only (`logical_axes` metadata on every `nnx.Param`, and `constrain`
on activations); this module decides where they live. A dimension that the mesh axis does
not divide is replicated (for example 4 kv heads on a tensor axis of 8).

How the mesh reaches the model: the caller traces the model inside `jax.set_mesh(mesh)`
(`LanguageModel` does this for its jitted forward). `current_mesh()` reads that context
while tracing; with no mesh set the model is plain single-device math. So model code never
receives a mesh argument, and the same module runs on one device or many.

Multi-host: one process per host calls `initialize_distributed()` before anything touches
JAX devices; `jax.devices()` is then the global device list and `make_mesh` spans all hosts.
"""

from __future__ import annotations

import math
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "tensor", "expert")

# logical axis -> mesh axis, or axes in order (None = replicated); parameters and activations alike
RULES: dict[str, str | tuple[str, ...] | None] = {
    # the batch also splits over the expert axis (data-parallel attention beside expert-parallel
    # MoE): attention, its KV cache and the dense layers are not repeated on every expert shard
    "batch": ("data", "expert"),
    "vocab": "tensor",
    "embed": None,
    "q_heads": "tensor",
    "kv_heads": "tensor",
    "head_dim": None,
    "mlp": "tensor",
    "experts": "expert",
    "moe_mlp": "tensor",  # expert x tensor: each tensor shard holds a slice of every local expert
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
    """Logical axis names of an array of `shape` -> PartitionSpec on `mesh` (by `RULES`)."""
    if len(axes) != len(shape):
        raise ValueError(f"logical axes {axes} do not match the array shape {shape}")
    spec, used = [], set(manual_axes(mesh))  # inside `jax.shard_map` its manual axes are split already
    for name, dim in zip(axes, shape, strict=True):
        rule = RULES.get(name) if name else None
        kept, split = [], 1
        for mesh_axis in (rule,) if isinstance(rule, str) else rule or ():
            size = mesh.shape.get(mesh_axis, 1)
            if size == 1 or mesh_axis in used:
                continue
            if dim % (split * size):
                break  # the dim splits over the axes kept so far and no further
            kept.append(mesh_axis)
            split *= size
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def param_sharding(var: nnx.Variable, mesh: Mesh) -> NamedSharding:
    value = var.get_value()
    axes = var.get_metadata().get("logical_axes") or (None,) * len(value.shape)
    return NamedSharding(mesh, logical_to_spec(tuple(axes), tuple(value.shape), mesh))


def model_shardings(model: Any, mesh: Mesh) -> dict[tuple, NamedSharding]:
    """Parameter path -> NamedSharding for every parameter of an (abstract or concrete) model."""
    return {path: param_sharding(var, mesh) for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}


def place_model(model: Any, mesh: Mesh) -> None:
    """Move every plain-array parameter of `model` (in place) to its sharding on `mesh`.

    Parameters already there stay put; structured values (e.g. quantized blocks) are left to the loader.
    """
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and isinstance(value := var.get_value(), (jax.Array, np.ndarray)):
            sharding = param_sharding(var, mesh)
            if getattr(value, "sharding", None) != sharding:
                var.set_value(jax.device_put(value, sharding))


def current_mesh() -> jax.sharding.AbstractMesh | None:
    """The mesh set by `jax.set_mesh` around the trace, or None when there is none (or one device), or when the
    trace is inside a `jax.shard_map` whose manual axes leave no axis of size > 1 (per-device math there)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return None
    manual = manual_axes(mesh)
    if math.prod(size for axis, size in mesh.shape.items() if axis not in manual) == 1:
        return None
    return mesh


def manual_axes(mesh: Mesh | jax.sharding.AbstractMesh | None) -> tuple[str, ...]:
    """The axes of `mesh` that an enclosing `jax.shard_map` has made manual (none outside one)."""
    return tuple(getattr(mesh, "manual_axes", ()) or ()) if mesh is not None else ()


def batch_axes(mesh: Mesh | jax.sharding.AbstractMesh | None, rows: int) -> tuple[str, ...]:
    """The mesh axes a batch of `rows` rows splits over (RULES["batch"], as far as `rows` divides), in order:
    row r lives on batch shard r // (rows / D), D the product of their sizes."""
    if mesh is None:
        return ()
    axes = logical_to_spec(("batch",), (rows,), mesh)[0] or ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def axes_size(mesh: Mesh | jax.sharding.AbstractMesh | None, axes: tuple[str, ...]) -> int:
    """The number of shards `axes` of `mesh` make together (1 for none)."""
    return math.prod(mesh.shape[a] for a in axes) if mesh is not None else 1


class MeshNotActive(RuntimeError):
    """Parameters placed on a mesh were traced without that mesh active."""


def require_active_mesh(value: Any, what: str) -> None:
    """Raise `MeshNotActive` when `value` (an array, a traced one, or a pytree such as FP8 blocks) lives on a
    multi-device mesh but no mesh is active: sharded code traced so would silently take its one-device path."""
    if current_mesh() is not None:
        return
    for leaf in jax.tree.leaves(value)[:1]:
        try:
            mesh = getattr(jax.typeof(leaf).sharding, "mesh", None)
        except TypeError:  # not a JAX value (e.g. numpy): on no mesh
            return
        if mesh is not None and not mesh.empty and mesh.size > 1:
            axes = ", ".join(f"{a}={mesh.shape[a]}" for a in mesh.axis_names)
            raise MeshNotActive(
                f"{what} are placed on a mesh ({axes}) but no mesh is active: trace and run the model inside "
                "`with jax.set_mesh(mesh):` (`LanguageModel.mesh_context()` does this)"
            )


def constrain(x: jax.Array, axes: tuple[str | None, ...]) -> jax.Array:
    """Pin activation x to the layout its logical axes imply on the current mesh (no-op off a mesh)."""
    mesh = current_mesh()
    if mesh is None:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh))


def spread_kv_heads(
    keys: jax.Array, values: jax.Array, num_q_heads: int, heads_axis: int = 1
) -> tuple[jax.Array, jax.Array]:
    """Keys/values (kv heads on `heads_axis`: [B, KV, S, D] as cached, 2 for [B, T, KV, D] as
    projected) laid out to match q heads sharded over the tensor axis.

    When the q heads split over the tensor axis but the KV heads do not (KV < axis size, or
    not a multiple), each kv head is repeated lcm(KV, T) / KV times: every tensor shard then
    slices out exactly the kv heads of its own q heads from the replicated k/v (no
    communication), and attention keeps its grouped form. The cache still stores KV heads.
    """
    repeat = kv_head_repeat(keys.shape[heads_axis], num_q_heads)
    if repeat == 1:
        return keys, values
    heads_axes = tuple("q_heads" if i == heads_axis else ("batch" if i == 0 else None) for i in range(keys.ndim))
    keys = constrain(jnp.repeat(keys, repeat, axis=heads_axis), heads_axes)
    values = constrain(jnp.repeat(values, repeat, axis=heads_axis), heads_axes)
    return keys, values


def kv_head_repeat(num_kv_heads: int, num_q_heads: int) -> int:
    """How many times `spread_kv_heads` repeats each kv head on the current mesh (1: not at all)."""
    mesh = current_mesh()
    axis = RULES["q_heads"]  # one mesh axis
    if mesh is None or axis not in mesh.shape:
        return 1
    shards = mesh.shape[axis]
    if shards == 1 or num_kv_heads % shards == 0 or num_q_heads % shards:
        return 1
    return math.lcm(num_kv_heads, shards) // num_kv_heads


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """Sharding of an input whose leading dim is the batch (over data, then expert, as far as it divides)."""
    return NamedSharding(mesh, logical_to_spec(("batch",) + (None,) * (len(shape) - 1), shape, mesh))


# Environment read by `initialize_distributed` when its arguments are left out.
COORDINATOR_ENV = "MIMO_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "MIMO_NUM_PROCESSES"
PROCESS_ID_ENV = "MIMO_PROCESS_ID"


def add_distributed_arguments(parser) -> None:
    """--coordinator-address/--num-processes/--process-id for a CLI (defaults: the MIMO_* environment).

    A CLI then calls `initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)`
    before touching JAX devices.
    """
    group = parser.add_argument_group("multi-host (one process per host)")
    group.add_argument("--coordinator-address", default=None, help=f"host:port of process 0 (${COORDINATOR_ENV})")
    group.add_argument("--num-processes", type=int, default=None, help=f"processes in the job (${NUM_PROCESSES_ENV})")
    group.add_argument("--process-id", type=int, default=None, help=f"this process, 0-based (${PROCESS_ID_ENV})")


def initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: list[int] | None = None,
    cpu_collectives: str | None = None,
) -> bool:
    """Join a multi-host JAX job (one process per host); returns False when running single-process.

    Arguments left out come from MIMO_COORDINATOR_ADDRESS ("host:port" of process 0),
    MIMO_NUM_PROCESSES and MIMO_PROCESS_ID. With none of them set and num_processes <= 1
    nothing happens (single host). Must run before any JAX computation. `cpu_collectives`
    ("gloo" or "mpi") enables cross-process collectives on the CPU backend (tests).
    """
    coordinator_address = coordinator_address or os.environ.get(COORDINATOR_ENV) or None
    if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
        num_processes = _env_int(NUM_PROCESSES_ENV)
    if process_id is None and os.environ.get(PROCESS_ID_ENV):
        process_id = _env_int(PROCESS_ID_ENV)
    if coordinator_address is None and (num_processes or 1) <= 1:
        return False
    missing = [
        name
        for name, value in (
            (COORDINATOR_ENV, coordinator_address),
            (NUM_PROCESSES_ENV, num_processes),
            (PROCESS_ID_ENV, process_id),
        )
        if value is None
    ]
    if missing:
        raise ValueError(f"multi-host run: set {', '.join(missing)} (or pass them) on every process")
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is outside [0, {num_processes})")
    if cpu_collectives is not None:
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(
        coordinator_address=coordinator_address,
        num_processes=num_processes,
        process_id=process_id,
        local_device_ids=local_device_ids,
    )
    return True


def _env_int(name: str) -> int:
    text = os.environ[name]
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"{name}={text!r}: expected an integer") from None
