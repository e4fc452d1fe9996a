"""OpenAI-compatible request and response models (pydantic), and the OpenAI error body.

Requests are validated strictly (a string is not an integer, `true` is not 1) straight from the
raw body, so malformed JSON, missing fields and wrong types all become one 400 error that names
the offending parameter. Unknown fields are ignored, as OpenAI's own server does with most.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Annotated, Any, Literal

import pydantic
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from mimo_jax.engine.sampling import MAX_TEMPERATURE, check_seed  # the engine's rules, with their messages

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20


class APIError(Exception):
    """An error answered with an OpenAI error body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def invalid(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param, code)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}


def _loc(loc: tuple) -> str | None:
    """Dotted parameter path of a validation error, without pydantic's union-member tags."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.fullmatch(r"[a-z_][a-z0-9_]*", part) and part not in _TYPE_TAGS:
            out += f".{part}" if out else part
        else:
            break
    return out or None


def parse_request(model: type[BaseModel], body: bytes) -> Any:
    """Validate a raw JSON body; any problem becomes an `APIError` 400 naming the parameter."""
    if not body.strip():
        raise invalid("request body is empty; expected a JSON object")
    try:
        return model.model_validate_json(body)
    except pydantic.ValidationError as e:
        errors = e.errors(include_url=False)
        first = max(errors, key=lambda err: len(err["loc"]))  # the most specific (deepest union member)
        if first["type"] == "json_invalid":
            raise invalid(f"request body is not valid JSON: {first['msg'].removeprefix('Invalid JSON: ')}") from None
        param = _loc(first["loc"])
        if first["type"] == "missing":
            raise invalid(f"missing required parameter '{param}'", param, "missing_required_parameter") from None
        msg = first["msg"].removeprefix("Value error, ")
        text = f"invalid value for '{param}': {msg}" if param else msg
        raise invalid(text, param, "invalid_value") from None


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_omitted(cls, data: Any) -> Any:
        """An explicit null is the field left out (as OpenAI and vLLM read `"n": null`, `"stream": null`)."""
        return {k: v for k, v in data.items() if v is not None} if isinstance(data, dict) else data


# ----------------------------------------------------------------------------- shared parameters
class StreamOptions(_Request):
    include_usage: bool = False
    continuous_usage_stats: bool = False


class JSONSchemaFormat(_Request):
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None


class ResponseFormat(_Request):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _check_schema(self):
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("type 'json_schema' needs a 'json_schema' object")
        return self


class StructuredOutputs(_Request):
    """vLLM's `structured_outputs` (one of these)."""

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = None
    json_object: bool | None = None


MAX_LOGIT_BIAS = 64  # the engine's default max_logit_bias: entries one request may bias


class SamplingFields(_Request):
    """Parameters both endpoints share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=MAX_TEMPERATURE)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=-1, le=2**31 - 1)  # 0 or -1: no top-k
    min_p: float | None = Field(default=None, ge=0.0, le=1.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    repetition_penalty: float | None = Field(default=None, gt=0.0)
    seed: int | None = None
    stop: str | list[str | int] | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    n: int = Field(default=1, ge=1, le=MAX_N)
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False  # extension (vLLM's): generate exactly max_tokens
    skip_special_tokens: bool = True
    user: str | None = None
    logit_bias: dict[str, float] | None = None  # {token id: bias in [-100, 100]}, at most MAX_LOGIT_BIAS entries
    min_tokens: int = Field(default=0, ge=0)  # extension (vLLM's): no stop token before this many tokens
    prompt_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)  # extension (vLLM's)

    @field_validator("seed")
    @classmethod
    def _check_seed(cls, value: int | None) -> int | None:
        if value is not None:
            check_seed(value)
        return value

    # Structured output (grammar-constrained decoding): OpenAI's, SGLang's and vLLM's spellings.
    response_format: ResponseFormat | None = None
    regex: str | None = None  # SGLang
    ebnf: str | None = None  # SGLang
    structured_outputs: StructuredOutputs | None = None  # vLLM
    guided_json: dict[str, Any] | str | None = None  # vLLM (older)
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None

    @field_validator("logit_bias")
    @classmethod
    def _check_logit_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is None:
            return None
        if len(value) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries, got {len(value)}")
        for key, bias in value.items():
            if not key.isdigit():
                raise ValueError(f"keys must be token ids, got {key!r}")
            if not -100 <= bias <= 100:
                raise ValueError(f"values must lie in [-100, 100], got {bias} for token {key}")
        return value

    @model_validator(mode="after")
    def _check_stop(self):
        stops = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        for s in stops:
            if isinstance(s, str) and not s:
                raise ValueError("stop strings must not be empty")
            if isinstance(s, int) and s < 0:
                raise ValueError("stop token ids must be >= 0")
        return self

    def stop_strings(self) -> list[str]:
        if isinstance(self.stop, str):
            return [self.stop]
        return [s for s in self.stop or [] if isinstance(s, str)]

    def stop_ids(self) -> list[int]:
        ids = [s for s in self.stop or [] if isinstance(s, int) and not isinstance(self.stop, str)]
        return ids + list(self.stop_token_ids or [])


# ----------------------------------------------------------------------------- chat requests
class TextPart(_Request):
    type: str
    text: str | None = None

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type '{self.type}' are not supported (this model reads text only)")
        if self.text is None:
            raise ValueError("a text content part needs 'text'")
        return self


class FunctionCall(_Request):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCall(_Request):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    # Extra keys travel to the template, as with transformers (e.g. a template reading `name`).
    model_config = ConfigDict(strict=True, extra="allow", allow_inf_nan=False)

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None

    @model_validator(mode="after")
    def _check_content(self):
        if self.content is None and self.role in ("system", "developer", "user", "tool"):
            raise ValueError(f"a '{self.role}' message needs 'content'")
        return self


class FunctionDef(_Request):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None

    @field_validator("parameters")
    @classmethod
    def _check_parameters(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        """A JSON schema of type object; its `properties` (read to convert the model's arguments) map names to
        schemas."""
        if value is None:
            return value
        if "type" in value and value["type"] != "object":
            raise ValueError(
                f"a function's parameters must be a JSON schema of type 'object', got {_json(value['type'])}"
            )
        properties = value.get("properties")
        if properties is None:
            return value
        if not isinstance(properties, dict):
            raise ValueError(
                f"'properties' must be an object mapping parameter names to schemas, got {_json(properties)}"
            )
        for name, schema in properties.items():
            if not isinstance(schema, dict | bool):
                raise ValueError(f"the schema of parameter '{name}' must be an object, got {_json(schema)}")
        return value


def _json(value: Any, limit: int = 60) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Tool(_Request):
    type: Literal["function"] = "function"
    function: FunctionDef


class NamedToolChoiceFunction(_Request):
    name: str


class NamedToolChoice(_Request):
    type: Literal["function"] = "function"
    function: NamedToolChoiceFunction


class FunctionChoice(_Request):
    name: str


class Thinking(_Request):
    type: Literal["enabled", "disabled"]


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    thinking: Thinking | None = None  # MiMo API's switch; same as chat_template_kwargs.enable_thinking
    functions: list[FunctionDef] | None = None  # legacy spelling of tools
    function_call: Literal["none", "auto"] | FunctionChoice | None = None  # legacy spelling of tool_choice

    @model_validator(mode="after")
    def _check_chat(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs requires logprobs=true")
        return self

    def tool_list(self) -> list[Tool] | None:
        """`tools`, or the legacy `functions` as tools."""
        if self.functions is not None:
            return [Tool(function=f) for f in self.functions]
        return self.tools

    def tool_choice_value(self) -> str | NamedToolChoice | None:
        """`tool_choice`, or the legacy `function_call` as a tool choice."""
        if isinstance(self.function_call, FunctionChoice):
            return NamedToolChoice(function=NamedToolChoiceFunction(name=self.function_call.name))
        if self.function_call is not None:
            return self.function_call
        return self.tool_choice


# ----------------------------------------------------------------------------- completion requests
class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    @model_validator(mode="after")
    def _check_prompt(self):
        p = self.prompt
        if isinstance(p, list) and not p:
            raise ValueError("prompt must not be empty")
        if isinstance(p, list) and isinstance(p[0], list) and any(not x for x in p):
            raise ValueError("token-id prompts must not be empty")
        return self

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if all(isinstance(x, int) for x in p):
            return [list(p)]
        return list(p)


# ----------------------------------------------------------------------------- responses
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class _Response(BaseModel):
    model_config = ConfigDict(extra="allow")


class PromptTokensDetails(_Response):
    cached_tokens: int = 0


class Usage(_Response):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class TopLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(_Response):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(_Response):
    content: list[TokenLogprob] | None


class FunctionCallOut(_Response):
    name: str
    arguments: str


class ToolCallOut(_Response):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class ToolCallDelta(_Response):
    index: int
    id: str | None = None
    type: Literal["function"] | None = None
    function: FunctionCallOut


class AssistantMessage(_Response):
    role: Literal["assistant"] = "assistant"
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


class ChatChoice(_Response):
    index: int
    message: AssistantMessage
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None


class ChatCompletion(_Response):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    role: Literal["assistant"] | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(_Response):
    index: int
    delta: ChatDelta
    logprobs: ChoiceLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Response):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionLogprobs(_Response):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class CompletionChoice(_Response):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None


class Completion(_Response):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(_Response):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "mimo_jax"
    root: str | None = None
    max_model_len: int | None = None


class ModelList(_Response):
    object: Literal["list"] = "list"
    data: list[ModelCard]
