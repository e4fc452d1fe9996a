"""Train the small MiMo-V2 demo checkpoint (with 3 working MTP layers) on the Python standard library.

Steps (each a subcommand; `prepare` and `export` run on the CPU, `train` on CPU or one GPU):

  prepare   stdlib *.py files (sorted, split by file) + chat samples made from their functions
            -> byte-level BPE tokenizer (HF `tokenizers`) with Qwen2's pre-tokenizer split,
            tokenizer_config.json with a MiMo-style chat template, token arrays train.npy / heldout.npy,
            held-out chat probes heldout_chat.jsonl, manifest.json
  train     MiMoModel(cfg, mtp_layers=3) with optax AdamW; one pure jitted step (state in, state out);
            main next-token loss + next-next-token losses of the MTP layers; aux-loss-free balancing
            of the MoE correction bias; writes params.safetensors (+ shards) and a log
  export    trained params -> release layout (hub config.json, fused qkv_proj, FP8 128x128 blocks,
            model_mtp.safetensors, index json) with the importer's writer, plus the tokenizer files
  evaluate  held-out loss/perplexity, MTP acceptance length (greedy, k = 1..3 draft steps), tool-call
            behaviour on held-out chat probes, and sample completions of a checkpoint directory

MTP wiring: the production one, the model's own (`MiMoModel.mtp_forward` -> `mtp_input`), as SGLang's
default multi-layer EAGLE worker, vLLM and the released checkpoints use it: every MTP layer k reads the
target's hidden state after its final norm, norm(h_t), and the embedding of token t+k+1, at position t,
and predicts token t+k+2. The exported config.json therefore has no `mtp_hidden_before_norm` (the demo
v1 checkpoint, trained on the pre-norm residual stream, needed `mtp_hidden_before_norm: true`).

    python launch/train_demo.py prepare --out .carry/demo_data
    python launch/train_demo.py train --data .carry/demo_data --out runs/demo   # one GPU: ~5 minutes
    python launch/train_demo.py export --params runs/demo --data .carry/demo_data --out runs/demo_release  # new dir
    python launch/train_demo.py evaluate --checkpoint runs/demo_release --data .carry/demo_data

`bench/train_demo_gpu.sh` runs train, export and evaluate in one device call.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

if __package__ in (None, ""):  # run as a script: make the repository's mimo_jax importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from mimo_jax.config import MiMoConfig, RunOptions
from mimo_jax.model import moe
from mimo_jax.model.cache import empty_layer_kv
from mimo_jax.model.mimo import MiMoModel, MoE
from mimo_jax.weights.safetensors_io import SafetensorsFile, save_file

# ----------------------------------------------------------------------------- presets


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model size, tokenizer size and training schedule."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    full_layers: tuple[int, ...]  # layer indices with full attention; others are SWA
    num_heads: int
    num_kv_heads: int  # full layers
    swa_num_kv_heads: int
    head_dim: int  # q and k
    v_head_dim: int
    intermediate_size: int  # layer 0 and MTP layers
    moe_intermediate_size: int
    num_experts: int
    experts_per_token: int
    sliding_window_size: int
    context_len: int
    mtp_layers: int = 3
    # training
    seq_len: int = 512
    batch_size: int = 64
    steps: int = 3000
    learning_rate: float = 2e-3
    warmup_steps: int = 200
    weight_decay: float = 0.1
    mtp_loss_weight: float = 0.3  # DeepSeek-V3's lambda: total = main + weight * mean(mtp losses)
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step per training step
    eval_every: int = 250
    eval_windows: int = 256


PRESETS = {
    # ~14M parameters; FP8-quantized matrices have 128-multiple input dims (hidden 256, experts 128).
    "demo": Preset(
        vocab_size=8192,
        hidden_size=256,
        num_layers=6,
        full_layers=(0, 5),
        num_heads=8,
        num_kv_heads=2,
        swa_num_kv_heads=4,
        head_dim=96,
        v_head_dim=64,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=8,
        experts_per_token=2,
        sliding_window_size=128,
        context_len=2048,
        steps=2600,  # the shipped run: about 4.5 minutes on one H200
    ),
    # CI: seconds on a CPU.
    "tiny": Preset(
        vocab_size=384,
        hidden_size=32,
        num_layers=2,
        full_layers=(0,),
        num_heads=4,
        num_kv_heads=1,
        swa_num_kv_heads=2,
        head_dim=12,
        v_head_dim=8,
        intermediate_size=64,
        moe_intermediate_size=16,
        num_experts=4,
        experts_per_token=2,
        sliding_window_size=8,
        context_len=256,
        seq_len=32,
        batch_size=8,
        steps=40,
        learning_rate=1e-2,
        warmup_steps=5,
        eval_every=20,
        eval_windows=8,
    ),
}

# ----------------------------------------------------------------------------- tokens and chat format

END_OF_TEXT = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (END_OF_TEXT, IM_START, IM_END)
# Markup the model writes itself: added tokens, but not "special" (kept when decoding).
MARKUP_TOKENS = ("<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# MiMo/Qwen3-style: `<|im_start|>role`, thinking in `<think>...</think>` (the model opens it when
# thinking is on; an empty block is pre-filled when `enable_thinking=false`), tools listed in the
# system turn, calls written as MiMo's XML tool-call markup, results in `<tool_response>` user turns.
CHAT_TEMPLATE = "".join(
    # Every piece of output is a quoted string and every tag trims around itself, so the template's
    # own line breaks never leak into the prompt.
    [
        "{%- set enable_thinking = enable_thinking if enable_thinking is defined else true -%}",
        "{%- set first_system = messages and messages[0].role == 'system' -%}",
        "{%- if tools -%}",
        "{{- '<|im_start|>system\\n' -}}",
        "{{- messages[0].content if first_system else 'You are MiMo, a helpful assistant.' -}}",
        "{{- '\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\n' -}}",
        "{{- 'You are provided with function signatures within <tools></tools> XML tags:\\n<tools>' -}}",
        "{%- for tool in tools -%}",
        "{{- '\\n' ~ ((tool.function if tool.function is defined else tool) | tojson) -}}",
        "{%- endfor -%}",
        "{{- '\\n</tools>\\n\\nFor each function call, ' -}}",
        "{{- 'output the function name and arguments in the following format:\\n' -}}",
        "{{- '<tool_call>\\n<function=example_function_name>\\n' -}}",
        "{{- '<parameter=example_parameter_1>value_1</parameter>\\n</function>\\n</tool_call><|im_end|>\\n' -}}",
        "{%- elif first_system -%}",
        "{{- '<|im_start|>system\\n' ~ messages[0].content ~ '<|im_end|>\\n' -}}",
        "{%- endif -%}",
        "{%- for message in messages -%}",
        "{%- if message.role == 'user' -%}",
        "{{- '<|im_start|>user\\n' ~ message.content ~ '<|im_end|>\\n' -}}",
        "{%- elif message.role == 'assistant' -%}",
        "{{- '<|im_start|>assistant\\n' -}}",
        "{%- if message.reasoning_content is string -%}",
        "{%- set reasoning = message.reasoning_content | trim -%}",
        "{{- '<think>\\n' ~ reasoning ~ '\\n</think>\\n\\n' -}}",
        "{%- endif -%}",
        "{%- set content = message.content if message.content is string else '' -%}",
        "{{- content -}}",
        "{%- for call in (message.tool_calls or []) -%}",
        "{%- set fn = call.function if call.function is defined else call -%}",
        "{%- if loop.first and content -%}{{- '\\n\\n' -}}{%- elif not loop.first -%}{{- '\\n' -}}{%- endif -%}",
        "{{- '<tool_call>\\n<function=' ~ fn.name ~ '>\\n' -}}",
        "{%- for name, value in fn.arguments.items() -%}",
        "{{- '<parameter=' ~ name ~ '>' ~ (value if value is string else value | tojson) ~ '</parameter>\\n' -}}",
        "{%- endfor -%}",
        "{{- '</function>\\n</tool_call>' -}}",
        "{%- endfor -%}",
        "{{- '<|im_end|>\\n' -}}",
        "{%- elif message.role == 'tool' -%}",
        "{%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}",
        "{{- '\\n<tool_response>\\n' ~ message.content ~ '\\n</tool_response>' -}}",
        "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{- '<|im_end|>\\n' -}}{%- endif -%}",
        "{%- endif -%}",
        "{%- endfor -%}",
        "{%- if add_generation_prompt -%}",
        "{{- '<|im_start|>assistant\\n' -}}",
        "{%- if not enable_thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}",
        "{%- endif -%}",
    ]
)

READ_SOURCE_TOOL = {
    "type": "function",
    "function": {
        "name": "read_source",
        "description": "Read the source code of a function or method of the Python standard library.",
        "parameters": {
            "type": "object",
            "properties": {
                "qualified_name": {"type": "string", "description": "module.function or module.Class.method"}
            },
            "required": ["qualified_name"],
        },
    },
}

RUN_PYTHON_TOOL = {
    "type": "function",
    "function": {
        "name": "run_python",
        "description": "Run a short Python snippet and return what it prints.",
        "parameters": {
            "type": "object",
            "properties": {"code": {"type": "string", "description": "Python source to run"}},
            "required": ["code"],
        },
    },
}

# ----------------------------------------------------------------------------- corpus


def stdlib_dir() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")


def is_heldout(relpath: str) -> bool:
    """About 2% of files, chosen by a hash of the path (independent of file order and machine)."""
    return _stable_hash("heldout:" + relpath) % 50 == 0


def stdlib_files(root: Path, max_bytes: int = 400_000, include: str | None = None) -> list[tuple[str, str]]:
    """(relative path, text) of the stdlib's *.py files in sorted order, UTF-8 only, no site-packages."""
    out = []
    for path in sorted(root.rglob("*.py"), key=lambda p: p.relative_to(root).as_posix()):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "dist-packages/")) or "__pycache__" in rel:
            continue
        if Path(rel).name.startswith("_sysconfigdata"):  # machine-specific build settings
            continue
        if include is not None and not rel.startswith(include):
            continue
        if path.stat().st_size > max_bytes or path.stat().st_size == 0:
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        out.append((rel, text))
    return out


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


# The chat mix, by a hash of (file, function): write a function (answered with its source), ask a plain
# question about one (answered in a sentence), either with tools offered that the question does not need
# (still answered directly), and ask for the tool by name (a call, the tool's response, then the answer).
CHAT_KINDS = ("write",) * 4 + ("ask",) * 2 + ("write_with_tools", "ask_with_tools") + ("use_tool",) * 2
TOOL_KINDS = ("write_with_tools", "ask_with_tools", "use_tool")


def chat_samples(rel: str, text: str) -> Iterator[dict[str, Any]]:
    """Chat conversations made from the documented functions (3 to 40 lines) of one file.

    Each yields {"messages": [...], "tools": [...] or None, "kind": one of CHAT_KINDS, "thinking": bool}. Tool
    calls appear only where tools are offered and the user asks for one; half the samples think (a reasoning
    block), the other half carry the empty block that the template pre-fills with thinking disabled.
    """
    import ast
    import textwrap

    try:
        tree = ast.parse(text)
    except (SyntaxError, ValueError):
        return
    module = rel[: -len(".py")].replace("/", ".").removesuffix(".__init__")
    lines = text.splitlines()

    def visit(node: ast.AST, prefix: str) -> Iterator[tuple[str, ast.FunctionDef | ast.AsyncFunctionDef]]:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef):
                yield prefix + child.name, child
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, prefix + child.name + ".")

    for qualname, fn in visit(tree, ""):
        doc = ast.get_docstring(fn)
        if not doc or fn.name.startswith("__") or not 3 <= fn.end_lineno - fn.lineno + 1 <= 40:
            continue
        key = _stable_hash(f"chat:{rel}:{qualname}")
        start = min([d.lineno for d in fn.decorator_list] + [fn.lineno]) - 1
        source = textwrap.dedent("\n".join(lines[start : fn.end_lineno])).rstrip()
        summary = _first_paragraph(doc)
        args = [a.arg for a in fn.args.args if a.arg not in ("self", "cls")]
        signature = f"{fn.name}({', '.join(args)})"
        full_name = f"{module}.{qualname}"
        arg_text = "no arguments" if not args else "the arguments " + ", ".join(f"`{a}`" for a in args)
        thinking = (key >> 8) % 2 == 0
        kind = CHAT_KINDS[(key >> 16) % len(CHAT_KINDS)]
        variant = (key >> 24) % 3
        tools = None
        if kind in TOOL_KINDS:  # the tool the user may ask for, sometimes beside one never asked for here
            tools = [READ_SOURCE_TOOL] + ([RUN_PYTHON_TOOL] if (key >> 32) % 2 else [])

        def reasoning(text: str, thinking: bool = thinking) -> str:
            return text if thinking else ""

        if kind == "use_tool":
            request = (
                f"Use `read_source` to show me how `{full_name}` is implemented.",
                f"Look up the source code of `{full_name}` with the read_source tool.",
                f"Read the source of `{full_name}` with your tool and show it to me.",
            )[variant]
            messages = [
                {"role": "user", "content": request},
                {
                    "role": "assistant",
                    "content": "",
                    "reasoning_content": reasoning(
                        f"The user asks me to read the source of `{full_name}` with `read_source`. I will call it."
                    ),
                    "tool_calls": [
                        {
                            "type": "function",
                            "function": {"name": "read_source", "arguments": {"qualified_name": full_name}},
                        }
                    ],
                },
                {"role": "tool", "content": source},
                {
                    "role": "assistant",
                    "content": f"`{full_name}` is implemented like this:\n\n```python\n{source}\n```",
                    "reasoning_content": reasoning("The tool returned the source; I show it to the user."),
                },
            ]
            yield {"messages": messages, "tools": tools, "kind": kind, "thinking": thinking}
            continue
        tool_note = " The `read_source` tool is offered, but this does not need it: I answer directly." if tools else ""
        if kind in ("write", "write_with_tools"):
            request = (
                f"Write a Python function `{signature}`: {summary}",
                f"Implement `{qualname}` from the `{module}` module.",
                f"{summary}\nWrite this as a Python function named `{fn.name}`.",
            )[variant]
            answer = f"Here is `{fn.name}`:\n\n```python\n{source}\n```"
            thought = (
                f"The user wants `{signature}`. It takes {arg_text}. Its job: {summary} "
                f"I will write it the way the standard library's `{module}` module does.{tool_note}"
            )
        else:  # a plain question, answered in text
            request, answer = (
                (f"What does `{full_name}` do?", f"`{signature}`, in the `{module}` module: {summary}"),
                (
                    f"Which module of the standard library defines `{qualname}`?",
                    f"`{qualname}` is defined in the `{module}` module. {summary}",
                ),
                (f"What arguments does `{full_name}` take?", f"`{fn.name}` takes {arg_text}. {summary}"),
            )[variant]
            thought = f"The user asks about `{full_name}`. Its docstring says: {summary}{tool_note}"
        messages = [
            {"role": "user", "content": request},
            {"role": "assistant", "content": answer, "reasoning_content": reasoning(thought)},
        ]
        yield {"messages": messages, "tools": tools, "kind": kind, "thinking": thinking}


def chat_probe(sample: dict[str, Any]) -> dict[str, Any]:
    """The first user turn of a chat sample as a generation prompt, and what the answer should do."""
    return {
        "messages": sample["messages"][:1],
        "tools": sample["tools"],
        "enable_thinking": sample["thinking"],
        "kind": sample["kind"],
        "expect": "tool_call" if sample["kind"] == "use_tool" else "text",
    }


def render_chat(template, sample: dict[str, Any]) -> str:
    return template.render(messages=sample["messages"], tools=sample["tools"], add_generation_prompt=False)


def compile_chat_template(source: str = CHAT_TEMPLATE):
    """The template compiled the way transformers compiles chat templates (sandboxed jinja2)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    return env.from_string(source)


# ----------------------------------------------------------------------------- tokenizer


# Qwen2's (and so MiMo's) pre-tokenizer split, before the byte-level mapping. Unlike GPT-2's, a run of
# newlines is a piece of its own (`\s*[\r\n]+`), so the "</think>\n\n" that the chat template pre-fills with
# thinking disabled tokenizes the same whether or not the answer follows it; digits are single pieces.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def train_tokenizer(texts: list[str], vocab_size: int):
    """Byte-level BPE with Qwen2's normalizer and pre-tokenizer; special tokens first (ids 0..2), markup last.

    Special and markup tokens are added tokens: matched before normalization and splitting, so they stay whole.
    """
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(MARKUP_TOKENS),
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKUP_TOKENS])
    if tokenizer.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tokenizer.get_vocab_size()} tokens, wanted {vocab_size}")
    return tokenizer


def tokenizer_config(context_len: int) -> dict[str, Any]:
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        "eos_token": IM_END,
        "pad_token": END_OF_TEXT,
        "unk_token": None,
        "add_bos_token": False,
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": context_len,
        "split_special_tokens": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _atomic_save_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(path.name + ".tmp.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


PROBES_PER_GROUP = 8  # held-out chat probes per (kind, thinking on/off)


def prepare(out: Path, preset: Preset, seed: int = 0, include: str | None = None) -> dict[str, Any]:
    """Corpus, tokenizer and token arrays into `out` (deterministic given the stdlib and seed)."""
    from tokenizers import Tokenizer

    out.mkdir(parents=True, exist_ok=True)
    root = stdlib_dir()
    files = stdlib_files(root, include=include)
    if not files:
        raise RuntimeError(f"no stdlib files under {root} (include={include!r})")
    template = compile_chat_template()
    train_docs: list[str] = []
    heldout_docs: list[str] = []
    kinds: dict[str, int] = {}
    n_thinking = 0
    probes: dict[tuple[str, bool], list[dict[str, Any]]] = {}
    for rel, text in files:
        if is_heldout(rel):
            heldout_docs.append(text)  # held-out loss is measured on plain source
            for sample in chat_samples(rel, text):  # held-out chats: tool-call behaviour probes
                group = probes.setdefault((sample["kind"], sample["thinking"]), [])
                if len(group) < PROBES_PER_GROUP:
                    group.append(chat_probe(sample))
            continue
        train_docs.append(text)
        for sample in chat_samples(rel, text):
            train_docs.append(render_chat(template, sample))
            kinds[sample["kind"]] = kinds.get(sample["kind"], 0) + 1
            n_thinking += sample["thinking"]
    n_chat = sum(kinds.values())
    probe_list = [p for key in sorted(probes) for p in probes[key]]
    _atomic_write_text(out / "heldout_chat.jsonl", "".join(json.dumps(p) + "\n" for p in probe_list))
    if not heldout_docs:  # tiny corpora: hold out the last file
        heldout_docs.append(train_docs.pop())
    tokenizer = train_tokenizer(train_docs, preset.vocab_size)
    tokenizer.save(str(out / "tokenizer.json.tmp"))
    os.replace(out / "tokenizer.json.tmp", out / "tokenizer.json")
    _atomic_write_text(out / "tokenizer_config.json", json.dumps(tokenizer_config(preset.context_len), indent=2) + "\n")
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))

    eot = tokenizer.token_to_id(END_OF_TEXT)
    random.Random(seed).shuffle(train_docs)  # interleave code files and chat samples

    def stream(docs: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tokenizer.encode_batch(docs, add_special_tokens=False):
            ids.extend(enc.ids)
            ids.append(eot)
        return np.asarray(ids, dtype=np.uint16 if preset.vocab_size <= 65536 else np.int32)

    train_ids, heldout_ids = stream(train_docs), stream(heldout_docs)
    _atomic_save_npy(out / "train.npy", train_ids)
    _atomic_save_npy(out / "heldout.npy", heldout_ids)
    manifest = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "files": len(files),
        "heldout_files": sorted(rel for rel, _ in files if is_heldout(rel)),
        "chat_samples": n_chat,
        "chat_kinds": dict(sorted(kinds.items())),
        "chat_thinking_share": n_thinking / max(n_chat, 1),
        "heldout_chat_probes": len(probe_list),
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(heldout_ids.size),
        "heldout_bytes": sum(len(d.encode()) for d in heldout_docs),
        "vocab_size": preset.vocab_size,
        "train_sha256": hashlib.sha256(train_ids.tobytes()).hexdigest(),
        "heldout_sha256": hashlib.sha256(heldout_ids.tobytes()).hexdigest(),
        "tokenizer_sha256": hashlib.sha256((out / "tokenizer.json").read_bytes()).hexdigest(),
    }
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


# ----------------------------------------------------------------------------- model config


def hub_config(preset: Preset, special_ids: dict[str, int] | None = None) -> dict[str, Any]:
    """config.json in the hub spelling of MiMo-V2.5 (`mimo_v2`, fused qkv_proj)."""
    special_ids = special_ids or {IM_END: 2, END_OF_TEXT: 0}
    n = preset.num_layers
    return {
        "architectures": ["MiMoV2ForCausalLM"],
        "model_type": "mimo_v2",
        "attention_projection_layout": "fused_qkv",
        "vocab_size": preset.vocab_size,
        "hidden_size": preset.hidden_size,
        "intermediate_size": preset.intermediate_size,
        "moe_intermediate_size": preset.moe_intermediate_size,
        "num_hidden_layers": n,
        "hybrid_layer_pattern": [0 if i in preset.full_layers else 1 for i in range(n)],
        "moe_layer_freq": [0 if i == 0 else 1 for i in range(n)],
        "num_attention_heads": preset.num_heads,
        "num_key_value_heads": preset.num_kv_heads,
        "head_dim": preset.head_dim,
        "v_head_dim": preset.v_head_dim,
        "swa_num_attention_heads": preset.num_heads,
        "swa_num_key_value_heads": preset.swa_num_kv_heads,
        "swa_head_dim": preset.head_dim,
        "swa_v_head_dim": preset.v_head_dim,
        "sliding_window": preset.sliding_window_size,
        "sliding_window_size": preset.sliding_window_size,
        "attention_chunk_size": preset.sliding_window_size,
        "add_full_attention_sink_bias": False,
        "add_swa_attention_sink_bias": True,
        "attention_value_scale": 0.707,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "rope_theta": 10000000,
        "swa_rope_theta": 10000,
        "partial_rotary_factor": 0.334,
        "rope_scaling": None,
        "layernorm_epsilon": 1e-5,
        "hidden_act": "silu",
        "n_routed_experts": preset.num_experts,
        "num_experts_per_tok": preset.experts_per_token,
        "n_shared_experts": None,
        "n_group": 1,
        "topk_group": 1,
        "topk_method": "noaux_tc",
        "scoring_func": "sigmoid",
        "norm_topk_prob": True,
        "routed_scaling_factor": None,
        "tie_word_embeddings": False,
        "max_position_embeddings": preset.context_len,
        "initializer_range": 0.02,
        "bos_token_id": None,
        "eos_token_id": [special_ids[IM_END], special_ids[END_OF_TEXT]],
        "pad_token_id": special_ids[END_OF_TEXT],
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def special_token_ids(tokenizer_path: Path) -> dict[str, int]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_path))
    return {t: tok.token_to_id(t) for t in SPECIAL_TOKENS + MARKUP_TOKENS}


# ----------------------------------------------------------------------------- training


def build_model(cfg: MiMoConfig, seed: int, mtp_layers: int) -> MiMoModel:
    # every expert on every token: plain matmuls, no scatter in the gradient
    options = RunOptions.for_platform(jax.default_backend(), moe_impl="dense")
    return MiMoModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(params=seed), mtp_layers=mtp_layers, options=options)


def split_model(model: MiMoModel) -> tuple[Any, nnx.State, nnx.State]:
    """(graphdef, correction biases, trainable params): the biases are balanced outside the gradient."""
    return nnx.split(model, nnx.PathContains("correction_bias"), nnx.Param)


def forward_train(
    model: MiMoModel, token_ids: jax.Array, positions: jax.Array
) -> tuple[jax.Array, dict[int, jax.Array]]:
    """`model.hidden_states` without a cache that also reports each MoE layer's expert load.

    Returns (residual stream before the final norm [B, T, H], {layer index: load [E]}), where
    load is the fraction of the layer's routed (token, slot) pairs that each expert received.
    """
    x = model.embed(token_ids)
    loads = {}
    for i, layer in enumerate(model.layers):
        with jax.named_scope(f"layer_{i}"):
            attn_out, _ = layer.self_attn(layer.input_layernorm(x), positions, None)
            x = x + attn_out
            h = layer.post_attention_layernorm(x)
            if isinstance(layer.mlp, MoE):
                mlp = layer.mlp
                _, ids = moe.route(
                    h.reshape(-1, h.shape[-1]),
                    mlp.router[...],
                    mlp.correction_bias[...],
                    top_k=mlp.top_k,
                    n_group=mlp.n_group,
                    topk_group=mlp.topk_group,
                    norm_topk_prob=mlp.norm_topk_prob,
                    scaling=mlp.scaling,
                )
                counts = jnp.zeros(mlp.router.shape[0], jnp.float32).at[ids.reshape(-1)].add(1.0)
                loads[i] = counts / ids.size
            x = x + layer.mlp(h)
    return x, loads


def balance_biases(biases: nnx.State, loads: dict[int, jax.Array], rate: float) -> nnx.State:
    """Aux-loss-free balancing (DeepSeek-V3): bias += rate * sign(mean load - load), per MoE layer."""

    def update(path, bias):
        layer = path[1].key  # ('layers', i, 'mlp', 'correction_bias', value)
        load = loads[layer]
        return bias + rate * jnp.sign(jnp.mean(load) - load)

    return jax.tree_util.tree_map_with_path(update, biases)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    params: nnx.State  # float32 master weights
    biases: nnx.State  # MoE correction biases (float32)
    opt_state: Any
    step: jax.Array  # int32 scalar


@dataclasses.dataclass(frozen=True)
class Trainer:
    """Everything static about a run; its methods are pure functions of TrainState and data."""

    graphdef: Any
    compute_dtypes: nnx.State  # the dtype each param computes in (bf16 on GPU; router, sinks fp32)
    preset: Preset
    seed: int
    tx: Any

    @property
    def window(self) -> int:
        """Tokens per training row: seq_len inputs, their next tokens, and MTP targets up to t+M+1."""
        return self.preset.seq_len + self.preset.mtp_layers + 1

    def merged(self, params: nnx.State, biases: nnx.State) -> MiMoModel:
        compute = jax.tree.map(lambda p, ref: p.astype(ref.dtype), params, self.compute_dtypes)
        return nnx.merge(self.graphdef, biases, compute)

    def losses(self, params, biases, rows):
        """rows [B, window] -> (main loss, MTP losses [M], main top-1 acc, MTP top-1 accs [M], loads)."""
        s, m = self.preset.seq_len, self.preset.mtp_layers
        model = self.merged(params, biases)
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (rows.shape[0], s))
        hidden, loads = forward_train(model, rows[:, :s], positions)

        def ce_acc(logits, labels):
            ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
            return ce, (jnp.argmax(logits, -1) == labels).mean()

        main, main_acc = ce_acc(model.logits(hidden), rows[:, 1 : s + 1])
        mtp, mtp_acc = [], []
        for k in range(m):
            # MTP layer k: embedding of token t+k+1 and the target's hidden at t (normed by `mtp_forward`) -> t+k+2.
            _, logits, _ = model.mtp_forward(k, rows[:, k + 1 : k + 1 + s], hidden, positions)
            ce, acc = ce_acc(logits, rows[:, k + 2 : k + 2 + s])
            mtp.append(ce)
            mtp_acc.append(acc)
        return main, jnp.stack(mtp), main_acc, jnp.stack(mtp_acc), loads

    def init(self, params: nnx.State, biases: nnx.State) -> TrainState:
        return TrainState(params, biases, self.tx.init(params), jnp.zeros((), jnp.int32))

    def sample_rows(self, step: jax.Array, tokens: jax.Array) -> jax.Array:
        key = jax.random.fold_in(jax.random.key(self.seed), step)
        starts = jax.random.randint(key, (self.preset.batch_size,), 0, tokens.shape[0] - self.window)
        return tokens[starts[:, None] + jnp.arange(self.window)].astype(jnp.int32)

    def train_step(self, state: TrainState, tokens: jax.Array) -> tuple[TrainState, dict[str, jax.Array]]:
        """One optimizer step on a batch drawn from `tokens` (seeded by the step): state in, state out."""
        rows = self.sample_rows(state.step, tokens)
        weight = self.preset.mtp_loss_weight

        def objective(params):
            main, mtp, main_acc, mtp_acc, loads = self.losses(params, state.biases, rows)
            return main + weight * mtp.mean(), (main, mtp, loads)

        (total, (main, mtp, loads)), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
        updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        biases = balance_biases(state.biases, loads, self.preset.bias_update_rate)
        all_loads = jnp.stack(list(loads.values()))
        metrics = {
            "loss": total,
            "main": main,
            "mtp": mtp,
            "grad_norm": optax.tree.norm(grads),
            "max_load": all_loads.max() * all_loads.shape[1],  # 1.0 = perfectly balanced
        }
        return TrainState(params, biases, opt_state, state.step + 1), metrics

    def eval_step(self, params, biases, rows) -> dict[str, jax.Array]:
        main, mtp, main_acc, mtp_acc, _ = self.losses(params, biases, rows)
        return {"main": main, "mtp": mtp, "main_acc": main_acc, "mtp_acc": mtp_acc}


def default_compute_dtype() -> Any:
    """bfloat16 on accelerators; float32 on the CPU (XLA:CPU has no bf16 x bf16 -> f32 dot)."""
    return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16


def param_dtypes(cfg: MiMoConfig, mtp_layers: int, dtype: Any) -> nnx.State:
    """Trainable params of a model built with `dtype` as 0-d arrays of their dtypes (router, sinks stay fp32)."""
    reference = nnx.eval_shape(lambda: MiMoModel(cfg, dtype=dtype, rngs=nnx.Rngs(0), mtp_layers=mtp_layers))
    _, _, ref_params = split_model(reference)
    return jax.tree.map(lambda r: jnp.zeros((), r.dtype), ref_params)


def make_trainer(cfg: MiMoConfig, model: MiMoModel, preset: Preset, seed: int, compute_dtype: Any = None) -> Trainer:
    graphdef, _, params = split_model(model)
    compute_dtypes = param_dtypes(cfg, len(model.mtp), compute_dtype or default_compute_dtype())
    schedule = optax.warmup_cosine_decay_schedule(
        0.0,
        preset.learning_rate,
        preset.warmup_steps,
        max(preset.steps, preset.warmup_steps + 1),
        preset.learning_rate / 10,
    )
    decay_mask = jax.tree.map(lambda p: p.ndim >= 2, params)  # no decay on norms, sinks
    tx = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=preset.weight_decay, mask=decay_mask),
    )
    return Trainer(graphdef, compute_dtypes, preset, seed, tx)


def eval_windows(tokens: np.ndarray, window: int, count: int) -> np.ndarray:
    """Consecutive non-overlapping windows from the start of a token stream (deterministic)."""
    count = min(count, len(tokens) // window)
    if count == 0:
        raise ValueError(f"held-out stream of {len(tokens)} tokens is shorter than one window of {window}")
    return tokens[: count * window].reshape(count, window).astype(np.int32)


def evaluate_heldout(trainer: Trainer, eval_fn, params, biases, windows: np.ndarray) -> dict[str, Any]:
    batch = trainer.preset.batch_size
    sums: dict[str, np.ndarray] = {}
    n = 0
    for i in range(0, len(windows) - batch + 1 if len(windows) >= batch else 1, batch):
        rows = windows[i : i + batch]
        out = jax.device_get(eval_fn(params, biases, jnp.asarray(rows)))
        for k, v in out.items():
            sums[k] = sums.get(k, 0) + np.asarray(v, np.float64) * len(rows)
        n += len(rows)
    return {k: (v / n).tolist() for k, v in sums.items()}


def params_to_arrays(params: nnx.State, biases: nnx.State, dtypes: nnx.State) -> dict[str, np.ndarray]:
    """Flat {dotted param path: array}, params cast to `dtypes` (see `param_dtypes`)."""
    cast = jax.tree.map(lambda p, ref: p.astype(ref.dtype), params, dtypes)
    out = {}
    for state in (cast, biases):
        for path, var in nnx.to_flat_state(state):
            out[".".join(str(k) for k in path)] = np.asarray(jax.device_get(var.get_value()))
    return dict(sorted(out.items()))


PARAMS_INDEX = "params.index.json"


def save_params(arrays: dict[str, np.ndarray], directory: Path, max_file_bytes: int = 15 * 2**20) -> list[str]:
    """Trained parameters as safetensors shards of at most `max_file_bytes` (the device returns <= 16 MB a file)."""
    shards: list[dict[str, np.ndarray]] = [{}]
    size = 0
    for name, arr in arrays.items():
        if size + arr.nbytes > max_file_bytes and shards[-1]:
            shards.append({})
            size = 0
        shards[-1][name] = arr
        size += arr.nbytes
    names = [f"params-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, directory / name)
        weight_map.update({t: name for t in shard})
    _atomic_write_text(directory / PARAMS_INDEX, json.dumps({"weight_map": weight_map}, indent=1) + "\n")
    return names


def load_params_into(model: MiMoModel, directory: Path) -> MiMoModel:
    """Fill a model (built with the run's config and MTP layers) from `save_params` shards."""
    index = json.loads((directory / PARAMS_INDEX).read_text())["weight_map"]
    files = {name: SafetensorsFile(directory / name) for name in sorted(set(index.values()))}
    variables = {
        ".".join(str(k) for k in path): var for path, var in nnx.iter_graph(model) if isinstance(var, nnx.Param)
    }
    if set(variables) != set(index):
        missing, extra = sorted(set(variables) - set(index)), sorted(set(index) - set(variables))
        raise ValueError(f"{directory}: params do not match the model (missing {missing[:5]}, unexpected {extra[:5]})")
    for name, var in variables.items():
        host = files[index[name]].get(name)
        if host.shape != var.get_value().shape:
            raise ValueError(f"{directory}: {name} has shape {host.shape}, the model expects {var.get_value().shape}")
        var.set_value(jnp.asarray(host, var.get_value().dtype))
    return model


def train(
    data: Path,
    out: Path,
    preset: Preset,
    seed: int = 0,
    steps: int | None = None,
    log_every: int = 10,
    max_seconds: float | None = None,
) -> dict:
    """Train from `prepare`'s arrays; write params shards, train_log.jsonl and train_summary.json into `out`.

    `max_seconds`: a wall-clock bound on the loop (compile included) for a device call with a hard limit: past
    it, training stops after the current step (held-out eval, params and summary as usual; the summary's
    `stopped_early` says so, and the learning rate has not finished its decay).
    """
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    steps = steps or preset.steps
    preset = dataclasses.replace(preset, steps=steps)
    config = hub_config(preset, special_token_ids(data / "tokenizer.json"))
    cfg = MiMoConfig.from_dict(config)
    model = build_model(cfg, seed, preset.mtp_layers)
    trainer = make_trainer(cfg, model, preset, seed)
    _, biases, params = split_model(model)
    state = trainer.init(params, biases)
    n_params = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(params))

    train_tokens = jnp.asarray(np.load(data / "train.npy").astype(np.int32))
    heldout = eval_windows(np.load(data / "heldout.npy"), trainer.window, preset.eval_windows)
    step_fn = jax.jit(trainer.train_step, donate_argnums=0)
    eval_fn = jax.jit(trainer.eval_step)

    log_path = out / "train_log.jsonl"
    log = open(log_path, "w")

    def record(entry: dict) -> None:
        log.write(json.dumps(entry) + "\n")
        log.flush()

    record(
        {
            "event": "start",
            "params": n_params,
            "preset": dataclasses.asdict(preset),
            "seed": seed,
            "devices": [str(d) for d in jax.devices()],
            "train_tokens": int(train_tokens.shape[0]),
        }
    )
    tqdm.write(
        f"{n_params / 1e6:.2f}M params, {train_tokens.shape[0] / 1e6:.2f}M train tokens, device {jax.devices()[0]}"
    )
    t0 = time.perf_counter()
    bar = tqdm(range(steps), desc="train", dynamic_ncols=True, mininterval=2.0)
    evals = []
    stopped_early = False
    for step in bar:
        state, metrics = step_fn(state, train_tokens)
        last = step == steps - 1
        if max_seconds is not None and not last and time.perf_counter() - t0 > max_seconds:
            jax.block_until_ready(state)
            stopped_early = last = True
            tqdm.write(f"step {step + 1} of {steps}: past max_seconds={max_seconds}, stopping here")
        if step % log_every == 0 or last:
            m = jax.device_get(metrics)
            entry = {
                "step": step,
                "time_s": time.perf_counter() - t0,
                "loss": float(m["loss"]),
                "main": float(m["main"]),
                "mtp": [float(x) for x in m["mtp"]],
                "grad_norm": float(m["grad_norm"]),
                "max_load": float(m["max_load"]),
            }
            record(entry)
            bar.set_postfix(
                loss=f"{entry['loss']:.3f}", main=f"{entry['main']:.3f}", mtp=f"{np.mean(entry['mtp']):.3f}"
            )
        if (step + 1) % preset.eval_every == 0 or last:
            ev = evaluate_heldout(trainer, eval_fn, state.params, state.biases, heldout)
            ev.update(step=step + 1, time_s=time.perf_counter() - t0, event="heldout")
            record(ev)
            evals.append(ev)
            tqdm.write(
                f"step {step + 1}: held-out loss {ev['main']:.4f} (ppl {math.exp(ev['main']):.2f}), "
                f"mtp {' '.join(f'{x:.3f}' for x in ev['mtp'])}, acc {ev['main_acc']:.3f} / "
                f"{' '.join(f'{x:.3f}' for x in ev['mtp_acc'])}"
            )
        if last:
            break
    train_time = time.perf_counter() - t0
    log.close()
    # Stored as the release stores them: bfloat16, with router, correction bias and sinks in float32.
    arrays = params_to_arrays(state.params, state.biases, param_dtypes(cfg, preset.mtp_layers, jnp.bfloat16))
    save_params(arrays, out)
    _atomic_write_text(out / "config.json", json.dumps(config, indent=2) + "\n")
    summary = {
        "params": n_params,
        "steps": evals[-1]["step"],
        "planned_steps": steps,
        "stopped_early": stopped_early,
        "train_time_s": train_time,
        "heldout": evals[-1],
        "first_loss": None,
        "preset": dataclasses.asdict(preset),
        "seed": seed,
    }
    with open(log_path) as f:
        losses = [json.loads(line) for line in f if '"loss"' in line]
    summary["first_loss"], summary["last_loss"] = losses[0]["loss"], losses[-1]["loss"]
    _atomic_write_text(out / "train_summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------- evaluation


def greedy_generate(model: MiMoModel, prompts: list[list[int]], new_tokens: int) -> np.ndarray:
    """Greedy continuation [B, new_tokens] of left-padded prompts, with the model's KV cache.

    Padding slots get position -1, which the cache never stores and attention never sees.
    """
    cfg = model.config
    graphdef, state = nnx.split(model)
    longest = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), longest), np.int32)
    pos = np.full((len(prompts), longest), -1, np.int32)
    for b, p in enumerate(prompts):
        ids[b, longest - len(p) :] = p
        pos[b, longest - len(p) :] = np.arange(len(p))
    lengths = np.asarray([len(p) for p in prompts], np.int32)

    @jax.jit
    def run(state, ids, pos, lengths):
        m = nnx.merge(graphdef, state)
        batch = ids.shape[0]
        cache = [empty_layer_kv(spec, batch, longest + new_tokens, m.dtype) for spec in cfg.layers]
        logits, cache = m(ids, pos, cache)
        first = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)

        def step(carry, i):
            token, cache = carry
            logits, cache = m(token[:, None], (lengths + i)[:, None], cache)
            return (jnp.argmax(logits[:, 0], -1).astype(jnp.int32), cache), token

        _, tokens = jax.lax.scan(step, (first, cache), jnp.arange(new_tokens, dtype=jnp.int32))
        return tokens.T

    return np.asarray(run(state, ids, pos, lengths))


def mtp_draft_hits(model: MiMoModel, sequences: np.ndarray) -> np.ndarray:
    """Teacher-forced MTP drafts: hits[k, b, t] = MTP layer k at position t predicts token t+k+2 exactly.

    Layer k reads the target's hidden state at t (through `mtp_forward`: the model's own wiring, after the
    final norm unless the config says otherwise) and the embedding of token t+k+1, as inference does.
    When all earlier drafts of a chain are right, their inputs equal these teacher-forced ones, so the
    accepted prefix of a greedy chain drafted at t is the leading run of hits[:, b, t].
    """
    graphdef, state = nnx.split(model)
    m_layers = len(model.mtp)

    @jax.jit
    def drafts(state, seqs):
        m = nnx.merge(graphdef, state)
        b, n = seqs.shape
        positions = jnp.broadcast_to(jnp.arange(n, dtype=jnp.int32), (b, n))
        hidden, _ = m.hidden_states(seqs, positions)
        out = []
        for k in range(m_layers):
            length = n - k - 1
            _, logits, _ = m.mtp_forward(k, seqs[:, k + 1 :], hidden[:, :length], positions[:, :length])
            pred = jnp.argmax(logits, -1).astype(jnp.int32)
            out.append(jnp.pad(pred, ((0, 0), (0, k + 1)), constant_values=-1))
        return jnp.stack(out)

    preds = np.asarray(drafts(state, jnp.asarray(sequences, jnp.int32)))
    hits = np.zeros_like(preds, dtype=bool)
    for k in range(m_layers):
        hits[k, :, : -(k + 2)] = preds[k, :, : -(k + 2)] == sequences[:, k + 2 :]
    return hits


def acceptance_lengths(hits: np.ndarray, start: int) -> list[int]:
    """Tokens per verify round of greedy speculative decoding with len(hits) drafts per round.

    A round at position p (last verified token; the target's next token x[p+1] is known) drafts
    x[p+2..p+M+1], accepts the leading run of hits, and gains accepted + 1 (the bonus) tokens.
    """
    m, batch, n = hits.shape
    out = []
    for b in range(batch):
        p = start
        while p + m + 1 < n:
            accepted = 0
            while accepted < m and hits[accepted, b, p]:
                accepted += 1
            out.append(accepted + 1)
            p += accepted + 1
    return out


def acceptance_by_steps(hits: np.ndarray, start: int) -> list[float]:
    """Mean tokens per verify round with k = 1 .. len(hits) draft steps (greedy chains use the first k layers)."""
    return [float(np.mean(acceptance_lengths(hits[:k], start))) for k in range(1, len(hits) + 1)]


def measure_acceptance(model: MiMoModel, prompts: np.ndarray, new_tokens: int) -> dict[str, Any]:
    """Greedy generation from each prompt, then the MTP acceptance over the generated part.

    `acceptance_length` is for k = len(model.mtp) draft steps; `acceptance_length_by_k` for k = 1, 2, ...
    """
    generated = greedy_generate(model, [list(p) for p in prompts], new_tokens)
    sequences = np.concatenate([prompts, generated], axis=1)
    hits = mtp_draft_hits(model, sequences)
    lengths = acceptance_lengths(hits, start=prompts.shape[1] - 1)
    region = hits[:, :, prompts.shape[1] - 1 : -(len(model.mtp) + 1)]
    return {
        "acceptance_length": float(np.mean(lengths)),
        "acceptance_length_by_k": acceptance_by_steps(hits, start=prompts.shape[1] - 1),
        "rounds": len(lengths),
        "draft_hit_rate": [float(region[k].mean()) for k in range(len(model.mtp))],
        "prompts": int(prompts.shape[0]),
        "prompt_tokens": int(prompts.shape[1]),
        "new_tokens": new_tokens,
    }


def text_acceptance(model: MiMoModel, rows: np.ndarray) -> dict[str, Any]:
    """Acceptance if the target reproduced the held-out text: drafts must equal the real next tokens.

    A stricter figure than `measure_acceptance` (whose greedy continuations of a small model are
    more predictable than human-written code).
    """
    hits = mtp_draft_hits(model, rows)
    lengths = acceptance_lengths(hits, start=0)
    return {
        "acceptance_length": float(np.mean(lengths)),
        "acceptance_length_by_k": acceptance_by_steps(hits, start=0),
        "rounds": len(lengths),
        "draft_hit_rate": [float(hits[k, :, : -(len(model.mtp) + 1)].mean()) for k in range(len(model.mtp))],
        "rows": int(rows.shape[0]),
        "tokens": int(rows.shape[1]),
    }


# Prompts end on a complete line with its newline: Qwen2's split keeps a newline run apart from the next line's
# indentation but joins it to the punctuation before it ("):\n"), so a line cut before its newline would end
# on a piece never seen in training.
SAMPLE_PROMPTS = (
    'def fibonacci(n):\n    """Return the n-th Fibonacci number."""\n',
    'import os\n\n\ndef list_python_files(directory):\n    """Return the paths of the .py files under directory."""\n',
    'class Stack:\n    """A last-in, first-out stack."""\n\n    def __init__(self):\n',
    'def read_json(path):\n    """Read a JSON file and return the parsed object."""\n    with open(path) as f:\n',
)
# (messages, tools): a request to write code, a plain question with a tool offered, a request for the tool.
CHAT_PROMPTS = (
    ([{"role": "user", "content": "Write a Python function `is_prime(n)`: Return True if n is a prime number."}], None),
    ([{"role": "user", "content": "What does `os.path.join` do?"}], [READ_SOURCE_TOOL]),
    ([{"role": "user", "content": "Use `read_source` to show me how `json.dumps` works."}], [READ_SOURCE_TOOL]),
)


def _chat_template(tokenizer_dir: Path):
    return compile_chat_template(json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"])


def _greedy_texts(model: MiMoModel, tok, texts: list[str], new_tokens: int) -> list[str]:
    """Greedy completions of `texts`, each cut before its first end-of-turn / end-of-text token."""
    prompts = [tok.encode(t, add_special_tokens=False).ids for t in texts]
    generated = greedy_generate(model, prompts, new_tokens)
    stops = {tok.token_to_id(END_OF_TEXT), tok.token_to_id(IM_END)}
    out = []
    for row in generated:
        ids = list(row)
        cut = next((i for i, t in enumerate(ids) if t in stops), len(ids))
        out.append(tok.decode(ids[:cut], skip_special_tokens=False))
    return out


def sample_completions(model: MiMoModel, tokenizer_dir: Path, new_tokens: int = 64) -> list[dict[str, str]]:
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    template = _chat_template(tokenizer_dir)
    texts = list(SAMPLE_PROMPTS)
    for messages, tools in CHAT_PROMPTS:
        for thinking in (True, False):
            texts.append(
                template.render(messages=messages, tools=tools, add_generation_prompt=True, enable_thinking=thinking)
            )
    completions = _greedy_texts(model, tok, texts, new_tokens)
    return [{"prompt": t, "completion": c} for t, c in zip(texts, completions, strict=True)]


def chat_behaviour(model: MiMoModel, data: Path, new_tokens: int = 128) -> dict[str, Any]:
    """Greedy answers to the held-out chat probes (`heldout_chat.jsonl`): how often each kind of request gets a
    tool call, and how often thinking-on answers open a reasoning block.

    Wanted: calls for "use_tool" (the user asks for the tool), none for the others (tools offered or not).
    """
    from tokenizers import Tokenizer

    probes = [json.loads(line) for line in (data / "heldout_chat.jsonl").read_text().splitlines()]
    if not probes:
        return {"probes": 0}
    tok = Tokenizer.from_file(str(data / "tokenizer.json"))
    template = _chat_template(data)
    texts = [
        template.render(
            messages=p["messages"], tools=p["tools"], add_generation_prompt=True, enable_thinking=p["enable_thinking"]
        )
        for p in probes
    ]
    completions = _greedy_texts(model, tok, texts, new_tokens)
    by_kind: dict[str, dict[str, Any]] = {}
    for probe, completion in zip(probes, completions, strict=True):
        row = by_kind.setdefault(probe["kind"], {"probes": 0, "tool_calls": 0, "thinking_on": 0, "opened_think": 0})
        row["probes"] += 1
        row["tool_calls"] += "<tool_call>" in completion
        if probe["enable_thinking"]:
            row["thinking_on"] += 1
            row["opened_think"] += completion.lstrip().startswith("<think>")

    def rate(kinds: tuple[str, ...], field: str, total: str = "probes") -> float | None:
        n = sum(by_kind[k][total] for k in kinds if k in by_kind)
        return sum(by_kind[k][field] for k in kinds if k in by_kind) / n if n else None

    return {
        "probes": len(probes),
        "new_tokens": new_tokens,
        "tool_call_rate_when_asked": rate(("use_tool",), "tool_calls"),
        "tool_call_rate_with_tools_not_asked": rate(("write_with_tools", "ask_with_tools"), "tool_calls"),
        "tool_call_rate_without_tools": rate(("write", "ask"), "tool_calls"),
        "thinking_on_opens_think": rate(tuple(by_kind), "opened_think", "thinking_on"),
        "by_kind": by_kind,
        "examples": [
            {"kind": p["kind"], "thinking": p["enable_thinking"], "request": p["messages"][0]["content"], "answer": c}
            for p, c in list(zip(probes, completions, strict=True))[:: max(1, len(probes) // 10)]
        ],
    }


def evaluate(
    model: MiMoModel,
    data: Path,
    preset: Preset,
    prompts: int = 64,
    prompt_tokens: int = 128,
    new_tokens: int = 128,
    heldout_windows: int | None = None,
    chat_tokens: int = 128,
) -> dict[str, Any]:
    """Held-out loss/perplexity, MTP acceptance (greedy, k = 1 .. len(model.mtp) draft steps), tool-call
    behaviour on the held-out chat probes, and sample completions."""
    t0 = time.perf_counter()
    manifest = json.loads((data / "manifest.json").read_text())
    heldout = np.load(data / "heldout.npy").astype(np.int32)
    graphdef, state = nnx.split(model)
    window = preset.seq_len + len(model.mtp) + 1
    windows = eval_windows(heldout, window, heldout_windows or preset.eval_windows)

    @jax.jit
    def losses(state, rows):
        m = nnx.merge(graphdef, state)
        s = preset.seq_len
        positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (rows.shape[0], s))
        hidden, _ = m.hidden_states(rows[:, :s], positions)
        nll = optax.softmax_cross_entropy_with_integer_labels(m.logits(hidden), rows[:, 1 : s + 1])
        mtp = []
        for k in range(len(m.mtp)):
            _, logits, _ = m.mtp_forward(k, rows[:, k + 1 : k + 1 + s], hidden, positions)
            mtp.append(optax.softmax_cross_entropy_with_integer_labels(logits, rows[:, k + 2 : k + 2 + s]).mean())
        return nll.mean(), jnp.stack(mtp)

    batch = min(preset.batch_size, len(windows))
    main, mtp, n = 0.0, 0.0, 0
    for i in range(0, len(windows) - batch + 1, batch):
        a, b = jax.device_get(losses(state, jnp.asarray(windows[i : i + batch])))
        main, mtp, n = main + float(a) * batch, mtp + np.asarray(b, np.float64) * batch, n + batch
    main, mtp = main / n, mtp / n
    bytes_per_token = manifest["heldout_bytes"] / manifest["heldout_tokens"]
    # Prompts for acceptance: spaced-out held-out windows (not the ones above's order, but deterministic).
    stride = max(len(heldout) // prompts, prompt_tokens)
    starts = [i * stride for i in range(prompts) if i * stride + prompt_tokens <= len(heldout)]
    prompt_rows = np.stack([heldout[s : s + prompt_tokens] for s in starts])
    result = {
        "heldout_loss": main,
        "heldout_perplexity": math.exp(main),
        "heldout_bits_per_byte": main / math.log(2) / bytes_per_token,
        "heldout_mtp_loss": mtp.tolist(),
        "heldout_tokens_scored": n * preset.seq_len,
        "acceptance": measure_acceptance(model, prompt_rows, new_tokens),
        "text_acceptance": text_acceptance(
            model, np.stack([heldout[s : s + prompt_tokens + new_tokens] for s in starts])
        ),
        "chat_behaviour": chat_behaviour(model, data, chat_tokens),
        "samples": sample_completions(model, data),
    }
    result["evaluate_time_s"] = time.perf_counter() - t0
    return result


# ----------------------------------------------------------------------------- export


def export(params_dir: Path, data: Path, out: Path) -> None:
    """Trained params -> the release layout (the importer's `export_release`: fused qkv_proj, FP8 128x128
    blocks, `model_mtp.safetensors`, index json), with the tokenizer files beside."""
    from mimo_jax.weights.export import export_release, hub_tensors

    config = json.loads((params_dir / "config.json").read_text())
    cfg = MiMoConfig.from_dict(config)
    model = load_params_into(MiMoModel(cfg, dtype=jnp.float32, rngs=None, mtp_layers=cfg.num_mtp_layers), params_dir)
    export_release(
        hub_tensors(model),
        config,
        out,
        layout="fused_qkv",
        fp8=True,
        max_file_bytes=8 << 20,  # several files and an index, as the releases ship
        extra_files=[data / "tokenizer.json", data / "tokenizer_config.json"],
    )


def write_demo_draft_vocab(checkpoint: Path, size: int, include: str | None = None) -> str:
    """`draft_vocab.json` for a demo checkpoint: its tokenizer's tokens ranked by frequency in the training split
    (`prepare`'s documents: the stdlib files not held out and the chat samples made from them)."""
    from tokenizers import Tokenizer

    from mimo_jax.weights.draft_vocab import rank_tokens, write_draft_vocab

    tokenizer = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    template = compile_chat_template()
    docs: list[str] = []
    for rel, text in stdlib_files(stdlib_dir(), include=include):
        if not is_heldout(rel):
            docs.append(text)
            docs.extend(render_chat(template, sample) for sample in chat_samples(rel, text))
    streams = (np.asarray(enc.ids) for enc in tokenizer.encode_batch(docs, add_special_tokens=False))
    ranked = rank_tokens(streams, tokenizer.get_vocab_size(with_added_tokens=True))
    source = f"token counts of the demo's training split (Python {sys.version.split()[0]} standard library)"
    return write_draft_vocab(checkpoint, ranked, size, source)


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="corpus, tokenizer, token arrays")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--include", help="only stdlib files whose relative path starts with this (tests)")
    p = sub.add_parser("train", help="train and save params")
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int)
    p.add_argument("--batch-size", type=int, help="rows per step (default: the preset's; smaller for CPU smoke runs)")
    p.add_argument("--eval-windows", type=int, help="held-out windows per eval (default: the preset's)")
    p.add_argument("--max-seconds", type=float, help="stop training early past this many seconds (see `train`)")
    p.add_argument("--evaluate", action="store_true", help="also run `evaluate` on the trained params")
    p = sub.add_parser("export", help="params -> release-layout checkpoint (into a new or empty directory)")
    p.add_argument("--params", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p = sub.add_parser("evaluate", help="quality figures of a checkpoint (release layout or params dir)")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo")
    p.add_argument("--prompts", type=int, default=64)
    p.add_argument("--heldout-windows", type=int)
    p.add_argument("--chat-tokens", type=int, default=128, help="tokens generated per held-out chat probe")
    p.add_argument("--run", type=Path, help="a `train` output dir whose summary and log go into the JSON too")
    p.add_argument("--out", type=Path, help="write the figures here as JSON")
    p = sub.add_parser("draft-vocab", help="draft_vocab.json (token frequency ranks) for a checkpoint")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--size", type=int, required=True, help="tokens the MTP drafts choose among")
    p.add_argument("--include", help="only stdlib files whose relative path starts with this (tests)")
    args = parser.parse_args(argv)
    # Reproducible GPU runs (scatter-adds in the embedding gradient); read when the backend starts.
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_gpu_deterministic_ops" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_gpu_deterministic_ops=true".strip()

    if args.command == "prepare":
        print(
            json.dumps(
                {
                    k: v
                    for k, v in prepare(args.out, PRESETS[args.preset], args.seed, args.include).items()
                    if k != "heldout_files"
                },
                indent=2,
            )
        )
    elif args.command == "train":
        preset = PRESETS[args.preset]
        if args.batch_size:
            preset = dataclasses.replace(preset, batch_size=args.batch_size)
        if args.eval_windows:
            preset = dataclasses.replace(preset, eval_windows=args.eval_windows)
        summary = train(args.data, args.out, preset, args.seed, args.steps, max_seconds=args.max_seconds)
        print(json.dumps({k: v for k, v in summary.items() if k != "preset"}, indent=2))
        if args.evaluate:
            model = load_checkpoint(args.out, preset)
            result = evaluate(model, args.data, preset)
            _atomic_write_text(args.out / "eval.json", json.dumps(result, indent=2) + "\n")
            print_eval(result)
    elif args.command == "export":
        export(args.params, args.data, args.out)
    elif args.command == "draft-vocab":
        print(write_demo_draft_vocab(args.checkpoint, args.size, args.include))
    elif args.command == "evaluate":
        model = load_checkpoint(args.checkpoint, PRESETS[args.preset])
        result = evaluate(
            model,
            args.data,
            PRESETS[args.preset],
            prompts=args.prompts,
            heldout_windows=args.heldout_windows,
            chat_tokens=args.chat_tokens,
        )
        result["checkpoint"] = str(args.checkpoint)
        result["device"] = f"{jax.devices()[0].device_kind} ({jax.devices()[0]})"  # the card, not just cuda:0
        result["data_manifest"] = {
            k: v for k, v in json.loads((args.data / "manifest.json").read_text()).items() if k != "heldout_files"
        }
        if args.run:  # one JSON with everything a device call brings back
            result["train_summary"] = json.loads((args.run / "train_summary.json").read_text())
            result["train_log"] = [json.loads(line) for line in (args.run / "train_log.jsonl").read_text().splitlines()]
        if args.out:
            _atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
        print_eval(result)


def load_checkpoint(directory: Path, preset: Preset) -> MiMoModel:
    """A params dir from `train` (our shards), else a release-layout checkpoint through mimo_jax.load_model.

    Either way the experts run as `dense` (every expert on every token, plain XLA on any backend): no kernel to
    compile for a 14M-parameter evaluation, and the same sums as the routed implementations.
    """
    options = RunOptions.for_platform(jax.default_backend(), moe_impl="dense")
    if (directory / PARAMS_INDEX).exists():
        cfg = MiMoConfig.from_json(directory)
        model = MiMoModel(cfg, dtype=jnp.float32, rngs=None, mtp_layers=preset.mtp_layers, options=options)
        return load_params_into(model, directory)
    import mimo_jax

    return mimo_jax.load_model(str(directory), mtp=preset.mtp_layers, options=options).model


def print_eval(result: dict[str, Any]) -> None:
    """Sample completions, then the figures (last, where a log's tail shows them)."""
    for s in result["samples"]:
        print("-" * 60 + f"\n{s['prompt']}\u2588{s['completion']}")
    print("-" * 60)
    acc = result["acceptance"]
    print(
        f"held-out loss {result['heldout_loss']:.4f}  perplexity {result['heldout_perplexity']:.2f}  "
        f"bits/byte {result['heldout_bits_per_byte']:.3f}  MTP losses {result['heldout_mtp_loss']}"
    )
    print(
        f"MTP acceptance length {acc['acceptance_length']:.3f} over {acc['rounds']} rounds "
        f"(draft hit rates {acc['draft_hit_rate']}) on greedy continuations of held-out prompts"
    )
    print(f"MTP acceptance length by draft steps k = 1, 2, ...: {acc['acceptance_length_by_k']}")
    text = result["text_acceptance"]
    print(
        f"MTP acceptance length {text['acceptance_length']:.3f} over {text['rounds']} rounds "
        f"(draft hit rates {text['draft_hit_rate']}) against held-out text; by k: {text['acceptance_length_by_k']}"
    )
    chat = result["chat_behaviour"]
    if chat["probes"]:
        print(
            f"held-out chat probes ({chat['probes']}): tool-call rate when asked {chat['tool_call_rate_when_asked']}, "
            f"with tools offered but not asked {chat['tool_call_rate_with_tools_not_asked']}, without tools "
            f"{chat['tool_call_rate_without_tools']}; thinking on opens <think>: {chat['thinking_on_opens_think']}"
        )


if __name__ == "__main__":
    main()
