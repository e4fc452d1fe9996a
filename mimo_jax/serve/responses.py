"""OpenAI's Responses API (`POST /v1/responses`), the subset SGLang and vLLM serve, run as the chat request it means.

A request becomes one `ChatCompletionRequest` (`chat_request`: `instructions` -> a system message, input items ->
chat messages, flat function tools -> chat tools, `text.format` -> `response_format`, `reasoning` ->
`enable_thinking`, `max_output_tokens` -> `max_completion_tokens`) and runs through `requests.chat_job` like any
chat completion; errors name the Responses fields. Its one choice becomes output items - a `reasoning` item (the
`<think>` block), a `message` with `output_text`, `function_call`s - either at once (`response_body`) or as the
Responses SSE events (`response_stream`). Nothing is stored: `store: true`, `previous_response_id`, `background`
and `conversation` are a 400.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any, Literal

import pydantic
from pydantic import Field, field_validator, model_validator

from mimo_jax.serve import protocol as P
from mimo_jax.serve.jobs import ChoiceOutput, Job, Piece
from mimo_jax.serve.parsers import ParsedToolCall
from mimo_jax.serve.requests import chat_job
from mimo_jax.serve.server import Server
from mimo_jax.text import THINK_END

# Reasoning efforts as OpenAI spells them; "none" turns thinking off, any other turns it on.
ReasoningEffort = Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"]
MESSAGE_ROLES = ("user", "system", "developer", "assistant")
LOGPROBS_INCLUDE = "message.output_text.logprobs"


# ---------------------------------------------------------------------------- the request
class ContentPart(P._Request):
    """A text part of an input item: input_text (user/system/developer), output_text or refusal (assistant),
    reasoning_text or summary_text (reasoning items)."""

    type: str
    text: str | None = None
    refusal: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type not in ("input_text", "output_text", "text", "refusal", "reasoning_text", "summary_text"):
            raise ValueError(f"content parts of type '{self.type}' are not supported (this model reads text only)")
        if self.type == "refusal" and self.refusal is None:
            raise ValueError("a refusal part needs 'refusal'")
        if self.type != "refusal" and self.text is None:
            raise ValueError(f"a '{self.type}' part needs 'text'")
        return self

    @property
    def value(self) -> str:
        return self.refusal if self.type == "refusal" else self.text


def _text(content: str | list[ContentPart] | None) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "\n".join(part.value for part in content)


class InputItem(P._Request):
    """One input item: a message (`type` "message" or left out), a function_call, a function_call_output or a
    reasoning item (as a previous response's output lists them)."""

    type: str = "message"
    role: str | None = None
    content: str | list[ContentPart] | None = None
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[ContentPart] | None = None
    summary: list[ContentPart] | None = None

    @model_validator(mode="after")
    def _check_item(self):
        need: tuple[str, ...]
        if self.type == "message":
            if self.role not in MESSAGE_ROLES:
                raise ValueError(f"a message needs 'role', one of {list(MESSAGE_ROLES)}, got {self.role!r}")
            need = ("content",)
        elif self.type == "function_call":
            need = ("call_id", "name", "arguments")
        elif self.type == "function_call_output":
            need = ("call_id", "output")
        elif self.type == "reasoning":
            need = ()
        elif self.type == "item_reference":
            raise ValueError("item references need stored responses, which this server does not keep")
        else:
            raise ValueError(
                f"input items of type '{self.type}' are not supported "
                "(message, function_call, function_call_output, reasoning)"
            )
        missing = [k for k in need if getattr(self, k) is None]
        if missing:
            raise ValueError(f"a '{self.type}' item needs '{missing[0]}'")
        return self


class FunctionTool(P.FunctionDef):
    """A function tool in the Responses API's flat shape: {"type": "function", "name", "parameters", ...}."""

    type: Literal["function"]

    @model_validator(mode="before")
    @classmethod
    def _function_only(cls, data: Any) -> Any:
        """Before the function's own fields: a web_search tool has no name to miss."""
        kind = data.get("type") if isinstance(data, dict) else None
        if kind != "function":
            raise ValueError(f"tools of type {kind!r} are not supported (function tools only)")
        return data


class ToolChoiceFunction(P._Request):
    type: Literal["function"]
    name: str


class TextFormat(P._Request):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("type 'json_schema' needs a 'schema'")
        return self


class TextConfig(P._Request):
    format: TextFormat | None = None


class Reasoning(P._Request):
    effort: ReasoningEffort | None = None


class ResponsesRequest(P._Request):
    model: str | None = None
    input: list[InputItem]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None  # extensions (vLLM's), as on chat completions
    min_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    repetition_penalty: float | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceFunction = "auto"
    parallel_tool_calls: bool = True
    text: TextConfig | None = None
    reasoning: Reasoning | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    stream: bool = False
    include: list[str] | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["auto", "disabled"] | None = None
    # Asked of a server that keeps responses; this one keeps none (checked in `chat_request`).
    store: bool = False
    previous_response_id: str | None = None
    background: bool = False
    conversation: Any = None

    @model_validator(mode="before")
    @classmethod
    def _text_input(cls, data: Any) -> Any:
        """A text input is one user message (so errors in a list name the item: `input[2].call_id`)."""
        if isinstance(data, dict) and isinstance(data.get("input"), str):
            data = {**data, "input": [{"type": "message", "role": "user", "content": data["input"]}]}
        return data

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value: list[InputItem]) -> list[InputItem]:
        if not value:
            raise ValueError("input must not be empty")
        return value


def parse(body: bytes) -> ResponsesRequest:
    return P.parse_request(ResponsesRequest, body)


# Chat parameters as the Responses API names them (for errors raised while checking the chat request).
_RESPONSES_NAMES = {
    "messages": "input",
    "max_completion_tokens": "max_output_tokens",
    "response_format": "text.format",
}


def _renamed(error: P.APIError) -> P.APIError:
    param, message = error.param, error.message
    for chat_name, name in _RESPONSES_NAMES.items():
        if param is not None and (param == chat_name or param.startswith((chat_name + ".", chat_name + "["))):
            param = name
        message = message.replace(f"'{chat_name}'", f"'{name}'")
    return P.APIError(error.status, message, error.type, param, error.code)


def _messages(req: ResponsesRequest) -> list[dict]:
    """Chat messages of the input: an assistant turn gathers its reasoning, message and function calls (in that
    order, as a response lists them); function_call_output items become tool messages."""
    messages = [{"role": "system", "content": req.instructions}] if req.instructions else []
    turn: dict | None = None  # the assistant turn being gathered

    def flush() -> None:
        nonlocal turn
        if turn is not None:
            messages.append(turn)
            turn = None

    for item in req.input:
        if item.type == "reasoning":
            flush()
            parts = item.content or item.summary or []
            turn = {"role": "assistant", "content": "", "reasoning_content": _text(parts)}
        elif item.type == "message" and item.role == "assistant":
            if turn is not None and (turn["content"] or "tool_calls" in turn):
                flush()
            turn = turn or {"role": "assistant", "content": ""}
            turn["content"] = _text(item.content)
        elif item.type == "function_call":
            turn = turn or {"role": "assistant", "content": ""}
            call = {
                "id": item.call_id,
                "type": "function",
                "function": {"name": item.name, "arguments": item.arguments},
            }
            turn.setdefault("tool_calls", []).append(call)
        elif item.type == "function_call_output":
            flush()
            messages.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        else:  # developer instructions are system instructions to a chat template
            flush()
            messages.append(
                {"role": "system" if item.role == "developer" else item.role, "content": _text(item.content)}
            )
    flush()
    return messages


def chat_request(req: ResponsesRequest) -> P.ChatCompletionRequest:
    """The chat completion a Responses request asks for (n = 1, not streamed: the route streams the events)."""
    for name, given in (
        ("store", req.store),
        ("previous_response_id", req.previous_response_id is not None),
        ("background", req.background),
        ("conversation", req.conversation is not None),
    ):
        if given:
            message = (
                f"'{name}' needs stored responses; this server keeps none (send the whole conversation as 'input')"
            )
            raise P.invalid(message, name, "unsupported_value")
    if req.truncation == "auto":
        raise P.invalid("'truncation' 'auto' is not supported (an input past the context is a 400)", "truncation")
    if LOGPROBS_INCLUDE in (req.include or []):
        raise P.invalid(f"'{LOGPROBS_INCLUDE}' is not available on /v1/responses", "include", "unsupported_value")
    chat: dict[str, Any] = {
        "messages": _messages(req),
        "tool_choice": req.tool_choice
        if isinstance(req.tool_choice, str)
        else {"type": "function", "function": {"name": req.tool_choice.name}},
        "parallel_tool_calls": req.parallel_tool_calls,
    }
    for name in ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                 "repetition_penalty", "seed", "stop", "user"):  # fmt: skip
        if getattr(req, name) is not None:
            chat[name] = getattr(req, name)
    if req.max_output_tokens is not None:
        chat["max_completion_tokens"] = req.max_output_tokens
    if req.tools:
        chat["tools"] = [
            {"type": "function", "function": t.model_dump(exclude={"type"}, exclude_none=True)} for t in req.tools
        ]
    fmt = req.text.format if req.text is not None else None
    if fmt is not None and fmt.type == "json_object":
        chat["response_format"] = {"type": "json_object"}
    elif fmt is not None and fmt.type == "json_schema":
        schema = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        chat["response_format"] = {
            "type": "json_schema",
            "json_schema": {k: v for k, v in schema.items() if v is not None},
        }
    kwargs = dict(req.chat_template_kwargs or {})
    if req.reasoning is not None and req.reasoning.effort is not None:
        kwargs.setdefault("enable_thinking", req.reasoning.effort != "none")
    if kwargs:
        chat["chat_template_kwargs"] = kwargs
    try:
        return P.ChatCompletionRequest.model_validate(chat)
    except pydantic.ValidationError as e:  # the chat fields' own checks (ranges, seeds), named as the Responses's
        first = e.errors(include_url=False)[0]
        param = P._loc(first["loc"]) or "input"
        message = f"invalid value for '{param}': {first['msg'].removeprefix('Value error, ')}"
        raise _renamed(P.invalid(message, param, "invalid_value")) from None


def job(server: Server, req: ResponsesRequest) -> tuple[P.ChatCompletionRequest, Job]:
    """Check the request and make its job (on the worker pool: this renders and tokenizes)."""
    server.check_model(req.model)
    chat = chat_request(req)
    try:
        made, _ = chat_job(server, chat)
    except P.APIError as e:
        raise _renamed(e) from None
    return chat, made


# ---------------------------------------------------------------------------- output items
def _reasoning_item(item_id: str, text: str, status: str) -> dict:
    content = [{"type": "reasoning_text", "text": text}]
    return {"id": item_id, "type": "reasoning", "summary": [], "content": content, "status": status}


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(item_id: str, text: str | None, status: str) -> dict:
    content = [] if text is None else [_text_part(text)]
    return {"id": item_id, "type": "message", "role": "assistant", "status": status, "content": content}


def _call_item(item_id: str, call: ParsedToolCall, arguments: str, status: str) -> dict:
    return {
        "id": item_id,
        "type": "function_call",
        "call_id": call.id,
        "name": call.name,
        "arguments": arguments,
        "status": status,
    }


def _reasoning_tokens(server: Server, choice: ChoiceOutput) -> int:
    """Generated tokens up to and including `</think>` (all of them if the output ended while thinking)."""
    if choice.reasoning is None or not choice.reasoning.saw_reasoning:
        return 0
    ids = choice.text.token_ids
    end = server.tokenizer.token_id(THINK_END)
    return ids.index(end) + 1 if end in ids else choice.completion_tokens


class _Response:
    """The response object of one request, as it grows (`output` items appended by the builder)."""

    def __init__(self, server: Server, req: ResponsesRequest, made: Job):
        self.server, self.req, self.job = server, req, made
        self.id = made.id_prefix.replace("req-", "resp_", 1)
        self.created_at = P.now()
        self.output: list[dict] = []
        self._ids = 0

    def new_id(self, prefix: str) -> str:
        self._ids += 1
        return f"{prefix}_{self.id.removeprefix('resp_')}{self._ids:03d}"

    def body(self, status: str) -> dict:
        req, choice = self.req, self.job.choices[0]
        done = status != "in_progress"
        tools = [t.model_dump() for t in req.tools or []]
        tool_choice = req.tool_choice if isinstance(req.tool_choice, str) else req.tool_choice.model_dump()
        fmt = req.text.format.model_dump(by_alias=True, exclude_none=True) if req.text and req.text.format else None
        usage = None
        if done:
            output = choice.completion_tokens
            usage = {
                "input_tokens": self.job.prompt_tokens,
                "input_tokens_details": {
                    "cached_tokens": self.job.usage().prompt_tokens_details.cached_tokens,
                    "cache_write_tokens": 0,
                },
                "output_tokens": output,
                "output_tokens_details": {"reasoning_tokens": _reasoning_tokens(self.server, choice)},
                "total_tokens": self.job.prompt_tokens + output,
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "model": self.server.model_name,
            "output": list(self.output),
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "temperature": req.temperature,
            "top_p": req.top_p,
            "tools": tools,
            "tool_choice": tool_choice,
            "parallel_tool_calls": req.parallel_tool_calls,
            "text": {"format": fmt or {"type": "text"}},
            "reasoning": {"effort": req.reasoning.effort if req.reasoning else None, "summary": None},
            "metadata": req.metadata or {},
            "user": req.user,
            "store": False,
            "previous_response_id": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "error": None,
            "usage": usage,
        }

    def final_status(self) -> str:
        return "incomplete" if self.job.choices[0].finish_reason == "length" else "completed"


def response_body(server: Server, req: ResponsesRequest, made: Job) -> dict:
    """The response of a finished job: a reasoning item (when the model thought), a message (when there is text, or
    nothing else), the function calls; cut short by max_output_tokens, the last text item is "incomplete"."""
    response = _Response(server, req, made)
    choice = made.choices[0]
    reasoning, content = "".join(choice.reasoning_text), "".join(choice.content)
    if reasoning:
        response.output.append(_reasoning_item(response.new_id("rs"), reasoning, "completed"))
    if content or not (reasoning or choice.calls):
        response.output.append(_message_item(response.new_id("msg"), content, "completed"))
    for call in choice.calls:
        response.output.append(_call_item(response.new_id("fc"), call, call.arguments_json(), "completed"))
    status = response.final_status()
    if status == "incomplete" and response.output[-1]["type"] != "function_call":
        response.output[-1]["status"] = "incomplete"
    return response.body(status)


# ---------------------------------------------------------------------------- streaming
class _EventWriter:
    """Pieces of the job's one choice -> Responses SSE events, each item opened (output_item.added, its content
    part) before its deltas and closed (the .done events) when the next item starts or the output ends."""

    def __init__(self, response: _Response):
        self.response = response
        self.sequence = 0
        self.open: dict | None = None  # the output item being written (reasoning or message), with its text
        self.text = ""

    def event(self, kind: str, **fields: Any) -> bytes:
        payload = {"type": kind, "sequence_number": self.sequence, **fields}
        self.sequence += 1
        return f"event: {kind}\ndata: ".encode() + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"

    def opening(self) -> list[bytes]:
        body = self.response.body("in_progress")
        return [self.event("response.created", response=body), self.event("response.in_progress", response=body)]

    def _start(self, kind: str) -> list[bytes]:
        out = self._close()
        index, response = len(self.response.output), self.response
        if kind == "reasoning":
            item, part = (
                _reasoning_item(response.new_id("rs"), "", "in_progress"),
                {"type": "reasoning_text", "text": ""},
            )
            item["content"] = []
        else:
            item, part = _message_item(response.new_id("msg"), None, "in_progress"), _text_part("")
        response.output.append(item)
        self.open, self.text = item, ""
        out.append(self.event("response.output_item.added", output_index=index, item=item))
        ids = dict(item_id=item["id"], output_index=index, content_index=0)
        out.append(self.event("response.content_part.added", **ids, part=part))
        return out

    def _delta(self, kind: str, text: str) -> list[bytes]:
        out = [] if self.open is not None and self.open["type"] == kind else self._start(kind)
        self.text += text
        ids = dict(item_id=self.open["id"], output_index=len(self.response.output) - 1, content_index=0)
        if kind == "reasoning":
            out.append(self.event("response.reasoning_text.delta", **ids, delta=text))
        else:
            out.append(self.event("response.output_text.delta", **ids, delta=text, logprobs=[]))
        return out

    def _close(self, status: str = "completed") -> list[bytes]:
        item, self.open = self.open, None
        if item is None:
            return []
        index = self.response.output.index(item)
        ids = dict(item_id=item["id"], output_index=index, content_index=0)
        if item["type"] == "reasoning":
            done = _reasoning_item(item["id"], self.text, status)
            part = done["content"][0]
            out = [self.event("response.reasoning_text.done", **ids, text=self.text)]
        else:
            done = _message_item(item["id"], self.text, status)
            part = done["content"][0]
            out = [self.event("response.output_text.done", **ids, text=self.text, logprobs=[])]
        self.response.output[index] = done
        out.append(self.event("response.content_part.done", **ids, part=part))
        out.append(self.event("response.output_item.done", output_index=index, item=done))
        return out

    def piece(self, choice: ChoiceOutput, piece: Piece) -> list[bytes]:
        out = []
        if piece.reasoning:
            out += self._delta("reasoning", piece.reasoning)
        if piece.content:
            out += self._delta("message", piece.content)
        for call in piece.calls:
            out += self._close()
            index, arguments = len(self.response.output), call.arguments_json()
            item = _call_item(self.response.new_id("fc"), call, "", "in_progress")
            self.response.output.append(item)
            out.append(self.event("response.output_item.added", output_index=index, item=item))
            ids = dict(item_id=item["id"], output_index=index)
            out.append(self.event("response.function_call_arguments.delta", **ids, delta=arguments))
            out.append(self.event("response.function_call_arguments.done", **ids, arguments=arguments))
            done = _call_item(item["id"], call, arguments, "completed")
            self.response.output[index] = done
            out.append(self.event("response.output_item.done", output_index=index, item=done))
        return out

    def closing(self) -> list[bytes]:
        status = self.response.final_status()
        item_status = "incomplete" if status == "incomplete" else "completed"
        out = [] if self.response.output else self._start("message")  # an answer of nothing is an empty message
        out += self._close(item_status)  # the last item, the one a cut would have cut
        kind = "response.incomplete" if status == "incomplete" else "response.completed"
        return out + [self.event(kind, response=self.response.body(status))]

    def error(self, error: P.APIError) -> bytes:
        return self.event("error", code=error.code or error.type, message=error.message, param=error.param)


async def response_stream(server: Server, req: ResponsesRequest, made: Job) -> AsyncIterator[bytes]:
    """The SSE body: response.created / in_progress, the items' events, response.completed (or .incomplete; an
    `error` event if the job fails). Cancels the job when the client goes away."""
    writer = _EventWriter(_Response(server, req, made))
    try:
        for event in writer.opening():
            yield event
        try:
            async for choice, piece in made.events():
                for event in writer.piece(choice, piece):
                    yield event
        except P.APIError as e:
            yield writer.error(e)
            return
        except Exception as e:  # a bug while writing events: the client still hears of it
            yield writer.error(made.fail_internal(e))
            return
        for event in writer.closing():
            yield event
    finally:
        made.cancel_unfinished()
