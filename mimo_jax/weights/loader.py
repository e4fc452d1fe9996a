"""Checkpoint tensors -> model parameters.

`parameter_sources(cfg)` is the single table saying which checkpoint tensors (hub names) make
each model parameter and how; loading, validation and the memory planner all read it.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.model import MiMoModel
from mimo_jax.weights.checkpoint import Checkpoint
from mimo_jax.weights.safetensors_io import CheckpointError

_FLOAT_DTYPES = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(jnp.bfloat16), np.dtype(np.float64)}


@dataclasses.dataclass(frozen=True)
class ParamSource:
    """Checkpoint tensors (with their torch-layout shapes) that assemble into one parameter."""

    path: tuple[Any, ...]  # parameter path in the model's state
    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]
    assemble: Callable[[list[np.ndarray]], np.ndarray]


def _identity(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0]


def _transpose(arrays: list[np.ndarray]) -> np.ndarray:
    return arrays[0].T


def _heads_in(n: int, d: int) -> Callable[[list[np.ndarray]], np.ndarray]:
    """torch [n*d, H] -> [H, n, d]"""
    return lambda a: a[0].reshape(n, d, -1).transpose(2, 0, 1)


def _heads_out(n: int, d: int) -> Callable[[list[np.ndarray]], np.ndarray]:
    """torch [H, n*d] -> [n, d, H]"""
    return lambda a: a[0].reshape(-1, n, d).transpose(1, 2, 0)


def _stack_transposed(arrays: list[np.ndarray]) -> np.ndarray:
    """E x torch [out, in] -> [E, in, out]"""
    return np.stack([a.T for a in arrays])


def parameter_sources(cfg: MiMoConfig) -> list[ParamSource]:
    h, v = cfg.hidden_size, cfg.vocab_size
    out = [ParamSource(("embed_tokens",), ("model.embed_tokens.weight",), ((v, h),), _identity)]
    for i, spec in enumerate(cfg.layers):
        p = f"model.layers.{i}."
        n, kv, d, dv = spec.num_heads, spec.num_kv_heads, spec.head_dim, spec.v_head_dim
        layer = ("layers", i)
        out += [
            ParamSource((*layer, "input_layernorm", "weight"), (p + "input_layernorm.weight",), ((h,),), _identity),
            ParamSource(
                (*layer, "post_attention_layernorm", "weight"),
                (p + "post_attention_layernorm.weight",),
                ((h,),),
                _identity,
            ),
            ParamSource(
                (*layer, "self_attn", "q_proj"), (p + "self_attn.q_proj.weight",), ((n * d, h),), _heads_in(n, d)
            ),
            ParamSource(
                (*layer, "self_attn", "k_proj"), (p + "self_attn.k_proj.weight",), ((kv * d, h),), _heads_in(kv, d)
            ),
            ParamSource(
                (*layer, "self_attn", "v_proj"), (p + "self_attn.v_proj.weight",), ((kv * dv, h),), _heads_in(kv, dv)
            ),
            ParamSource(
                (*layer, "self_attn", "o_proj"), (p + "self_attn.o_proj.weight",), ((h, n * dv),), _heads_out(n, dv)
            ),
        ]
        if spec.has_sink:
            out.append(
                ParamSource((*layer, "self_attn", "sink"), (p + "self_attn.attention_sink_bias",), ((n,),), _identity)
            )
        if spec.moe:
            e, i_moe = cfg.num_experts, cfg.moe_intermediate_size
            experts = range(e)
            out += [
                ParamSource((*layer, "mlp", "router"), (p + "mlp.gate.weight",), ((e, h),), _identity),
                ParamSource(
                    (*layer, "mlp", "correction_bias"), (p + "mlp.gate.e_score_correction_bias",), ((e,),), _identity
                ),
            ]
            for proj, shape in (("gate_proj", (i_moe, h)), ("up_proj", (i_moe, h)), ("down_proj", (h, i_moe))):
                names = tuple(f"{p}mlp.experts.{x}.{proj}.weight" for x in experts)
                out.append(ParamSource((*layer, "mlp", proj), names, (shape,) * e, _stack_transposed))
        else:
            im = cfg.intermediate_size
            for proj, shape in (("gate_proj", (im, h)), ("up_proj", (im, h)), ("down_proj", (h, im))):
                out.append(ParamSource((*layer, "mlp", proj), (f"{p}mlp.{proj}.weight",), (shape,), _transpose))
    out.append(ParamSource(("norm", "weight"), ("model.norm.weight",), ((h,),), _identity))
    if not cfg.tie_word_embeddings:
        out.append(ParamSource(("lm_head",), ("lm_head.weight",), ((v, h),), _transpose))
    return out


def _read(ckpt: Checkpoint, src: ParamSource) -> list[np.ndarray]:
    arrays = []
    for name, shape in zip(src.names, src.shapes, strict=True):
        if name not in ckpt:
            raise CheckpointError(f"{ckpt.directory}: missing tensor {name!r}")
        got = ckpt.shape(name)
        if got != shape:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name!r} has shape {list(got)} but the config implies {list(shape)}"
            )
        dtype = ckpt.dtype(name)
        if dtype not in _FLOAT_DTYPES:
            raise CheckpointError(
                f"{ckpt.file_of(name)}: tensor {name!r} has dtype {dtype}; expected a float type "
                "(quantized tensors need a quantization_config)"
            )
        arrays.append(ckpt.get(name))
    return arrays


def _check_unexpected(ckpt: Checkpoint, used: set[str], mtp: bool) -> None:
    for name in ckpt.names():
        if name in used or (not mtp and name.startswith("model.mtp.")):
            continue
        raise CheckpointError(f"{ckpt.file_of(name)}: unexpected tensor {name!r} (not part of this config's model)")


def abstract_model(cfg: MiMoConfig, dtype: Any) -> MiMoModel:
    """The model's structure with shape-only parameters (no memory)."""
    return nnx.eval_shape(lambda: MiMoModel(cfg, dtype=dtype, rngs=None))


def load_params(
    directory: str | os.PathLike, dtype: Any = jnp.float32, put: Callable[[tuple, np.ndarray], jax.Array] | None = None
) -> MiMoModel:
    """Read a checkpoint into a `MiMoModel`. `put(path, host_array)` places each parameter (default: device 0)."""
    ckpt = Checkpoint(directory)
    cfg = ckpt.config
    model = abstract_model(cfg, dtype)
    params = {path: var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)}
    sources = parameter_sources(cfg)
    missing = set(params) - {s.path for s in sources}
    if missing:
        raise AssertionError(f"parameters without a checkpoint source: {sorted(missing)}")
    used: set[str] = set()
    for src in sources:  # validate everything before placing anything
        _read(ckpt, src)
        used.update(src.names)
    _check_unexpected(ckpt, used, mtp=False)
    put = put or (lambda path, arr: jnp.asarray(arr))
    for src in sources:
        var = params[src.path]
        host = np.asarray(src.assemble(_read(ckpt, src)), dtype=var.get_value().dtype)
        if host.shape != var.get_value().shape:
            raise AssertionError(f"{src.path}: assembled {host.shape}, model expects {var.get_value().shape}")
        var.set_value(put(src.path, host))
    return model
