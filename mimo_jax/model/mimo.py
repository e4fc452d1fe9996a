"""MiMo-V2 decoder in Flax NNX: hybrid full/SWA attention with sinks, dense and MoE SwiGLU.

Every parameter carries `logical_axes` metadata; `mimo_jax.sharding` maps those names to mesh
axes. Weights are stored input-major (`x @ W`), attention projections per head.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec

from mimo_jax import kernels, quant, sharding
from mimo_jax.config import LayerSpec, MiMoConfig
from mimo_jax.model import moe
from mimo_jax.model.attention import ATTENTION_IMPLS, apply_rope, attention, rope_cos_sin
from mimo_jax.model.cache import LayerKV, heads_major, update_and_read
from mimo_jax.quant import weight

_INIT_STD = 0.02
_HIDDEN_AXES = ("batch", None, "embed")  # residual stream [B, T, H]


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


class Attention(nnx.Module):
    def __init__(self, spec: LayerSpec, hidden: int, value_scale: float, dtype, rngs: nnx.Rngs | None):
        self.spec = spec
        self.value_scale = value_scale
        n, kv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
        self.q_proj = _param(rngs, (hidden, n, d), dtype, ("embed", "q_heads", "head_dim"))
        self.k_proj = _param(rngs, (hidden, kv, d), dtype, ("embed", "kv_heads", "head_dim"))
        self.v_proj = _param(rngs, (hidden, kv, dv), dtype, ("embed", "kv_heads", "head_dim"))
        self.o_proj = _param(rngs, (n, dv, hidden), dtype, ("q_heads", "head_dim", "embed"))
        self.sink = _param(rngs, (n,), jnp.float32, ("q_heads",)) if spec.has_sink else None
        self.impl = "xla"  # see mimo_jax.model.attention.ATTENTION_IMPLS

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: LayerKV | None
    ) -> tuple[jax.Array, LayerKV | None]:
        spec = self.spec
        q = quant.project(x, self.q_proj)
        k = quant.project(x, self.k_proj)
        v = quant.project(x, self.v_proj) * jnp.asarray(self.value_scale, x.dtype)
        cos, sin = rope_cos_sin(positions, spec.rotary_dim, spec.rope_theta, x.dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_cache is None:
            keys, values, key_pos = heads_major(k), heads_major(v), positions
        else:
            keys, values, key_pos, kv_cache = update_and_read(kv_cache, k, v, positions)
        keys, values = sharding.spread_kv_heads(keys, values, spec.num_heads)
        chunk_kv = sharding.spread_kv_heads(k, v, spec.num_heads, heads_axis=2) if self.impl != "xla" else None
        out = attention(
            q,
            keys,
            values,
            positions,
            key_pos,
            window_keys=spec.window_keys,
            sink=None if self.sink is None else self.sink[...],
            scale=spec.head_dim**-0.5,
            slot_is_position=kv_cache is not None and not kv_cache.ring,
            impl=self.impl,
            chunk_kv=chunk_kv,
        )
        return jnp.einsum("btnd,ndh->bth", out, weight(self.o_proj, after=out)), kv_cache


class MLP(nnx.Module):
    """Dense SwiGLU."""

    def __init__(self, hidden: int, intermediate: int, dtype, rngs: nnx.Rngs | None):
        self.gate_proj = _param(rngs, (hidden, intermediate), dtype, ("embed", "mlp"))
        self.up_proj = _param(rngs, (hidden, intermediate), dtype, ("embed", "mlp"))
        self.down_proj = _param(rngs, (intermediate, hidden), dtype, ("mlp", "embed"))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = jax.nn.silu(x @ weight(self.gate_proj, after=x)) * (x @ weight(self.up_proj, after=x))
        return h @ weight(self.down_proj, after=h)


class MoE(nnx.Module):
    """Routed experts; `impl` picks the expert computation (see `mimo_jax.model.moe.EXPERT_IMPLS`).

    Traced under a mesh (`jax.set_mesh`) whose expert or tensor axis splits the experts, it runs
    expert-parallel in `jax.shard_map` (`moe.experts_sharded`); `strategy` picks the dispatch
    ("auto" decides by token count) and `capacity_factor` (None = never drop) bounds the
    per-shard buffers, sowing the dropped count as `nnx.Intermediate` "dropped_tokens" (read it
    with `nnx.capture(model, nnx.Intermediate)`).

    The expert weights are made and imported as [E, H, I] / [E, I, H] (`layout` "in_out");
    `set_layout` transposes them on their devices into the layout the implementation reads
    (`moe.expert_layout`: the GPU kernel's "out_in"), else each call hands them over transposed.
    """

    GATE_AXES = ("experts", "embed", "moe_mlp")
    DOWN_AXES = ("experts", "moe_mlp", "embed")

    def __init__(self, cfg: MiMoConfig, dtype, rngs: nnx.Rngs | None, impl: str | None = None):
        e, h, i = cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size
        self.router = _param(rngs, (e, h), jnp.float32, ("experts_replicated", "embed_replicated"))
        self.correction_bias = _param(rngs, (e,), jnp.float32, ("experts_replicated",), init="zeros")
        self.gate_proj = _param(rngs, (e, h, i), dtype, self.GATE_AXES)
        self.up_proj = _param(rngs, (e, h, i), dtype, self.GATE_AXES)
        self.down_proj = _param(rngs, (e, i, h), dtype, self.DOWN_AXES)
        self.top_k = cfg.experts_per_token
        self.n_group = cfg.n_group
        self.topk_group = cfg.topk_group
        self.norm_topk_prob = cfg.norm_topk_prob
        self.scaling = cfg.routed_scaling_factor
        self.impl = impl or kernels.default_expert_impl()  # the Pallas kernel on GPU, ragged_dot elsewhere
        self.layout = "in_out"  # of gate/up/down as stored (see `set_layout`)
        self.strategy = "auto"
        self.capacity_factor: float | None = None

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
        gate_axes, down_axes = self._axes(self.layout)
        gate_spec = sharding.logical_to_spec(gate_axes, self.gate_proj.get_value().shape, mesh) if mesh else None
        down_spec = sharding.logical_to_spec(down_axes, self.down_proj.get_value().shape, mesh) if mesh else None
        experts = tuple(
            moe.read_experts(p, self.impl, x, spec, mesh)
            for p, spec in ((self.gate_proj, gate_spec), (self.up_proj, gate_spec), (self.down_proj, down_spec))
        )
        if self.layout != moe.expert_layout(self.impl):  # not re-laid out (`set_layout`): transposed per call
            experts = tuple(moe.swap_expert_axes(w) for w in experts)
            gate_spec = None if gate_spec is None else PartitionSpec(*moe.swapped_axes(gate_spec))
        if not any(gate_spec or ()):  # one device, or experts not split: plain math
            weights, ids = route(flat, self.router[...], self.correction_bias[...])
            out = moe.EXPERT_IMPLS[self.impl](flat, weights, ids, *experts)
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

    def set_layout(self, layout: str) -> None:
        """Store gate/up/down in `layout` (`kernels.EXPERT_LAYOUTS`), transposed on their devices one at a time, each
        old buffer freed at once (re-laying out a whole model needs room for one more weight only)."""
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
    def __init__(self, cfg: MiMoConfig, spec: LayerSpec, dtype, rngs: nnx.Rngs | None):
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        self.self_attn = Attention(spec, cfg.hidden_size, cfg.value_scale, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if spec.moe:
            self.mlp = MoE(cfg, dtype, rngs)
        else:
            self.mlp = MLP(cfg.hidden_size, cfg.intermediate_size, dtype, rngs)

    def __call__(
        self, x: jax.Array, positions: jax.Array, kv_cache: LayerKV | None
    ) -> tuple[jax.Array, LayerKV | None]:
        attn_out, kv_cache = self.self_attn(self.input_layernorm(x), positions, kv_cache)
        x = x + attn_out
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, kv_cache


class MTPLayer(nnx.Module):
    """One multi-token-prediction layer: [norm(embed(token)); norm(hidden)] -> eh_proj -> SWA block."""

    def __init__(self, cfg: MiMoConfig, dtype, rngs: nnx.Rngs | None):
        h = cfg.hidden_size
        self.enorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.hnorm = RMSNorm(h, cfg.rms_norm_eps, dtype)
        self.eh_proj = _param(rngs, (2 * h, h), dtype, ("embed_replicated", "embed"))
        self.block = DecoderLayer(cfg, cfg.mtp_layer(), dtype, rngs)
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

    `mtp_layers` > 0 adds that many MTP layers (sharing embed_tokens and lm_head).
    """

    def __init__(self, cfg: MiMoConfig, dtype=jnp.float32, rngs: nnx.Rngs | None = None, mtp_layers: int = 0):
        self.config = cfg
        self.dtype = jnp.dtype(dtype)
        self.embed_tokens = _param(rngs, (cfg.vocab_size, cfg.hidden_size), dtype, ("vocab", "embed"))
        self.layers = nnx.List([DecoderLayer(cfg, spec, dtype, rngs) for spec in cfg.layers])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype)
        if cfg.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, (cfg.hidden_size, cfg.vocab_size), dtype, ("embed", "vocab"))
        self.mtp = nnx.List([MTPLayer(cfg, dtype, rngs) for _ in range(mtp_layers)])

    def moe_layers(self) -> list[MoE]:
        return [m for layer in (*self.layers, *(t.block for t in self.mtp)) if isinstance(m := layer.mlp, MoE)]

    def set_attention_impl(self, impl: str) -> None:
        """Attention implementation of every layer (MTP included), see `mimo_jax.model.attention.ATTENTION_IMPLS`."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention implementation {impl!r}; choose from {ATTENTION_IMPLS}")
        for _, node in nnx.iter_graph(self):
            if isinstance(node, Attention):
                node.impl = impl

    def set_moe_impl(self, impl: str | None = None) -> None:
        """Expert implementation of every MoE layer (None: keep each layer's), its expert weights re-laid out
        on their devices to the layout it reads (`moe.expert_layout`; a no-op when they already are)."""
        if impl is not None and impl not in moe.EXPERT_IMPLS:
            raise ValueError(f"unknown MoE implementation {impl!r}; choose from {sorted(moe.EXPERT_IMPLS)}")
        for layer in self.moe_layers():
            layer.impl = impl or layer.impl
            layer.set_layout(moe.expert_layout(layer.impl))

    def set_expert_layout(self, layout: str) -> None:
        """Every MoE layer's expert weights in `layout` (e.g. "in_out" before saving: checkpoints keep it)."""
        for layer in self.moe_layers():
            layer.set_layout(layout)

    def set_moe_strategy(self, strategy: str = "auto", capacity_factor: float | None = None) -> None:
        """Dispatch of the expert-parallel MoE on a mesh (see `mimo_jax.model.moe.STRATEGIES`)."""
        if strategy not in moe.STRATEGIES:
            raise ValueError(f"unknown MoE strategy {strategy!r}; choose from {moe.STRATEGIES}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor={capacity_factor}: must be > 0 (or None for no dropping)")
        for layer in self.moe_layers():
            layer.strategy, layer.capacity_factor = strategy, capacity_factor

    def embed(self, token_ids: jax.Array) -> jax.Array:
        return jnp.take(weight(self.embed_tokens, after=token_ids), token_ids, axis=0)

    def hidden_states(
        self, token_ids: jax.Array, positions: jax.Array, cache: list[LayerKV] | None = None
    ) -> tuple[jax.Array, list[LayerKV] | None]:
        """Residual stream after the last layer (before the final norm) [B, T, H], and the new cache."""
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
        if logits.ndim < 2:
            return logits
        return sharding.constrain(logits, ("batch",) + (None,) * (logits.ndim - 2) + ("vocab",))

    def mtp_forward(
        self, k: int, token_ids: jax.Array, hidden: jax.Array, positions: jax.Array, kv_cache: LayerKV | None = None
    ) -> tuple[jax.Array, jax.Array, LayerKV | None]:
        """MTP layer k on (next tokens, previous hidden states) -> (its hidden states, float32 logits, cache)."""
        layer = self.mtp[k]
        h, kv_cache = layer(self.embed(token_ids), hidden, positions, kv_cache)
        return h, self.logits(h, layer.final_layernorm), kv_cache

    def __call__(
        self, token_ids: jax.Array, positions: jax.Array | None = None, cache: list[LayerKV] | None = None
    ) -> tuple[jax.Array, list[LayerKV] | None]:
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(token_ids.shape[1], dtype=jnp.int32), token_ids.shape)
        hidden, cache = self.hidden_states(token_ids, positions, cache)
        return self.logits(hidden), cache
