"""Tiny checkpoints in the released layouts (written by `export_release`) and an independent dequantizer.

`release_fixture(tmp, layout, kv_heads)` starts from a transformers model (the oracle), adds random
MTP tensors (transformers has no MTP layers) and writes:
- "flash": separate q/k/v, FP8, some layers with Flash's per-head fused K/V blocks;
- "fused": fused qkv_proj with T = kv_heads shards, FP8 with per-shard scales (V2.5 / Pro);
- "bf16": the transformers save itself (bf16, transformers spelling, no MTP).
Blocks are 16x16 and hidden 40 / MoE intermediate 20, so edge blocks are partial.
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
from hf_fixtures import make_hf_model, save_hf_checkpoint, to_hub_config

from mimo_jax.config import MiMoConfig
from mimo_jax.weights import SafetensorsFile, checkpoint_tensors, parameter_sources
from mimo_jax.weights.export import export_release

BLOCK = 16
MTP_LAYERS = 3


def tiny_overrides(kv_heads: int) -> dict:
    return dict(
        hidden_size=40,
        num_attention_heads=2 * kv_heads,
        num_key_value_heads=kv_heads,
        moe_intermediate_size=20,
        num_hidden_layers=4,
    )


def read_all(directory: str) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(os.listdir(directory)):
        if f.endswith(".safetensors"):
            st = SafetensorsFile(os.path.join(directory, f))
            out.update({k: np.array(st.get(k)) for k in st.keys()})
    return out


def mtp_tensors(hub_config: dict, seed: int) -> dict[str, np.ndarray]:
    cfg = MiMoConfig.from_dict(hub_config).replace(fused_qkv=False)
    rng = np.random.RandomState(seed)
    out = {}
    for t in checkpoint_tensors(parameter_sources(cfg, MTP_LAYERS)):
        if t.name.startswith("model.mtp."):
            if len(t.shape) == 1:
                out[t.name] = (1.0 + 0.3 * rng.randn(*t.shape)).astype(np.float32)
            else:
                out[t.name] = (rng.randn(*t.shape) / np.sqrt(t.shape[-1])).astype(np.float32)
    return out


def release_fixture(tmp: str, layout: str, kv_heads: int = 2, seed: int = 0, max_file_bytes: int = 30_000):
    """(checkpoint dir, transformers model, transformers save dir) for one layout."""
    import torch

    hf = make_hf_model(seed=seed, **tiny_overrides(kv_heads))
    hf_dir = save_hf_checkpoint(hf, os.path.join(tmp, "hf"))
    if layout == "bf16":
        bf16_dir = os.path.join(tmp, "bf16")
        hf.to(torch.bfloat16).save_pretrained(bf16_dir, max_shard_size="40KB")
        hf.to(torch.float32)
        return bf16_dir, hf, hf_dir
    tensors = read_all(hf_dir)
    hub = to_hub_config(hf_dir)
    tensors.update(mtp_tensors(hub, seed))
    out = os.path.join(tmp, layout)
    if layout == "flash":
        export_release(
            tensors,
            hub,
            out,
            layout="separate",
            fused_kv_layers=[1, 2, 4 + 1],
            block_size=BLOCK,
            max_file_bytes=max_file_bytes,
        )
    else:
        export_release(tensors, hub, out, layout="fused_qkv", block_size=BLOCK, max_file_bytes=max_file_bytes)
    return out, hf, hf_dir


# ----------------------------------------------------------------------------- independent dequantizer
def _dequant(w8: np.ndarray, s: np.ndarray, block: int) -> np.ndarray:
    rows = np.arange(w8.shape[0]) // block
    cols = np.arange(w8.shape[1]) // block
    return w8.astype(np.float32) * s[rows][:, cols]


def dequantized_reference(directory: str) -> dict[str, np.ndarray]:
    """Every tensor of a release checkpoint as float32, in the separate layout (straight loops, no shared code)."""
    with open(os.path.join(directory, "config.json")) as f:
        raw = json.load(f)
    block = raw["quantization_config"]["weight_block_size"][0] if "quantization_config" in raw else None
    shards = raw["num_key_value_heads"]
    d, dv = raw["head_dim"], raw["v_head_dim"]
    stored = read_all(directory)
    out = {}
    for name, arr in stored.items():
        if name.endswith("weight_scale_inv"):
            continue
        scale = stored.get(name.removesuffix("weight") + "weight_scale_inv")
        prefix = name.removesuffix("qkv_proj.weight")
        if name.endswith("qkv_proj.weight"):
            mtp = name.startswith("model.mtp.")
            layer = int(name.split(".")[2]) if not mtp else None
            sliding = mtp or raw["hybrid_layer_pattern"][layer] == 1
            n = raw["swa_num_attention_heads"] if sliding else raw["num_attention_heads"]
            kv = raw["swa_num_key_value_heads"] if sliding else raw["num_key_value_heads"]
            shard_rows = arr.shape[0] // shards
            blocks_per_shard = math.ceil(shard_rows / block) if block else 0
            q, k, v = [], [], []
            for s_i in range(shards):
                w = arr[s_i * shard_rows : (s_i + 1) * shard_rows]
                if scale is not None:
                    w = _dequant(w, scale[s_i * blocks_per_shard : (s_i + 1) * blocks_per_shard], block)
                w = w.astype(np.float32)
                nq, nk = n // shards * d, kv // shards * d
                q.append(w[:nq])
                k.append(w[nq : nq + nk])
                v.append(w[nq + nk :])
            out[prefix + "q_proj.weight"] = np.concatenate(q)
            out[prefix + "k_proj.weight"] = np.concatenate(k)
            out[prefix + "v_proj.weight"] = np.concatenate(v)
        elif name.endswith("k_proj.weight") and scale is not None:
            v_name = name.replace("k_proj", "v_proj")
            v8, vs = stored[v_name], stored[v_name.removesuffix("weight") + "weight_scale_inv"]
            kv = arr.shape[0] // d
            kb = math.ceil(d / block)
            if scale.shape[0] == kv * kb and scale.shape[0] != math.ceil(kv * d / block):  # per-head [K|V] blocks
                vb = vs.shape[0] // kv
                ks, vv = [], []
                for h in range(kv):
                    w = np.concatenate([arr[h * d : (h + 1) * d], v8[h * dv : (h + 1) * dv]])
                    s = np.concatenate([scale[h * kb : (h + 1) * kb], vs[h * vb : (h + 1) * vb]])
                    full = _dequant(w, s, block)
                    ks.append(full[:d])
                    vv.append(full[d:])
                out[name], out[v_name] = np.concatenate(ks), np.concatenate(vv)
            else:
                out[name], out[v_name] = _dequant(arr, scale, block), _dequant(v8, vs, block)
        elif name.endswith("v_proj.weight") and scale is not None:
            continue  # with its k
        elif scale is not None:
            out[name] = _dequant(arr, scale, block)
        else:
            out[name] = arr.astype(np.float32)
    return out


def hf_reference_logits(hf_dir: str, reference: dict[str, np.ndarray], token_ids: np.ndarray) -> np.ndarray:
    """transformers' logits with the dequantized weights (main model; it has no MTP layers)."""
    import shutil
    import tempfile

    import torch
    from safetensors.torch import save_file
    from transformers import MiMoV2FlashForCausalLM

    with tempfile.TemporaryDirectory() as d:
        shutil.copy(os.path.join(hf_dir, "config.json"), d)
        state = {
            k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in reference.items() if not k.startswith("model.mtp.")
        }
        save_file(state, os.path.join(d, "model.safetensors"))
        model = MiMoV2FlashForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.as_tensor(token_ids, dtype=torch.long)).logits.float().numpy()
