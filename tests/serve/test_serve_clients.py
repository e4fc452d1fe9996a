"""The official `openai` client against `python -m mimo_jax.serve` (the demo checkpoint, one server for the module),
the way real clients call it: `chat.completions.parse` with a pydantic model, json_schema, forced and named tool
calls, lm-eval's loglikelihood request (completions, echo + logprobs, max_tokens 0), the Responses API (plain,
streamed, function tools and a second turn with the tool's output, `responses.parse`), and /tokenize, /detokenize.

Every answer must parse and validate: schemas through jsonschema and pydantic, response objects and stream events
through the SDK's own types (`model_validate`, strict about required fields), a stream's text against its final
response. Thinking is off where the answer matters (the demo model thinks at length), and schemas are bounded so
the grammar brings any output to an end well within max_tokens.
"""

from __future__ import annotations

import json
import math
from typing import Literal

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent

from mimo_jax.text import Tokenizer

NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 24},
        "days": {"type": "integer", "minimum": 1, "maximum": 7},
    },
    "required": ["city"],
}
WEATHER = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather.", "parameters": WEATHER_PARAMETERS},
}
CLOCK = {
    "type": "function",
    # no parameters at all: a function without declared properties takes any, as free text until max_tokens
    "function": {
        "name": "now",
        "description": "The time.",
        "parameters": {"type": "object", "properties": {}, "additionalProperties": False},
    },
}
RESPONSES_WEATHER = {"type": "function", **WEATHER["function"], "strict": None}


class Forecast(pydantic.BaseModel):
    city: Literal["Paris", "Rome", "Oslo"]
    days: int = pydantic.Field(ge=1, le=14)
    rain: bool


class Served:
    def __init__(self, url: str):
        self.url = url
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
        self.http = httpx.Client(base_url=url, timeout=300)
        from mimo_jax.weights.demo import demo_model_dir

        self.tok = Tokenizer(demo_model_dir())


@pytest.fixture(scope="module")
def demo(demo_server):
    served = Served(demo_server)
    yield served
    served.http.close()


# ----------------------------------------------------------------------------- chat completions
def test_chat_parse_and_json_schema(demo):
    for seed, temperature in [(0, 0.0), (1, 1.0)]:
        completion = demo.client.chat.completions.parse(
            model="mimo-demo", messages=QUESTION, response_format=Forecast, max_tokens=200,
            temperature=temperature, seed=seed, extra_body=NO_THINKING,
        )  # fmt: skip
        message = completion.choices[0].message
        assert isinstance(message.parsed, Forecast), message
        assert message.parsed == Forecast.model_validate_json(message.content)
    schema = {"type": "object", "properties": {"answer": {"enum": ["yes", "no"]}, "n": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["answer", "n"], "additionalProperties": False}  # fmt: skip
    r = demo.client.chat.completions.create(
        model="mimo-demo", messages=QUESTION, max_tokens=100, temperature=0.8, seed=3, extra_body=NO_THINKING,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": schema, "strict": True}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content), schema)


def test_chat_tool_choice_required_and_named(demo):
    kwargs = dict(model="mimo-demo", messages=QUESTION, tools=[WEATHER, CLOCK], max_tokens=200, extra_body=NO_THINKING)
    r = demo.client.chat.completions.create(tool_choice="required", temperature=0.7, seed=1, **kwargs)
    assert r.choices[0].finish_reason == "tool_calls" and r.choices[0].message.tool_calls
    for name in ("get_weather", "now"):
        r = demo.client.chat.completions.create(tool_choice={"type": "function", "function": {"name": name}}, **kwargs)
        (call,) = r.choices[0].message.tool_calls
        assert call.function.name == name and call.id
        parameters = {"get_weather": WEATHER_PARAMETERS, "now": CLOCK["function"]["parameters"]}[name]
        jsonschema.validate(json.loads(call.function.arguments), parameters)


# ----------------------------------------------------------------------------- lm-eval's loglikelihood request
def test_completions_echo_logprobs_as_lm_eval_sends_them(demo):
    context, continuation = "def add(a, b):\n    return", " a + b"
    r = demo.client.completions.create(
        model="mimo-demo",
        prompt=[context + continuation],
        max_tokens=0,
        echo=True,
        logprobs=1,
        temperature=0.0,
        seed=1234,
    )
    choice = r.choices[0]
    lp = choice.logprobs
    ids = demo.tok.encode(context + continuation, add_special_tokens=True)
    assert choice.text == context + continuation and r.usage.completion_tokens == 0
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(ids)
    assert "".join(lp.tokens) == "".join(demo.tok.token_text(t) for t in ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    # lm-eval's reading: the continuation's tokens are the last ones; their summed logprob, and greedy when each is
    # the top-1 token
    n = len(ids) - len(demo.tok.encode(context, add_special_tokens=True))
    scores = lp.token_logprobs[-n:]
    assert all(x <= 0 and math.isfinite(x) for x in scores)
    for token, score, top in zip(lp.tokens[-n:], scores, lp.top_logprobs[-n:], strict=True):
        assert len(top) == 1 and max(top.values()) >= score - 1e-5
        if token in top:  # greedy at this token: its own logprob is the top one
            assert abs(top[token] - score) < 1e-5


# ----------------------------------------------------------------------------- the Responses API
def _check_response(raw: dict) -> SDKResponse:
    response = SDKResponse.model_validate(raw)  # strict about the fields the SDK requires
    usage = response.usage
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert 0 <= usage.output_tokens_details.reasoning_tokens <= usage.output_tokens
    return response


def test_responses_create_plain(demo):
    r = demo.http.post(
        "/v1/responses",
        json={"model": "mimo-demo", "input": "Write a function that adds two numbers.", "instructions": "Be brief.",
              "max_output_tokens": 40, "temperature": 0.0, "reasoning": {"effort": "none"}},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    response = _check_response(r.json())
    assert response.object == "response" and response.id.startswith("resp_") and response.model == "mimo-demo"
    assert [item.type for item in response.output] == ["message"]
    assert response.usage.output_tokens_details.reasoning_tokens == 0
    # the SDK sends the same request and reads the same text (greedy)
    sdk = demo.client.responses.create(
        model="mimo-demo", input="Write a function that adds two numbers.", instructions="Be brief.",
        max_output_tokens=40, temperature=0.0, reasoning={"effort": "none"},
    )  # fmt: skip
    assert sdk.output_text == response.output_text
    assert sdk.status == ("incomplete" if sdk.usage.output_tokens == 40 else "completed")
    # thinking on (the template's default; this prompt, in the form of the demo's chat training, makes it think
    # where others get an empty block): a reasoning item first, its tokens counted
    r = demo.client.responses.create(
        model="mimo-demo",
        input="Write a Python function `is_prime(n)`: Return True if n is a prime number.",
        max_output_tokens=30,
        temperature=0.0,
    )
    assert r.output[0].type == "reasoning" and r.output[0].content[0].text
    assert r.usage.output_tokens_details.reasoning_tokens > 0


def test_responses_streamed(demo):
    kwargs = dict(model="mimo-demo", input="def fib(n):", max_output_tokens=30, temperature=0.0)
    events = list(demo.client.responses.create(stream=True, **kwargs))
    whole = demo.client.responses.create(**kwargs)
    kinds = [e.type for e in events]
    assert kinds[:2] == ["response.created", "response.in_progress"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    for e in events:
        pydantic.TypeAdapter(ResponseStreamEvent).validate_python(e.model_dump())
    final = events[-1].response
    _check_response(final.model_dump())
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    reasoning = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert text == final.output_text == whole.output_text  # greedy: streamed and whole agree
    assert [item.type for item in final.output] == [item.type for item in whole.output]
    if reasoning:
        assert final.output[0].content[0].text == reasoning
    done = [e.item.id for e in events if e.type == "response.output_item.done"]
    assert done == [item.id for item in final.output]
    # the SDK's stream helper checks that items keep their ids from added to done to the final response (of a
    # response that completes: a bounded schema)
    with demo.client.responses.stream(
        model="mimo-demo", input=QUESTION, text_format=Forecast, max_output_tokens=200, reasoning={"effort": "none"}
    ) as stream:
        for _ in stream:
            pass
        final = stream.get_final_response()
    assert final.status == "completed" and isinstance(final.output_parsed, Forecast)


def test_responses_function_tool_round_trip(demo):
    tools = [RESPONSES_WEATHER]
    for tool_choice in ("required", {"type": "function", "name": "get_weather"}):
        r = demo.client.responses.create(
            model="mimo-demo", input=QUESTION, tools=tools, tool_choice=tool_choice, max_output_tokens=200,
            reasoning={"effort": "none"}, temperature=0.7, extra_body={"seed": 5},
        )  # fmt: skip
        calls = [item for item in r.output if item.type == "function_call"]
        assert r.status == "completed" and calls
        assert calls[0].name == "get_weather" and calls[0].call_id and calls[0].id.startswith("fc_")
        jsonschema.validate(json.loads(calls[0].arguments), WEATHER_PARAMETERS)
    # streamed: the call's arguments arrive in function_call_arguments events
    events = list(demo.client.responses.create(
        model="mimo-demo", input=QUESTION, tools=tools, tool_choice="required", max_output_tokens=200,
        reasoning={"effort": "none"}, stream=True,
    ))  # fmt: skip
    (args_done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
    jsonschema.validate(json.loads(args_done.arguments), WEATHER_PARAMETERS)
    # the second turn: the call and its output go back as input items
    history = QUESTION + [calls[0].model_dump(exclude_none=True)]
    history.append({"type": "function_call_output", "call_id": calls[0].call_id, "output": '{"sky": "sun"}'})
    r = demo.client.responses.create(
        model="mimo-demo", input=history, tools=tools, max_output_tokens=20, reasoning={"effort": "none"}
    )
    assert r.status in ("completed", "incomplete") and r.output and r.usage.input_tokens > 0


def test_responses_parse_json_schema(demo):
    r = demo.client.responses.parse(
        model="mimo-demo", input=QUESTION, text_format=Forecast, max_output_tokens=200, reasoning={"effort": "none"}
    )
    assert isinstance(r.output_parsed, Forecast)
    r = demo.client.responses.create(
        model="mimo-demo", input=QUESTION, text={"format": {"type": "json_object"}}, max_output_tokens=60,
        reasoning={"effort": "none"}, temperature=0.0,
    )  # fmt: skip
    assert r.output_text.startswith("{")


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "hi", "store": True}, "store"),
        ({"input": "hi", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "hi", "max_output_tokens": 5000}, "max_output_tokens"),
        ({"input": "hi", "temperature": -1.0}, "temperature"),
        ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0]"),
        ({"input": "hi", "tool_choice": "required"}, "tool_choice"),
        ({"input": [{"type": "function_call", "name": "f", "arguments": "{}"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
        ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ],
)
def test_responses_errors_name_the_field(demo, body, param):
    r = demo.http.post("/v1/responses", json=body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


# ----------------------------------------------------------------------------- /tokenize, /detokenize
def test_tokenize_and_detokenize(demo):
    text = "def fib(n):\n    return n"
    r = demo.http.post("/tokenize", json={"model": "mimo-demo", "prompt": text, "return_token_strs": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["tokens"] == demo.tok.encode(text, add_special_tokens=True) and body["count"] == len(body["tokens"])
    assert body["max_model_len"] == 1024 and body["token_strs"] == [demo.tok.token_text(t) for t in body["tokens"]]
    r = demo.http.post("/detokenize", json={"model": "mimo-demo", "tokens": body["tokens"]})
    assert r.json() == {"prompt": text}
    # messages count as the chat completion's prompt does
    chat = demo.client.chat.completions.create(model="mimo-demo", messages=QUESTION, tools=[WEATHER], max_tokens=1)
    r = demo.http.post("/tokenize", json={"messages": QUESTION, "tools": [WEATHER]})
    assert r.status_code == 200 and r.json()["count"] == chat.usage.prompt_tokens
    r = demo.http.post("/tokenize", json={"messages": QUESTION, "add_generation_prompt": False})
    assert r.json()["count"] < chat.usage.prompt_tokens
    for body, param in [
        ({"tokens": [1, 10**9]}, "tokens"),
        ({"tokens": [-1]}, "tokens"),
        ({"tokens": ["a"]}, "tokens[0]"),
    ]:
        r = demo.http.post("/detokenize", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    for body, param in [
        ({"prompt": "a", "messages": QUESTION}, None),
        ({}, None),
        ({"model": "other", "prompt": "a"}, "model"),
    ]:
        r = demo.http.post("/tokenize", json=body)
        assert r.status_code in (400, 404) and r.json()["error"]["param"] == param, r.text
