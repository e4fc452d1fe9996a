"""Block-FP8 w8a8 GEMMs for GPU in Pallas (Triton backend): fp8 activations times fp8 weights on the tensor cores.

Activations are quantized per (row, 128-column group) to float8_e4m3fn with one float32 scale each
(`quantize_groups`: amax / 448, as SGLang and vLLM serve block-FP8 checkpoints); weights come as stored (e4m3
values with float32 scales per 128 x 128 block, or per 128 inputs x one output column). The reduction runs in
steps of one scale group: acc += dot(a_tile, w_tile) * a_scale[:, None] * w_scale, the dot on fp8 operands with
a float32 result (wgmma on sm_90) and the scaled sum in float32 on the CUDA cores. That sum is also where the
tensor cores' reduced-precision fp8 accumulation is promoted to float32, every 128 (as DeepGEMM does).

Kernels over the MoE schedule of `mimo_jax.kernels.moe_gpu` (a table of (expert, row start, row end, column
tile) per program, rows sorted by expert), and one for a single weight:
- `gate_up`: h = silu(x Wg) * (x Wu) on an expert's rows (x gathered by token index), quantized to fp8 in the
  epilogue: a program's 128 columns are one scale group, so the down GEMM reads fp8 h with no pass between;
- `down`: y = (h Wd) * routing weight, in the activations' dtype;
- `matmul_w8a8`: x @ W for one weight (the dense projections at prefill sizes).

Weights [in, out] ("in_out") or [out, in] ("out_in", the reduction dim contiguous: the operand order fp8
tensor-core MMAs read; "in_out" tiles are transposed on their way to shared memory). Activation scales are
kept group-major, [groups, rows], so a row tile's scales are one contiguous load.

Pallas emits tt.dot with maxNumImpreciseAcc = 0, with which Triton adds every K=32 fp8 MMA into a separate
float32 accumulator (a wait after each instruction). `_accumulate_fp8_dots_in_mma` gives fp8 x fp8 dots
Triton's own sm_90 default (2^30: accumulate inside the MMA), as `tl.dot` would; the kernels here promote to
float32 every 128 themselves.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from mimo_jax import quant
from mimo_jax.kernels import manual_axes
from mimo_jax.quant import FP8_MAX

GROUP = quant.ACTIVATION_GROUP  # the reduction step: one activation scale group and one weight scale block
FP8_DTYPES = (jnp.float8_e4m3fn, jnp.float8_e5m2)
MMA_IMPRECISE_ACC = 2**30  # Triton's max_num_imprecise_acc_default on sm_90


@dataclasses.dataclass(frozen=True)
class GemmTiles:
    """One w8a8 kernel's tiling: rows and output columns per program (the reduction step is GROUP), launch."""

    block_rows: int
    block_cols: int
    num_warps: int
    num_stages: int


@dataclasses.dataclass(frozen=True)
class W8A8Config:
    """The MoE's two w8a8 kernels. gate/up keeps two accumulators; its block_cols is GROUP (h is quantized
    per program)."""

    gate_up: GemmTiles
    down: GemmTiles


# Prefill tiles (to be confirmed on an H100 by bench/bench_moe_kernel.py --w8a8, which sweeps W8A8_CANDIDATES):
# 128-row tiles where experts hold a few hundred rows (8192 tokens on Flash: 256 per expert), 64 below that.
W8A8_LARGE = W8A8Config(GemmTiles(128, GROUP, 8, 3), GemmTiles(128, 128, 8, 4))
W8A8_SMALL = W8A8Config(GemmTiles(64, GROUP, 4, 4), GemmTiles(64, 128, 4, 4))
W8A8_LARGE_ROWS = 192  # mean rows per expert from which W8A8_LARGE is the default
W8A8_CANDIDATES = (
    W8A8_LARGE,
    W8A8_SMALL,
    W8A8Config(GemmTiles(128, GROUP, 8, 4), GemmTiles(128, 256, 8, 3)),
    W8A8Config(GemmTiles(64, GROUP, 4, 3), GemmTiles(128, 128, 4, 4)),
    W8A8Config(GemmTiles(128, GROUP, 8, 3), GemmTiles(64, 256, 4, 3)),
)
# Single-weight GEMM (dense projections): one accumulator, wider column tiles.
MATMUL_TILES = GemmTiles(128, 128, 8, 4)
MATMUL_CANDIDATES = (MATMUL_TILES, GemmTiles(128, 256, 8, 3), GemmTiles(64, 128, 4, 4), GemmTiles(64, 256, 4, 3))


def w8a8_config(assignments: int, num_experts: int) -> W8A8Config:
    """Tiles by the mean rows per expert (static: from shapes, not the routing)."""
    return W8A8_LARGE if assignments / num_experts >= W8A8_LARGE_ROWS else W8A8_SMALL


# ----------------------------------------------------------------------------- fp8 dots in the Triton lowering
def _accumulate_fp8_dots_in_mma() -> None:
    """Wrap the Pallas Triton lowering of dot_general once: a dot of two fp8 operands gets maxNumImpreciseAcc =
    MMA_IMPRECISE_ACC (see the module docstring); every other dot lowers as before."""
    from jax._src.lib.mlir import ir
    from jax._src.pallas.triton import lowering

    base = lowering.triton_lowering_rules[jax.lax.dot_general_p]
    if getattr(base, "fp8_accumulates_in_mma", False):
        return

    def rule(ctx, a, b, **params):
        out = base(ctx, a, b, **params)
        if all(aval.dtype in FP8_DTYPES for aval in ctx.avals_in):
            dot = getattr(out.owner, "operation", out.owner)
            if dot.name == "tt.dot":  # float32 result: no cast after it
                i32 = ir.IntegerType.get_signless(32)
                dot.attributes["maxNumImpreciseAcc"] = ir.IntegerAttr.get(i32, MMA_IMPRECISE_ACC)
        return out

    rule.fp8_accumulates_in_mma = True
    lowering.triton_lowering_rules[jax.lax.dot_general_p] = rule


_accumulate_fp8_dots_in_mma()


# ----------------------------------------------------------------------------- activations (XLA)
def quantize_groups(a: jax.Array, rows: int | None = None) -> tuple[jax.Array, jax.Array]:
    """a [n, d] (d a multiple of GROUP) -> (e4m3 values [rows, d], float32 scales [d / GROUP, rows]) with
    scale = amax / 448 per row and group; `rows` >= n pads with zero rows (whole row tiles)."""
    n = a.shape[0]
    values, scale = quant.quantize_activations(jnp.pad(a, ((0, (n if rows is None else rows) - n), (0, 0))))
    return values, scale.T


# ----------------------------------------------------------------------------- kernels
# The pieces both expert kernels (these and `moe_gpu`'s grouped ones) share: a program's tile from the work table,
# weight tiles and block scales as stored, masked row stores.
def tile_at(table_ref, block_cols: int) -> tuple:
    """Program p's tile of a `moe_gpu.schedule` work table: (expert, row start, row end, first column)."""
    pid = pl.program_id(0)
    return table_ref[0, pid], table_ref[1, pid], table_ref[2, pid], table_ref[3, pid] * block_cols


def weight_tile(w_ref, expert, cols, ks, out_in: bool):
    """The weight tile over output slice `cols` and reduction slice `ks`, as stored ([out, in] when `out_in`);
    `expert` None: a dense weight."""
    if expert is None:
        return w_ref[cols, ks] if out_in else w_ref[ks, cols]
    return w_ref[expert, cols, ks] if out_in else w_ref[expert, ks, cols]


def block_scale(s_ref, expert, out_block, in_block, out_in: bool):
    """The fp8 block scale(s) at (output block, reduction block) of scales stored like their weight."""
    return s_ref[expert, out_block, in_block] if out_in else s_ref[expert, in_block, out_block]


def column_blocks(col, block_cols: int):
    """The 128-wide scale block of a tile's columns from `col`: one index, or one per column when it spans blocks."""
    if block_cols <= GROUP:
        return col // GROUP
    return (col + jax.lax.broadcasted_iota(jnp.int32, (block_cols,), 0)) // GROUP


def rows_before(row_start, row_end, shape) -> jax.Array:
    """Which rows of a tile starting at `row_start` lie before `row_end` (later rows are another expert's)."""
    return row_start + jax.lax.broadcasted_iota(jnp.int32, shape, 0) < row_end


def store_rows(out_ref, row_start, row_end, col, value, tiles) -> None:
    """Store a [block_rows, block_cols] tile at (row_start, col), only its rows before `row_end`; `tiles` has
    block_rows and block_cols."""
    target = out_ref.at[pl.ds(row_start, tiles.block_rows), pl.ds(col, tiles.block_cols)]
    plgpu.store(target, value.astype(out_ref.dtype), mask=rows_before(row_start, row_end, value.shape))


def _scaled_sums(a_at, a_scale_at, w_refs, w_scale_at, n_steps: int, tiles: GemmTiles, out_in: bool, expert, col):
    """For each weight: sum over groups g of (a_at(g) @ W[g-th 128 inputs, col:col + block_cols]) *
    a_scale_at(g)[:, None] * w_scale_at(w_index, g), float32 [block_rows, block_cols]; the weight scale is a
    scalar (one 128 x 128 block) or one per column [block_cols]."""
    contract = 1 if out_in else 0
    dims = (((1,), (contract,)), ((), ()))
    cols = pl.ds(col, tiles.block_cols)

    def step(g, accs):
        a, a_scale = a_at(g), a_scale_at(g)
        ks = pl.ds(g * GROUP, GROUP)
        out = []
        for index, (acc, w_ref) in enumerate(zip(accs, w_refs, strict=True)):
            w = weight_tile(w_ref, expert, cols, ks, out_in)
            prod = jax.lax.dot_general(a, w, dims, preferred_element_type=jnp.float32)
            w_scale = w_scale_at(index, g)
            if jnp.ndim(w_scale):
                out.append(acc + prod * (a_scale[:, None] * w_scale[None, :]))
            else:
                out.append(acc + prod * (a_scale * w_scale)[:, None])
        return tuple(out)

    zeros = jnp.zeros((tiles.block_rows, tiles.block_cols), jnp.float32)
    return jax.lax.fori_loop(0, n_steps, step, (zeros,) * len(w_refs))


def _block_scale_at(s_refs, expert, col: jax.Array, tiles: GemmTiles, out_in: bool):
    """w_scale_at for expert block scales stored like their weights ([E, in/128, out/128], or [E, out/128,
    in/128] when `out_in`): a scalar per step, or one per column when the tile spans blocks."""
    c_block = column_blocks(col, tiles.block_cols)

    def at(index, g):
        return block_scale(s_refs[index], expert, c_block, g, out_in)

    return at


def _gate_up_kernel(
    table_ref, token_ref, x_ref, xs_ref, wg_ref, wu_ref, sg_ref, su_ref, h_ref, hs_ref, *, tiles, out_in
):
    """Program p: rows [row start, row end) of one expert (x gathered by token), 128 intermediate columns:
    h = silu(x Wg) * (x Wu), stored as e4m3 with its per-row scale for this column group."""
    expert, row_start, row_end, col = tile_at(table_ref, tiles.block_cols)

    @pl.when(row_start < row_end)
    def _():
        tokens = token_ref[pl.ds(row_start, tiles.block_rows)]
        n_steps = x_ref.shape[1] // GROUP
        scale_at = _block_scale_at((sg_ref, su_ref), expert, col, tiles, out_in)
        gate, up = _scaled_sums(
            lambda g: x_ref[tokens, pl.ds(g * GROUP, GROUP)],
            lambda g: xs_ref[g, tokens],
            (wg_ref, wu_ref),
            scale_at,
            n_steps,
            tiles,
            out_in,
            expert,
            col,
        )
        h = gate / (1.0 + jnp.exp(-gate)) * up
        scale = jnp.maximum(jnp.max(jnp.abs(h), axis=1), 1e-30) / FP8_MAX
        values = jnp.clip(h * (1.0 / scale)[:, None], -FP8_MAX, FP8_MAX).astype(h_ref.dtype)
        store_rows(h_ref, row_start, row_end, col, values, tiles)
        in_rows = rows_before(row_start, row_end, scale.shape)
        plgpu.store(hs_ref.at[col // GROUP, pl.ds(row_start, tiles.block_rows)], scale, mask=in_rows)


def _down_kernel(table_ref, rw_ref, h_ref, hs_ref, wd_ref, sd_ref, y_ref, *, tiles, out_in):
    """Program p: y = (h Wd) * routing weight on rows [row start, row end) of one expert, block_cols columns."""
    expert, row_start, row_end, col = tile_at(table_ref, tiles.block_cols)

    @pl.when(row_start < row_end)
    def _():
        rows = pl.ds(row_start, tiles.block_rows)
        (acc,) = _scaled_sums(
            lambda g: h_ref[rows, pl.ds(g * GROUP, GROUP)],
            lambda g: hs_ref[g, rows],
            (wd_ref,),
            _block_scale_at((sd_ref,), expert, col, tiles, out_in),
            h_ref.shape[1] // GROUP,
            tiles,
            out_in,
            expert,
            col,
        )
        store_rows(y_ref, row_start, row_end, col, acc * rw_ref[rows][:, None], tiles)


def _matmul_kernel(x_ref, xs_ref, w_ref, s_ref, y_ref, *, tiles, out_in):
    """Program (i, j): rows [i * block_rows, ...) times the weight's columns [j * block_cols, ...); the weight
    scales are per (128 inputs, output column)."""
    i, j = pl.program_id(0), pl.program_id(1)
    rows, col = pl.ds(i * tiles.block_rows, tiles.block_rows), j * tiles.block_cols
    (acc,) = _scaled_sums(
        lambda g: x_ref[rows, pl.ds(g * GROUP, GROUP)],
        lambda g: xs_ref[g, rows],
        (w_ref,),
        lambda index, g: s_ref[g, pl.ds(col, tiles.block_cols)],
        x_ref.shape[1] // GROUP,
        tiles,
        out_in,
        None,
        col,
    )
    y_ref[rows, pl.ds(col, tiles.block_cols)] = acc.astype(y_ref.dtype)


def check_tiles(tiles: GemmTiles, d_out: int, what: str) -> None:
    """Tiles Triton can compile that cover `d_out` output columns exactly."""
    for name, size in (("block_rows", tiles.block_rows), ("block_cols", tiles.block_cols)):
        if size & (size - 1) or size < 16:
            raise ValueError(f"{what}: {name}={size} must be a power of two >= 16 (Triton tiles)")
    if d_out % tiles.block_cols:
        raise ValueError(f"{what}: {d_out} output columns are not a multiple of block_cols={tiles.block_cols}")
    if tiles.block_cols > GROUP and tiles.block_cols % GROUP:
        raise ValueError(f"{what}: block_cols={tiles.block_cols} must divide or be a multiple of {GROUP}")


def gate_up(
    table: jax.Array,
    tokens: jax.Array,
    x_fp8: jax.Array,
    x_scales: jax.Array,
    w_gate: tuple[jax.Array, jax.Array],
    w_up: tuple[jax.Array, jax.Array],
    *,
    rows: int,
    tiles: GemmTiles,
    out_in: bool,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """h = silu(x Wg) * (x Wu) for every scheduled (expert, row tile, 128 columns): (e4m3 h [rows, I], float32
    scales [I / 128, rows]). `table`: `moe_gpu.schedule` for block_rows and 128-column tiles; `tokens` [>= rows]:
    the x row of each sorted row; x_fp8 / x_scales: `quantize_groups(x)`; weights (values, block scales)."""
    (wg, sg), (wu, su) = w_gate, w_up
    inter = wg.shape[1] if out_in else wg.shape[2]
    if tiles.block_cols != GROUP:
        raise ValueError(f"gate/up: block_cols={tiles.block_cols} must be {GROUP} (h is quantized per program)")
    check_tiles(tiles, inter, "gate/up")
    kernel = functools.partial(_gate_up_kernel, tiles=tiles, out_in=out_in)
    outputs = [((rows, inter), jnp.float8_e4m3fn), ((inter // GROUP, rows), jnp.float32)]
    inputs = (table, tokens, x_fp8, x_scales, wg, wu, sg, su)
    h, h_scales = manual_axes.pallas_call(
        kernel, tiles, inputs, outputs, (table.shape[1],), interpret, "moe_w8a8_gate_up"
    )
    return h, h_scales


def down(
    table: jax.Array,
    routing: jax.Array,
    h: jax.Array,
    h_scales: jax.Array,
    w_down: tuple[jax.Array, jax.Array],
    *,
    tiles: GemmTiles,
    out_in: bool,
    out_dtype,
    interpret: bool = False,
) -> jax.Array:
    """y = (h Wd) * routing weight for every scheduled (expert, row tile, column tile) -> [rows, H] `out_dtype`.
    `table`: `moe_gpu.schedule` for these tiles; `routing` [rows] float32 per sorted row."""
    wd, sd = w_down
    hidden = wd.shape[1] if out_in else wd.shape[2]
    check_tiles(tiles, hidden, "down")
    kernel = functools.partial(_down_kernel, tiles=tiles, out_in=out_in)
    inputs = (table, routing, h, h_scales, wd, sd)
    outputs = [((h.shape[0], hidden), out_dtype)]
    (y,) = manual_axes.pallas_call(kernel, tiles, inputs, outputs, (table.shape[1],), interpret, "moe_w8a8_down")
    return y


def matmul_w8a8(
    x: jax.Array,
    values: jax.Array,
    col_scales: jax.Array,
    *,
    layout: str = "in_out",
    tiles: GemmTiles | None = None,
    interpret: bool = False,
) -> jax.Array:
    """x [M, K] @ W -> [M, N] in x.dtype, x quantized per (row, 128 columns) here. W: e4m3 `values` [K, N]
    ("in_out") or [N, K] ("out_in") with `col_scales` float32 [K / 128, N] (per 128 inputs and output column:
    `column_scales` spreads 128 x 128 block scales)."""
    if layout not in ("in_out", "out_in"):
        raise ValueError(f"layout={layout!r}: choose 'in_out' or 'out_in'")
    out_in = layout == "out_in"
    m, k = x.shape
    n = values.shape[0] if out_in else values.shape[1]
    if values.ndim != 2 or (values.shape[1] if out_in else values.shape[0]) != k:
        raise ValueError(f"x [{m}, {k}] and weight {values.shape} ({layout}) disagree")
    if col_scales.shape != (k // GROUP, n) or k % GROUP:
        raise ValueError(f"weight {values.shape}: need K a multiple of {GROUP} and column scales {(k // GROUP, n)}")
    tiles = tiles or MATMUL_TILES
    check_tiles(tiles, n, "matmul")
    rows = -(-m // tiles.block_rows) * tiles.block_rows
    x_fp8, x_scales = quantize_groups(x, rows)
    kernel = functools.partial(_matmul_kernel, tiles=tiles, out_in=out_in)
    grid = (rows // tiles.block_rows, n // tiles.block_cols)
    inputs = (x_fp8, x_scales, values, col_scales.astype(jnp.float32))
    (y,) = manual_axes.pallas_call(kernel, tiles, inputs, [((rows, n), x.dtype)], grid, interpret, "matmul_w8a8")
    return y[:m]


def column_scales(scales: jax.Array, block_out: int, n: int) -> jax.Array:
    """Block scales [K / 128, ceil(N / block_out)] -> one per (128 inputs, output column) [K / 128, N]."""
    return jnp.repeat(scales.astype(jnp.float32), block_out, axis=1)[:, :n] if block_out > 1 else scales
