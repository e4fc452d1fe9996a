"""A tiny served checkpoint for the server tests: random MiMo weights, a byte-level BPE tokenizer
trained here with HF `tokenizers`, and a MiMo-style chat template (thinking block, tool calls).

The weights are random (tests/hf_fixtures.py) except for one planted chain: a few added tokens
each predict the next one with a large margin, so greedy chat output is a known script that
exercises the reasoning and tool-call parsers end to end:

    <think> REASONING </think> CONTENT <tool_call> CALL_BODY </tool_call> <|im_end|>

Thinking on, the prompt ends in `<think>` and the whole script follows; thinking off, it ends in
`</think>` and the answer starts at CONTENT. Every other token keeps its random behaviour.
"""

from __future__ import annotations

import json
import os

import numpy as np

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
    from hf_fixtures import make_hf_model, save_hf_checkpoint
    from tokenizers import Tokenizer

    os.makedirs(directory, exist_ok=True)
    vocab = write_tokenizer(directory)
    tok = Tokenizer.from_file(os.path.join(directory, "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    model = make_hf_model(seed, vocab_size=vocab, eos_token_id=eos, pad_token_id=tok.token_to_id("<|endoftext|>"))
    plant_script(model, [tok.token_to_id(t) for t in SCRIPT])
    save_hf_checkpoint(model, directory)
    return directory
