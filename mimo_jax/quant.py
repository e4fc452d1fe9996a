"""Block-quantized FP8 weights: one on-device representation and one accessor for the model.

`BlockQuantized` holds float8_e4m3fn values in the parameter's own (input-major) shape and
float32 scales with one entry per block: `W[i, j, ...] = values[i, j, ...] * scales[i // b0, j // b1, ...]`
where `block = (b0, b1, ...)` (a block size of 1 gives every index of that axis its own scale).
Layouts the importer produces (block 128 in the released checkpoints):

| parameter | values | scales | block |
|---|---|---|---|
| dense MLP gate/up [H, I], down [I, H] | fp8, input-major | [ceil(in/128), ceil(out/128)] | (128, 128) |
| experts gate/up [E, H, I], down [E, I, H] | fp8, [E, in, out] | [E, ceil(in/128), ceil(out/128)] | (1, 128, 128) |
| attention q/k/v [H, heads, head_dim] | fp8 | [ceil(H/128), heads, head_dim] | (128, 1, 1) |

Attention projections get one scale per output row because their checkpoint blocks do not line
up with heads (head_dim 192, per-shard fused QKV, Flash's per-head fused K/V blocks).
Expert blocks are the checkpoint's own 128x128 blocks, transposed: a grouped-matmul kernel can
consume `values[e]` ([in, out]) with `scales[e]` directly.

`weight(param)` is what model code calls to read any weight: it returns the array, dequantizing
(f32 multiply, cast to the model's dtype) inside the jitted computation when quantized.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class BlockQuantized:
    """A weight stored as float8 values with float32 per-block scales (see module docstring)."""

    values: jax.Array
    scales: jax.Array
    block: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    dtype: str = dataclasses.field(metadata=dict(static=True), default="bfloat16")  # dequantized dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def ndim(self) -> int:
        return len(self.values.shape)

    @property
    def nbytes(self) -> int:
        return math.prod(self.values.shape) * FP8.itemsize + math.prod(self.scales.shape) * 4

    def dequantize(self, dtype: Any = None) -> jax.Array:
        """values * scales in float32, cast to `dtype`: one fused elementwise pass on TPU/GPU.

        The last (minor) axis's scales are repeated (1/b of the weight's size); every other axis is
        split into [n/b, b] so the scales broadcast over b. Repeating them along every axis would
        materialize a float32 scale tensor as large as the weight (the TPU compiler does not fuse
        that broadcast through the reshape into the multiply).
        """
        shape, block, last = self.values.shape, self.block, self.values.ndim - 1
        scales = self.scales.astype(jnp.float32)
        split = [axis < last and b > 1 and n % b == 0 for axis, (n, b) in enumerate(zip(shape, block, strict=True))]
        for axis, (n, b) in enumerate(zip(shape, block, strict=True)):
            if b > 1 and not split[axis]:
                scales = jax.lax.slice_in_dim(jnp.repeat(scales, b, axis=axis), 0, n, axis=axis)
        values_shape = [
            d for axis, n in enumerate(shape) for d in ((n // block[axis], block[axis]) if split[axis] else (n,))
        ]
        scales_shape = [d for axis, n in enumerate(scales.shape) for d in ((n, 1) if split[axis] else (n,))]
        values = self.values.reshape(values_shape).astype(jnp.float32)
        return (values * scales.reshape(scales_shape)).astype(dtype or self.dtype).reshape(shape)


def scale_shape(shape: tuple[int, ...], block: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(-(-n // b) for n, b in zip(shape, block, strict=True))


def tied(value: Any, after: jax.Array) -> Any:
    """A block-quantized `value` made to wait for `after` (an optimization barrier, no copy); others as given.

    Its dequantization then cannot run before the activation it is applied to exists: else XLA,
    seeing it depends on no activation, may dequantize every layer's weights up front (and hoist
    them out of the decode loop), holding them all in bf16 at once.
    """
    if not isinstance(value, BlockQuantized):
        return value
    values, scales, _ = jax.lax.optimization_barrier((value.values, value.scales, after))
    return dataclasses.replace(value, values=values, scales=scales)


def blocks_split_evenly(value: Any, spec: Any, mesh: Any) -> bool:
    """Whether every shard of `value` laid out by PartitionSpec `spec` on `mesh` holds whole blocks
    (True for a plain array, or without a mesh): the scales then shard like the values."""
    if not isinstance(value, BlockQuantized):
        return True
    if mesh is None or spec is None:
        return True
    for n, b, axes in zip(value.shape, value.block, tuple(spec) + (None,) * value.ndim, strict=False):
        axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
        if n % (b * math.prod(mesh.shape[a] for a in axes)):  # a shard's rows: whole blocks
            return False
    return True


def dequantize_experts(w: Any, group: int = 8) -> jax.Array:
    """Stacked expert weights [E, ...] (an array, or `BlockQuantized`) in bf16, dequantized `group` experts
    at a time in a loop: the float32 working set (the products and the broadcast block scales, which
    the TPU compiler materializes) is one group's, not every expert's at once."""
    if not isinstance(w, BlockQuantized):
        return w
    e = w.shape[0]
    g = math.gcd(e, group)
    if g == e:
        return w.dequantize()
    one = lambda vs: dataclasses.replace(w, values=vs[0], scales=vs[1]).dequantize()
    grouped = lambda a: a.reshape((e // g, g) + a.shape[1:])
    out = jax.lax.map(one, (grouped(w.values), grouped(w.scales)))
    return out.reshape(w.shape)


# At most this many activation rows go through `project`'s per-block partial products; more rows dequantize
# the weight once (the partials [rows, I/b, *out] in float32 outgrow the bf16 copy they avoid).
BLOCKED_PROJECTION_MAX_ROWS = 32


def project(x: jax.Array, param: Any, platform: str = "cpu") -> jax.Array:
    """x [..., I] @ W [I, *out] -> [..., *out] for a weight parameter (or raw value) W, quantized or not.

    A block-quantized W applied to few rows (decode, up to BLOCKED_PROJECTION_MAX_ROWS): partial products per
    input block on the fp8 values (widened inside the dot), scaled per (input block, output block) and summed in
    float32 -- the attention q/k/v (blocks (b, 1, 1)) everywhere, the dense MLP (128 x 128 blocks) on GPU
    (`platform`). No dequantized copy of W is written and read back: that pass made a dense fp8 MLP projection at
    one row 3.9x slower on an H100 (141 vs 36 us at Flash's 4096 x 16384, `bench/bench_projection.py`). On CPU
    the widening of 2-d blocks is a standalone convert that XLA hoists out of a decode loop (every such weight
    in bf16 at once), so there they keep the dequantized path.
    Otherwise the weight is read through `weight` (dequantized, ordered after x).
    """
    value = param.get_value() if hasattr(param, "get_value") else param
    rows = math.prod(x.shape[:-1])
    blocked = _blocks_divide(value) and (platform == "gpu" or all(b == 1 for b in value.block[1:]))
    if not blocked or rows > BLOCKED_PROJECTION_MAX_ROWS:
        w = weight(param, after=x)
        return jnp.tensordot(x, w, axes=1)
    values, scales = block_views(tied(value, x))
    c, b = values.shape[:2]
    out = "".join(chr(ord("n") + i) for i in range(values.ndim - 2))  # letters of the output dims
    blocks_x = x.reshape(*x.shape[:-1], c, b)
    partial = jnp.einsum(
        f"...cb,cb{out}->...c{out}", blocks_x, values.astype(x.dtype), preferred_element_type=jnp.float32
    )
    y = jnp.sum(partial * scales, axis=1 - values.ndim)  # over c: scales [c, *out'] broadcast on the split blocks
    return y.reshape(*x.shape[:-1], *value.shape[1:]).astype(x.dtype)


def block_views(value: BlockQuantized) -> tuple[jax.Array, jax.Array]:
    """A weight [I, *out] whose blocks tile it as (values [I/b, b, *out'], float32 scales [I/b, *out']), where each
    output dim with blocks of bo > 1 is split [n/bo, bo] and its scales [n/bo, 1] broadcast over bo (no copies)."""
    n_in, b = value.shape[0], value.block[0]
    out_dims, scale_dims = [], []
    for n, bo in zip(value.shape[1:], value.block[1:], strict=True):
        out_dims += [n // bo, bo] if bo > 1 else [n]
        scale_dims += [n // bo, 1] if bo > 1 else [n]
    values = value.values.reshape(n_in // b, b, *out_dims)
    return values, value.scales.astype(jnp.float32).reshape(n_in // b, *scale_dims)


def _blocks_divide(value: Any) -> bool:
    """A block-quantized weight whose blocks tile every axis exactly (`project`'s blocked path)."""
    return isinstance(value, BlockQuantized) and all(n % b == 0 for n, b in zip(value.shape, value.block, strict=True))


# w8a8: activations quantized to e4m3 per (row, ACTIVATION_GROUP columns), as SGLang and vLLM serve block-FP8.
ACTIVATION_GROUP = 128


def quantize_activations(a: jax.Array) -> tuple[jax.Array, jax.Array]:
    """a [..., d] (d a multiple of ACTIVATION_GROUP) -> (e4m3 values [..., d], float32 scales [..., d / 128]):
    scale = amax / 448 per group of 128 columns of a row."""
    d = a.shape[-1]
    if d % ACTIVATION_GROUP:
        raise ValueError(f"activations {a.shape}: the last dim must be a multiple of {ACTIVATION_GROUP}")
    groups = a.astype(jnp.float32).reshape(*a.shape[:-1], d // ACTIVATION_GROUP, ACTIVATION_GROUP)
    scale = jnp.maximum(jnp.max(jnp.abs(groups), axis=-1), 1e-30) / FP8_MAX
    values = jnp.clip(groups / scale[..., None], -FP8_MAX, FP8_MAX).astype(jnp.float8_e4m3fn)
    return values.reshape(a.shape), scale


def round_activations(a: jax.Array) -> jax.Array:
    """a as w8a8 kernels see it: `quantize_activations` and back, in a's dtype (XLA's w8a8 numerics)."""
    values, scale = quantize_activations(a)
    groups = values.astype(jnp.float32).reshape(*scale.shape, ACTIVATION_GROUP) * scale[..., None]
    return groups.reshape(a.shape).astype(a.dtype)


def w8a8_ready(value: Any) -> bool:
    """Whether a weight [K, *out] can meet w8a8 activations: FP8 blocks of ACTIVATION_GROUP inputs that are
    whole 128 x 128 blocks (2-d) or per output element, K and the outputs multiples of 128."""
    if not isinstance(value, BlockQuantized) or value.ndim < 2 or value.block[0] != ACTIVATION_GROUP:
        return False
    outputs, out_blocks = math.prod(value.shape[1:]), value.block[1:]
    blocks_fit = all(b == 1 for b in out_blocks) or (value.ndim == 2 and out_blocks[0] == ACTIVATION_GROUP)
    return blocks_fit and value.shape[0] % ACTIVATION_GROUP == 0 and outputs % ACTIVATION_GROUP == 0


def weight(param: Any, after: jax.Array | None = None) -> jax.Array:
    """The value of a weight parameter (an `nnx.Param` or a raw value), dequantized if block-quantized.

    `after`: the activation the weight is applied to; a quantized weight's dequantization waits for it (`tied`).
    """
    value = param.get_value() if hasattr(param, "get_value") else param
    if isinstance(value, BlockQuantized):
        return (value if after is None else tied(value, after)).dequantize()
    return param[...] if hasattr(param, "get_value") else value


# ----------------------------------------------------------------------------- host (numpy) helpers
def expand_scales(scales: np.ndarray, shape: tuple[int, ...], block: tuple[int, ...]) -> np.ndarray:
    """Per-element scales of a `shape` tensor from its block scales."""
    out = np.asarray(scales, np.float32)
    for axis, (size, b) in enumerate(zip(shape, block, strict=True)):
        if b > 1:
            out = np.repeat(out, b, axis=axis).take(np.arange(size), axis=axis)
    return out


def dequantize_blocks(values: np.ndarray, scales: np.ndarray, block: tuple[int, ...], dtype: Any = np.float32):
    """Reference dequantization (float32 multiply, as every FP8 loader does), cast to `dtype`."""
    full = expand_scales(scales, values.shape, block)
    return (values.astype(np.float32) * full).astype(dtype)


def quantize_blocks(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """[R, C] float -> (float8_e4m3fn [R, C], float32 scale_inv [ceil(R/br), ceil(C/bc)]), as the releases do:
    each block's scale is amax / 448; partial edge blocks use the rows and columns they have."""
    w = np.asarray(w, np.float32)
    r, c = w.shape
    br, bc = block
    rb, cb = -(-r // br), -(-c // bc)
    padded = np.zeros((rb * br, cb * bc), np.float32)
    padded[:r, :c] = w
    amax = np.abs(padded.reshape(rb, br, cb, bc)).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    q = np.clip(w / expand_scales(scale, (r, c), block), -FP8_MAX, FP8_MAX).astype(FP8)
    return q, scale
