"""Generated tokens -> text pieces: incremental detokenization with stop strings, `<think>` splitting,
and MiMo tool-call markup -> OpenAI `tool_calls`.

Every parser is incremental (`feed` pieces, then `finish`) and holds back only the text that may
still turn into a marker or a stop string, so a streamed answer and a whole answer are the same
text: the non-streaming path feeds the whole text once through the same code.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import re
import uuid
from typing import Any

from tokenizers.decoders import DecodeStream

from mimo_jax.text import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START


def partial_suffix(text: str, markers: list[str] | tuple[str, ...]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some marker (0 if none)."""
    longest = min(len(text), max((len(m) for m in markers), default=1) - 1)
    for k in range(longest, 0, -1):
        tail = text[-k:]
        if any(m.startswith(tail) for m in markers):
            return k
    return 0


class TextStream:
    """Token ids -> text, released only when no stop string can still begin in it.

    `add(token_id)` returns the newly released text; once a stop string appears the text is cut
    just before it, `stopped` is set and the tokens after that one are not kept.
    """

    def __init__(self, tokenizer: Any, stop_strings: list[str] = (), skip_special_tokens: bool = True):
        self._tokenizer = tokenizer
        self._rust = getattr(tokenizer, "hf", tokenizer)  # DecodeStream needs the `tokenizers.Tokenizer` itself
        self._decode = DecodeStream(skip_special_tokens=skip_special_tokens)
        self._skip_special = skip_special_tokens
        self.stop_strings = [s for s in stop_strings if s]
        self.token_ids: list[int] = []
        self.text = ""  # released so far
        self._pending = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        if self.stopped:
            return ""
        self.token_ids.append(token_id)
        piece = self._decode.step(self._rust, token_id)
        if not piece:
            return ""
        self._pending += piece
        if not self.stop_strings:
            return self._release(len(self._pending))
        hits = [i for i in (self._pending.find(s) for s in self.stop_strings) if i >= 0]
        if hits:
            self.stopped = True
            return self._release(min(hits), drop_rest=True)
        return self._release(len(self._pending) - partial_suffix(self._pending, self.stop_strings))

    def finish(self) -> str:
        """Release what was held back (generation ended without completing a stop string)."""
        if self.stopped:
            return ""
        out = self._release(len(self._pending))
        # Bytes of an unfinished character stay inside the decode stream; a full decode shows them (as U+FFFD).
        full = self._tokenizer.decode(self.token_ids, skip_special_tokens=self._skip_special)
        if len(full) > len(self.text) and full.startswith(self.text):
            tail = full[len(self.text) :]
            self.text += tail
            out += tail
        return out

    def _release(self, upto: int, drop_rest: bool = False) -> str:
        out, self._pending = self._pending[:upto], ("" if drop_rest else self._pending[upto:])
        self.text += out
        return out


class ReasoningParser:
    """Splits `<think>...</think>` off the answer: `feed(text) -> (reasoning, content)`.

    `in_reasoning` is set when the prompt already opened the block (the template wrote `<think>`).
    Otherwise a block is recognised only at the very start of the output. Whitespace around the
    reasoning (templates write `<think>\\n...\\n</think>\\n\\n`) and before the answer is dropped; a
    streamed reasoning holds back trailing whitespace until it knows whether the block ends there.
    """

    def __init__(self, in_reasoning: bool = False, start: str = THINK_START, end: str = THINK_END):
        self.start, self.end = start, end
        self.state = "reasoning_start" if in_reasoning else "opening"
        self._held = ""
        self.saw_reasoning = in_reasoning

    def feed(self, text: str) -> tuple[str, str]:
        reasoning, content = [], []
        text = self._held + text
        self._held = ""
        while text:
            if self.state == "opening":
                stripped = text.lstrip()
                if stripped.startswith(self.start):
                    self.state, self.saw_reasoning = "reasoning_start", True
                    text = stripped[len(self.start) :]
                elif self.start.startswith(stripped):  # maybe a marker still arriving (or only whitespace so far)
                    self._held, text = text, ""
                else:
                    self.state = "content"
            elif self.state == "reasoning_start":
                stripped = text.lstrip()
                if stripped:
                    self.state = "reasoning"
                text = stripped
            elif self.state == "reasoning":
                i = text.find(self.end)
                if i >= 0:
                    reasoning.append(text[:i].rstrip())
                    self.state, text = "after_reasoning", text[i + len(self.end) :]
                else:
                    keep = partial_suffix(text, (self.end,))
                    body = text[: len(text) - keep]
                    keep += len(body) - len(body.rstrip())  # trailing whitespace may precede the end marker
                    reasoning.append(text[: len(text) - keep])
                    self._held, text = text[len(text) - keep :], ""
            elif self.state == "after_reasoning":
                text = text.lstrip()
                if text:
                    self.state = "content"
            else:
                content.append(text)
                text = ""
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        held, self._held = self._held, ""
        if self.state in ("reasoning", "reasoning_start"):
            return held.rstrip(), ""
        return "", held


@dataclasses.dataclass
class ParsedToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = dataclasses.field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


_FUNCTION_RE = re.compile(r"<function=([^>]+)>(.*?)</function>", re.DOTALL)
_PARAMETER_RE = re.compile(r"<parameter=([^>]+)>(.*?)</parameter>", re.DOTALL)


def _convert(value: str, schema_type: Any) -> Any:
    """A parameter's text -> the JSON value its schema type asks for (text stays text when it does not parse)."""
    if value.strip().lower() == "null":
        return None
    kind = (schema_type[0] if isinstance(schema_type, list) and schema_type else schema_type) or "string"
    kind = str(kind).lower()
    if kind in ("string", "str", "text", "enum"):
        return value
    stripped = value.strip()
    if kind.startswith(("int", "uint", "long", "short")):
        try:
            return int(stripped)
        except ValueError:
            return value
    if kind.startswith(("num", "float", "double")):
        try:
            number = float(stripped)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in stripped and "e" not in stripped.lower() else number
    if kind.startswith("bool"):
        if stripped.lower() in ("true", "false"):
            return stripped.lower() == "true"
        return value
    try:
        return json.loads(stripped)
    except ValueError:
        pass
    try:
        return ast.literal_eval(stripped)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return value


class ToolCallParser:
    """MiMo tool-call markup -> `ParsedToolCall`s; `feed(text) -> (content, calls)`.

    Format (as sglang-jax's MiMo detector reads it)::

        <tool_call>
        <function=get_weather>
        <parameter=city>Paris</parameter>
        </function>
        </tool_call>

    Parameter values are kept as written and converted by the tool's JSON schema type. A block that
    names an unknown function, or does not parse, stays in the content as text. Text after the first
    call is not content (it is the whitespace between calls).
    """

    def __init__(self, tools: list[dict]):
        self.schemas: dict[str, dict] = {}
        for tool in tools:
            fn = tool.get("function", tool)
            properties = (fn.get("parameters") or {}).get("properties")
            self.schemas[fn["name"]] = properties if isinstance(properties, dict) else {}
        self.calls: list[ParsedToolCall] = []
        self._buffer = ""
        self._in_call = False

    def feed(self, text: str) -> tuple[str, list[ParsedToolCall]]:
        content, calls = [], []
        text = self._buffer + text
        self._buffer = ""
        while text:
            if self._in_call:
                j = text.find(TOOL_CALL_END)
                if j < 0:
                    self._buffer, text = text, ""
                    break
                block = TOOL_CALL_START + text[: j + len(TOOL_CALL_END)]
                text = text[j + len(TOOL_CALL_END) :]
                self._in_call = False
                call = self._parse(block)
                if call is None:
                    content.append(block)
                else:
                    calls.append(call)
                    self.calls.append(call)
            else:
                i = text.find(TOOL_CALL_START)
                if i >= 0:
                    if not self.calls:
                        content.append(text[:i])
                    text, self._in_call = text[i + len(TOOL_CALL_START) :], True
                else:
                    keep = partial_suffix(text, (TOOL_CALL_START,))
                    if not self.calls:
                        content.append(text[: len(text) - keep])
                    self._buffer, text = text[len(text) - keep :], ""
        return "".join(content), calls

    def finish(self) -> tuple[str, list[ParsedToolCall]]:
        """An unfinished block (output cut short) is returned as text."""
        held, self._buffer = self._buffer, ""
        if self._in_call:
            self._in_call = False
            return TOOL_CALL_START + held, []
        return ("" if self.calls else held), []

    def _parse(self, block: str) -> ParsedToolCall | None:
        match = _FUNCTION_RE.search(block)
        if match is None:
            return None
        name, body = match.group(1).strip(), match.group(2)
        if name not in self.schemas:
            return None
        properties = self.schemas[name]
        arguments = {}
        for param in _PARAMETER_RE.finditer(body):
            key = param.group(1).strip()
            schema = properties.get(key)
            arguments[key] = _convert(param.group(2), schema.get("type") if isinstance(schema, dict) else None)
        return ParsedToolCall(name, arguments)
