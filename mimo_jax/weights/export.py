"""Write checkpoints in the released MiMo-V2 layout (for fixtures, demos and round trips).

`export_release(tensors, hub_config, out_dir, layout=..., fp8=...)` takes float tensors under their
hub names in the *separate* layout (torch [out, in]: `self_attn.{q,k,v}_proj.weight`, MTP layers
as `model.mtp.layers.K.*` with `pre_mlp_layernorm`) and writes what the releases ship:

- `config.json` in the hub spelling, with `quantization_config` (fp8, e4m3, 128x128 blocks,
  `ignored_layers` = every o_proj) when `fp8`, and `attention_projection_layout: fused_qkv` for
  the fused layout;
- `layout="fused_qkv"` (V2.5, Pro): one `qkv_proj` per layer, T = `num_key_value_heads` shards of
  [Q_r | K_r | V_r], FP8 blocks per shard (scale rows rounded up per shard);
  `layout="separate"` (Flash): q/k/v tensors; `fused_kv_layers` picks layers whose K and V are
  quantized as one per-head [K | V] block column (Flash's quirk);
- FP8 `weight_scale_inv` (float32) beside every quantized weight (the table's `quantizable`
  tensors); other tensors in `float_dtype` (router and correction bias float32);
- several files with `model.safetensors.index.json` when they exceed `max_file_bytes`, MTP
  tensors in `model_mtp.safetensors` (fused layout, as V2.5/Pro ship them).

`hub_tensors(model)` gives the input dict from a `MiMoModel`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from typing import Any

import ml_dtypes
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.quant import quantize_blocks, weight
from mimo_jax.weights.checkpoint import INDEX_NAME
from mimo_jax.weights.safetensors_io import save_file
from mimo_jax.weights.table import (
    COPY,
    EXPERTS,
    F32,
    HEADS_IN,
    HEADS_OUT,
    TRANSPOSE,
    attention_rows,
    ceil_div,
    checkpoint_tensors,
    kv_blocked_per_head,
    parameter_sources,
)

LAYOUTS = ("fused_qkv", "separate")
MTP_FILE = "model_mtp.safetensors"
_MTP_RE = re.compile(r"^model\.mtp\.layers\.(\d+)\.")
_FLOAT_DTYPES = {"bfloat16", "float32"}


def release_config(hub_config: Mapping[str, Any], layout: str, fp8: bool, block_size: int = 128) -> dict:
    """The hub config as a release of this layout writes it."""
    raw = copy.deepcopy(dict(hub_config))
    target = raw.get("text_config", raw)
    if layout == "fused_qkv":
        target["attention_projection_layout"] = "fused_qkv"
    else:
        target.pop("attention_projection_layout", None)
    raw.pop("quantization_config", None)
    target.pop("quantization_config", None)
    if fp8:
        n = MiMoConfig.from_dict(raw).num_layers
        raw["quantization_config"] = {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [block_size, block_size],
            "ignored_layers": [f"model.layers.{i}.self_attn.o_proj" for i in range(n)]
            + ["model.decoder.self_attn.o_proj"],
        }
    return raw


def _quantize_grouped(w: np.ndarray, groups: int, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """Quantize each of `groups` equal row shards on its own (fused qkv)."""
    parts = [quantize_blocks(shard, block) for shard in np.split(w, groups, axis=0)]
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def _quantize_kv_per_head(k: np.ndarray, v: np.ndarray, kv: int, block: tuple[int, int]):
    """Flash's per-head fused K/V blocks: each head's [K_h; V_h] rows quantized as one column of blocks."""
    d, dv = k.shape[0] // kv, v.shape[0] // kv
    k_blocks = ceil_div(d, block[0])
    k8, v8, ks, vs = [], [], [], []
    for h in range(kv):
        q, s = quantize_blocks(np.concatenate([k[h * d : (h + 1) * d], v[h * dv : (h + 1) * dv]]), block)
        k8.append(q[:d])
        v8.append(q[d:])
        ks.append(s[:k_blocks])
        vs.append(s[k_blocks:])
    return np.concatenate(k8), np.concatenate(ks), np.concatenate(v8), np.concatenate(vs)


def export_release(
    params_by_hub_name: Mapping[str, np.ndarray],
    hub_config: Mapping[str, Any],
    out_dir: str | os.PathLike,
    *,
    layout: str = "fused_qkv",
    fp8: bool = True,
    fused_kv_layers: Iterable[int] | bool = (),
    block_size: int = 128,
    float_dtype: str = "bfloat16",
    max_file_bytes: int = 4 << 30,
    mtp_file: bool | None = None,
    extra_files: Iterable[str | os.PathLike] = (),
) -> str:
    """Write `params_by_hub_name` (separate-layout hub names, float arrays) as a release checkpoint in `out_dir`.

    `fused_kv_layers`: layer indices (main layers; MTP layer K is `num_layers + K`) whose K/V use
    Flash's per-head fused blocks (True = all), only with layout="separate" and fp8.
    `extra_files` (tokenizer files, ...) are copied beside. Written atomically: nothing at
    `out_dir` unless everything succeeded. Returns `out_dir`.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout={layout!r}: expected one of {LAYOUTS}")
    if float_dtype not in _FLOAT_DTYPES:
        raise ValueError(f"float_dtype={float_dtype!r}: expected one of {sorted(_FLOAT_DTYPES)}")
    if fused_kv_layers and (layout != "separate" or not fp8):
        raise ValueError("fused_kv_layers applies to the separate (Flash) FP8 layout only")
    out_dir = os.fspath(out_dir)
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise FileExistsError(f"{out_dir} exists and is not an empty directory")
    mtp_file = layout == "fused_qkv" if mtp_file is None else mtp_file
    block = (block_size, block_size)

    config = release_config(hub_config, layout, fp8, block_size)
    cfg = MiMoConfig.from_dict(config)
    mtp_ids = {int(m.group(1)) for name in params_by_hub_name if (m := _MTP_RE.match(name))}
    mtp_layers = max(mtp_ids) + 1 if mtp_ids else 0
    separate = parameter_sources(cfg.replace(fused_qkv=False), mtp_layers)
    expected = {t.name: t for t in checkpoint_tensors(separate)}
    for name, t in expected.items():
        if name not in params_by_hub_name:
            raise KeyError(f"export_release: missing tensor {name!r}")
        if tuple(np.shape(params_by_hub_name[name])) != t.shape:
            raise ValueError(
                f"export_release: tensor {name!r} has shape {list(np.shape(params_by_hub_name[name]))}, "
                f"the config implies {list(t.shape)}"
            )
    for name in params_by_hub_name:
        if name not in expected:
            raise KeyError(f"export_release: unexpected tensor {name!r} (not part of this config's model)")
    if fused_kv_layers is True:
        fused_kv_layers = range(cfg.num_layers + mtp_layers)
    fused_kv = set(fused_kv_layers or ())

    def source(name: str) -> np.ndarray:
        return np.asarray(params_by_hub_name[name], np.float32)

    def release_dtype(t) -> np.dtype:
        return F32 if t.dtype == F32 or float_dtype == "float32" else np.dtype(ml_dtypes.bfloat16)

    def layer_index(name: str) -> int:
        m = _MTP_RE.match(name)
        return cfg.num_layers + int(m.group(1)) if m else int(name.split(".")[2])

    out_sources = parameter_sources(cfg, mtp_layers)
    by_tensor = {}
    for src in out_sources:
        for t in src.tensors:
            by_tensor.setdefault(t.name, src)
    tensors: dict[str, np.ndarray] = {}
    for t in checkpoint_tensors(out_sources):
        if t.name in tensors:  # written together with its k partner
            continue
        src = by_tensor[t.name]
        if t.name.endswith("qkv_proj.weight"):  # fused qkv from the separate q, k, v (T = row_groups >= 1)
            w = np.zeros(t.shape, np.float32)
            prefix = t.name.removesuffix("qkv_proj.weight")
            for part_src in (s for s in out_sources if s.kind == HEADS_IN and s.tensors[0].name == t.name):
                rows, _ = attention_rows(part_src, block_size, None)
                w[rows] = source(f"{prefix}{part_src.part}_proj.weight")
            if fp8:
                tensors[t.name], tensors[t.scale_name] = _quantize_grouped(w, t.row_groups, block)
            else:
                tensors[t.name] = w.astype(release_dtype(t))
        elif fp8 and t.quantizable and t.name.endswith("k_proj.weight") and layer_index(t.name) in fused_kv:
            v_name = t.name.replace("k_proj", "v_proj")
            lay = src.qkv
            k_rows = lay.kv_heads * ceil_div(lay.head_dim, block_size)
            if not kv_blocked_per_head(k_rows, lay.kv_heads, lay.head_dim, block_size) and (
                lay.head_dim % block_size or lay.v_head_dim % block_size
            ):
                raise ValueError(
                    f"export_release: {t.name}: per-head fused K/V blocks for {lay.kv_heads} kv heads of dim "
                    f"{lay.head_dim} cannot be told apart from uniform blocks by the scale shape"
                )
            k8, ks, v8, vs = _quantize_kv_per_head(source(t.name), source(v_name), lay.kv_heads, block)
            tensors[t.name], tensors[t.scale_name] = k8, ks
            tensors[v_name], tensors[v_name.removesuffix("weight") + "weight_scale_inv"] = v8, vs
        elif fp8 and t.quantizable:
            tensors[t.name], tensors[t.scale_name] = quantize_blocks(source(t.name), block)
        else:
            tensors[t.name] = source(t.name).astype(release_dtype(t))

    parent = os.path.dirname(os.path.abspath(out_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.partial-", dir=parent)
    try:
        _write_files(tensors, tmp, max_file_bytes, mtp_file)
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
        for path in extra_files:
            shutil.copy2(path, os.path.join(tmp, os.path.basename(path)))
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty (checked above)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


def _write_files(tensors: dict[str, np.ndarray], directory: str, max_file_bytes: int, mtp_file: bool) -> None:
    main = {k: v for k, v in tensors.items() if not (mtp_file and _MTP_RE.match(k))}
    mtp = {k: v for k, v in tensors.items() if k not in main}
    files: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in main.items():
        if files[-1] and size + arr.nbytes > max_file_bytes:
            files.append({})
            size = 0
        files[-1][name] = arr
        size += arr.nbytes
    if len(files) == 1 and not mtp:
        save_file(files[0], os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, group in enumerate(files):
        file_name = f"model-{i + 1:05d}-of-{len(files):05d}.safetensors"
        save_file(group, os.path.join(directory, file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(group, file_name))
    if mtp:
        save_file(mtp, os.path.join(directory, MTP_FILE), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(mtp, MTP_FILE))
    total = sum(a.nbytes for a in tensors.values())
    with open(os.path.join(directory, INDEX_NAME), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def hub_tensors(model: Any) -> dict[str, np.ndarray]:
    """A `MiMoModel`'s parameters as separate-layout hub tensors (torch [out, in], float32) for `export_release`."""
    cfg = model.config.replace(fused_qkv=False)
    nodes = dict(nnx.iter_graph(model))
    params = {path: var for path, var in nodes.items() if isinstance(var, nnx.Param)}
    out: dict[str, np.ndarray] = {}
    for src in parameter_sources(cfg, len(model.mtp)):
        value = np.asarray(weight(params[src.path]), np.float32)
        if src.kind == COPY:
            out[src.tensors[0].name] = value
        elif src.kind == TRANSPOSE:
            out[src.tensors[0].name] = np.ascontiguousarray(value.T)
        elif src.kind == HEADS_IN:
            name = src.tensors[1 if src.part == "v" else 0].name
            out[name] = np.ascontiguousarray(value.transpose(1, 2, 0).reshape(-1, value.shape[0]))
        elif src.kind == HEADS_OUT:
            out[src.tensors[0].name] = np.ascontiguousarray(value.reshape(-1, value.shape[-1]).T)
        elif src.kind == EXPERTS:
            out_in = nodes[src.path[:-1]].layout == "out_in"  # re-laid out for a kernel: already [out, in]
            for e, t in enumerate(src.tensors):
                out[t.name] = np.ascontiguousarray(value[e] if out_in else value[e].T)
    return out
