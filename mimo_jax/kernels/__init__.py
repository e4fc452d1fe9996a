"""Accelerator kernels, each behind a plain-JAX reference. Backend-specific modules load only when called."""

from __future__ import annotations

import math

import jax

from mimo_jax import quant

# Stacked expert weights as stored: "in_out" ([E, H, I] gate/up, [E, I, H] down) or "out_in" (each transposed).
EXPERT_LAYOUTS = ("in_out", "out_in")

# w8a8 "prefill" (`RunOptions.w8a8`): fp8 experts above this many rows per expert (mean, static). Below, the
# widening kernels (bandwidth-bound, tuned for decode).
W8A8_MIN_ROWS_PER_EXPERT = 96


def experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down, w8a8: str = "off") -> jax.Array:
    """MoE experts through the Pallas GPU kernel (`mimo_jax.kernels.moe_gpu`); contract of `experts_ragged`
    with the weights transposed ([E, out, in], `moe.expert_layout`). `w8a8` (`RunOptions.w8a8` modes): fp8
    experts meet fp8-quantized activations at prefill sizes ("prefill", on `fp8_gemm_gpu`) or everywhere."""
    from mimo_jax.kernels import moe_gpu  # lazy: CPU/TPU processes never load the GPU kernel module

    return moe_gpu.experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down, layout="out_in", w8a8=w8a8)


def experts_pallas_gpu_w8a8(x, weights, ids, w_gate, w_up, w_down) -> jax.Array:
    """The Pallas GPU kernel with fp8 expert weights meeting fp8-quantized activations (w8a8, as SGLang
    and vLLM serve block-FP8 checkpoints: about 4% off the exact path) at every size, on `fp8_gemm_gpu`; bf16
    weights as "pallas_gpu"."""
    return experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down, w8a8="always")


def matmul_w8a8_gpu(x: jax.Array, w) -> jax.Array:
    """x [..., K] @ w [K, *out] -> [..., *out] for a `quant.w8a8_ready` FP8 weight on the Pallas fp8 GEMM
    (`mimo_jax.kernels.fp8_gemm_gpu.matmul_w8a8`: x quantized per row and 128 columns, fp8 tensor-core dots)."""
    from mimo_jax.kernels import fp8_gemm_gpu

    if not quant.w8a8_ready(w):
        raise ValueError(f"weight {getattr(w, 'shape', None)} is not FP8 in blocks of {quant.ACTIVATION_GROUP} inputs")
    k, out = w.shape[0], w.shape[1:]
    n = math.prod(out)
    scales = w.scales.reshape(k // quant.ACTIVATION_GROUP, -1)
    col_scales = fp8_gemm_gpu.column_scales(scales, n // scales.shape[1], n)
    y = fp8_gemm_gpu.matmul_w8a8(x.reshape(-1, k), w.values.reshape(k, n), col_scales)
    return y.reshape(*x.shape[:-1], *out)


def paged_attention_pallas_gpu(q, k_pages, v_pages, page_table, q_pos, **kwargs) -> jax.Array:
    """Decode attention over a paged KV pool through the Pallas GPU kernel (`mimo_jax.kernels.paged_attention_gpu`,
    whose `paged_attention` documents the arguments); contract of `mimo_jax.model.attention.attention_paged`."""
    from mimo_jax.kernels import paged_attention_gpu as kernel  # lazy: CPU/TPU processes never load it

    return kernel.paged_attention(q, k_pages, v_pages, page_table, q_pos, **kwargs)


def ring_attention_pallas_gpu(q, k, v, pos, q_pos, **kwargs) -> jax.Array:
    """Sliding-window decode attention over a ring through the Pallas GPU kernel (`mimo_jax.kernels.
    ring_attention_gpu.ring_attention` documents the arguments); contract of `mimo_jax.model.attention.attention`
    over a ring that already holds this step's keys."""
    from mimo_jax.kernels import ring_attention_gpu as kernel  # lazy: CPU/TPU processes never load it

    return kernel.ring_attention(q, k, v, pos, q_pos, **kwargs)
