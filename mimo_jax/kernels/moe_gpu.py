"""Expert FFN for GPU in Pallas (Triton backend): grouped matmuls, and a fused kernel for decode.

Same contract as `mimo_jax.model.moe.experts_ragged`: (x [N, H], weights [N, K], ids [N, K], w_gate, w_up, w_down)
-> [N, H]. Assignments are sorted by expert; a small schedule computed in XLA lists, for every program,
(expert, first row, end row, output column tile), so each program reads only weight tiles of an expert that
received tokens. Two Pallas kernels run over that schedule:

1. gate/up: h = silu(x @ w_gate[e]) * (x @ w_up[e]) on the expert's rows (x rows gathered by token index);
2. down: y = (h @ w_down[e]) * routing weight.

Programs of one expert at one column tile are adjacent, so its row tiles read each weight tile once from HBM
and again from L2. Shapes are static (the schedule has an upper-bound length; spare programs return at once),
so one compilation serves every routing pattern. The tile sizes are chosen by rows per expert: small row tiles
and narrow column tiles when decoding (weight streaming, memory-bound), large tiles for prefill (compute-bound).

At a few assignments (decode at small batch) a third kernel does it all in one launch, with no sort or schedule
(`FusedConfig`): one program per (assignment, block of intermediate columns) computes that block of h from its
token's row and multiplies it by the matching slice of the down weight; the [hidden] partial sums are added after
the kernel. Each assignment reads its expert's weights once (an expert chosen twice is read twice, which is why
this serves only a few assignments). With `split` > 1 it runs as two launches with that many times the programs
(the gate/up reduction in parts, then the down product's columns in parts): more programs per SM where there
would be about one.

Weights are bf16 arrays, or block-scaled fp8 (the importer's layout, `mimo_jax.quant.BlockQuantized` with block
(1, 128, 128), or a plain (values, scales) pair): values float8_e4m3fn [E, in, out], scales float32
[E, in/128, out/128], W[e, i, j] = values[e, i, j] * scales[e, i // 128, j // 128], dequantized in the kernel.
With `layout="out_in"` every weight (and its scales) is given transposed, [E, out, in] as checkpoints store
nn.Linear weights: the reduction dimension is contiguous, which is the operand order tensor-core MMAs read.
Expert ids outside [0, E) (e.g. experts on another shard) contribute zero, as in `experts_ragged`.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from mimo_jax.config import W8A8_MODES
from mimo_jax.kernels import EXPERT_LAYOUTS, W8A8_MIN_ROWS_PER_EXPERT, fp8_gemm_gpu, manual_axes
from mimo_jax.kernels.fp8_gemm_gpu import W8A8Config, block_scale, column_blocks, store_rows, tile_at, weight_tile
from mimo_jax.quant import FP8_MAX

FP8_BLOCK = 128  # fp8 block-scale tile (checkpoint `weight_block_size`)


@dataclasses.dataclass(frozen=True)
class TileConfig:
    """One kernel's tiling: rows per program (block_rows), output columns per program, reduction step, launch."""

    block_rows: int
    block_cols: int
    block_k: int
    num_warps: int
    num_stages: int
    swap_ab: bool = False  # compute (W^T a^T)^T: the weight tile is the MMA's wide side, the rows its narrow one


FP8_DOTS = ("bf16", "f16")


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """Both kernels' tiles; `fp8_dot` says how fp8 weight tiles meet the activations in the matmul.

    "bf16" / "f16": weights widened to that dtype. e4m3 -> f16 is one conversion per two values on
    Hopper (bf16 needs three); for f16 the activations are scaled per row by a power of two into f16's
    range (exact, no overflow) once before the kernel, and the row scale applied to the finished sum.
    Preparing activations outside the kernel keeps reductions out of its inner loop. (w8a8, fp8 activations on
    fp8 tensor cores, is `fp8_gemm_gpu`'s: `experts_grouped(..., w8a8="prefill" | "always")` / a `W8A8Config`.)
    """

    gate_up: TileConfig
    down: TileConfig
    fp8_dot: str = "bf16"


# Chosen by bench/bench_moe_kernel.py on an H100 and an H200 (bench/RESULTS.md). fp8 steps stay inside one
# scale block; fp8 widens to f16 (8-19% faster than bf16 widening at T = 1..128, 11-15% at 8192, H200).
DECODE = KernelConfig(TileConfig(16, 128, 64, 4, 5), TileConfig(16, 128, 128, 4, 4))
MIDDLE = KernelConfig(TileConfig(64, 128, 64, 4, 4), TileConfig(64, 128, 64, 4, 4))
PREFILL = KernelConfig(TileConfig(128, 128, 64, 8, 4), TileConfig(128, 256, 64, 8, 3))
DECODE_FP8 = KernelConfig(TileConfig(16, 128, 128, 4, 4), TileConfig(16, 128, 128, 4, 4), fp8_dot="f16")
MIDDLE_FP8 = KernelConfig(TileConfig(64, 128, 64, 4, 4), TileConfig(64, 128, 64, 4, 4), fp8_dot="f16")
PREFILL_FP8 = KernelConfig(TileConfig(64, 128, 64, 4, 4), TileConfig(64, 128, 64, 4, 4), fp8_dot="f16")


@dataclasses.dataclass(frozen=True)
class FusedConfig:
    """The single-launch decode kernel's tiling: `block_inter` intermediate columns per program, the gate/up
    reduction over hidden in steps of `block_k`, the down product in steps of `block_out` hidden columns.

    `unroll`: reduction blocks per loop iteration, their loads issued together (tensor-core form).
    `split`: > 1 runs it in two launches with `split` x the programs: the gate/up reduction over hidden split
    into that many parts (partial sums added by the second launch), then the down product's hidden columns.
    `tensor_cores`: products on the tensor cores (the token's row padded to 16 rows); False: multiplied and
    summed in fp32 on the CUDA cores (one row, no padding, no f16 scaling; swap_ab and fp8_dot unused).
    `swap_ab`: the weight tile is the MMA's wide side and the token's row its narrow one (as TileConfig).
    `fp8_dot`: how fp8 weight tiles are widened, "f16" (the row and h scaled by a power of two inside the
    kernel: exact) or "bf16".
    """

    block_inter: int
    block_k: int
    block_out: int
    num_warps: int
    num_stages: int
    swap_ab: bool = True
    fp8_dot: str = "f16"
    tensor_cores: bool = True
    unroll: int = 1
    split: int = 1


# Up to this many assignments (tokens x top-k) the fused kernel serves, bf16 / fp8 weights: where it beat the
# grouped kernels on an H200 (bench/RESULTS.md, kernel run 10: fp8 also at 4 tokens x top-8, bf16 not).
FUSED_MAX_ASSIGNMENTS = 16
FUSED_MAX_ASSIGNMENTS_FP8 = 32
FUSED_MIN_PROGRAMS = 128  # about one program per SM: block_inter shrinks (down to 16) until there are this many
# 256-wide down steps: 1-5% faster than 128 at 1-4 tokens (kernel run 13, H200)
FUSED = FusedConfig(128, 128, 256, 4, 3)
FUSED_FP8 = FusedConfig(128, 128, 256, 4, 4, swap_ab=False)
# fp8 with at most one program per SM (one token x top-8 on Flash): two launches with twice the programs, and 3
# stages so that two fit on an SM: 0.070-0.073 ms against 0.076-0.082 in one launch (kernel runs 12-13)
FUSED_FP8_FEW = dataclasses.replace(FUSED_FP8, block_out=128, num_stages=3, split=2)


def fused_config(assignments: int, inter: int, fp8: bool = False) -> FusedConfig:
    """FUSED(_FP8) with block_inter halved until `assignments x inter / block_inter` programs fill the GPU;
    FUSED_FP8_FEW's launch when fp8 still has fewer than two programs per SM."""
    base = FUSED_FP8 if fp8 else FUSED
    block_inter = base.block_inter
    while block_inter > 16 and (inter % block_inter or assignments * (inter // block_inter) < FUSED_MIN_PROGRAMS):
        block_inter //= 2
    if fp8 and assignments * (inter // block_inter) < 2 * FUSED_MIN_PROGRAMS:
        base = FUSED_FP8_FEW
    return dataclasses.replace(base, block_inter=block_inter)


def default_config(
    assignments: int, num_experts: int, fp8: bool = False, inter: int | None = None, w8a8: bool = False
) -> KernelConfig | FusedConfig | W8A8Config:
    """Kernel and tiles by the assignments and the mean rows per expert (static: from shapes, not the routing);
    the fused kernel when `inter` is given and there are at most FUSED_MAX_ASSIGNMENTS(_FP8) assignments; the
    w8a8 kernels (`fp8_gemm_gpu`) for fp8 weights at prefill sizes when `w8a8`."""
    if inter is not None and assignments <= (FUSED_MAX_ASSIGNMENTS_FP8 if fp8 else FUSED_MAX_ASSIGNMENTS):
        return fused_config(assignments, inter, fp8)
    rows_per_expert = assignments / num_experts
    if rows_per_expert <= 16:
        return DECODE_FP8 if fp8 else DECODE
    if rows_per_expert <= W8A8_MIN_ROWS_PER_EXPERT:
        return MIDDLE_FP8 if fp8 else MIDDLE
    if fp8 and w8a8:
        return fp8_gemm_gpu.w8a8_config(assignments, num_experts)
    return PREFILL_FP8 if fp8 else PREFILL


def _fit_fused(cfg: FusedConfig, hidden: int) -> FusedConfig:
    """Halve the steps over hidden until they divide it, and split no further than there are steps (small models)."""
    block_k, block_out = cfg.block_k, cfg.block_out
    while hidden % block_k and block_k > 16:
        block_k //= 2
    while hidden % block_out and block_out > 16:
        block_out //= 2
    split = cfg.split if (hidden // block_k) % cfg.split == 0 and (hidden // block_out) % cfg.split == 0 else 1
    return dataclasses.replace(cfg, block_k=block_k, block_out=block_out, split=split)


def _fit(tile: TileConfig, d_in: int, d_out: int) -> TileConfig:
    """Halve the reduction step and column tile until they divide the weight (small test models)."""
    block_k, block_cols = tile.block_k, tile.block_cols
    while d_in % block_k and block_k > 16:
        block_k //= 2
    while d_out % block_cols and block_cols > 16:
        block_cols //= 2
    return dataclasses.replace(tile, block_k=block_k, block_cols=block_cols)


def _split_weight(w) -> tuple[jax.Array, jax.Array | None]:
    """bf16 array -> (w, None); fp8 -> (values, scales), from a (values, scales) pair or any object with
    `.values` / `.scales` (e.g. the importer's `BlockQuantized` with block (1, 128, 128)), shapes checked."""
    if isinstance(w, tuple):
        values, scales = w
    elif hasattr(w, "values") and hasattr(w, "scales"):
        block = getattr(w, "block", (1, FP8_BLOCK, FP8_BLOCK))
        if tuple(block) != (1, FP8_BLOCK, FP8_BLOCK):
            raise ValueError(f"fp8 expert weights need block (1, {FP8_BLOCK}, {FP8_BLOCK}), got {block}")
        values, scales = w.values, w.scales
    else:
        return w, None
    e, d_in, d_out = values.shape
    want = (e, -(-d_in // FP8_BLOCK), -(-d_out // FP8_BLOCK))
    if scales.shape != want:
        raise ValueError(f"fp8 block scales have shape {scales.shape}; values {values.shape} need {want}")
    return values, scales


def max_tiles(assignments: int, num_experts: int, block_rows: int) -> int:
    """Upper bound of sum_e ceil(g_e / block_rows) over group sizes g summing to `assignments`."""
    nonempty = min(num_experts, assignments)
    return (assignments - nonempty) // block_rows + nonempty


def schedule(group_sizes: jax.Array, block_rows: int, n_col_tiles: int, n_tiles: int) -> jax.Array:
    """Program table [4, n_tiles * n_col_tiles] int32: (expert, row start, row end, column tile) per program.

    Programs are ordered expert-major, then column tile, then row tile, so the row tiles of one expert that
    share a weight tile run side by side. Spare programs get row start = row end = 0 (they do nothing).
    """
    num_experts = group_sizes.shape[0]
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    tiles = (group_sizes + block_rows - 1) // block_rows
    prog_end = jnp.cumsum(tiles) * n_col_tiles
    prog_begin = prog_end - tiles * n_col_tiles
    p = jnp.arange(n_tiles * n_col_tiles, dtype=jnp.int32)
    expert = jnp.searchsorted(prog_end, p, side="right", method="compare_all").astype(jnp.int32)
    valid = expert < num_experts
    expert = jnp.minimum(expert, num_experts - 1)
    local = p - prog_begin[expert]
    row_tiles = jnp.maximum(tiles[expert], 1)
    col = local // row_tiles
    row_start = starts[expert] + (local % row_tiles) * block_rows
    row_end = ends[expert]
    zero = jnp.zeros_like(p)
    table = [jnp.where(valid, v, zero) for v in (expert, row_start, row_end, col)]
    return jnp.stack(table).astype(jnp.int32)


def _scale(s_ref, expert, k, cfg: TileConfig, col, out_in: bool):
    """fp32 block scale(s) of the weight tile at step k: a scalar, or one per column [block_cols] when the
    tile spans blocks."""
    return block_scale(s_ref, expert, column_blocks(col, cfg.block_cols), (k * cfg.block_k) // FP8_BLOCK, out_in)


def _silu(g: jax.Array) -> jax.Array:
    """g * sigmoid(g), inside the kernels."""
    return g / (1.0 + jnp.exp(-g))


def _pow2_scale(amax: jax.Array) -> jax.Array:
    """2^e with |a / 2^e| <= 2^8 for |a| <= amax: f16 holds a / 2^e exactly to its precision, without overflow."""
    return jnp.exp2(jnp.ceil(jnp.log2(jnp.maximum(amax, 1e-30))) - 8.0)


def _f16_rows(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a [rows, d] -> (a / 2^e in f16, 2^e [rows] f32), one `_pow2_scale` per row."""
    row_scale = _pow2_scale(jnp.max(jnp.abs(a.astype(jnp.float32)), axis=1))
    return (a.astype(jnp.float32) / row_scale[:, None]).astype(jnp.float16), row_scale


def _dot_operand(a: jax.Array, fp8_dot: str, scaled: bool) -> tuple[jax.Array, jax.Array | None]:
    """Activations as the kernel's dot takes them, prepared once in XLA (not per tile step):
    (a, None) for bf16 weights or widening to bf16; ("f16") the row-scaled f16 copy and its per-row
    scales [rows]."""
    if not scaled or fp8_dot == "bf16":
        return a, None
    return _f16_rows(a)


def _expert_matmuls(a_at, w_refs, s_refs, expert, col, n_steps: int, cfg: TileConfig, out_in: bool):
    """For each W in w_refs: sum over k of a_at(k) @ W[expert][k-th row block, col:col + block_cols], fp32
    [rows, block_cols]. With `out_in` the weights are stored [E, out, in] and the tile read transposed.

    fp8 tiles are widened to the activation tile's dtype and their block scale applied to the partial
    product. With `cfg.swap_ab` the products are
    accumulated transposed, [block_cols, rows] (the weight tile as the MMA's M side), and turned at the end.
    (Loading the scales one step ahead measured 7% slower on an H100: bench/RESULTS.md, run 2.)
    """
    w_contract = 1 if out_in else 0
    # where the per-column (weight) block scales broadcast in a product tile
    row_axis = 1 if cfg.swap_ab else 0

    def step(k, accs):
        a = a_at(k)
        ks, cs = pl.ds(k * cfg.block_k, cfg.block_k), pl.ds(col, cfg.block_cols)
        out = []
        for acc, w_ref, s_ref in zip(accs, w_refs, s_refs, strict=True):
            w = weight_tile(w_ref, expert, cs, ks, out_in).astype(a.dtype)
            if cfg.swap_ab:
                dims = (((w_contract,), (1,)), ((), ()))
                prod = jax.lax.dot_general(w, a, dims, preferred_element_type=jnp.float32)
            else:
                dims = (((1,), (w_contract,)), ((), ()))
                prod = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
            if s_ref is not None:
                scale = _scale(s_ref, expert, k, cfg, col, out_in)
                prod = prod * (jnp.expand_dims(scale, row_axis) if jnp.ndim(scale) else scale)
            out.append(acc + prod)
        return tuple(out)

    shape = (cfg.block_cols, cfg.block_rows) if cfg.swap_ab else (cfg.block_rows, cfg.block_cols)
    accs = jax.lax.fori_loop(0, n_steps, step, (jnp.zeros(shape, jnp.float32),) * len(w_refs))
    return tuple(acc.T for acc in accs) if cfg.swap_ab else accs


def _unpack_refs(refs, a_scaled: bool, n_weights: int, scaled: bool):
    """(activation scales or None, weight refs, scale refs (None each when bf16), output ref)."""
    refs = list(refs)
    a_scale = refs.pop(0) if a_scaled else None
    weights = [refs.pop(0) for _ in range(n_weights)]
    scales = [refs.pop(0) for _ in range(n_weights)] if scaled else [None] * n_weights
    (out,) = refs
    return a_scale, weights, scales, out


def _gate_up_kernel(table_ref, token_ref, x_ref, *refs, cfg: TileConfig, scaled: bool, fp8_dot: str, out_in: bool):
    xs_ref, w_refs, s_refs, h_ref = _unpack_refs(refs, scaled and fp8_dot != "bf16", 2, scaled)
    expert, row_start, row_end, col = tile_at(table_ref, cfg.block_cols)

    @pl.when(row_start < row_end)
    def _():
        tokens = token_ref[pl.ds(row_start, cfg.block_rows)]

        def x_at(k):  # the tile's rows of x, gathered by token index
            return x_ref[tokens, pl.ds(k * cfg.block_k, cfg.block_k)]

        n_steps = x_ref.shape[1] // cfg.block_k
        gate, up = _expert_matmuls(x_at, w_refs, s_refs, expert, col, n_steps, cfg, out_in)
        if xs_ref is not None:  # f16 rows: the per-row scale `_dot_operand` made factors out of the whole sum
            by_row = xs_ref[tokens]
            gate, up = gate * by_row[:, None], up * by_row[:, None]
        h = _silu(gate) * up  # fp32
        store_rows(h_ref, row_start, row_end, col, h, cfg)


def _down_kernel(table_ref, rw_ref, h_ref, *refs, cfg: TileConfig, scaled: bool, fp8_dot: str, out_in: bool):
    hs_ref, w_refs, s_refs, y_ref = _unpack_refs(refs, scaled and fp8_dot != "bf16", 1, scaled)
    expert, row_start, row_end, col = tile_at(table_ref, cfg.block_cols)

    @pl.when(row_start < row_end)
    def _():
        rows = pl.ds(row_start, cfg.block_rows)

        def h_at(k):
            return h_ref[rows, pl.ds(k * cfg.block_k, cfg.block_k)]

        n_steps = h_ref.shape[1] // cfg.block_k
        (acc,) = _expert_matmuls(h_at, w_refs, s_refs, expert, col, n_steps, cfg, out_in)
        routing = rw_ref[rows] if hs_ref is None else rw_ref[rows] * hs_ref[rows]
        store_rows(y_ref, row_start, row_end, col, acc * routing[:, None], cfg)


FUSED_ROWS = 16  # the MMA's narrow side: one token's row and 15 rows of zeros (Triton dots need 16)


def _fused_dtype(cfg: FusedConfig, scaled: bool, x_dtype) -> tuple:
    """(the products' operand dtype, whether rows and h are scaled into f16 by a power of two)."""
    if not cfg.tensor_cores:
        return jnp.float32, False
    f16 = scaled and cfg.fp8_dot == "f16"
    return (jnp.float16 if f16 else jnp.bfloat16 if scaled else x_dtype), f16


def _padded(v: jax.Array, cfg: FusedConfig) -> jax.Array:
    """A token's row (or h) [n] as the product's operand: on the tensor cores the MMA's narrow side, padded with
    zero rows ([n, ROWS] when swap_ab, else [ROWS, n]; so every product there is 0); on the CUDA cores v itself."""
    if not cfg.tensor_cores:
        return v
    shape, axis = ((v.shape[0], FUSED_ROWS), 1) if cfg.swap_ab else ((FUSED_ROWS, v.shape[0]), 0)
    first = jax.lax.broadcasted_iota(jnp.int32, shape, axis) == 0
    return jnp.where(first, v[:, None] if cfg.swap_ab else v[None, :], jnp.zeros((), v.dtype))


def _token_row(y: jax.Array, cfg: FusedConfig) -> jax.Array:
    """[out] of a product or accumulator (the padded MMA rows are zeros)."""
    return jnp.sum(y, axis=1 if cfg.swap_ab else 0) if cfg.tensor_cores else y


def _times(w, v, cfg: FusedConfig, dtype, out_in: bool) -> jax.Array:
    """Weight tile w (as stored) times v (`_padded`) over w's reduction axis, fp32: on the tensor cores [w_out,
    ROWS] when swap_ab (v [k, ROWS]), else [ROWS, w_out] (v [ROWS, k]); on the CUDA cores [w_out]."""
    w, contract = w.astype(dtype), 1 if out_in else 0
    if not cfg.tensor_cores:
        return jnp.sum(w * jnp.expand_dims(v, 1 - contract), axis=contract)
    dims = (((contract,), (0,)), ((), ())) if cfg.swap_ab else (((1,), (contract,)), ((), ()))
    operands = (w, v) if cfg.swap_ab else (v, w)
    return jax.lax.dot_general(*operands, dims, preferred_element_type=jnp.float32)


def _row_scale(x_ref, token) -> jax.Array:
    """`_pow2_scale` of the token's row, its amax from a few wide loads issued together (a loop of small ones
    would cost its latency): chunks are the largest power of two dividing hidden (Triton block sizes)."""
    hidden = x_ref.shape[1]
    chunk = min(hidden & -hidden, 4096)
    amax = 0.0
    for i in range(hidden // chunk):
        amax = jnp.maximum(amax, jnp.max(jnp.abs(x_ref[token, pl.ds(i * chunk, chunk)].astype(jnp.float32))))
    return _pow2_scale(amax)


def _gate_up_sums(x_ref, token, w_refs, s_refs, expert, col, steps, cfg: FusedConfig, scaled: bool, out_in: bool):
    """x Wg and x Wu of the token's row on intermediate columns [col, col + block_inter), the reduction over
    hidden blocks [steps[0], steps[1]) x unroll, fp32 in accumulator form (`_token_row` makes them [block_inter])."""
    bi, bk = cfg.block_inter, cfg.block_k
    dtype, f16 = _fused_dtype(cfg, scaled, x_ref.dtype)
    x_scale = _row_scale(x_ref, token) if f16 else None

    def x_operand(k):
        row = x_ref[token, pl.ds(k * bk, bk)].astype(jnp.float32)
        return _padded((row if x_scale is None else row / x_scale).astype(dtype), cfg)

    def step(i, accs):  # `unroll` reduction blocks per iteration, every load issued before the first product
        ks = [i * cfg.unroll + u for u in range(cfg.unroll)]
        cs = pl.ds(col, bi)
        tiles = [[weight_tile(w_ref, expert, cs, pl.ds(k * bk, bk), out_in) for k in ks] for w_ref in w_refs]
        out = []
        for acc, w_tiles, s_ref in zip(accs, tiles, s_refs, strict=True):
            for k, w in zip(ks, w_tiles, strict=True):
                prod = _times(w, x_operand(k), cfg, dtype, out_in)
                if s_ref is not None:
                    prod = prod * block_scale(s_ref, expert, col // FP8_BLOCK, (k * bk) // FP8_BLOCK, out_in)
                acc = acc + prod
            out.append(acc)
        return tuple(out)

    acc_shape = ((bi, FUSED_ROWS) if cfg.swap_ab else (FUSED_ROWS, bi)) if cfg.tensor_cores else (bi,)
    zeros = jnp.zeros(acc_shape, jnp.float32)
    gate, up = jax.lax.fori_loop(steps[0], steps[1], step, (zeros, zeros))
    return (gate, up) if x_scale is None else (gate * x_scale, up * x_scale)


def _down_products(h, w_ref, s_ref, expert, col, steps, out_at, cfg: FusedConfig, scaled: bool, out_in: bool, x_dtype):
    """h (fp32 [block_inter] as `_padded`, or accumulator form) times the down weight's rows [col, col +
    block_inter) on hidden blocks [steps[0], steps[1]) x unroll, stored into out[p, c] (out_at = (out_ref, p, c))."""
    out_ref, p, c = out_at
    bi, bo = cfg.block_inter, cfg.block_out
    dtype, f16 = _fused_dtype(cfg, scaled, x_dtype)
    h_scale = None
    if f16:
        h_scale = _pow2_scale(jnp.max(jnp.abs(h)))
        h = h / h_scale
    h = h.astype(dtype)

    def step(i, carry):
        js = [i * cfg.unroll + u for u in range(cfg.unroll)]
        tiles = [weight_tile(w_ref, expert, pl.ds(j * bo, bo), pl.ds(col, bi), out_in) for j in js]
        for j, w in zip(js, tiles, strict=True):  # loads first: the stores below would keep them in order
            y = _token_row(_times(w, h, cfg, dtype, out_in), cfg)
            if s_ref is not None:  # one scale, or one per output column when the block spans scale blocks
                out_block = j * bo + (jax.lax.broadcasted_iota(jnp.int32, (bo,), 0) if bo > FP8_BLOCK else 0)
                y = y * block_scale(s_ref, expert, out_block // FP8_BLOCK, col // FP8_BLOCK, out_in)
            out_ref[p, c, pl.ds(j * bo, bo)] = y if h_scale is None else y * h_scale
        return carry

    jax.lax.fori_loop(steps[0], steps[1], step, 0)


def _silu_gate(gate, up, routing):
    """The fused kernels' h on fp32 sums: silu(gate) * up * routing weight."""
    return _silu(gate) * up * routing.astype(jnp.float32)


def _owned(expert, w_ref) -> jax.Array:
    """Whether `expert` is one of this shard's (ids of other shards' experts fall outside [0, E))."""
    return (expert >= 0) & (expert < w_ref.shape[0])


def _store_zeros(out_ref, p, c, steps, cfg: FusedConfig):
    """Zeros in out[p, c] on hidden blocks [steps[0], steps[1]) x unroll: another shard's expert, so that the
    partial sums add up without a mask."""

    def step(j, carry):
        out_ref[p, c, pl.ds(j * cfg.block_out, cfg.block_out)] = jnp.zeros((cfg.block_out,), jnp.float32)
        return carry

    jax.lax.fori_loop(steps[0] * cfg.unroll, steps[1] * cfg.unroll, step, 0)


def _fused_kernel(ids_ref, rw_ref, x_ref, *refs, cfg: FusedConfig, top_k: int, scaled: bool, out_in: bool):
    """Program (p, c): assignment p's expert on intermediate columns [c * bi, (c + 1) * bi): h = silu(x Wg) *
    (x Wu) * routing weight for those columns, then out[p, c] = h @ Wd[those rows] ([hidden], fp32).

    On the tensor cores the token's row is the MMA's narrow side, padded with zero rows (so h and every product
    there stay 0); on the CUDA cores (`tensor_cores=False`) each tile, widened to fp32, is multiplied by the
    row (or h) and summed over its reduction axis.
    """
    w_refs, s_refs, out_ref = refs[:3], refs[3:6] if scaled else (None,) * 3, refs[-1]
    p, c = pl.program_id(0), pl.program_id(1)
    expert, col, hidden = ids_ref[p], c * cfg.block_inter, x_ref.shape[1]
    valid = _owned(expert, w_refs[0])
    down_steps = (0, hidden // cfg.block_out // cfg.unroll)

    @pl.when(valid)
    def _():
        steps = (0, hidden // cfg.block_k // cfg.unroll)
        gate, up = _gate_up_sums(x_ref, p // top_k, w_refs[:2], s_refs[:2], expert, col, steps, cfg, scaled, out_in)
        h = _silu_gate(gate, up, rw_ref[p])  # accumulator form: the padded rows stay 0
        out_at = (out_ref, p, c)
        _down_products(h, w_refs[2], s_refs[2], expert, col, down_steps, out_at, cfg, scaled, out_in, x_ref.dtype)

    pl.when(~valid)(lambda: _store_zeros(out_ref, p, c, down_steps, cfg))


def _fused_gate_up_kernel(ids_ref, x_ref, *refs, cfg: FusedConfig, top_k: int, scaled: bool, out_in: bool):
    """`split` > 1, first launch. Program (p, c, s): x Wg and x Wu of assignment p on intermediate block c over
    the s-th of `split` parts of hidden -> gate[p, s, block c], up[p, s, block c] (fp32). Other shards' experts
    write nothing (the second launch does not read them)."""
    w_refs, s_refs, (gate_ref, up_ref) = refs[:2], refs[2:4] if scaled else (None,) * 2, refs[-2:]
    p, c, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, col = ids_ref[p], c * cfg.block_inter
    per_part = x_ref.shape[1] // cfg.block_k // cfg.unroll // cfg.split

    @pl.when(_owned(expert, w_refs[0]))
    def _():
        steps = (part * per_part, (part + 1) * per_part)
        gate, up = _gate_up_sums(x_ref, p // top_k, w_refs, s_refs, expert, col, steps, cfg, scaled, out_in)
        gate_ref[p, part, pl.ds(col, cfg.block_inter)] = _token_row(gate, cfg)
        up_ref[p, part, pl.ds(col, cfg.block_inter)] = _token_row(up, cfg)


def _fused_down_kernel(ids_ref, rw_ref, gate_ref, up_ref, *refs, cfg: FusedConfig, scaled: bool, out_in: bool, x_dtype):
    """`split` > 1, second launch. Program (p, c, r): h = silu(gate) * up * routing weight on intermediate
    block c (the parts of the first launch added), then out[p, c] on the r-th of `split` parts of hidden."""
    w_ref, s_ref, out_ref = refs[0], refs[1] if scaled else None, refs[-1]
    p, c, part = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    expert, col, bi = ids_ref[p], c * cfg.block_inter, cfg.block_inter
    per_part = out_ref.shape[2] // cfg.block_out // cfg.unroll // cfg.split
    steps = (part * per_part, (part + 1) * per_part)
    valid = _owned(expert, w_ref)

    @pl.when(valid)
    def _():
        gate = sum(gate_ref[p, s, pl.ds(col, bi)] for s in range(cfg.split))
        up = sum(up_ref[p, s, pl.ds(col, bi)] for s in range(cfg.split))
        h = _padded(_silu_gate(gate, up, rw_ref[p]), cfg)
        _down_products(h, w_ref, s_ref, expert, col, steps, (out_ref, p, c), cfg, scaled, out_in, x_dtype)

    pl.when(~valid)(lambda: _store_zeros(out_ref, p, c, steps, cfg))


def _check_tiling(cfg: TileConfig, d_in: int, d_out: int, scaled: bool, what: str) -> None:
    for name, size in (("block_rows", cfg.block_rows), ("block_cols", cfg.block_cols), ("block_k", cfg.block_k)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"{what}: {name}={size} must be a power of two >= 16 (Triton tiles)")
    if d_in % cfg.block_k or d_out % cfg.block_cols:
        raise ValueError(f"{what}: weight [{d_in}, {d_out}] is not a multiple of tile {cfg.block_k}x{cfg.block_cols}")
    if scaled and (FP8_BLOCK % cfg.block_k or (cfg.block_cols > FP8_BLOCK and cfg.block_cols % FP8_BLOCK)):
        raise ValueError(f"{what}: fp8 needs block_k dividing {FP8_BLOCK} and block_cols dividing or multiple of it")


def experts_grouped(
    x: jax.Array,
    weights: jax.Array,
    ids: jax.Array,
    w_gate,
    w_up,
    w_down,
    *,
    config: KernelConfig | FusedConfig | W8A8Config | None = None,
    fp8_dot: str | None = None,
    layout: str = "in_out",
    w8a8: str = "off",
    interpret: bool = False,
) -> jax.Array:
    """Expert FFN on GPU via Pallas; same contract as `experts_ragged`. `interpret=True` runs anywhere (slow).

    `config`: the grouped kernels' tiles (KernelConfig), the fused decode kernel's (FusedConfig) or the w8a8
    kernels' (W8A8Config, fp8 weights only); default: by assignments and rows per expert (`default_config`).
    `fp8_dot` overrides a KernelConfig's or FusedConfig's (see KernelConfig).
    `layout`: "in_out" (weights [E, in, out], as `experts_ragged` takes them) or "out_in" ([E, out, in]).
    `w8a8` (`mimo_jax.config.W8A8_MODES`): fp8 experts run on `fp8_gemm_gpu` (activations quantized per token
    and 128 columns, fp8 tensor-core dots) at prefill sizes ("prefill": decode sizes keep the exact widening
    kernels) or at every size ("always", the numerics `moe.experts_ragged` emulates); "off": never.
    """
    if w8a8 not in W8A8_MODES:
        raise ValueError(f"w8a8={w8a8!r}: choose from {W8A8_MODES}")
    if layout not in EXPERT_LAYOUTS:
        raise ValueError(f"layout={layout!r}: choose from {EXPERT_LAYOUTS}")
    out_in = layout == "out_in"
    n, top_k = ids.shape
    wg, sg = _split_weight(w_gate)
    wu, su = _split_weight(w_up)
    wd, sd = _split_weight(w_down)
    num_experts = wg.shape[0]
    hidden, inter = (wg.shape[2], wg.shape[1]) if out_in else wg.shape[1:]
    want_down = (num_experts, hidden, inter) if out_in else (num_experts, inter, hidden)
    if wu.shape != wg.shape or wd.shape != want_down or x.shape != (n, hidden):
        raise ValueError(f"shapes disagree ({layout}): x {x.shape}, gate {wg.shape}, up {wu.shape}, down {wd.shape}")
    if (sg is None) != (su is None) or (sg is None) != (sd is None):
        raise ValueError("gate, up and down must all be bf16 arrays or all fp8 (values, scales) pairs")
    scaled = sg is not None
    m = n * top_k
    if m == 0:
        return jnp.zeros_like(x)
    if config is None:
        whole_groups = hidden % FP8_BLOCK == 0 and inter % FP8_BLOCK == 0  # w8a8 reduces in whole scale groups
        if scaled and whole_groups and w8a8 == "always":
            config = fp8_gemm_gpu.w8a8_config(m, num_experts)
        else:
            config = default_config(m, num_experts, scaled, inter, w8a8 == "prefill" and whole_groups)
        if isinstance(config, KernelConfig):
            config = dataclasses.replace(
                config, gate_up=_fit(config.gate_up, hidden, inter), down=_fit(config.down, inter, hidden)
            )
        elif isinstance(config, FusedConfig):
            config = _fit_fused(config, hidden)
    if isinstance(config, W8A8Config):
        if not scaled:
            raise ValueError("the w8a8 kernels (W8A8Config) need fp8 (values, scales) expert weights")
        return _experts_w8a8(x, weights, ids, (wg, wu, wd), (sg, su, sd), config, out_in, interpret)
    cfg = config if fp8_dot is None else dataclasses.replace(config, fp8_dot=fp8_dot)
    if cfg.fp8_dot not in FP8_DOTS:
        raise ValueError(f"fp8_dot={cfg.fp8_dot!r}: choose from {FP8_DOTS}")
    weights_and_scales = (wg, wu, wd) + ((sg, su, sd) if scaled else ())
    if isinstance(cfg, FusedConfig):
        return _experts_fused(x, weights, ids, weights_and_scales, cfg, scaled, out_in, interpret)
    _check_tiling(cfg.gate_up, hidden, inter, scaled, "gate/up")
    _check_tiling(cfg.down, inter, hidden, scaled, "down")

    pad = max(cfg.gate_up.block_rows, cfg.down.block_rows)  # any row window starting below m stays in bounds
    order, valid, group_sizes, tokens, routing = _sorted_rows(weights, ids, num_experts, pad)
    rows = m + pad

    with jax.named_scope("moe_gate_up"):
        c = cfg.gate_up
        n_tiles = max_tiles(m, num_experts, c.block_rows)
        n_cols = inter // c.block_cols
        table = schedule(group_sizes, c.block_rows, n_cols, n_tiles)
        kernel = functools.partial(_gate_up_kernel, cfg=c, scaled=scaled, fp8_dot=cfg.fp8_dot, out_in=out_in)
        x_op, x_scale = _dot_operand(x, cfg.fp8_dot, scaled)
        a_scale = () if x_scale is None else (x_scale,)
        inputs = (table, tokens, x_op, *a_scale, wg, wu) + ((sg, su) if scaled else ())
        (h,) = manual_axes.pallas_call(
            kernel, c, inputs, [((rows, inter), x.dtype)], n_tiles * n_cols, interpret, "moe_gate_up"
        )

    with jax.named_scope("moe_down"):
        c = cfg.down
        n_tiles = max_tiles(m, num_experts, c.block_rows)
        n_cols = hidden // c.block_cols
        table = schedule(group_sizes, c.block_rows, n_cols, n_tiles)
        kernel = functools.partial(_down_kernel, cfg=c, scaled=scaled, fp8_dot=cfg.fp8_dot, out_in=out_in)
        h_op, h_scale = _dot_operand(h, cfg.fp8_dot, scaled)
        a_scale = () if h_scale is None else (h_scale,)
        inputs = (table, routing, h_op, *a_scale, wd) + ((sd,) if scaled else ())
        (y,) = manual_axes.pallas_call(
            kernel, c, inputs, [((rows, hidden), x.dtype)], n_tiles * n_cols, interpret, "moe_down"
        )

    return _combine(y, order, valid, (n, top_k), x.dtype)


def _sorted_rows(weights, ids, num_experts: int, pad: int):
    """Assignments sorted by expert: (order [m], valid [m] (this shard's expert), group sizes [E], token of each
    sorted row and its routing weight, both padded by `pad` rows)."""
    top_k = ids.shape[1]
    with jax.named_scope("moe_sort"):
        flat = ids.reshape(-1)
        valid = (flat >= 0) & (flat < num_experts)
        flat = jnp.where(valid, flat, num_experts)  # foreign experts sort last and get no tiles
        order = jnp.argsort(flat, stable=True).astype(jnp.int32)
        group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
        tokens = jnp.pad(order // top_k, (0, pad))
        routing = jnp.pad(weights.reshape(-1).astype(jnp.float32)[order], (0, pad))
    return order, valid, group_sizes, tokens, routing


def _combine(y, order, valid, shape: tuple[int, int], dtype) -> jax.Array:
    """Sorted rows y [rows, H] back to tokens, summed over each token's top-k -> [N, H]."""
    n, top_k = shape
    m, rows = n * top_k, y.shape[0]
    with jax.named_scope("moe_combine"):
        position = jnp.zeros((m,), jnp.int32).at[order].set(jnp.arange(m, dtype=jnp.int32)).reshape(n, top_k)
        # foreign experts' rows point past the end: the gather reads only this shard's rows, not all N x K
        position = jnp.where(valid.reshape(n, top_k), position, rows)
        picked = jnp.take(y, position, axis=0, mode="fill", fill_value=0).astype(jnp.float32)
        return picked.sum(axis=1).astype(dtype)


def _experts_w8a8(x, weights, ids, w, s, cfg: W8A8Config, out_in: bool, interpret: bool) -> jax.Array:
    """The grouped FFN on `fp8_gemm_gpu`: x quantized per token and 128 columns, gate/up writing fp8 h, down."""
    (wg, wu, wd), (sg, su, sd) = w, s
    n, top_k = ids.shape
    m, num_experts, hidden = n * top_k, wg.shape[0], x.shape[1]
    inter = wg.shape[1] if out_in else wg.shape[2]
    if hidden % FP8_BLOCK or inter % FP8_BLOCK:
        raise ValueError(f"w8a8: hidden {hidden} and intermediate {inter} must be multiples of {FP8_BLOCK}")
    pad = max(cfg.gate_up.block_rows, cfg.down.block_rows)
    order, valid, group_sizes, tokens, routing = _sorted_rows(weights, ids, num_experts, pad)
    rows = m + pad
    with jax.named_scope("moe_w8a8_gate_up"):
        x_fp8, x_scales = fp8_gemm_gpu.quantize_groups(x)
        c = cfg.gate_up
        table = schedule(group_sizes, c.block_rows, inter // c.block_cols, max_tiles(m, num_experts, c.block_rows))
        h, h_scales = fp8_gemm_gpu.gate_up(
            table, tokens, x_fp8, x_scales, (wg, sg), (wu, su), rows=rows, tiles=c, out_in=out_in, interpret=interpret
        )
    with jax.named_scope("moe_w8a8_down"):
        c = cfg.down
        table = schedule(group_sizes, c.block_rows, hidden // c.block_cols, max_tiles(m, num_experts, c.block_rows))
        y = fp8_gemm_gpu.down(
            table, routing, h, h_scales, (wd, sd), tiles=c, out_in=out_in, out_dtype=x.dtype, interpret=interpret
        )
    return _combine(y, order, valid, (n, top_k), x.dtype)


def _experts_fused(x, weights, ids, weights_and_scales, cfg: FusedConfig, scaled: bool, out_in: bool, interpret):
    """The fused decode kernel over every assignment, then the partial sums added per token in XLA."""
    n, top_k = ids.shape
    wg = weights_and_scales[0]  # shapes checked by experts_grouped
    hidden, inter = x.shape[1], wg.shape[1 if out_in else 2]
    for name, size, dim, what, within_block in (
        ("block_inter", cfg.block_inter, inter, "intermediate", True),
        ("block_k", cfg.block_k, hidden, "hidden", True),
        ("block_out", cfg.block_out, hidden, "hidden", False),  # its scales may differ along it: a vector
    ):
        if size & (size - 1) or size < 16 or dim % size or (scaled and within_block and size > FP8_BLOCK):
            limit = f" and at most {FP8_BLOCK} (fp8 blocks)" if scaled and within_block else ""
            raise ValueError(f"fused: {name}={size} must be a power of two >= 16 dividing {what} {dim}{limit}")
    if cfg.unroll < 1 or (hidden // cfg.block_k) % cfg.unroll or (hidden // cfg.block_out) % cfg.unroll:
        raise ValueError(f"fused: unroll={cfg.unroll} must divide hidden {hidden} / block_k and / block_out")
    steps = (hidden // cfg.block_k // cfg.unroll, hidden // cfg.block_out // cfg.unroll)
    if cfg.split < 1 or steps[0] % cfg.split or steps[1] % cfg.split:
        raise ValueError(f"fused: split={cfg.split} must divide the loop steps over hidden {hidden} {steps}")
    n_cols, m = inter // cfg.block_inter, n * top_k
    flat_ids = ids.reshape(-1).astype(jnp.int32)
    routing = weights.reshape(-1)  # widened in the kernel: no conversion op before it
    shares = ((m, n_cols, hidden), jnp.float32)  # per (assignment, intermediate block): its share of [hidden]
    if cfg.split == 1:
        with jax.named_scope("moe_fused"):
            kernel = functools.partial(_fused_kernel, cfg=cfg, top_k=top_k, scaled=scaled, out_in=out_in)
            inputs = (flat_ids, routing, x, *weights_and_scales)
            (partial,) = manual_axes.pallas_call(kernel, cfg, inputs, [shares], (m, n_cols), interpret, "moe_fused")
    else:
        gate_up_w = weights_and_scales[:2] + (weights_and_scales[3:5] if scaled else ())
        down_w = weights_and_scales[2:3] + (weights_and_scales[5:6] if scaled else ())
        grid = (m, n_cols, cfg.split)
        with jax.named_scope("moe_fused_gate_up"):
            kernel = functools.partial(_fused_gate_up_kernel, cfg=cfg, top_k=top_k, scaled=scaled, out_in=out_in)
            parts = ((m, cfg.split, inter), jnp.float32)
            gate, up = manual_axes.pallas_call(
                kernel, cfg, (flat_ids, x, *gate_up_w), [parts, parts], grid, interpret, "moe_fused_gate_up"
            )
        with jax.named_scope("moe_fused_down"):
            kernel = functools.partial(_fused_down_kernel, cfg=cfg, scaled=scaled, out_in=out_in, x_dtype=x.dtype)
            inputs = (flat_ids, routing, gate, up, *down_w)
            (partial,) = manual_axes.pallas_call(kernel, cfg, inputs, [shares], grid, interpret, "moe_fused_down")
    with jax.named_scope("moe_combine"):  # other shards' experts wrote zeros
        return partial.reshape(n, top_k * n_cols, hidden).sum(axis=1).astype(x.dtype)


def experts_pallas_gpu(
    x, weights, ids, w_gate, w_up, w_down, fp8_dot: str | None = None, layout: str = "in_out", w8a8: str = "off"
) -> jax.Array:
    """EXPERT_IMPLS entry: the Pallas kernel on GPU; elsewhere a clear error (use "ragged" on CPU/TPU)."""
    if jax.default_backend() != "gpu":
        raise ValueError(f"the pallas_gpu MoE kernel needs a GPU backend, not {jax.default_backend()!r}")
    return experts_grouped(x, weights, ids, w_gate, w_up, w_down, fp8_dot=fp8_dot, layout=layout, w8a8=w8a8)


def quantize_fp8_blocks(w: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[E, in, out] -> (float8_e4m3fn values, float32 scales [E, in/128, out/128]), amax-scaled per block."""
    e, d_in, d_out = w.shape
    if d_in % FP8_BLOCK or d_out % FP8_BLOCK:
        raise ValueError(f"weight {w.shape} is not a multiple of {FP8_BLOCK}x{FP8_BLOCK} blocks")
    blocks = w.astype(jnp.float32).reshape(e, d_in // FP8_BLOCK, FP8_BLOCK, d_out // FP8_BLOCK, FP8_BLOCK)
    amax = jnp.abs(blocks).max(axis=(2, 4))
    scales = jnp.maximum(amax, 1e-12) / FP8_MAX
    values = (blocks / scales[:, :, None, :, None]).astype(jnp.float8_e4m3fn).reshape(w.shape)
    return values, scales


def dequantize_fp8_blocks(values: jax.Array, scales: jax.Array, dtype=jnp.float32) -> jax.Array:
    """Inverse of `quantize_fp8_blocks` (up to fp8 rounding): values * scale of their 128x128 block."""
    full = jnp.repeat(jnp.repeat(scales, FP8_BLOCK, axis=1), FP8_BLOCK, axis=2)
    full = full[:, : values.shape[1], : values.shape[2]]
    return (values.astype(jnp.float32) * full).astype(dtype)
