"""THE tensor table: which checkpoint tensors make each model parameter, and how.

`parameter_sources(cfg, mtp_layers)` lists, for every parameter of `MiMoModel(cfg, mtp_layers=...)`,
the checkpoint tensors (hub names, torch [out, in] shapes, release dtypes, whether FP8 releases
store them as 128x128 blocks) and the transform (`kind`). Loading, validation, the exporter and
the memory planner all read this one list.

Kinds (param <- checkpoint tensor, torch layout [out, in]):
- `copy`: as stored (embeddings, norms, sinks, router, correction bias).
- `transpose`: [out, in] -> [in, out] (dense MLP, lm_head, MTP eh_proj).
- `heads_in`: rows gathered and split per head, [heads*head_dim, H] -> [H, heads, head_dim] (q, k, v;
  from separate tensors or from the fused `qkv_proj`, see `attention_rows`).
- `heads_out`: [H, heads*head_dim] -> [heads, head_dim, H] (o_proj).
- `experts`: E tensors [out, in] -> [E, in, out].
"""

from __future__ import annotations

import dataclasses
import math

import ml_dtypes
import numpy as np

from mimo_jax.config import LayerSpec, MiMoConfig

BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)

COPY, TRANSPOSE, HEADS_IN, HEADS_OUT, EXPERTS = "copy", "transpose", "heads_in", "heads_out", "experts"


def ceil_div(a: int, b: int) -> int:
    return -(-a // b)


@dataclasses.dataclass(frozen=True)
class CheckpointTensor:
    """One tensor of a released checkpoint."""

    name: str
    shape: tuple[int, ...]
    dtype: np.dtype  # release dtype when not block-quantized
    quantizable: bool = False  # FP8 releases store it as float8 blocks + `weight_scale_inv`
    row_groups: int = 1  # fused qkv: the rows are this many shards, each blocked on its own

    @property
    def scale_name(self) -> str:
        return self.name.removesuffix("weight") + "weight_scale_inv"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def scale_shape(self, block: tuple[int, int]) -> tuple[int, int]:
        """Scale shape as FP8 releases write it (rows rounded up per shard for fused qkv)."""
        rows, cols = self.shape
        return self.row_groups * ceil_div(rows // self.row_groups, block[0]), ceil_div(cols, block[1])


@dataclasses.dataclass(frozen=True)
class QKVLayout:
    """How one layer's q/k/v rows are stored: separate tensors, or one `qkv_proj` of `shards` x [Q_r|K_r|V_r]."""

    heads: int
    kv_heads: int
    head_dim: int
    v_head_dim: int
    shards: int  # 0 = separate q/k/v tensors

    @property
    def shard_rows(self) -> tuple[int, int, int]:
        t = self.shards
        return (
            (self.heads // t) * self.head_dim,
            (self.kv_heads // t) * self.head_dim,
            (self.kv_heads // t) * self.v_head_dim,
        )


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Checkpoint tensors that make one model parameter (see the module docstring for `kind`)."""

    path: tuple
    kind: str
    tensors: tuple[CheckpointTensor, ...]
    heads: int = 0  # heads_in / heads_out: heads and head_dim of the parameter
    head_dim: int = 0
    part: str = ""  # heads_in: "q", "k" or "v"
    qkv: QKVLayout | None = None


def _t(name: str, shape: tuple[int, ...], dtype: np.dtype = BF16, quantizable: bool = False, groups: int = 1):
    return CheckpointTensor(name, tuple(shape), np.dtype(dtype), quantizable, groups)


def _attention_sources(cfg: MiMoConfig, prefix: str, path: tuple, spec: LayerSpec) -> list[ParamSource]:
    h = cfg.hidden_size
    n, kv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
    p = prefix + "self_attn."
    out = []
    if cfg.fused_qkv:
        t = cfg.num_kv_heads  # the checkpoint was written for T = num_key_value_heads attention shards
        if n % t or kv % t:
            raise ValueError(
                f"{p}qkv_proj: {n} query / {kv} key-value heads cannot be split into the checkpoint's "
                f"{t} (num_key_value_heads) fused shards"
            )
        layout = QKVLayout(n, kv, d, dv, t)
        qkv = _t(p + "qkv_proj.weight", (n * d + kv * d + kv * dv, h), quantizable=True, groups=t)
        for part, heads, hd in (("q", n, d), ("k", kv, d), ("v", kv, dv)):
            out.append(ParamSource((*path, f"{part}_proj"), HEADS_IN, (qkv,), heads, hd, part, layout))
    else:
        layout = QKVLayout(n, kv, d, dv, 0)
        q = _t(p + "q_proj.weight", (n * d, h), quantizable=True)
        k = _t(p + "k_proj.weight", (kv * d, h), quantizable=True)
        v = _t(p + "v_proj.weight", (kv * dv, h), quantizable=True)
        out += [
            ParamSource((*path, "q_proj"), HEADS_IN, (q,), n, d, "q", layout),
            # k and v both list (k, v): Flash may block them together per head (see `attention_rows`).
            ParamSource((*path, "k_proj"), HEADS_IN, (k, v), kv, d, "k", layout),
            ParamSource((*path, "v_proj"), HEADS_IN, (k, v), kv, dv, "v", layout),
        ]
    out.append(ParamSource((*path, "o_proj"), HEADS_OUT, (_t(p + "o_proj.weight", (h, n * dv)),), n, dv))
    if spec.has_sink:
        out.append(ParamSource((*path, "sink"), COPY, (_t(p + "attention_sink_bias", (n,)),)))
    return out


def _dense_mlp_sources(prefix: str, path: tuple, hidden: int, inter: int) -> list[ParamSource]:
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    return [
        ParamSource((*path, proj), TRANSPOSE, (_t(f"{prefix}mlp.{proj}.weight", shape, quantizable=True),))
        for proj, shape in shapes.items()
    ]


def _norm(name: str, path: tuple, h: int) -> ParamSource:
    return ParamSource((*path, "weight"), COPY, (_t(name, (h,)),))


def parameter_sources(cfg: MiMoConfig, mtp_layers: int = 0) -> list[ParamSource]:
    """Every parameter of `MiMoModel(cfg, mtp_layers=mtp_layers)` with its checkpoint tensors, in file order."""
    h, vocab = cfg.hidden_size, cfg.vocab_size
    out = [ParamSource(("embed_tokens",), COPY, (_t("model.embed_tokens.weight", (vocab, h)),))]
    for i, spec in enumerate(cfg.layers):
        p, layer = f"model.layers.{i}.", ("layers", i)
        out.append(_norm(p + "input_layernorm.weight", (*layer, "input_layernorm"), h))
        out += _attention_sources(cfg, p, (*layer, "self_attn"), spec)
        out.append(_norm(p + "post_attention_layernorm.weight", (*layer, "post_attention_layernorm"), h))
        if spec.moe:
            e, inter = cfg.num_experts, cfg.moe_intermediate_size
            mlp = (*layer, "mlp")
            out += [
                ParamSource((*mlp, "router"), COPY, (_t(p + "mlp.gate.weight", (e, h), F32),)),
                ParamSource((*mlp, "correction_bias"), COPY, (_t(p + "mlp.gate.e_score_correction_bias", (e,), F32),)),
            ]
            for proj, shape in (("gate_proj", (inter, h)), ("up_proj", (inter, h)), ("down_proj", (h, inter))):
                tensors = tuple(_t(f"{p}mlp.experts.{x}.{proj}.weight", shape, quantizable=True) for x in range(e))
                out.append(ParamSource((*mlp, proj), EXPERTS, tensors))
        else:
            out += _dense_mlp_sources(p, (*layer, "mlp"), h, cfg.intermediate_size)
    out.append(_norm("model.norm.weight", ("norm",), h))
    if not cfg.tie_word_embeddings:
        out.append(ParamSource(("lm_head",), TRANSPOSE, (_t("lm_head.weight", (vocab, h)),)))
    for k in range(mtp_layers):
        p, path = f"model.mtp.layers.{k}.", ("mtp", k)
        block = (*path, "block")
        out += [
            _norm(p + "enorm.weight", (*path, "enorm"), h),
            _norm(p + "hnorm.weight", (*path, "hnorm"), h),
            ParamSource((*path, "eh_proj"), TRANSPOSE, (_t(p + "eh_proj.weight", (h, 2 * h)),)),
            _norm(p + "input_layernorm.weight", (*block, "input_layernorm"), h),
        ]
        out += _attention_sources(cfg, p, (*block, "self_attn"), cfg.mtp_layer())
        out.append(_norm(p + "pre_mlp_layernorm.weight", (*block, "post_attention_layernorm"), h))
        out += _dense_mlp_sources(p, (*block, "mlp"), h, cfg.intermediate_size)
        out.append(_norm(p + "final_layernorm.weight", (*path, "final_layernorm"), h))
    return out


def checkpoint_tensors(sources: list[ParamSource]) -> list[CheckpointTensor]:
    """The distinct checkpoint tensors of a table, in order (fused qkv and k/v are shared by several params)."""
    seen: dict[str, CheckpointTensor] = {}
    for src in sources:
        for t in src.tensors:
            seen.setdefault(t.name, t)
    return list(seen.values())


def fp8_param_block(kind: str, ndim: int, block: tuple[int, int]) -> tuple[int, ...]:
    """Block shape of an FP8 parameter in the model's layout (see `mimo_jax.quant`), from the checkpoint's."""
    br, bc = block
    return {COPY: (br, bc), TRANSPOSE: (bc, br), EXPERTS: (1, bc, br), HEADS_IN: (bc, 1, 1), HEADS_OUT: (1, 1, br)}[
        kind
    ][:ndim]


# ----------------------------------------------------------------------------- attention row maps
def kv_blocked_per_head(k_scale_rows: int, kv_heads: int, head_dim: int, block: int) -> bool:
    """Flash quirk: K and V quantized as one per-head [K | V] block column (k_scale then has
    kv * ceil(head_dim / block) rows instead of ceil(kv * head_dim / block))."""
    per_head = kv_heads * ceil_div(head_dim, block)
    return k_scale_rows == per_head and per_head != ceil_div(kv_heads * head_dim, block)


def attention_rows(src: ParamSource, block: int, scale_rows: tuple[int, ...] | None) -> tuple[np.ndarray, np.ndarray]:
    """For a heads_in parameter: (row of `src.tensors[value_tensor]` for each param row (head-major),
    row of the stacked scales of `src.tensors` for each param row).

    `scale_rows` gives the row counts of the checkpoint's scale tensors (None: not quantized).
    Returns (value_rows, scale_rows); the value tensor is tensors[1] for separate v, else tensors[0].
    """
    lay = src.qkv
    assert lay is not None
    d = src.head_dim
    head = np.repeat(np.arange(src.heads), d)
    t = np.tile(np.arange(d), src.heads)
    if lay.shards:  # fused: shard s holds q heads [s*n/T, (s+1)*n/T) then its k heads then its v heads
        q_rows, k_rows, _ = lay.shard_rows
        per_shard = src.heads // lay.shards
        shard = head // per_shard
        offset = {"q": 0, "k": q_rows, "v": q_rows + k_rows}[src.part]
        local = offset + (head % per_shard) * d + t
        shard_total = sum(lay.shard_rows)
        return shard * shard_total + local, shard * ceil_div(shard_total, block) + local // block
    rows = head * d + t
    if src.part == "q" or scale_rows is None:
        return rows, rows // block
    k_scale_rows = scale_rows[0]
    if not kv_blocked_per_head(k_scale_rows, lay.kv_heads, lay.head_dim, block):
        return rows, rows // block + (k_scale_rows if src.part == "v" else 0)
    k_blocks = ceil_div(lay.head_dim, block)
    if src.part == "k":
        return rows, head * k_blocks + t // block
    fused_block = (lay.head_dim + t) // block  # V follows K inside the head's block column
    v_blocks = ceil_div(lay.head_dim + lay.v_head_dim, block) - k_blocks
    in_k = fused_block < k_blocks
    return rows, np.where(in_k, head * k_blocks + fused_block, k_scale_rows + head * v_blocks + fused_block - k_blocks)


def expected_scale_shapes(src: ParamSource, block: tuple[int, int], k_scale_rows: int | None) -> list[tuple[int, int]]:
    """Scale shapes that fit `src.tensors` (for separate k/v: given the checkpoint's k-scale row count)."""
    shapes = [t.scale_shape(block) for t in src.tensors]
    lay = src.qkv
    if src.kind == HEADS_IN and lay is not None and not lay.shards and src.part in ("k", "v") and k_scale_rows:
        if kv_blocked_per_head(k_scale_rows, lay.kv_heads, lay.head_dim, block[0]):
            k_blocks = ceil_div(lay.head_dim, block[0])
            v_blocks = ceil_div(lay.head_dim + lay.v_head_dim, block[0]) - k_blocks
            cols = shapes[0][1]
            shapes = [(lay.kv_heads * k_blocks, cols), (lay.kv_heads * v_blocks, cols)]
    return shapes
