"""Tiny MiMo-V2 checkpoints written by transformers (the oracle), with non-trivial weights."""

from __future__ import annotations

import json
import os

import numpy as np

TINY_BASE = dict(
    vocab_size=96,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=24,
    v_head_dim=16,
    n_routed_experts=8,
    num_experts_per_tok=2,
    sliding_window=5,
    max_position_embeddings=512,
)
# Overrides that give meshes of up to 8 devices something to split: 16 experts and 8 q heads; full layers
# have 2 kv heads and SWA layers 4, so tensor=4 and tensor=8 exercise replicated kv heads.
SHARDABLE = dict(
    n_routed_experts=16,
    num_experts_per_tok=4,
    num_attention_heads=8,
    num_key_value_heads=2,
    num_hidden_layers=3,
    layer_types=["full_attention", "sliding_attention", "full_attention"],
    mlp_layer_types=["dense", "sparse", "sparse"],
    n_group=4,
    topk_group=2,
)


def make_hf_model(seed: int = 0, **overrides):
    """A transformers MiMoV2FlashForCausalLM with random weights in every parameter."""
    import torch
    from transformers import MiMoV2FlashConfig, MiMoV2FlashForCausalLM

    kwargs = {**TINY_BASE, **overrides}
    torch.manual_seed(seed)
    cfg = MiMoV2FlashConfig(**kwargs)
    model = MiMoV2FlashForCausalLM(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn(p.shape, generator=gen))
            elif name.endswith("sinks"):
                p.copy_(1.5 * torch.randn(p.shape, generator=gen))
            elif "embed" in name or "lm_head" in name:
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / np.sqrt(p.shape[-1]))
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.2 * torch.randn(b.shape, generator=gen))
    return model


def save_hf_checkpoint(model, directory: str, max_shard_size: str | None = None) -> str:
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(directory, **kwargs)
    return directory


def hf_logits(model, token_ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.as_tensor(token_ids, dtype=torch.long)).logits.float().numpy()


def to_hub_config(directory: str) -> dict:
    """Rewrite a transformers-native config.json in the hub spelling (same model)."""
    with open(os.path.join(directory, "config.json")) as f:
        c = json.load(f)
    rope = c.pop("rope_parameters")
    layer_types = c.pop("layer_types")
    mlp_types = c.pop("mlp_layer_types")
    window = c.pop("sliding_window")
    hub = {
        **c,
        "architectures": ["MiMoV2ForCausalLM"],
        "model_type": "mimo_v2",
        "hybrid_layer_pattern": [0 if t == "full_attention" else 1 for t in layer_types],
        "moe_layer_freq": [0 if t == "dense" else 1 for t in mlp_types],
        "swa_num_attention_heads": c["num_attention_heads"],
        "swa_num_key_value_heads": 2 * c["num_key_value_heads"],
        "swa_head_dim": c["head_dim"],
        "swa_v_head_dim": c["v_head_dim"],
        "sliding_window": window - 1,
        "sliding_window_size": window - 1,
        "rope_theta": rope["full_attention"]["rope_theta"],
        "swa_rope_theta": rope["sliding_attention"]["rope_theta"],
        "partial_rotary_factor": rope["full_attention"]["partial_rotary_factor"],
        "layernorm_epsilon": c.pop("rms_norm_eps"),
        "add_swa_attention_sink_bias": True,
        "add_full_attention_sink_bias": False,
        "routed_scaling_factor": None if c["routed_scaling_factor"] == 1.0 else c["routed_scaling_factor"],
        "n_shared_experts": None,
        "scoring_func": "sigmoid",
        "topk_method": "noaux_tc",
        "context_len": c["max_position_embeddings"],
    }
    return hub
