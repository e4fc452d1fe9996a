"""Accelerator kernels, each behind a plain-JAX reference. Backend-specific modules load only when called."""

from __future__ import annotations

import jax

# Stacked expert weights as stored: "in_out" ([E, H, I] gate/up, [E, I, H] down) or "out_in" (each transposed).
EXPERT_LAYOUTS = ("in_out", "out_in")


def experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down) -> jax.Array:
    """MoE experts through the Pallas GPU kernel (`mimo_jax.kernels.moe_gpu`); contract of `experts_ragged`
    with the weights transposed ([E, out, in], `moe.expert_layout`)."""
    from mimo_jax.kernels import moe_gpu  # lazy: CPU/TPU processes never load the GPU kernel module

    return moe_gpu.experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down, layout="out_in")


def experts_pallas_gpu_w8a8(x, weights, ids, w_gate, w_up, w_down) -> jax.Array:
    """The Pallas GPU kernel with fp8 expert weights meeting fp8-quantized activations (w8a8, as SGLang
    and vLLM serve block-FP8 checkpoints: faster, about 3% off the exact path); bf16 weights as "pallas_gpu"."""
    from mimo_jax.kernels import moe_gpu

    return moe_gpu.experts_pallas_gpu(x, weights, ids, w_gate, w_up, w_down, fp8_dot="fp8", layout="out_in")


def paged_attention_pallas_gpu(q, k_pages, v_pages, page_table, q_pos, **kwargs) -> jax.Array:
    """Decode attention over a paged KV pool through the Pallas GPU kernel (`mimo_jax.kernels.paged_attention_gpu`,
    whose `paged_attention` documents the arguments); contract of `mimo_jax.model.attention.attention_paged`."""
    from mimo_jax.kernels import paged_attention_gpu as kernel  # lazy: CPU/TPU processes never load it

    return kernel.paged_attention(q, k_pages, v_pages, page_table, q_pos, **kwargs)
