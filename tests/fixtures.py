"""Shared test helpers: tiny models and checkpoints, the served and batch test checkpoints, paths.

Heavy imports (torch, transformers, tokenizers) stay inside the functions that need them.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import socket
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.engine.constraints import TokenConstraint, bitmask_of
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.serve.metrics import COMPILE_EVENT  # jax records it for a program compiled or loaded from a cache
from mimo_jax.weights import SafetensorsFile, checkpoint_tensors, parameter_sources
from mimo_jax.weights.export import export_release, hub_tensors


@contextlib.contextmanager
def count_compiles():
    """Yields a list that gets the name of every program this process compiles or loads from the persistent
    compilation cache (tests/conftest.py keeps one per run) while the block runs: either means the jit cache
    missed."""
    compiled: list = []

    def on_compile(event: str, seconds: float, **kwargs) -> None:
        if event == COMPILE_EVENT:
            compiled.append(kwargs.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(on_compile)
    try:
        yield compiled
    finally:
        jax.monitoring.unregister_event_duration_listener(on_compile)


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository


def load_script(path: str):
    """A script of the repository (not a package module, e.g. "bench/bench_mtp.py") loaded as a module."""
    full = os.path.join(ROOT, path)
    name = os.path.splitext(os.path.basename(full))[0]
    spec = importlib.util.spec_from_file_location(name, full)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ============================================================================= a tiny MiMo config
TINY = dict(
    architectures=["MiMoV2ForCausalLM"],
    vocab_size=64,
    hidden_size=32,
    intermediate_size=48,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=1,
    swa_num_key_value_heads=2,
    head_dim=24,
    v_head_dim=16,
    hybrid_layer_pattern=[0, 1, 1, 0],
    moe_layer_freq=[0, 1, 1, 1],
    n_routed_experts=8,
    num_experts_per_tok=2,
    sliding_window_size=4,
    rope_theta=10000.0,
    swa_rope_theta=1000.0,
    partial_rotary_factor=0.5,
    add_swa_attention_sink_bias=True,
    add_full_attention_sink_bias=True,
)
TINY_CONFIG = MiMoConfig.from_dict(TINY)


# ============================================================================= predictable models (speculative)
def successor(vocab: int) -> np.ndarray:
    """The map the test models follow: never token 0."""
    return 1 + np.arange(vocab) % (vocab - 1)


def predictable_model(noise: float, mtp_noise: float, seed: int = 0, cfg: MiMoConfig = TINY_CONFIG) -> MiMoModel:
    """Embedding -> lm_head predicts successor(token); attention and MLP outputs scaled by `noise` (target)
    and `mtp_noise` (MTP blocks) bend it with the context. MTP eh_proj passes the token embedding only."""
    model = MiMoModel(cfg, rngs=nnx.Rngs(seed), mtp_layers=3)
    v, h = cfg.vocab_size, cfg.hidden_size
    embed = np.random.RandomState(seed).randn(v, h).astype(np.float32)
    normed = embed / np.sqrt((embed**2).mean(-1, keepdims=True))
    head = np.zeros((h, v), np.float32)
    for t, s in enumerate(successor(v)):
        head[:, s] += normed[t] * (4.0 / h)
    model.embed_tokens.set_value(jnp.asarray(embed))
    model.lm_head.set_value(jnp.asarray(head))
    blocks = [(layer, noise) for layer in model.layers] + [(m.block, mtp_noise) for m in model.mtp]
    for block, scale in blocks:
        block.self_attn.o_proj.set_value(block.self_attn.o_proj.get_value() * scale)
        block.mlp.down_proj.set_value(block.mlp.down_proj.get_value() * scale)
    eh = np.zeros((2 * h, h), np.float32)
    eh[:h] = np.eye(h)
    for m in model.mtp:
        m.eh_proj.set_value(jnp.asarray(eh))
    return model


# ============================================================================= transformers models (the oracle)
# Tiny MiMo-V2 checkpoints written by transformers, with non-trivial weights.
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


# ============================================================================= checkpoints in the released layouts
# Tiny checkpoints in the released layouts (written by `export_release`) and an independent dequantizer.
#
# `release_fixture(tmp, layout, kv_heads)` starts from a transformers model (the oracle), adds random
# MTP tensors (transformers has no MTP layers) and writes:
# - "flash": separate q/k/v, FP8, some layers with Flash's per-head fused K/V blocks;
# - "fused": fused qkv_proj with T = kv_heads shards, FP8 with per-shard scales (V2.5 / Pro);
# - "bf16": the transformers save itself (bf16, transformers spelling, no MTP).
# Blocks are 16x16 and hidden 40 / MoE intermediate 20, so edge blocks are partial.

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


# ============================================================================= the served test checkpoint
# A tiny served checkpoint for the server tests: random MiMo weights, a byte-level BPE tokenizer
# trained here with HF `tokenizers`, and a MiMo-style chat template (thinking block, tool calls).
#
# The weights are random (make_hf_model) except for one planted chain: a few added tokens
# each predict the next one with a large margin, so greedy chat output is a known script that
# exercises the reasoning and tool-call parsers end to end:
#
#     <think> REASONING </think> CONTENT <tool_call> CALL_BODY </tool_call> <|im_end|>
#
# Thinking on, the prompt ends in `<think>` and the whole script follows; thinking off, it ends in
# `</think>` and the answer starts at CONTENT. Every other token keeps its random behaviour.

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
REASONING = "The user wants the weather in Paris."
CONTENT = "Let me look that up."
CALL_BODY = "\n<function=get_weather>\n<parameter=city>Paris</parameter>\n<parameter=days>3</parameter>\n</function>\n"
SCRIPT = ["<think>", REASONING, "</think>", CONTENT, "<tool_call>", CALL_BODY, "</tool_call>", "<|im_end|>"]
ADDED_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", REASONING, CONTENT, CALL_BODY]

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            "required": ["city"],
        },
    },
}

CHAT_TEMPLATE = """{%- if messages[0].role == 'system' %}
{%- set system_message = messages[0].content %}
{%- set loop_messages = messages[1:] %}
{%- else %}
{%- set system_message = 'You are MiMo, a helpful assistant.' %}
{%- set loop_messages = messages %}
{%- endif %}
<|im_start|>system
{{ system_message }}
{%- if tools %}

# Tools
You may call one or more functions. The available functions:
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools>
To call a function, answer with:
<tool_call>
<function=NAME>
<parameter=ARGUMENT>VALUE</parameter>
</function>
</tool_call>
{%- endif %}
<|im_end|>
{% for message in loop_messages %}
{% if message.role == 'user' %}
<|im_start|>user
{{ message.content }}<|im_end|>
{% elif message.role == 'assistant' %}
<|im_start|>assistant
{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}
{{- message.content or '' }}
{%- for call in message.tool_calls or [] %}
<tool_call>
<function={{ call.function.name }}>
{% for name, value in call.function.arguments.items() %}
<parameter={{ name }}>{{ value if value is string else value | tojson }}</parameter>
{% endfor %}
</function>
</tool_call>
{%- endfor %}
<|im_end|>
{% elif message.role == 'tool' %}
<|im_start|>tool
{{ message.content }}<|im_end|>
{% else %}
{{ raise_exception('unsupported role ' + message.role) }}
{% endif %}
{% endfor %}
{%- if add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think></think>{% else %}<think>{% endif %}
{%- endif %}
"""

_CORPUS = [
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "The quick brown fox jumps over the lazy dog. What is the weather like in Paris today?",
    "import os\nimport sys\n\nfor name in sorted(os.listdir('.')):\n    print(name, file=sys.stderr)\n",
    "Hello! How can I help you today? I can answer questions, write code and call tools.",
    "class Point:\n    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n",
    "Caf\u00e9 cr\u00e8me br\u00fbl\u00e9e \u2014 \u65e5\u672c\u8a9e\u306e\u30c6\u30ad\u30b9\u30c8 \U0001f600 emoji and unicode text.",
]


def build_tokenizer(vocab_size: int = 330):
    """A byte-level BPE tokenizer (deterministic) with the chat's special and added tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in ADDED_TOKENS])
    return tok


def write_tokenizer(directory: str) -> int:
    """tokenizer.json + tokenizer_config.json (with the chat template); returns the vocabulary size."""
    tok = build_tokenizer()
    tok.save(os.path.join(directory, "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "unk_token": None,
        "model_max_length": 512,
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }
    with open(os.path.join(directory, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=1)
    return tok.get_vocab_size(with_added_tokens=True)


def plant_script(model, token_ids: list[int], seed: int = 0) -> None:
    """Make token_ids[i] predict token_ids[i + 1] greedily, whatever precedes it.

    Each chain token gets a large embedding along its own orthonormal direction u_i (the layers'
    outputs are small beside it), the final norm weight becomes 1, and the lm_head row of the
    successor points along u_i.
    """
    import torch

    hidden = model.config.hidden_size
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        head = model.lm_head.weight
        model.model.norm.weight.fill_(1.0)
        for i, (tok, nxt) in enumerate(zip(token_ids[:-1], token_ids[1:], strict=True)):
            u = torch.tensor(basis[:, i], dtype=embed.dtype)
            embed[tok] = 200.0 * u
            head[nxt] = 2.5 * u
        # Rows of the chain's successors that are not themselves predicted by a chain token stay random.


def write_checkpoint(directory: str, seed: int = 0) -> str:
    """The served test checkpoint: config + safetensors (transformers), tokenizer, chat template."""
    from tokenizers import Tokenizer

    os.makedirs(directory, exist_ok=True)
    vocab = write_tokenizer(directory)
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    model = make_hf_model(seed, vocab_size=vocab, eos_token_id=eos, pad_token_id=tok.token_to_id("<|endoftext|>"))
    plant_script(model, [tok.token_to_id(t) for t in SCRIPT])
    save_hf_checkpoint(model, directory)
    return directory


# ============================================================================= the batch test checkpoint
# Two layers (one full, one SWA with MoE): the smallest model with every cache kind, quick to compile.
BATCH_MODEL = {
    **TINY,
    "num_hidden_layers": 2,
    "hybrid_layer_pattern": [0, 1],
    "moe_layer_freq": [0, 1],
    "eos_token_id": [61],
    "max_position_embeddings": 64,
}
BATCH_WORDS = ["<unk>", "user", "assistant", "system"] + [f"w{i}" for i in range(4, 60)]
BATCH_SPECIALS = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|pad|>"]  # ids 60..63
BATCH_CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m.role }} {{ m.content }}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{% if not thinking %} w9{% endif %}{% endif %}"
)


def write_batch_checkpoint(directory: str, seed: int = 3) -> str:
    """A tiny checkpoint (release layout, float32) with a word-level tokenizer and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    src = directory + ".src"
    os.makedirs(src, exist_ok=True)
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(BATCH_WORDS)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(BATCH_SPECIALS)
    tokenizer.save(os.path.join(src, "tokenizer.json"))
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"eos_token": "<|im_end|>", "pad_token": "<|pad|>", "chat_template": BATCH_CHAT_TEMPLATE}, f)
    model = MiMoModel(MiMoConfig.from_dict(BATCH_MODEL), rngs=nnx.Rngs(seed))
    files = [os.path.join(src, n) for n in ("tokenizer.json", "tokenizer_config.json")]
    return export_release(
        hub_tensors(model),
        BATCH_MODEL,
        directory,
        layout="separate",
        fp8=False,
        float_dtype="float32",
        extra_files=files,
    )


def write_jsonl(path, rows) -> str:
    with open(path, "w") as f:
        for row in rows:
            f.write(row if isinstance(row, str) else json.dumps(row))
            f.write("\n")
    return str(path)


def read_results(path) -> dict:
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            assert r["id"] not in out, f"id {r['id']} written twice"
            out[r["id"]] = r
    return out


def metric_value(exposition: str, name: str, **labels: str) -> float:
    """A sample of a /metrics body, read with prometheus_client's parser: its full name (e.g.
    "mimo:generation_tokens_total") and labels besides model_name. KeyError if it is not there."""
    from prometheus_client.parser import text_string_to_metric_families

    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            if sample.name == name and {k: v for k, v in sample.labels.items() if k != "model_name"} == labels:
                return sample.value
    raise KeyError(f"{name} {labels} is not in the exposition")


# ---------------------------------------------------------------------------- child processes
DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def child_env(device_count: int | None = None, **extra: str) -> dict[str, str]:
    """The environment of a python child process: the repository importable, CPU only, `device_count` fake CPU
    devices (None: one, jax's default) and the session's other XLA flags (tests/conftest.py); then `extra`."""
    flags = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(DEVICE_COUNT_FLAG)]
    if device_count is not None:
        flags.append(f"{DEVICE_COUNT_FLAG}={device_count}")
    env = {
        **os.environ,
        "JAX_PLATFORMS": "cpu",
        "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]),
        "XLA_FLAGS": " ".join(flags),
    }
    return {**env, **extra}


# ---------------------------------------------------------------------------- a server in a subprocess
class ServerProcess:
    """`python -m mimo_jax.serve` started now on a free localhost port (one CPU device, float32, 4 slots), warming up
    while the caller goes on; `url()` waits until /health answers. Its log goes to `log_path` (shown when it fails)."""

    def __init__(self, log_path: str, args: list[str], ready_timeout: float = 300.0):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "mimo_jax.serve", "--port", str(port), "--dtype", "float32", "--max-batch", "4",
               "--round-tokens", "4", "--log-level", "warning", *args]  # fmt: skip
        self.log_path, self.ready_timeout, self.ready = log_path, ready_timeout, False
        self.address = f"http://127.0.0.1:{port}"
        with open(log_path, "w") as log:
            self.proc = subprocess.Popen(cmd, env=child_env(), stdout=log, stderr=subprocess.STDOUT)  # one CPU device

    def url(self) -> str:
        """The server's URL once /health answers (within `ready_timeout` of this first call)."""
        import httpx

        deadline = time.monotonic() + self.ready_timeout
        while not self.ready:
            assert self.proc.poll() is None, open(self.log_path).read()
            with contextlib.suppress(httpx.HTTPError):
                self.ready = httpx.get(self.address + "/health", timeout=2).status_code == 200
            if not self.ready:
                assert time.monotonic() < deadline, "server did not become ready:\n" + open(self.log_path).read()
                time.sleep(0.5)
        return self.address

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@contextlib.contextmanager
def serve_process(log_path: str, args: list[str], ready_timeout: float = 300.0):
    """`python -m mimo_jax.serve` on a free localhost port (one CPU device, float32, 4 slots); yields its URL once
    /health answers, terminates it on exit. Its log goes to `log_path` (shown when it fails to start)."""
    server = ServerProcess(log_path, args, ready_timeout)
    try:
        yield server.url()
    finally:
        server.stop()


# The served test checkpoint's server (tests/serve/test_serve.py, test_serve_structured.py): its engine settings.
TINY_SERVER = dict(max_batch=4, max_context=512, prefill_chunk=64, round_tokens=4, max_waiting=16)


class TinyServer:
    """The served test checkpoint (write_checkpoint) in `directory`, and its server `process` (ServerProcess)."""

    def __init__(self, directory: str, log_path: str):
        self.directory, self.log_path = directory, log_path
        flags = [f"--{name.replace('_', '-')}={value}" for name, value in TINY_SERVER.items()]
        self.process = ServerProcess(log_path, ["--model", directory, *flags])

    def url(self) -> str:
        return self.process.url()


@pytest.fixture(scope="session")
def tiny_server(tmp_path_factory):
    """`python -m mimo_jax.serve` on the served test checkpoint (TINY_SERVER's settings), shared by the modules that
    send it requests; yielded while it warms up (`.url()` waits for it). Registered in tests/conftest.py."""
    directory = str(tmp_path_factory.mktemp("tiny-server") / "tiny-mimo")
    write_checkpoint(directory)
    server = TinyServer(directory, os.path.join(os.path.dirname(directory), "server.log"))
    try:
        yield server
    finally:
        server.process.stop()


DEMO_SERVER_ARGS = ["--max-context", "1024", "--prefill-chunk", "128"]


@pytest.fixture(scope="session")
def demo_server_process(tmp_path_factory):
    """`python -m mimo_jax.serve` on the embedded demo model (1024 tokens of context, prefill chunks of 128) as a
    ServerProcess, yielded while it warms up; demo_server waits for it."""
    server = ServerProcess(str(tmp_path_factory.mktemp("demo-server") / "server.log"), DEMO_SERVER_ARGS)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def demo_server(demo_server_process):
    """The URL of `python -m mimo_jax.serve` on the embedded demo model (1024 tokens of context, prefill chunks of
    128), started once for the modules that only send it requests (registered in tests/conftest.py)."""
    return demo_server_process.url()


# The speculating demo server of tests/serve/test_serve_mtp.py: drafts per target forward, and its flags.
MTP_SERVER_STEPS = 2
MTP_SERVER_ARGS = ["--speculative-steps", str(MTP_SERVER_STEPS), "--per-request-spec-decode-metrics", "detailed",
                   "--max-batch", "2", "--max-context", "512", "--prefill-chunk", "32", "--round-tokens", "8",
                   "--log-level", "info"]  # fmt: skip


@pytest.fixture(scope="session")
def mtp_server_process(tmp_path_factory):
    """`python -m mimo_jax.serve` on the demo model with MTP speculation (MTP_SERVER_ARGS) as a ServerProcess, for
    the one test that drives it to its end (tests/serve/test_serve_mtp.py: it drains and stops it)."""
    server = ServerProcess(str(tmp_path_factory.mktemp("mtp-server") / "server.log"), MTP_SERVER_ARGS)
    try:
        yield server
    finally:
        if server.proc.poll() is None:
            server.stop()


# session fixtures of servers that warm up from the session's start
EARLY_SERVERS = ("tiny_server", "demo_server_process", "mtp_server_process")


@pytest.fixture(scope="session", autouse=True)
def servers_started_early(request):
    """Start the EARLY_SERVERS that collected tests use when the session starts: each warms up on a core the tests
    before them mostly leave idle (their compiles use about one), instead of in the test that first needs it."""
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker collects every test: each would start them all
        return
    for name in EARLY_SERVERS:
        if any(name in getattr(item, "fixturenames", ()) for item in request.session.items):
            request.getfixturevalue(name)


# ============================================================================= fake constraints (engine tests)
class Allowed:
    """Only `ids`, never finished."""

    def __init__(self, ids):
        self.ids, self.accepted = set(ids), []

    def fill_allowed(self, bitmask):
        bitmask[:] = bitmask_of(self.ids, TINY["vocab_size"])

    def accept(self, token):
        assert token in self.ids, token
        self.accepted.append(token)

    def is_finished(self):
        return False


class Script(Allowed):
    """Exactly `tokens`, then finished."""

    def __init__(self, tokens):
        super().__init__(tokens)
        self.tokens = list(tokens)

    def fill_allowed(self, bitmask):
        bitmask[:] = bitmask_of([self.tokens[len(self.accepted)]], TINY["vocab_size"])

    def is_finished(self):
        return len(self.accepted) == len(self.tokens)


class DeadEnd(Allowed):
    """Anything for `after` tokens, then nothing (an empty mask)."""

    def __init__(self, after):
        super().__init__(range(TINY["vocab_size"]))
        self.after = after

    def fill_allowed(self, bitmask):
        if len(self.accepted) < self.after:
            bitmask[:] = -1


BUILT_CONSTRAINTS: dict = {}  # spec "name" -> the constraint built for it


def fake_constraint(spec: dict) -> TokenConstraint:
    """A constraint_factory standing in for a grammar backend: only even ids, a script of tokens, a dead end."""
    kind = spec["type"]
    if kind == "even":
        c = Allowed(range(0, TINY["vocab_size"], 2))
    elif kind == "script":
        c = Script(spec["tokens"])
    elif kind == "dead_end":
        c = DeadEnd(spec["after"])
    else:
        raise KeyError(f"unknown constraint type {kind!r}")
    BUILT_CONSTRAINTS[spec.get("name")] = c
    return c


def run_by_step(engine, requests, add_later=(), round_tokens=3):
    """requests: {id: (prompt, options)}; add_later: (after_step, id, prompt, options). -> {id: outputs}"""
    out = {}
    pending = [(0, rid, p, o) for rid, (p, o) in requests.items()] + sorted(add_later, key=lambda x: x[0])
    step = 0
    while engine.has_work() or pending:
        while pending and pending[0][0] <= step and engine.free_slots:
            _, rid, prompt, options = pending.pop(0)
            engine.add(rid, prompt, options)
            out[rid] = dict(tokens=[], logprobs=[], top=[], reason=None, outputs=0, steps=set())
        for o in engine.step(max_tokens_per_round=round_tokens):
            r = out[o.request_id]
            assert r["reason"] is None, "outputs after the end"
            r["tokens"] += o.token_ids
            r["logprobs"] += o.logprobs or []
            r["top"] += o.top_logprobs or []
            r["outputs"] += 1
            r["steps"].add(step)
            if o.finished:
                r["reason"] = o.finish_reason
        step += 1
    return out


def next_token_logits(lm, prompt, tokens, length: int = 48):
    """Full-forward logits predicting each of `tokens` after `prompt` (padded to one length: one compile)."""
    seq = np.zeros((1, length), np.int32)
    seq[0, : len(prompt) + len(tokens)] = list(prompt) + list(tokens)
    return np.array(lm.logits(seq)[0, len(prompt) - 1 : len(prompt) - 1 + len(tokens)])
