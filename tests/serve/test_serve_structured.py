"""Structured output end to end: `python -m mimo_jax.serve` decoding under llguidance grammars, driven over
HTTP with the official `openai` client (including `chat.completions.parse` with a pydantic model).

Two servers: the served test checkpoint of tests/fixtures.py (random weights, a planted reasoning chain,
a 512-token context) for JSON answers, and the demo checkpoint (a real, if tiny, tokenizer and a context
that holds tool definitions) for forced tool calls. The test model follows its planted script only where
the grammar lets it, so every schema here bounds its output (enums, integer ranges, short strings, short
arrays): whatever the model prefers, the grammar has to bring it to a valid end well within max_tokens.
Seeds and temperatures vary; outputs must parse and validate, calls must name the forced function.
"""

from __future__ import annotations

import json
import re
from typing import Literal

import httpx
import jsonschema
import llguidance
import openai
import pydantic
import pytest

from mimo_jax.text import Tokenizer
from tests import fixtures as sf

QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
MAX_TOKENS = 400  # the test checkpoint's context is 512 tokens
FORECAST = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 10},
        "days": {"type": "integer", "minimum": 1, "maximum": 14},
        "unit": {"enum": ["C", "F"]},
        "daily": {
            "type": "array",
            "maxItems": 2,
            "items": {
                "type": "object",
                "properties": {
                    "sky": {"enum": ["sun", "rain"]},
                    "high": {"type": "integer", "minimum": -40, "maximum": 50},
                },
                "required": ["sky", "high"],
                "additionalProperties": False,
            },
        },
    },
    "required": ["city", "days", "unit", "daily"],
    "additionalProperties": False,
}
FORECAST_FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": FORECAST, "strict": True}}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather forecast for a city.",
        "parameters": {
            "type": "object",
            # A bounded string: the demo model, forced to call, would otherwise write code into it until max_tokens.
            "properties": {
                "city": {"type": "string", "maxLength": 24},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city"],
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {
        "name": "now",
        "description": "The time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}


class Server:
    def __init__(self, url: str, model: str, tokenizer: Tokenizer):
        self.url, self.model, self.tok = url, model, tokenizer
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=url, timeout=300)

    def chat(self, **kwargs):
        return self.client.chat.completions.create(model=self.model, messages=QUESTION, **kwargs)


@pytest.fixture(scope="module")
def tiny(tiny_server):
    """The served test checkpoint (random weights; `<think>` REASONING `</think>` planted), its server shared."""
    return Server(tiny_server.url(), "tiny-mimo", Tokenizer(tiny_server.directory))


@pytest.fixture(scope="module")
def demo(demo_server):
    """The demo checkpoint (its chat template thinks unless told not to, and writes MiMo tool calls)."""
    from mimo_jax.weights.demo import demo_model_dir

    return Server(demo_server, "mimo-demo", Tokenizer(demo_model_dir()))


# ----------------------------------------------------------------------------- JSON answers (test checkpoint)
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.0, 1.3])
def test_json_schema_response_format(tiny, temperature):
    for seed in range(3):
        for thinking in (NO_THINKING, {}) if temperature <= 0.7 else (NO_THINKING,):
            r = tiny.chat(
                response_format=FORECAST_FORMAT,
                max_tokens=MAX_TOKENS,
                temperature=temperature,
                seed=seed,
                extra_body=thinking,
            )
            choice = r.choices[0]
            assert choice.finish_reason == "stop", choice
            jsonschema.validate(json.loads(choice.message.content), FORECAST)
            if thinking == {} and temperature == 0:  # the planted script thinks first, then the grammar applies
                assert choice.message.reasoning_content == sf.REASONING


def test_json_schema_with_n_and_streaming(tiny):
    kwargs = dict(response_format=FORECAST_FORMAT, max_tokens=MAX_TOKENS, temperature=1.0, seed=11, n=3)
    r = tiny.chat(**kwargs, extra_body=NO_THINKING)
    for choice in r.choices:
        jsonschema.validate(json.loads(choice.message.content), FORECAST)
    texts = ["", "", ""]
    for chunk in tiny.chat(**kwargs, stream=True, extra_body=NO_THINKING):
        for c in chunk.choices:
            texts[c.index] += c.delta.content or ""
    assert texts == [c.message.content for c in r.choices]  # same seed: the same three answers, streamed


def _json_object_prefix(tokenizer: Tokenizer, text: str) -> bool:
    """Whether `text` is a JSON object or the beginning of one (any tokenization)."""
    lt = llguidance.LLTokenizer(tokenizer.hf.to_str())
    grammar = '%llguidance {"no_forcing": true}\nstart: %json {"type": "object"}'
    matcher = llguidance.LLMatcher(lt, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    ids = lt.tokenize_str(text)
    return matcher.try_consume_tokens(ids) == len(ids)


def test_json_object_response_format(tiny):
    # An open object has no bound a random model must reach: a complete answer parses, a cut one is a prefix.
    for seed, temperature in [(0, 0.0), (1, 0.8), (2, 1.0)]:
        r = tiny.chat(
            response_format={"type": "json_object"},
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=seed,
            extra_body=NO_THINKING,
        )
        choice = r.choices[0]
        assert choice.message.content.startswith("{") and _json_object_prefix(tiny.tok, choice.message.content)
        if choice.finish_reason == "stop":
            assert isinstance(json.loads(choice.message.content), dict)
        else:
            assert choice.finish_reason == "length"
    # Constrained rounds run the warmed-up decode loop: nothing compiled after the ready line.
    assert sf.metric_value(tiny.http.get("/metrics").text, "mimo:xla_compilations_total") == 0


class Day(pydantic.BaseModel):
    sky: Literal["sun", "rain", "snow"]
    high: int = pydantic.Field(ge=-40, le=50)


class Forecast(pydantic.BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = pydantic.Field(ge=1, le=14)
    rain: bool
    wind: Literal["calm", "breeze", "gale"] | None
    daily: list[Day] = pydantic.Field(max_length=2)


def test_openai_client_parse(tiny):
    for seed, temperature, thinking in [
        (0, 0.0, {}),
        (1, 0.0, NO_THINKING),
        (2, 0.7, NO_THINKING),
        (3, 1.2, NO_THINKING),
    ]:
        completion = tiny.client.chat.completions.parse(
            model=tiny.model,
            messages=QUESTION,
            response_format=Forecast,
            max_tokens=MAX_TOKENS,
            temperature=temperature,
            seed=seed,
            extra_body=thinking,
        )
        message = completion.choices[0].message
        assert isinstance(message.parsed, Forecast), message
        assert message.parsed == Forecast.model_validate_json(message.content)


def test_completions_regex_and_choice(tiny):
    regex = r"[a-z]{3,8}( [0-9]{1,3})?"
    for seed in range(3):
        r = tiny.client.completions.create(
            model=tiny.model, prompt="def fib", max_tokens=40, temperature=1.0, seed=seed, extra_body={"regex": regex}
        )
        assert re.fullmatch(regex, r.choices[0].text) and r.choices[0].finish_reason == "stop"
        r = tiny.client.completions.create(
            model=tiny.model,
            prompt="def fib",
            max_tokens=40,
            temperature=1.0,
            seed=seed,
            extra_body={"structured_outputs": {"choice": ["yes", "no"]}},
        )
        assert r.choices[0].text in ("yes", "no")


# ----------------------------------------------------------------------------- forced tool calls (demo checkpoint)
def _check_calls(message, name=None, single=False):
    assert message.tool_calls, message
    assert not single or len(message.tool_calls) == 1
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in (WEATHER, CLOCK)}
    for call in message.tool_calls:
        assert call.type == "function" and call.id
        assert call.function.name == name if name else call.function.name in schemas
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tool_choice_required_and_named(demo, temperature):
    for seed in range(2):
        kwargs = dict(
            tools=[WEATHER, CLOCK], max_tokens=300, temperature=temperature, seed=seed, extra_body=NO_THINKING
        )
        r = demo.chat(tool_choice="required", parallel_tool_calls=False, **kwargs)
        assert r.choices[0].finish_reason == "tool_calls"
        _check_calls(r.choices[0].message, single=True)
        r = demo.chat(tool_choice="required", **kwargs)
        _check_calls(r.choices[0].message)
        for name in ("get_weather", "now"):
            r = demo.chat(tool_choice={"type": "function", "function": {"name": name}}, **kwargs)
            assert r.choices[0].finish_reason == "tool_calls"
            _check_calls(r.choices[0].message, name=name, single=True)


def test_tool_call_after_thinking(demo):
    """Thinking on, the demo template leaves the `<think>` to the model: it may think (free text until
    `</think>`), then it must call; an answer cut short inside its thoughts has no content at all."""
    for seed in range(2):
        r = demo.chat(tools=[WEATHER], tool_choice="required", max_tokens=800, temperature=0.7, seed=seed)
        choice = r.choices[0]
        if choice.finish_reason == "tool_calls":
            _check_calls(choice.message)
        else:
            assert choice.finish_reason == "length" and not choice.message.content and choice.message.reasoning_content


def test_legacy_function_call(demo):
    r = demo.http.post(
        "/v1/chat/completions",
        json={
            "messages": QUESTION,
            "functions": [WEATHER["function"]],
            "function_call": {"name": "get_weather"},
            "max_tokens": 200,
            **NO_THINKING,
        },
    )
    assert r.status_code == 200, r.text
    (call,) = r.json()["choices"][0]["message"]["tool_calls"]
    assert call["function"]["name"] == "get_weather"
    jsonschema.validate(json.loads(call["function"]["arguments"]), WEATHER["function"]["parameters"])
