"""The Responses API without a model (`mimo_jax.serve.responses`): a Responses request -> the chat request it means,
errors naming the Responses fields, and the SSE events a choice's pieces become (checked against the SDK's event
types and against the non-streamed response of the same output). The end-to-end runs are in test_serve_clients.py.
"""

from __future__ import annotations

import json
import types

import pydantic
import pytest
from openai.types.responses import Response as SDKResponse
from openai.types.responses import ResponseStreamEvent

from mimo_jax.serve import protocol as P
from mimo_jax.serve import responses as R
from mimo_jax.serve.jobs import Piece
from mimo_jax.serve.parsers import ParsedToolCall

TOOL = {
    "type": "function",
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
}


def _request(**body) -> R.ResponsesRequest:
    return R.parse(json.dumps(body).encode())


def test_text_input_and_instructions():
    chat = R.chat_request(_request(input="Hi", instructions="Be brief.", max_output_tokens=7, temperature=0.5))
    assert [m.model_dump(exclude_none=True) for m in chat.messages] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
    ]
    assert chat.max_completion_tokens == 7 and chat.temperature == 0.5 and chat.n == 1 and not chat.stream


def test_input_items_become_chat_turns():
    items = [
        {"role": "developer", "content": "Use tools."},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Weather"}, {"type": "input_text", "text": "in Paris?"}]},
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Call it."}]},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}', "id": "fc_1"},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "sun"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sun.", "annotations": []}]},
        {"role": "assistant", "content": "Anything else?"},
        {"role": "user", "content": "No."},
    ]  # fmt: skip
    chat = R.chat_request(_request(input=items, tools=[TOOL]))
    got = [m.model_dump(exclude_none=True) for m in chat.messages]
    call = lambda i, city: {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": "get_weather", "arguments": json.dumps({"city": city})},
    }  # noqa: E731
    assert got == [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Weather\nin Paris?"},
        {"role": "assistant", "content": "", "reasoning_content": "Call it.", "tool_calls": [call(1, "Paris"), call(2, "Rome")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sun"},
        {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
        {"role": "assistant", "content": "Sun."},
        {"role": "assistant", "content": "Anything else?"},
        {"role": "user", "content": "No."},
    ]  # fmt: skip
    assert chat.tools[0].function.name == "get_weather" and chat.tools[0].function.parameters == TOOL["parameters"]


def test_tools_formats_and_reasoning_map_to_chat_fields():
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    chat = R.chat_request(
        _request(
            input="x",
            tools=[TOOL],
            tool_choice={"type": "function", "name": "get_weather"},
            parallel_tool_calls=False,
            text={"format": {"type": "json_schema", "name": "A", "schema": schema, "strict": True}},
            reasoning={"effort": "none"},
        )
    )
    assert chat.tool_choice.function.name == "get_weather" and chat.parallel_tool_calls is False
    assert chat.response_format.type == "json_schema" and chat.response_format.json_schema.schema_ == schema
    assert chat.response_format.json_schema.strict is True
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    chat = R.chat_request(_request(input="x", reasoning={"effort": "high"}, text={"format": {"type": "json_object"}}))
    assert chat.chat_template_kwargs == {"enable_thinking": True} and chat.response_format.type == "json_object"
    # the template's own switch wins over the effort; no reasoning field leaves the template's default
    chat = R.chat_request(
        _request(input="x", reasoning={"effort": "low"}, chat_template_kwargs={"enable_thinking": False})
    )
    assert chat.chat_template_kwargs == {"enable_thinking": False}
    assert R.chat_request(_request(input="x", text={"format": {"type": "text"}})).chat_template_kwargs is None


@pytest.mark.parametrize(
    "body, param",
    [
        ({"input": "x", "store": True}, "store"),
        ({"input": "x", "background": True}, "background"),
        ({"input": "x", "conversation": "conv_1"}, "conversation"),
        ({"input": "x", "previous_response_id": "resp_1"}, "previous_response_id"),
        ({"input": "x", "truncation": "auto"}, "truncation"),
        ({"input": "x", "include": ["message.output_text.logprobs"]}, "include"),
        ({"input": "x", "top_p": 0.0}, "top_p"),
        ({"input": "x", "seed": 2**64}, "seed"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "msg_1"}]}, "input[0]"),
        ({"input": [{"type": "function_call_output", "output": "x"}]}, "input[0]"),
        ({"input": [{"role": "tool", "content": "x"}]}, "input[0]"),
        ({"input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]}, "input[0].content"),
        ({"input": "x", "tools": [{"type": "file_search"}]}, "tools[0]"),
        ({"input": "x", "tools": [{**TOOL, "parameters": {"type": "array"}}]}, "tools[0].parameters"),
        ({"input": "x", "tool_choice": {"type": "function"}}, "tool_choice"),
    ],
)
def test_bad_requests_name_the_responses_field(body, param):
    with pytest.raises(P.APIError) as e:
        R.chat_request(R.parse(json.dumps(body).encode()))
    assert e.value.status == 400 and e.value.param == param, e.value.body()


def test_chat_errors_are_renamed():
    error = P.invalid("'max_completion_tokens' must be at least 1, got 0", "max_completion_tokens", "invalid_value")
    renamed = R._renamed(error)
    assert renamed.param == "max_output_tokens" and renamed.message == "'max_output_tokens' must be at least 1, got 0"
    assert R._renamed(P.invalid("bad", "messages[3].tool_calls[0].function.arguments")).param == "input"
    assert R._renamed(P.invalid("bad", "response_format")).param == "text.format"
    assert R._renamed(P.invalid("bad", "tools")).param == "tools"


# ----------------------------------------------------------------------------- output items and events
class _Choice:
    """What the builders read of a `ChoiceOutput`, filled by `take` as the job's events would."""

    def __init__(self):
        self.reasoning = types.SimpleNamespace(saw_reasoning=False)
        self.reasoning_text, self.content, self.calls = [], [], []
        self.text = types.SimpleNamespace(token_ids=[])
        self.completion_tokens, self.finish_reason = 0, None

    def take(self, piece: Piece, token_ids: list[int]) -> Piece:
        self.reasoning.saw_reasoning |= bool(piece.reasoning)
        self.reasoning_text.append(piece.reasoning)
        self.content.append(piece.content)
        self.calls.extend(piece.calls)
        self.text.token_ids += token_ids
        self.completion_tokens += len(token_ids)
        self.finish_reason = piece.finish_reason
        return piece


THINK_END_ID = 7


def _job(choice: _Choice):
    server = types.SimpleNamespace(model_name="m", tokenizer=types.SimpleNamespace(token_id=lambda text: THINK_END_ID))
    cached = types.SimpleNamespace(prompt_tokens_details=types.SimpleNamespace(cached_tokens=3))  # from the prefix cache
    job = types.SimpleNamespace(choices=[choice], prompt_tokens=5, id_prefix="req-abc", usage=lambda: cached)
    return server, job


def _events(chunks: list[bytes]) -> list[dict]:
    out = []
    for chunk in chunks:
        head, data = chunk.decode().split("\n", 1)
        event = json.loads(data.removeprefix("data: "))
        assert head == f"event: {event['type']}" and chunk.endswith(b"\n\n")
        out.append(pydantic.TypeAdapter(ResponseStreamEvent).validate_python(event).model_dump(exclude_unset=True))
    return out


@pytest.mark.parametrize("finish", ["stop", "length"])
def test_events_and_final_response_agree_with_the_whole_response(finish):
    call = ParsedToolCall("get_weather", {"city": "Paris"})
    pieces = [
        (Piece(reasoning="Let me "), [1, 2]),
        (Piece(reasoning="think."), [3, THINK_END_ID]),
        (Piece(content="Calling."), [4]),
        (Piece(calls=[call], finish_reason=finish), [5, 6]),
    ]
    req = _request(input="x", tools=[TOOL], max_output_tokens=8)
    choice = _Choice()
    server, job = _job(choice)
    writer = R._EventWriter(R._Response(server, req, job))
    chunks = writer.opening()
    for piece, ids in pieces:
        chunks += writer.piece(choice, choice.take(piece, ids))
    events = _events(chunks + writer.closing())
    kinds = [e["type"] for e in events]
    assert kinds == [
        "response.created", "response.in_progress",
        "response.output_item.added", "response.content_part.added",
        "response.reasoning_text.delta", "response.reasoning_text.delta",
        "response.reasoning_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.content_part.added", "response.output_text.delta",
        "response.output_text.done", "response.content_part.done", "response.output_item.done",
        "response.output_item.added", "response.function_call_arguments.delta",
        "response.function_call_arguments.done", "response.output_item.done",
        "response.completed" if finish == "stop" else "response.incomplete",
    ]  # fmt: skip
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    final = SDKResponse.model_validate(events[-1]["response"])
    whole = SDKResponse.model_validate(R.response_body(server, req, job))
    strip = lambda r: [{k: v for k, v in item.model_dump().items() if k != "id"} for item in r.output]  # noqa: E731
    assert strip(final) == strip(whole)
    assert [item.type for item in final.output] == ["reasoning", "message", "function_call"]
    assert final.output[0].content[0].text == "Let me think." and final.output_text == "Calling."
    assert json.loads(final.output[2].arguments) == {"city": "Paris"} and final.output[2].call_id == call.id
    assert [e["item"]["id"] for e in events if e["type"] == "response.output_item.done"] == [i.id for i in final.output]
    assert final.status == ("completed" if finish == "stop" else "incomplete")
    assert final.usage.output_tokens == 7 and final.usage.output_tokens_details.reasoning_tokens == 4
    assert final.usage.total_tokens == 12 and final.id.startswith("resp_")
    assert final.usage.input_tokens_details.cached_tokens == 3


def test_an_empty_answer_still_has_a_message():
    choice = _Choice()
    server, job = _job(choice)
    req = _request(input="x")
    writer = R._EventWriter(R._Response(server, req, job))
    chunks = writer.opening() + writer.piece(choice, choice.take(Piece(finish_reason="stop"), [9]))
    events = _events(chunks + writer.closing())
    final = SDKResponse.model_validate(events[-1]["response"])
    assert [item.type for item in final.output] == ["message"] and final.output_text == ""
    assert [item.type for item in SDKResponse.model_validate(R.response_body(server, req, job)).output] == ["message"]
    assert final.usage.output_tokens_details.reasoning_tokens == 0
