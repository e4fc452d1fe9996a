"""Mixture-of-experts math: sigmoid router with correction bias and grouped top-k, and expert FFNs.

Two expert implementations compute the same thing:
- `experts_dense`: every expert on every token, weighted by a dense combine matrix. Plainly
  correct; the reference for the others (and fine for tiny test models).
- `experts_ragged`: tokens sorted by expert and `jax.lax.ragged_dot` (the native grouped matmul
  on TPU/CPU).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mimo_jax import kernels


def route(
    x: jax.Array,
    router: jax.Array,
    correction_bias: jax.Array,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    scaling: float,
) -> tuple[jax.Array, jax.Array]:
    """x [N, H], router [E, H] fp32 -> (weights [N, K] fp32, expert ids [N, K] int32)."""
    logits = jnp.einsum("nh,eh->ne", x.astype(jnp.float32), router.astype(jnp.float32))
    scores = jax.nn.sigmoid(logits)
    choice = scores + correction_bias.astype(jnp.float32)
    n, e = choice.shape
    if n_group > 1:
        grouped = choice.reshape(n, n_group, e // n_group)
        group_scores = jax.lax.top_k(grouped, 2)[0].sum(-1)  # [N, G]
        _, top_groups = jax.lax.top_k(group_scores, topk_group)
        group_mask = jnp.zeros((n, n_group), bool).at[jnp.arange(n)[:, None], top_groups].set(True)
        expert_mask = jnp.repeat(group_mask, e // n_group, axis=1)
        choice = jnp.where(expert_mask, choice, -jnp.inf)
    _, ids = jax.lax.top_k(choice, top_k)
    weights = jnp.take_along_axis(scores, ids, axis=1)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdims=True) + 1e-20)
    return weights * scaling, ids.astype(jnp.int32)


def _swiglu(x: jax.Array, gate: jax.Array, up: jax.Array) -> jax.Array:
    return jax.nn.silu(gate) * up


def experts_dense(
    x: jax.Array, weights: jax.Array, ids: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Reference: x [N, H]; w_gate/w_up [E, H, I]; w_down [E, I, H] -> [N, H] (fp32 accumulation)."""
    n = x.shape[0]
    e = w_gate.shape[0]
    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], ids].add(weights)
    g = jnp.einsum("nh,ehi->nei", x, w_gate)
    u = jnp.einsum("nh,ehi->nei", x, w_up)
    y = jnp.einsum("nei,eih->neh", _swiglu(x, g, u), w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("neh,ne->nh", y, combine).astype(x.dtype)


def sort_by_expert(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Flattened (token, k) assignments sorted by expert: (order [N*K], group_sizes [E])."""
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def experts_ragged(
    x: jax.Array, weights: jax.Array, ids: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Grouped matmul over tokens sorted by expert; same contract as `experts_dense`."""
    n, k = ids.shape
    order, group_sizes = sort_by_expert(ids, w_gate.shape[0])
    token = order // k
    xs = x[token]
    g = jax.lax.ragged_dot(xs, w_gate, group_sizes)
    u = jax.lax.ragged_dot(xs, w_up, group_sizes)
    y = jax.lax.ragged_dot(_swiglu(xs, g, u), w_down, group_sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y).astype(x.dtype)


EXPERT_IMPLS = {"dense": experts_dense, "ragged": experts_ragged, "pallas_gpu": kernels.experts_pallas_gpu}
