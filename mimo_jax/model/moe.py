"""Mixture-of-experts math: sigmoid router with correction bias and grouped top-k, and expert FFNs.

Expert implementations (`EXPERT_IMPLS`) compute the same thing on the experts they are given:
- `experts_dense`: every expert on every token, weighted by a dense combine matrix. Plainly
  correct; the reference for the others (and fine for tiny test models).
- `experts_ragged`: tokens sorted by expert and `jax.lax.ragged_dot` (the native grouped matmul
  on TPU/CPU).
- `experts_gather` / `experts_gather_fused`: each token gathers its chosen experts' weights (decode
  at a few tokens on GPU, where `ragged_dot` reads every expert); as matmuls on gathered copies, or
  as a multiply-reduce that XLA can fuse with the gather.
Their contract: `fn(x [N, H], weights [N, K], ids [N, K], w_gate [E, H, I], w_up [E, H, I],
w_down [E, I, H]) -> [N, H]` in x.dtype; an id >= E means "expert not here" and
contributes nothing (its weight is 0 too). On a mesh every expert shard calls one of them on
its local experts only (`experts_sharded`), so a new kernel plugs in by joining the table.
The Pallas GPU kernels take every weight transposed instead ("out_in": [E, I, H] for gate/up,
[E, H, I] for down, the checkpoint's nn.Linear layout; `expert_layout`): with the reduction dim
contiguous they stream fp8 experts 1.4-1.8x faster. `swap_expert_axes` turns one layout into the other.

On a mesh `experts_sharded` runs the MoE inside `jax.shard_map` with one of two dispatches:
- "replicated" (few tokens, decode): every expert shard sees all tokens of its data shard
  (all-gathered first when the batch is split over the expert axis), keeps the assignments
  to its own experts, and the partial outputs are summed with `psum` (`psum_scatter` back to
  each shard's own tokens when the batch is split over the expert axis). From
  `SPLIT_ROUTING_MIN_TOKENS` tokens on, each shard routes only a slice of them and the routing
  (weights, ids) is all-gathered.
- "all_to_all" (many tokens, prefill): each expert shard routes its own tokens (its batch
  slice, or 1/S of replicated tokens) and sends each token once to every shard owning one of
  its experts (`jax.lax.all_to_all` with per-destination buffers); the owners send results
  back (replicated tokens are then all-gathered).
  (`jax.lax.ragged_all_to_all` would move fewer bytes but XLA:CPU does not implement it.)
Expert weights may also be split over the tensor axis along the intermediate dim (`moe_mlp`);
those partial outputs are summed over `tensor`. No token is dropped unless a capacity factor
is given; then the dropped (token, shard) pairs are counted and returned.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from mimo_jax import kernels, quant
from mimo_jax.config import MOE_STRATEGIES


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
    combine = jnp.zeros((n, e), jnp.float32).at[jnp.arange(n)[:, None], ids].add(weights, mode="drop")
    g = jnp.einsum("nh,ehi->nei", x, w_gate)
    u = jnp.einsum("nh,ehi->nei", x, w_up)
    y = jnp.einsum("nei,eih->neh", _swiglu(x, g, u), w_down, preferred_element_type=jnp.float32)
    return jnp.einsum("neh,ne->nh", y, combine).astype(x.dtype)


def sort_by_expert(ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Flattened (token, k) assignments sorted by expert: (order [N*K], group_sizes [E]).

    Ids >= num_experts sort last and fall outside every group (ragged_dot gives them zeros).
    """
    flat = ids.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def experts_ragged(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    w8a8: str = "off",
) -> jax.Array:
    """Grouped matmul over tokens sorted by expert; same contract as `experts_dense`.

    Block-quantized FP8 experts (`quant.BlockQuantized`) are dequantized here, a few experts at a time
    (`quant.dequantize_experts`): inside the expert-parallel shard_map that is this shard's experts.
    `w8a8` ("prefill": at the GPU kernel's prefill sizes, "always"): FP8 experts see x and h rounded as the
    w8a8 kernels quantize them (`quant.round_activations`), the GPU kernels' numerics in XLA.
    """
    n, k = ids.shape
    order, group_sizes = sort_by_expert(ids, w_gate.shape[0])
    token = order // k
    xs = x[token]
    if _rounds_activations(w8a8, n * k, w_gate):
        xs = quant.round_activations(xs)
    # one projection's dequantized experts at a time: each waits for the previous product (`quant.tied`)
    g = jax.lax.ragged_dot(xs, quant.dequantize_experts(w_gate), group_sizes)
    u = jax.lax.ragged_dot(xs, quant.dequantize_experts(quant.tied(w_up, g)), group_sizes)
    h = _swiglu(xs, g, u)
    if _rounds_activations(w8a8, n * k, w_gate):
        h = quant.round_activations(h)
    w_down = quant.dequantize_experts(quant.tied(w_down, h))
    y = jax.lax.ragged_dot(h, w_down, group_sizes, preferred_element_type=jnp.float32)
    y = y * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[1]), jnp.float32).at[token].add(y).astype(x.dtype)


def _rounds_activations(w8a8: str, assignments: int, w_gate) -> bool:
    """Whether `w8a8` applies to FP8 experts at this many assignments (static), as the GPU kernel decides."""
    if not isinstance(w_gate, quant.BlockQuantized) or w8a8 == "off":
        return False
    dims_fit = all(d % quant.ACTIVATION_GROUP == 0 for d in w_gate.shape[1:])
    return dims_fit and (w8a8 == "always" or assignments / w_gate.shape[0] > kernels.W8A8_MIN_ROWS_PER_EXPERT)


def experts_gather(
    x: jax.Array, weights: jax.Array, ids: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Each token gathers its K chosen experts' weights: reads only those experts (decode with few tokens;
    at many tokens it reads an expert once per token that chose it). Same contract as `experts_dense`."""
    weights = jnp.where(ids < w_gate.shape[0], weights, 0.0)  # ids >= E are experts not on this shard
    g = jnp.einsum("nh,nkhi->nki", x, w_gate[ids])
    u = jnp.einsum("nh,nkhi->nki", x, w_up[ids])
    y = jnp.einsum("nki,nkih->nkh", _swiglu(x, g, u), w_down[ids], preferred_element_type=jnp.float32)
    return jnp.einsum("nkh,nk->nh", y, weights).astype(x.dtype)


def experts_gather_fused(
    x: jax.Array, weights: jax.Array, ids: jax.Array, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """`experts_gather` as multiply-and-reduce, so XLA can fuse the weight gather into the reduction
    (reading each chosen expert once, no gathered copy). For one or a few tokens per step."""
    weights = jnp.where(ids < w_gate.shape[0], weights, 0.0)  # ids >= E are experts not on this shard
    xf = x.astype(jnp.float32)
    g = jnp.sum(xf[:, None, :, None] * w_gate[ids], axis=2)  # [N, K, I]
    u = jnp.sum(xf[:, None, :, None] * w_up[ids], axis=2)
    h = _swiglu(x, g, u)
    y = jnp.sum(h[:, :, :, None] * w_down[ids], axis=2)  # [N, K, H]
    return jnp.einsum("nkh,nk->nh", y, weights).astype(x.dtype)


def swapped_axes(entries: Any) -> tuple:
    """(experts, a, b) -> (experts, b, a): the logical axes or PartitionSpec entries of stacked expert weights."""
    entries = tuple(entries) + (None,) * (3 - len(entries))
    return entries[0], entries[2], entries[1]


def swap_expert_axes(w: Any) -> Any:
    """Stacked expert weights [E, a, b] -> [E, b, a]: an array (a placed one stays where it is, its
    NamedSharding permuted alike), a `jax.ShapeDtypeStruct`, or `quant.BlockQuantized` (values, scales and
    block transposed together)."""
    if isinstance(w, quant.BlockQuantized):
        block = swapped_axes(w.block)
        return dataclasses.replace(w, values=swap_expert_axes(w.values), scales=swap_expert_axes(w.scales), block=block)
    if isinstance(w, jax.ShapeDtypeStruct):
        sharding = w.sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, PartitionSpec(*swapped_axes(sharding.spec)))
        return jax.ShapeDtypeStruct(swapped_axes(w.shape), w.dtype, sharding=sharding)
    return jnp.swapaxes(w, 1, 2)


EXPERT_IMPLS = {
    "dense": experts_dense,
    "ragged": experts_ragged,
    "gather": experts_gather,
    "gather_fused": experts_gather_fused,
    "pallas_gpu": kernels.experts_pallas_gpu,
    "pallas_gpu_w8a8": kernels.experts_pallas_gpu_w8a8,
}
# Implementations that take a `w8a8` mode (`RunOptions.w8a8`); the others compute as "off".
W8A8_IMPLS = frozenset({"ragged", "pallas_gpu"})
# Implementations that take `quant.BlockQuantized` expert weights as they are (dequantizing in the kernel).
QUANTIZED_IMPLS = frozenset({"ragged", "pallas_gpu", "pallas_gpu_w8a8"})
# Implementations that read the weights transposed ("out_in"); the rest read "in_out" (bench/RESULTS.md,
# MoE kernel run 6: fp8 decode 1.4x faster from [E, out, in] on an H200).
_OUT_IN_IMPLS = frozenset({"pallas_gpu", "pallas_gpu_w8a8"})


def expert_fn(impl: str, w8a8: str = "off") -> Callable:
    """The EXPERT_IMPLS function `impl` with its `w8a8` mode bound (where it takes one)."""
    fn = EXPERT_IMPLS[impl]
    return functools.partial(fn, w8a8=w8a8) if impl in W8A8_IMPLS and w8a8 != "off" else fn


def expert_layout(impl: str) -> str:
    """The layout implementation `impl` reads expert weights in: "in_out" ([E, H, I] gate/up, [E, I, H]
    down) or "out_in" (each transposed)."""
    return "out_in" if impl in _OUT_IN_IMPLS else "in_out"


def read_experts(param, impl: str, after: jax.Array, spec: PartitionSpec | None = None, mesh=None):
    """Stacked expert weights (a parameter or raw value) as `impl` takes them, ordered after `after`: FP8
    blocks as stored for `QUANTIZED_IMPLS` when each shard (by `spec` on `mesh`) holds whole scale blocks
    (dequantized per shard or in the kernel), else dequantized here."""
    value = param.get_value() if hasattr(param, "get_value") else param
    if impl in QUANTIZED_IMPLS and quant.blocks_split_evenly(value, spec, mesh):
        return quant.tied(value, after)
    return quant.weight(param, after=after)


# --- Expert parallelism on a mesh -----------------------------------------------------------

# Tokens per data shard at or above which "auto" dispatches with all_to_all instead of replicating
# tokens over the expert shards. On 2 x H200 (bench/bench_moe.py, bench/RESULTS.md) replicated was as
# fast or faster from 64 to 8192 tokens; past that the replicated buffers (tokens x top_k rows per
# shard) grow with the whole batch, so all_to_all takes over.
ALL_TO_ALL_MIN_TOKENS = 16384

# Replicated tokens at or above this count are routed 1/S per expert shard and the (weights, ids) all-gathered,
# instead of every shard running the router over every token (at 8192 tokens on 4 x H200 the replicated
# routing was ~0.2 ms of a 2.4 ms layer, bench/RESULTS.md); below it one all-gather's latency costs more.
SPLIT_ROUTING_MIN_TOKENS = 2048

STRATEGIES = MOE_STRATEGIES

RouteFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


def choose_strategy(strategy: str, tokens_per_data_shard: int, expert_shards: int) -> str:
    """The dispatch a MoE call uses: "replicated" or "all_to_all" (static: shapes decide)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown MoE strategy {strategy!r}; choose from {STRATEGIES}")
    if expert_shards == 1:
        return "replicated"  # nothing to send anywhere
    if strategy == "auto":
        return "all_to_all" if tokens_per_data_shard >= ALL_TO_ALL_MIN_TOKENS else "replicated"
    return strategy


def buffer_capacity(tokens: int, top_k: int, expert_shards: int, capacity_factor: float | None) -> int:
    """Rows of one shard's dispatch buffer: every token (never drops) or capacity_factor x the mean load."""
    if capacity_factor is None:
        return tokens
    if capacity_factor <= 0:
        raise ValueError(f"capacity_factor={capacity_factor}: must be > 0 (or None for no dropping)")
    return max(1, min(tokens, math.ceil(capacity_factor * tokens * top_k / expert_shards)))


def _local_assignments(
    weights: jax.Array, ids: jax.Array, first_expert: jax.Array, local_experts: int
) -> tuple[jax.Array, jax.Array]:
    """Global expert ids -> ids of this shard's experts; other experts become `local_experts` with weight 0."""
    local = ids - first_expert
    here = (local >= 0) & (local < local_experts)
    return jnp.where(here, weights, 0.0), jnp.where(here, local, local_experts).astype(jnp.int32)


def _pack(wanted: jax.Array, capacity: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Compact the rows where `wanted` [..., N] into `capacity` slots, in order.

    Returns (source row of each slot [..., capacity], N = empty; slot of each row [..., N],
    capacity = not sent; rows that did not fit).
    """
    n = wanted.shape[-1]
    position = jnp.cumsum(wanted, axis=-1, dtype=jnp.int32) - 1
    kept = wanted & (position < capacity)
    slot = jnp.where(kept, position, capacity)
    rows = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), wanted.shape)
    lead = tuple(jnp.indices(wanted.shape[:-1], sparse=True))
    lead = tuple(i[..., None] for i in lead)
    source = jnp.full((*wanted.shape[:-1], capacity), n, jnp.int32).at[(*lead, slot)].set(rows, mode="drop")
    return source, slot, (wanted.sum() - kept.sum()).astype(jnp.int32)


def _take_rows(a: jax.Array, rows: jax.Array, fill) -> jax.Array:
    return jnp.take(a, rows, axis=0, mode="fill", fill_value=fill)


def experts_sharded(
    x: jax.Array,
    router: jax.Array,
    correction_bias: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    route_fn: RouteFn,
    top_k: int,
    mesh: jax.sharding.Mesh | jax.sharding.AbstractMesh,
    gate_spec: PartitionSpec,
    token_axes: str | tuple[str, ...] | None,
    impl: str = "ragged",
    strategy: str = "auto",
    capacity_factor: float | None = None,
    w8a8: str = "off",
) -> tuple[jax.Array, jax.Array]:
    """Routed MoE of x [N, H] on a mesh -> (out [N, H] laid out like x, dropped (token, shard) pairs int32).

    The weights come in `expert_layout(impl)`. `gate_spec` is the PartitionSpec of w_gate ([E, H, I];
    [E, I, H] for "out_in") (experts over an expert axis, the intermediate dim optionally over a tensor
    axis); w_up has the same, w_down its transpose. `token_axes`: the mesh axes the tokens are split over
    (None: replicated). Tokens split over the expert axis too (data-parallel attention) are gathered for
    "replicated" and scattered back with `psum_scatter`; for "all_to_all" each shard dispatches its own tokens.
    `w8a8`: the mode handed to implementations that take one (`expert_fn`).
    """
    out_in = expert_layout(impl) == "out_in"
    gate_spec = swapped_axes(gate_spec) if out_in else tuple(gate_spec) + (None,) * (3 - len(gate_spec))
    expert_axis, embed_axis, mlp_axis = gate_spec  # in the "in_out" order from here on
    if embed_axis is not None:
        raise ValueError(f"expert weights split over the hidden dim ({gate_spec}) are not supported")
    token_axes = () if token_axes is None else (token_axes,) if isinstance(token_axes, str) else tuple(token_axes)
    local_fn = expert_fn(impl, w8a8)
    expert_shards = mesh.shape[expert_axis] if expert_axis else 1
    split = expert_axis is not None and expert_axis in token_axes  # each expert shard holds its own tokens
    other_token_axes = tuple(a for a in token_axes if a != expert_axis)
    group_tokens = x.shape[0] // math.prod(mesh.shape[a] for a in other_token_axes)  # one expert group's tokens
    mode = choose_strategy(strategy, group_tokens, expert_shards)

    def route_all(x, router, bias):
        """(weights, ids) of every token x [N, H] on every expert shard."""
        n = x.shape[0]
        if expert_shards == 1 or n < SPLIT_ROUTING_MIN_TOKENS:
            return route_fn(x, router, bias)
        mine = -(-n // expert_shards)  # this shard routes rows [shard * mine, ...), then all shards share
        padded = jnp.pad(x, ((0, mine * expert_shards - n), (0, 0)))
        rows = jax.lax.dynamic_slice_in_dim(padded, jax.lax.axis_index(expert_axis) * mine, mine)
        gathered = [jax.lax.all_gather(a, expert_axis, tiled=True) for a in route_fn(rows, router, bias)]
        return tuple(a[:n] for a in gathered)

    def replicated(x, router, bias, w_gate, w_up, w_down):
        if split:
            x = jax.lax.all_gather(x, expert_axis, tiled=True)
        n, local_experts = x.shape[0], w_gate.shape[0]
        shard = jax.lax.axis_index(expert_axis) if expert_axis else 0
        weights, ids = _local_assignments(*route_all(x, router, bias), shard * local_experts, local_experts)
        capacity = buffer_capacity(n, top_k, expert_shards, capacity_factor)
        dropped = jnp.int32(0)
        if capacity == n:
            out = local_fn(x, weights, ids, w_gate, w_up, w_down)
        else:  # only the tokens that fit in the buffer get computed
            source, slot, dropped = _pack((ids < local_experts).any(-1), capacity)
            packed = local_fn(
                _take_rows(x, source, 0),
                _take_rows(weights, source, 0),
                _take_rows(ids, source, local_experts),
                w_gate,
                w_up,
                w_down,
            )
            out = _take_rows(packed, slot, 0)
            dropped = jax.lax.psum(dropped, expert_axis) if expert_axis else dropped
        if split:  # each shard keeps the sum for its own tokens
            out = jax.lax.psum_scatter(out, expert_axis, scatter_dimension=0, tiled=True)
            return jax.lax.psum(out, mlp_axis) if mlp_axis else out, dropped
        sum_axes = tuple(a for a in (expert_axis, mlp_axis) if a)
        return jax.lax.psum(out, sum_axes) if sum_axes else out, dropped

    def all_to_all(x, router, bias, w_gate, w_up, w_down):
        n, hidden, local_experts = x.shape[0], x.shape[1], w_gate.shape[0]
        shards, shard = expert_shards, jax.lax.axis_index(expert_axis)
        if split:
            x_mine, mine, real = x, n, jnp.ones((n,), bool)
        else:  # tokens replicated over the expert axis: this shard dispatches rows [shard * mine, ...)
            mine = -(-n // shards)
            x = jnp.pad(x, ((0, mine * shards - n), (0, 0)))
            x_mine = jax.lax.dynamic_slice_in_dim(x, shard * mine, mine)
            real = (shard * mine + jnp.arange(mine)) < n  # padding rows go nowhere
        weights, ids = route_fn(x_mine, router, bias)
        owner = ids // local_experts  # [mine, K]
        dest = jnp.arange(shards, dtype=jnp.int32)[:, None, None]
        to_dest = (owner[None] == dest) & real[None, :, None]  # [S, mine, K]
        capacity = buffer_capacity(mine, top_k, shards, capacity_factor)
        source, slot, dropped = _pack(to_dest.any(-1), capacity)  # [S, capacity], [S, mine]
        send_ids = jnp.where(to_dest, ids[None] - dest * local_experts, local_experts)
        send_w = jnp.where(to_dest, weights[None], 0.0)
        gather = jax.vmap(_take_rows, in_axes=(0, 0, None))
        send_x = _take_rows(x_mine, source, 0)  # [S, capacity, H]
        send_ids = gather(send_ids, source, local_experts)
        send_w = gather(send_w, source, 0)

        def exchange(a):
            return jax.lax.all_to_all(a, expert_axis, 0, 0)

        recv_x, recv_ids, recv_w = exchange(send_x), exchange(send_ids), exchange(send_w)
        flat = shards * capacity
        out = local_fn(
            recv_x.reshape(flat, hidden),
            recv_w.reshape(flat, top_k),
            recv_ids.reshape(flat, top_k),
            w_gate,
            w_up,
            w_down,
        )
        if mlp_axis:
            out = jax.lax.psum(out, mlp_axis)
        back = exchange(out.reshape(shards, capacity, hidden))  # results for the rows this shard sent
        out_mine = gather(back, slot, 0).astype(jnp.float32).sum(0).astype(x.dtype)
        dropped = jax.lax.psum(dropped, expert_axis)
        if split:
            return out_mine, dropped
        return jax.lax.all_gather(out_mine, expert_axis, tiled=True, to="invarying")[:n], dropped

    body = replicated if mode == "replicated" else all_to_all

    def counted(*args):
        out, dropped = body(*args)
        return out, jax.lax.psum(dropped, other_token_axes) if other_token_axes else dropped

    token_spec = PartitionSpec(token_axes or None, None)
    gate_spec, down_spec = (expert_axis, None, mlp_axis), (expert_axis, mlp_axis, None)
    if out_in:
        gate_spec, down_spec = swapped_axes(gate_spec), swapped_axes(down_spec)
    gate_spec, down_spec = PartitionSpec(*gate_spec), PartitionSpec(*down_spec)
    replicated_spec = PartitionSpec()
    return jax.shard_map(
        counted,
        mesh=mesh,
        in_specs=(token_spec, replicated_spec, replicated_spec, gate_spec, gate_spec, down_spec),
        out_specs=(token_spec, replicated_spec),
    )(x, router, correction_bias, w_gate, w_up, w_down)
