"""The embedded demo checkpoint (mimo_jax/demo_model): release layout, loading, stable output, working MTP."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

import mimo_jax
from launch import train_demo as td
from mimo_jax.weights.demo import demo_model_dir

# From the held-out split (statistics.py is never trained on): the MTP acceptance snippet.
HELDOUT_SNIPPET = '''def median_low(data):
    """Return the low median of numeric data.

    When the number of data points is odd, the middle value is returned.
    When it is even, the smaller of the two middle values is returned.

    >>> median_low([1, 3, 5])
    3
    >>> median_low([1, 3, 5, 7])
    3

    """
    data = sorted(data)
    n = len(data)
    if n == 0:
        raise StatisticsError("no median for empty data")
    if n % 2 == 1:
        return data[n // 2]
    else:
        return data[n // 2 - 1]


def median_high(data):
    """Return the high median of data.'''

GOLDEN_PROMPT = 'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n'
# Greedy continuation of GOLDEN_PROMPT by the shipped checkpoint (float32, FP8 weights dequantized): '    return
# n\n\n\ndef summarize_list(summarize_list):\n    """Return list of list elements."""\n'. The smallest top-1/top-2
# logit gap along it is 0.138, far above float32 noise across machines.
GOLDEN_IDS = [
    261,
    383,
    324,
    1079,
    312,
    301,
    2009,
    281,
    856,
    1420,
    620,
    2009,
    281,
    856,
    1420,
    296,
    261,
    423,
    868,
    825,
    410,
    825,
    4198,
    966,
]


@pytest.fixture(scope="module")
def demo():
    return mimo_jax.load_model("demo", mtp=True)


@pytest.fixture(scope="module")
def tokenizer():
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(demo_model_dir() / "tokenizer.json"))


def test_release_layout_and_size_budget():
    directory = demo_model_dir()
    files = sorted(os.listdir(directory))
    assert {"config.json", "model.safetensors.index.json", "model_mtp.safetensors", "tokenizer.json"} <= set(files)
    assert sum(os.path.getsize(directory / f) for f in files) <= 25 * 10**6
    config = json.loads((directory / "config.json").read_text())
    assert config["model_type"] == "mimo_v2" and config["attention_projection_layout"] == "fused_qkv"
    quant = config["quantization_config"]
    assert quant["quant_method"] == "fp8" and quant["weight_block_size"] == [128, 128]
    assert all(name.endswith("self_attn.o_proj") for name in quant["ignored_layers"])
    index = json.loads((directory / "model.safetensors.index.json").read_text())["weight_map"]
    mtp = {n for n, f in index.items() if f == "model_mtp.safetensors"}
    assert mtp and all(n.startswith("model.mtp.layers.") for n in mtp)
    assert "model.layers.1.self_attn.qkv_proj.weight_scale_inv" in index
    assert len(set(index.values())) >= 3  # several files, as the releases ship


def test_demo_loads_with_every_mimo_feature(demo):
    cfg = demo.config
    assert cfg.fused_qkv and cfg.num_mtp_layers == 3 and len(demo.model.mtp) == 3
    assert any(cfg.sliding) and not all(cfg.sliding)  # hybrid full / SWA
    assert cfg.num_kv_heads != cfg.swa_num_kv_heads  # GQA, different kv heads per layer type
    assert cfg.head_dim > cfg.v_head_dim and cfg.partial_rotary_factor < 1
    assert cfg.swa_sink and not cfg.moe[0] and all(cfg.moe[1:])
    assert cfg.num_experts > cfg.experts_per_token


def _greedy(demo, prompt_ids: list[int], new_tokens: int) -> np.ndarray:
    return td.greedy_generate(demo.model, [prompt_ids], new_tokens)[0]


def test_greedy_completion_is_stable(demo, tokenizer):
    ids = tokenizer.encode(GOLDEN_PROMPT, add_special_tokens=False).ids
    out = _greedy(demo, ids, len(GOLDEN_IDS))
    assert out.tolist() == GOLDEN_IDS, tokenizer.decode(out.tolist())
    text = tokenizer.decode(out.tolist())
    assert "return" in text  # it writes Python


def test_mtp_acceptance_on_heldout_snippet(demo, tokenizer):
    prompt = np.asarray([tokenizer.encode(HELDOUT_SNIPPET, add_special_tokens=False).ids], np.int32)
    result = td.measure_acceptance(demo.model, prompt, new_tokens=96)
    assert result["acceptance_length"] > 2.0, result


def test_chat_template_from_the_shipped_files():
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(demo_model_dir()))
    text = tok.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=False
    )
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert tok.eos_token == "<|im_end|>"
    assert (
        tok.convert_tokens_to_ids("<|im_end|>")
        in json.loads((demo_model_dir() / "config.json").read_text())["eos_token_id"]
    )
