"""Pallas calls inside `jax.shard_map`: every operand and output must vary over the same manual mesh axes."""

from __future__ import annotations

import jax


def varying_axes(a) -> frozenset:
    """The manual mesh axes `a` varies over (empty outside `jax.shard_map`)."""
    aval = jax.typeof(a)
    if hasattr(aval, "manual_axis_type"):  # JAX >= 0.10
        return aval.manual_axis_type.varying
    return getattr(aval, "vma", frozenset())


def match_varying(args: tuple) -> tuple:
    """Inside `jax.shard_map`, mark every kernel input as varying over the union of their manual mesh axes
    (Pallas wants one type for all operands); outside it this is the identity. None entries pass through."""
    union = frozenset().union(*(varying_axes(a) for a in args if a is not None))
    if not union:
        return args
    cast = jax.lax.pcast if hasattr(jax.lax, "pcast") else None

    def vary(a):
        if a is None:
            return a
        missing = tuple(sorted(union - varying_axes(a)))
        if not missing:
            return a
        return cast(a, missing, to="varying") if cast else jax.lax.pvary(a, missing)

    return tuple(map(vary, args))


def out_struct(shape, dtype, like) -> jax.ShapeDtypeStruct:
    """Output type varying over the same manual mesh axes as the (matched) input `like`."""
    aval = jax.typeof(like)
    if hasattr(aval, "manual_axis_type"):  # JAX >= 0.10
        return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=aval.manual_axis_type)
    if hasattr(aval, "vma"):
        return jax.ShapeDtypeStruct(shape, dtype, vma=aval.vma)
    return jax.ShapeDtypeStruct(shape, dtype)


def pallas_call(kernel, launch, inputs: tuple, outputs: list, grid, interpret: bool, name: str) -> list:
    """Run the Triton-backend Pallas `kernel` over `grid` on `inputs` (matched for shard_map) -> a list of `outputs`
    ((shape, dtype) each); `launch` gives num_warps and num_stages."""
    from jax.experimental import pallas as pl
    from jax.experimental.pallas import triton as plgpu

    args = match_varying(inputs)
    return pl.pallas_call(
        kernel,
        out_shape=[out_struct(shape, dtype, args[0]) for shape, dtype in outputs],
        grid=grid if isinstance(grid, tuple) else (grid,),
        compiler_params=plgpu.CompilerParams(num_warps=launch.num_warps, num_stages=launch.num_stages),
        interpret=interpret,
        name=name,
    )(*args)
