"""Structured output in `python -m mimo_jax.batch`: a line asks for it with the fields of a chat/completions body
(`response_format`, `regex`, `structured_outputs`, `guided_json`, `tool_choice` required / named), and its text
parses and validates; malformed or conflicting fields are bad lines naming the field.

The served test checkpoint (random weights, a planted reasoning chain, a byte-level BPE tokenizer llguidance reads)
on one CPU device; every schema bounds its output, so the grammar brings any output to an end within max_tokens.
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest

import mimo_jax
from mimo_jax import batch
from mimo_jax.serve.parsers import ToolCallParser
from tests import fixtures as sf

SCHEMA = {
    "type": "object",
    "properties": {"city": {"enum": ["Paris", "Rome"]}, "days": {"type": "integer", "minimum": 1, "maximum": 9}},
    "required": ["city", "days"],
    "additionalProperties": False,
}
# Short tools: the chat template writes them into the prompt (with its instructions, 500+ tokens of this tokenizer).
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}}},
]  # fmt: skip
NO_THINKING = {"enable_thinking": False}
QUESTION = [{"role": "user", "content": "What is the weather like in Paris today?"}]
REGEX = r"[a-z]{2,6}( [0-9]{1,2})?"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return sf.write_checkpoint(str(tmp_path_factory.mktemp("batch-structured") / "tiny-mimo"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    lm = mimo_jax.load_model(checkpoint, dtype="float32")
    factory = batch.grammar_factory(checkpoint, lm.config.vocab_size, lm.config.eos_token_ids)
    assert factory is not None
    return mimo_jax.Engine(
        lm, max_batch=4, max_context=1024, prefill_chunk=128, max_round_tokens=4, constraint_factory=factory
    )


def _run(engine, checkpoint, tmp_path, rows, logs):
    tokenizer, template = batch.load_tokenizer(checkpoint)
    settings = batch.RunSettings(sampling=dict(max_new_tokens=300, temperature=1.0), progress=False)
    input_path = sf.write_jsonl(tmp_path / "in.jsonl", rows)
    summary = batch.run_batch(
        engine, str(input_path), str(tmp_path / "out.jsonl"), settings,
        tokenizer=tokenizer, template=template, log=logs.append,
    )  # fmt: skip
    return summary, sf.read_results(tmp_path / "out.jsonl")


def test_lines_with_structured_output(engine, checkpoint, tmp_path):
    rows = []
    for seed in range(3):
        rows += [
            {"id": f"schema{seed}", "messages": QUESTION, "chat_template_kwargs": NO_THINKING, "seed": seed,
             "response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}}},
            {"id": f"think{seed}", "messages": QUESTION, "seed": seed, "temperature": 0.0 if seed == 0 else 0.7,
             "guided_json": json.dumps(SCHEMA)},
            {"id": f"regex{seed}", "prompt": "def fib", "regex": REGEX, "seed": seed},
            {"id": f"choice{seed}", "prompt": "def fib", "structured_outputs": {"choice": ["yes", "no"]}, "seed": seed},
            {"id": f"required{seed}", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required",
             "parallel_tool_calls": False, "chat_template_kwargs": NO_THINKING, "seed": seed},
            {"id": f"named{seed}", "messages": QUESTION, "tools": TOOLS, "chat_template_kwargs": NO_THINKING,
             "tool_choice": {"type": "function", "function": {"name": "now" if seed else "get_weather"}}, "seed": seed},
        ]  # fmt: skip
    logs = []
    summary, results = _run(engine, checkpoint, tmp_path, rows, logs)
    assert summary.completed == len(rows) and summary.skipped == 0, logs
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
    for seed in range(3):
        jsonschema.validate(json.loads(results[f"schema{seed}"]["text"]), SCHEMA)
        # thinking on: free text until </think> (greedy: the planted reasoning), then the grammar
        think = results[f"think{seed}"]["text"]
        assert "</think>" in think, think
        jsonschema.validate(json.loads(think.rsplit("</think>", 1)[1]), SCHEMA)
        if seed == 0:
            assert think.split("</think>")[0].strip().removeprefix("<think>").strip() == sf.REASONING
        assert re.fullmatch(REGEX, results[f"regex{seed}"]["text"])
        assert results[f"choice{seed}"]["text"] in ("yes", "no")
        for kind in ("required", "named"):
            result = results[f"{kind}{seed}"]
            assert result["finish_reason"] == "stop", result
            _, calls = ToolCallParser(TOOLS).feed(result["text"])
            assert len(calls) == 1, result["text"]
            if kind == "named":
                assert calls[0].name == ("now" if seed else "get_weather")
            jsonschema.validate(calls[0].arguments, schemas[calls[0].name])


def test_bad_structured_lines_name_the_field(engine, checkpoint, tmp_path):
    rows = [
        {"id": "two", "prompt": "x", "regex": "a+", "guided_choice": ["a"]},
        {"id": "badregex", "prompt": "x", "regex": "(a"},
        {"id": "notools", "messages": QUESTION, "tool_choice": "required"},
        {"id": "unknown", "messages": QUESTION, "tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "f"}}},
        {"id": "toolprompt", "prompt": "x", "tool_choice": "required"},
        {"id": "both", "messages": QUESTION, "tools": TOOLS, "tool_choice": "required", "regex": "a"},
        {"id": "format", "prompt": "x", "response_format": {"type": "xml"}},
        {"id": "ok", "prompt": "x", "regex": "ab", "max_tokens": 5},
    ]  # fmt: skip
    logs = []
    summary, results = _run(engine, checkpoint, tmp_path, rows, logs)
    assert list(results) == ["ok"] and results["ok"]["text"] == "ab" and summary.skipped == len(rows) - 1
    text = "\n".join(logs)
    for line, field in [(1, "guided_choice"), (2, "regex"), (3, "tool_choice"), (4, "tool_choice"),
                        (5, "tool_choice"), (6, "regex"), (7, "response_format")]:  # fmt: skip
        (message,) = [m for m in logs if f"in.jsonl:{line}:" in m]
        assert f'"{field}"' in message, text
