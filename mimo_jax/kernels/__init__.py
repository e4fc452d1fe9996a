"""Accelerator kernels, each behind a plain-JAX reference. Backend-specific modules load only when called."""

from __future__ import annotations

import jax


def experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down) -> jax.Array:
    """MoE experts through the Pallas GPU kernel (`mimo_jax.kernels.moe_gpu`); contract of `experts_ragged`."""
    from mimo_jax.kernels import moe_gpu  # lazy: CPU/TPU processes never load the GPU kernel module

    return moe_gpu.experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down)


def default_expert_impl() -> str:
    """EXPERT_IMPLS name to use on this backend: the Pallas kernel on GPU, `jax.lax.ragged_dot` elsewhere."""
    return "pallas_gpu" if jax.default_backend() == "gpu" else "ragged"
