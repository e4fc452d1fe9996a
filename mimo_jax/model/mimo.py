"""MiMo-V2 decoder in Flax NNX: hybrid full/SWA attention with sinks, dense and MoE SwiGLU.

Every parameter carries `logical_axes` metadata; `mimo_jax.sharding` maps those names to mesh
axes. Weights are stored input-major (`x @ W`), attention projections per head. How the model computes
(kernels, MoE dispatch) is a `RunOptions` fixed when it is built: `MiMoModel.with_options` gives another
view over the same weights, `relayout_experts` stores the experts in the layout a kernel reads.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec

from mimo_jax import kernels, quant, sharding
from mimo_jax.config import LayerSpec, MiMoConfig, RunOptions
from mimo_jax.model import moe
from mimo_jax.model.attention import (
    ATTENTION_IMPLS,
    PAGED_IMPLS,
    PAGED_KERNEL_MAX_QUERIES,
    RING_IMPLS,
    apply_rope,
    attention,
    attention_paged,
    ring_kernel,
    ring_kernel_fits,
    rope_cos_sin,
)
from mimo_jax.model.cache import (
    LayerKV,
    PagedKV,
    heads_major,
    ring_holds_window,
    update_and_read,
    write_pages,
    write_ring,
)
from mimo_jax.quant import weight

_INIT_STD = 0.02
_HIDDEN_AXES = ("batch", None, "embed")  # residual stream [B, T, H]
LayerCache = LayerKV | PagedKV  # a layer's cache: contiguous slots or a ring (LayerKV), or pages (full layers)


class DraftVocab(nnx.Variable):
    """The MTP drafts' reduced vocabulary (`with_draft_vocab`): derived from lm_head, never a checkpoint tensor,
    so the loader, exporter and Orbax store (which handle `nnx.Param`s) leave it alone."""


def _param(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, axes: tuple[str | None, ...], init: str = "normal"):
    if init == "ones":
        value = jnp.ones(shape, dtype)
    elif init == "zeros" or rngs is None:
        value = jnp.zeros(shape, dtype)
    else:
        value = (_INIT_STD * jax.random.normal(rngs.params(), shape, jnp.float32)).astype(dtype)
    return nnx.Param(value, logical_axes=axes)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return weight * y.astype(x.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, dtype, rngs: nnx.Rngs | None = None):
        self.weight = _param(rngs, (dim,), dtype, ("norm",), init="ones")
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        return rms_norm(x, self.weight[...], self.eps)


def project(x: jax.Array, param, w8a8: str = "off", platform: str = "cpu") -> jax.Array:
    """x [..., K] @ W [K, *out] (`quant.project`), or with `w8a8` "always" and a `quant.w8a8_ready` FP8 weight
    ("prefill" keeps dense projections on XLA: its dequantized GEMM beats the dense w8a8 kernel): x quantized per
    (row, 128 columns), on the Pallas fp8 GEMM on GPU off a multi-device mesh (a pallas_call is not partitioned),
    else x rounded so in XLA (the same numerics)."""
    value = param.get_value() if hasattr(param, "get_value") else param
    if w8a8 != "always" or not quant.w8a8_ready(value):
        return quant.project(x, param, platform)
    mesh = sharding.current_mesh()
    if platform == "gpu" and (mesh is None or mesh.size == 1):
        return kernels.matmul_w8a8_gpu(x, quant.tied(value, x))
    return quant.project(quant.round_activations(x), param, platform)


class Attention(nnx.Module):
    def __init__(
        self,
        spec: LayerSpec,
        hidden: int,
        value_scale: float,
        dtype,
        rngs: nnx.Rngs | None,
        impl: str = "xla",
        paged_impl: str = "xla",
        w8a8: str = "off",
        platform: str = "cpu",
        ring_impl: str = "xla",
    ):
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
        if paged_impl not in PAGED_IMPLS:
            raise ValueError(f"unknown paged attention implementation {paged_impl!r}; choose from {PAGED_IMPLS}")
        if ring_impl not in RING_IMPLS:
            raise ValueError(f"unknown ring attention implementation {ring_impl!r}; choose from {RING_IMPLS}")
        self.spec = spec
        self.value_scale = value_scale
        n, kv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
        self.q_proj = _param(rngs, (hidden, n, d), dtype, ("embed", "q_heads", "head_dim"))
        self.k_proj = _param(rngs, (hidden, kv, d), dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = _param(rngs, (hidden, kv, dv), dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = _param(rngs, (n, dv, hidden), dtype, ("q_heads", "head_dim", "embed"))
        self.sink = _param(rngs, (n,), jnp.float32, ("q_heads",)) if spec.has_sink else None
        self.impl = impl  # see mimo_jax.model.attention.ATTENTION_IMPLS
        self.paged_impl = paged_impl  # decode rows over a paged cache: PAGED_IMPLS
        self.ring_impl = ring_impl  # decode rows over an SWA ring: RING_IMPLS
        self.w8a8, self.platform = w8a8, platform  # q/k/v on fp8 activations (`project`)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache | None]:
        spec = self.spec
        q = project(x, self.q_proj, self.w8a8, self.platform)
        k = project(x, self.k_proj, self.w8a8, self.platform)
        v = project(x, self.v_proj, self.w8a8, self.platform) * jnp.asarray(self.value_scale, x.dtype)
        cos, sin = rope_cos_sin(positions, spec.rotary_dim, spec.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        chunk_kv = sharding.spread_kv_heads(k, v, spec.num_heads, heads_axis=2) if self.impl != "xla" else None
        common = dict(
            window_keys=spec.window_keys,
            sink=None if self.sink is None else self.sink[...],
            scale=spec.head_dim**-0.5,
            impl=self.impl,
            chunk_kv=chunk_kv,
        )
        if isinstance(kv_cache, PagedKV):
            if spec.sliding:
                raise ValueError("a sliding-window layer got a paged cache: SWA layers keep rings (LayerKV)")
            kv_cache = write_pages(kv_cache, k, v, positions)
            out = attention_paged(q, kv_cache, positions, paged_impl=self.paged_impl, **common)
        elif kv_cache is not None and self._ring_kernel(kv_cache, q.shape):
            kv_cache = write_ring(kv_cache, k, v, positions)
            ring_args = dict(sink=common["sink"], scale=common["scale"], interpret=self.ring_impl == "pallas_interpret")
            out = ring_kernel(q, kv_cache, positions, window=spec.window_keys, **ring_args)
        else:
            if kv_cache is None:
                keys, values, key_pos = heads_major(k), heads_major(v), positions
            else:
                keys, values, key_pos, kv_cache = update_and_read(kv_cache, k, v, positions)
            keys, values = sharding.spread_kv_heads(keys, values, spec.num_heads)
            full_slots = kv_cache is not None and not kv_cache.ring
            out = attention(q, keys, values, positions, key_pos, slot_is_position=full_slots, **common)
        return jnp.einsum("btnd,ndh->bth", out, weight(self.o_proj, after=out)), kv_cache

    def _ring_kernel(self, cache: LayerKV, q_shape: tuple) -> bool:
        """Whether decode rows q [B, T, N, D] over this ring go through the ring kernel (`RING_IMPLS`)."""
        return (
            self.ring_impl != "xla"
            and cache.ring
            and q_shape[1] <= PAGED_KERNEL_MAX_QUERIES
            and ring_holds_window(cache.slots, self.spec.window_keys, q_shape[1])
            and (self.ring_impl != "pallas_gpu" or cache.slots >= 16)  # Triton's smallest dot
            and ring_kernel_fits(q_shape, cache)
        )


class MLP(nnx.Module):
    """Dense SwiGLU (`w8a8` / `platform`: see `project`)."""

    def __init__(
        self, hidden: int, intermediate: int, dtype, rngs: nnx.Rngs | None, w8a8: str = "off", platform: str = "cpu"
    ):
        self.gate_proj = _param(rngs, (hidden, intermediate), dtype, ("embed", "mlp"))
        self.up_proj = _param(rngs, (hidden, intermediate), dtype, ("embed", "mlp"))
        self.down_proj = _param(rngs, (intermediate, hidden), dtype, ("mlp", "embed"))
        self.w8a8, self.platform = w8a8, platform

    def __call__(self, x: jax.Array) -> jax.Array:
        gate = project(x, self.gate_proj, self.w8a8, self.platform)
        h = jax.nn.silu(gate) * project(x, self.up_proj, self.w8a8, self.platform)
        return project(h, self.down_proj, self.w8a8, self.platform)


class MoE(nnx.Module):
    """Routed experts computed by `options.expert_impl` (see `mimo_jax.model.moe.EXPERT_IMPLS`).

    Traced under a mesh (`jax.set_mesh`) whose expert or tensor axis splits the experts, it runs
    expert-parallel in `jax.shard_map` (`moe.experts_sharded`); `options.moe_strategy` picks the
    dispatch ("auto" decides by token count) and `options.capacity_factor` (None = never drop) bounds
    the per-shard buffers, sowing the dropped count as `nnx.Intermediate` "dropped_tokens" (read it
    with `nnx.capture(model, nnx.Intermediate)`). Parameters placed on a mesh traced without it raise.

    The expert weights are made and imported as [E, H, I] / [E, I, H] (`layout` "in_out");
    `relayout_experts` stores them in the layout the implementation reads (`moe.expert_layout`: the
    GPU kernel's "out_in"), else each call hands them over transposed.
    """

    GATE_AXES = ("experts", "embed", "moe_mlp")
    DOWN_AXES = ("experts", "moe_mlp", "embed")

    def __init__(self, cfg: MiMoConfig, dtype, rngs: nnx.Rngs | None, options: RunOptions, layout: str = "in_out"):
        impl = options.expert_impl
        if impl not in moe.EXPERT_IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose from {sorted(moe.EXPERT_IMPLS)}")
        if layout not in kernels.EXPERT_LAYOUTS:
            raise ValueError(f"unknown expert layout {layout!r}; choose from {kernels.EXPERT_LAYOUTS}")
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = _param(rngs, (e, h), jnp.float32, ("experts_replicated", "embed_replicated"))
        self.correction_bias = _param(rngs, (e,), jnp.float32, ("experts_replicated",), init="zeros")
        gate_axes, down_axes = self._axes(layout)
        gate_shape, down_shape = ((e, i, h), (e, h, i)) if layout == "out_in" else ((e, h, i), (e, i, h))
        self.gate_proj = _param(rngs, gate_shape, dtype, gate_axes)
        self.up_proj = _param(rngs, gate_shape, dtype, gate_axes)
        self.down_proj = _param(rngs, down_shape, dtype, down_axes)
        self.top_k = cfg.experts_per_token
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.impl = impl
        self.layout = layout  # of gate/up/down as stored (see `relayout_experts`)
        self.strategy = options.moe_strategy
        self.capacity_factor = options.capacity_factor
        self.w8a8 = options.w8a8_mode

    def __call__(self, x: jax.Array) -> jax.Array:
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        route = functools.partial(
            moe.route,
            top_k=self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            scaling=self.scaling,
        )
        mesh = sharding.current_mesh()
        if mesh is None:
            sharding.require_active_mesh(self.gate_proj.get_value(), "MoE experts")
        gate_axes, down_axes = self._axes(self.layout)
        gate_spec = sharding.logical_to_spec(gate_axes, self.gate_proj.get_value().shape, mesh) if mesh else None
        down_spec = sharding.logical_to_spec(down_axes, self.down_proj.get_value().shape, mesh) if mesh else None
        experts = tuple(
            moe.read_experts(p, self.impl, x, spec, mesh)
            for p, spec in ((self.gate_proj, gate_spec), (self.up_proj, gate_spec), (self.down_proj, down_spec))
        )
        if self.layout != moe.expert_layout(self.impl):  # not re-laid out (`relayout_experts`): transposed per call
            experts = tuple(moe.swap_expert_axes(w) for w in experts)
            gate_spec = None if gate_spec is None else PartitionSpec(*moe.swapped_axes(gate_spec))
        if not any(gate_spec or ()):  # one device, or experts not split: plain math
            weights, ids = route(flat, self.router[...], self.correction_bias[...])
            out = moe.expert_fn(self.impl, self.w8a8)(flat, weights, ids, *experts)
            return out.reshape(shape)
        batch_axes = ("batch",) + (None,) * (len(shape) - 1)
        token_axes = sharding.logical_to_spec(batch_axes, shape, mesh)[0]  # the mesh axes the batch is split over
        out, dropped = moe.experts_sharded(
            flat,
            self.router[...],
            self.correction_bias[...],
            *experts,
            route_fn=route,
            top_k=self.top_k,
            mesh=mesh,
            gate_spec=gate_spec,
            token_axes=token_axes,
            impl=self.impl,
            strategy=self.strategy,
            capacity_factor=self.capacity_factor,
            w8a8=self.w8a8,
        )
        if self.capacity_factor is not None:
            self.sow(nnx.Intermediate, "dropped_tokens", dropped)
        return out.reshape(shape)

    @classmethod
    def _axes(cls, layout: str) -> tuple[tuple, tuple]:
        """Logical axes of (gate/up, down) weights stored in `layout`."""
        if layout == "out_in":
            return moe.swapped_axes(cls.GATE_AXES), moe.swapped_axes(cls.DOWN_AXES)
        return cls.GATE_AXES, cls.DOWN_AXES

    def _store_in(self, layout: str) -> None:
        """Transpose gate/up/down into `layout` on their devices one at a time, each old buffer freed at once
        (a whole model needs room for one more weight only). Private to `relayout_experts` and saving: it
        changes this module's graph, so callers build a new view or restore the layout."""
        if layout not in kernels.EXPERT_LAYOUTS:
            raise ValueError(f"unknown expert layout {layout!r}; choose from {kernels.EXPERT_LAYOUTS}")
        if layout == self.layout:
            return
        gate_axes, down_axes = self._axes(layout)
        for param, axes in ((self.gate_proj, gate_axes), (self.up_proj, gate_axes), (self.down_proj, down_axes)):
            old = param.get_value()
            param.set_value(moe.swap_expert_axes(old))
            param.set_metadata(logical_axes=axes)
            for leaf in jax.tree.leaves(old):
                if isinstance(leaf, jax.Array):
                    leaf.delete()
        self.layout = layout


class DecoderLayer(nnx.Module):
    def __init__(
        self, cfg: MiMoConfig, spec: LayerSpec, dtype, rngs: nnx.Rngs | None, options: RunOptions, expert_layout: str
    ):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        w8a8 = dict(w8a8=options.w8a8_mode, platform=options.platform)
        self.self_attn = Attention(
            spec,
            cfg.hidden_size,
            cfg.value_scale,
            dtype,
            rngs,
            options.attention_impl,
            options.paged_attention_impl,
            **w8a8,
            ring_impl=options.ring_attention_impl,
        )
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if spec.moe:
            self.mlp = MoE(cfg, dtype, rngs, options, expert_layout)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs, **w8a8)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: LayerCache | None
    ) -> tuple[jax.Array, LayerCache | None]:
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class MTPLayer(nnx.Module):
    """One multi-token-prediction layer: [norm(embed(token)); norm(hidden)] -> eh_proj -> SWA block."""

    def __init__(self, cfg: MiMoConfig, dtype, rngs: nnx.Rngs | None, options: RunOptions, expert_layout: str):
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.eh_proj = _param(rngs, (2 * h, h), dtype, ("embed_replicated", "embed"))
        self.block = DecoderLayer(cfg, cfg.mtp_layer(), dtype, rngs, options, expert_layout)
        self.final_layernorm = RMSNorm(h, cfg.rms_norm_eps, dtype)

    def __call__(
        self, token_embeds: jax.Array, hidden: jax.Array, positions: jax.Array, kv_cache: LayerKV | None
    ) -> tuple[jax.Array, LayerKV | None]:
        """Returns the block's residual stream (before `final_layernorm`) and the new cache."""
        x = jnp.concatenate([self.enorm(token_embeds), self.hnorm(hidden)], axis=-1)
        x = x @ weight(self.eh_proj, after=x)
        return self.block(x, positions, kv_cache)


class MiMoModel(nnx.Module):
    """The causal LM. `rngs=None` builds zero weights (to be filled by the importer).

    `mtp_layers` > 0 adds that many MTP layers (sharing embed_tokens and lm_head). `options`: how it
    computes (None: `RunOptions` for this process's backend); `expert_layout`: how the MoE weights are
    stored ("in_out" as imported; `relayout_experts` makes the kernel's layout). `draft_vocab` > 0: room for a
    reduced draft vocabulary of that many tokens (zeros; `with_draft_vocab` fills it from lm_head).
    """

    def __init__(
        self,
        cfg: MiMoConfig,
        dtype=jnp.float32,
        rngs: nnx.Rngs | None = None,
        mtp_layers: int = 0,
        options: RunOptions | None = None,
        expert_layout: str = "in_out",
        draft_vocab: int = 0,
    ):
        options = options or RunOptions.for_platform(jax.default_backend())
        self.config = cfg
        self.options = options
        self.expert_layout = expert_layout
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype, rngs, options, expert_layout) for spec in cfg.layers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, ("embed", "vocab"))
        self.mtp = nnx.List([MTPLayer(cfg, dtype, rngs, options, expert_layout) for _ in range(mtp_layers)])
        # The drafts' lm_head over the `draft_vocab` most frequent tokens (FR-Spec): a copy of those lm_head
        # columns, so a draft step reads N/V of the full head; the verify keeps the full vocabulary (lossless).
        self.draft_vocab = draft_vocab
        self.draft_ids = nnx.data(DraftVocab(jnp.zeros((draft_vocab,), jnp.int32)) if draft_vocab else None)
        self.draft_head = nnx.data(
            DraftVocab(jnp.zeros((cfg.hidden_size, draft_vocab), dtype), logical_axes=("embed", "vocab"))
            if draft_vocab
            else None
        )

    def moe_layers(self) -> list[MoE]:
        return [m for layer in (*self.layers, *(t.block for t in self.mtp)) if isinstance(m := layer.mlp, MoE)]

    def with_options(self, options: RunOptions) -> MiMoModel:
        """Another view of this model's weights (the same arrays) that computes as `options` say; the experts
        stay in their stored layout (a kernel that reads the other one gets them transposed per call)."""
        return _view(self, options, self.expert_layout)

    def embed(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(weight(self.embed_tokens, after=token_ids), token_ids, axis=0)

    def hidden_states(
        self, token_ids: jax.Array, positions: jax.Array, cache: list[LayerCache] | None = None
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        """Residual stream after the last layer (before the final norm) [B, T, H], and the new cache.

        `cache`: one per layer, a LayerKV (contiguous slots or an SWA ring) or, for a full layer, a PagedKV
        (`cache.paged_layer_caches` builds that list from pools, a page table and rings)."""
        if sharding.current_mesh() is None:
            sharding.require_active_mesh(self.embed_tokens.get_value(), "the model's parameters")
        x = sharding.constrain(self.embed(token_ids), _HIDDEN_AXES)
        new_cache = [] if cache is not None else None
        for i, layer in enumerate(self.layers):
            with jax.named_scope(f"layer_{i}"):
                x, layer_cache = layer(x, positions, None if cache is None else cache[i])
                x = sharding.constrain(x, _HIDDEN_AXES)
            if new_cache is not None:
                new_cache.append(layer_cache)
        return x, new_cache

    def logits(self, hidden: jax.Array, norm: RMSNorm | None = None) -> jax.Array:
        """Final norm (the model's, or an MTP layer's) and lm_head -> float32 logits [..., vocab]."""
        h = (norm or self.norm)(hidden)
        if self.lm_head is None:
            logits = jnp.einsum(
                "...h,vh->...v", h, weight(self.embed_tokens, after=h), preferred_element_type=jnp.float32
            )
        else:
            logits = jnp.einsum("...h,hv->...v", h, weight(self.lm_head, after=h), preferred_element_type=jnp.float32)
        return _vocab_sharded(logits)

    def draft_logits(self, hidden: jax.Array, norm: RMSNorm) -> jax.Array:
        """An MTP layer's float32 logits [..., vocab] for drafting: `logits` over the draft vocabulary only (-inf
        for every other token) when the model has one (`with_draft_vocab`), else over the whole vocabulary."""
        if self.draft_head is None:
            return self.logits(hidden, norm)
        h = norm(hidden)
        reduced = jnp.einsum("...h,hn->...n", h, weight(self.draft_head, after=h), preferred_element_type=jnp.float32)
        full = jnp.full(reduced.shape[:-1] + (self.config.vocab_size,), -jnp.inf, jnp.float32)
        return _vocab_sharded(full.at[..., self.draft_ids[...]].set(reduced))

    def mtp_input(self, hidden: jax.Array) -> jax.Array:
        """What the MTP layers read of the target's residual stream `hidden`: after the final norm (the released
        checkpoints' wiring), or as it is for a checkpoint whose config says `mtp_hidden_before_norm`."""
        return hidden if self.config.mtp_hidden_before_norm else self.norm(hidden)

    def mtp_forward(
        self, k: int, token_ids: jax.Array, hidden: jax.Array, positions: jax.Array, kv_cache: LayerKV | None = None
    ) -> tuple[jax.Array, jax.Array, LayerKV | None]:
        """MTP layer k on (next tokens, the target's residual stream) -> (its hidden states, float32 logits, cache)."""
        layer = self.mtp[k]
        h, kv_cache = layer(self.embed(token_ids), self.mtp_input(hidden), positions, kv_cache)
        return h, self.logits(h, layer.final_layernorm), kv_cache

    def __call__(
        self, token_ids: jax.Array, positions: jax.Array | None = None, cache: list[LayerCache] | None = None
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1], dtype=jnp.int32), token_ids.shape)
        hidden, cache = self.hidden_states(token_ids, positions, cache)
        return self.logits(hidden), cache


def _vocab_sharded(logits: jax.Array) -> jax.Array:
    """Logits [batch, ..., vocab] constrained to the vocabulary's sharding (a vector passes as it is)."""
    if logits.ndim < 2:
        return logits
    return sharding.constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))


def _view(model: MiMoModel, options: RunOptions, expert_layout: str) -> MiMoModel:
    """A model built with (options, expert_layout) over `model`'s parameter arrays (no copy)."""
    cfg, dtype, mtp_layers, draft = model.config, model.dtype, len(model.mtp), model.draft_vocab
    abstract = nnx.eval_shape(lambda: MiMoModel(cfg, dtype, None, mtp_layers, options, expert_layout, draft))
    graphdef, _ = nnx.split(abstract)
    _, params = nnx.split(model)
    return nnx.merge(graphdef, params)


def with_draft_vocab(model: MiMoModel, token_ids: Any) -> MiMoModel:
    """`model` (same weight arrays) whose MTP drafts choose among `token_ids` only (FR-Spec): a copy of those
    lm_head columns is made on lm_head's devices (sharded as lm_head over the vocabulary), so each draft step
    reads len(token_ids) columns instead of the whole head. The verify still scores the full vocabulary, so
    what is emitted is unchanged (greedy: identical; sampled: the same distribution). Empty: no draft vocabulary.
    Works on abstract models too (ShapeDtypeStruct weights: the draft head is abstract)."""
    ids = np.asarray(token_ids)
    vocab = model.config.vocab_size
    if ids.ndim != 1 or not (ids.size == 0 or np.issubdtype(ids.dtype, np.integer)):
        raise ValueError(f"draft vocabulary: expected a 1-D list of token ids, got {ids.dtype} {ids.shape}")
    if ids.size and (ids.min() < 0 or ids.max() >= vocab):
        raise ValueError(f"draft vocabulary: token ids must lie in [0, {vocab}), got [{ids.min()}, {ids.max()}]")
    if np.unique(ids).size != ids.size:
        raise ValueError("draft vocabulary: token ids repeat")
    if ids.size and not len(model.mtp):
        raise ValueError("a draft vocabulary needs MTP layers (the model has none)")
    ids = ids.astype(np.int32)
    if model.lm_head is None:  # tied: lm_head = embed_tokens.T
        table, axis = model.embed_tokens.get_value(), 0
    else:
        table, axis = model.lm_head.get_value(), 1
    graphdef, params = nnx.split(model)
    out = nnx.merge(graphdef, params)  # a new module over the same arrays
    out.draft_vocab = int(ids.size)
    if not ids.size:
        out.draft_ids = out.draft_head = nnx.data(None)
        return out
    head_shape = (model.config.hidden_size, ids.size)
    placed = getattr(table, "sharding", None)
    if isinstance(table, jax.ShapeDtypeStruct):
        ids_value = jax.ShapeDtypeStruct(ids.shape, jnp.int32, sharding=_replicated_like(placed))
        head = jax.ShapeDtypeStruct(head_shape, table.dtype, sharding=_vocab_sharding_like(placed, head_shape))
    else:
        gather = lambda t, i: (quant.weight(t) if isinstance(t, quant.BlockQuantized) else t).take(i, axis=axis)
        take = jax.jit(
            lambda t, i: gather(t, i).T if axis == 0 else gather(t, i),
            out_shardings=_vocab_sharding_like(placed, head_shape),
        )
        ids_value = jax.device_put(ids, _replicated_like(placed))
        head = take(table, ids_value)
    out.draft_ids = nnx.data(DraftVocab(ids_value))
    out.draft_head = nnx.data(DraftVocab(head, logical_axes=("embed", "vocab")))
    return out


def _replicated_like(placed: jax.sharding.Sharding | None) -> jax.sharding.Sharding | None:
    if isinstance(placed, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(placed.mesh, PartitionSpec())
    return placed


def _vocab_sharding_like(placed: jax.sharding.Sharding | None, shape: tuple[int, ...]) -> jax.sharding.Sharding | None:
    """A [hidden, vocab-like] array placed as the rules place lm_head on `placed`'s mesh."""
    if isinstance(placed, jax.sharding.NamedSharding):
        return jax.sharding.NamedSharding(placed.mesh, sharding.logical_to_spec(("embed", "vocab"), shape, placed.mesh))
    return placed


def relayout_experts(model: MiMoModel, layout: str | None = None) -> MiMoModel:
    """`model` with its expert weights stored in `layout` (default: the one its MoE implementation reads,
    `moe.expert_layout`), transposed on their devices one weight at a time. Consumes `model`: its old expert
    buffers are freed (concrete arrays) and its graph no longer matches; use the returned model."""
    layout = layout or moe.expert_layout(model.options.expert_impl)
    if layout not in kernels.EXPERT_LAYOUTS:
        raise ValueError(f"unknown expert layout {layout!r}; choose from {kernels.EXPERT_LAYOUTS}")
    if layout == model.expert_layout:
        return model
    for layer in model.moe_layers():
        layer._store_in(layout)
    return _view(model, model.options, layout)
