"""Grammar-constrained decoding with llguidance: a request's constraint spec -> a per-request token constraint.

A *spec* is a JSON-able dict (it travels in `SamplingOptions.constraint`) naming one grammar:

    {"json_object": true}                                  any JSON object
    {"json_schema": {...}, "strict": false}                a JSON value valid for the schema
    {"regex": "[0-9]{3}-[0-9]{4}"}                         text matching the regex (whole output)
    {"lark": "start: ..."}                                 llguidance's Lark dialect
    {"ebnf": "root ::= ..."}                               GBNF / EBNF (converted to Lark) or Lark
    {"choice": ["yes", "no"]}                              exactly one of the strings
    {"tool_call": {"tools": [...], "required": true, "parallel": true}}   one or more MiMo tool calls
    {"tool_call": {"tools": [...], "name": "get_weather"}}                one call of that function

plus, optionally, `"thinking"`: `"inside"` (or `true`) when the prompt already opened a `<think>` block,
`"optional"` when the model may open one with its first token. Inside the block every token is allowed;
after `</think>` (and a few whitespace tokens) the grammar applies.

`GrammarFactory(tokenizer, vocab_size, eos_token_ids)` is the engine's `ConstraintFactory`: calling it
with a spec returns a fresh `TokenConstraint` (`fill_allowed(bitmask)`, `accept(token)`, `is_finished()`).
`validate(spec)` compiles the grammar (cached, so the engine's call later only copies it) and raises
`GrammarError` (a ValueError with llguidance's message and the spec key at fault) for a bad schema,
regex or grammar. Once the grammar is complete only the EOS tokens may follow, and `is_finished()`
turns true when nothing else could.

Tool calls follow the markup `mimo_jax.serve.parsers.ToolCallParser` reads (the MiMo chat template's):

    <tool_call>
    <function=NAME>
    <parameter=ARG>VALUE</parameter>
    </function>
    </tool_call>

A parameter whose schema type the parser keeps as text (string, or no type) is free text without
`</parameter>`, `</function>` or `</tool_call>` (`enum`, `const`, `minLength` and `maxLength` are
enforced, `pattern` and `format` are not); any other type is JSON for its schema (`%json`), which the
parser converts back. Parameters come in the order of the schema's `properties`, required ones always;
a function without declared properties takes any (unless `additionalProperties` is false).
"""

from __future__ import annotations

import collections
import json
import logging
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import llguidance
import numpy as np

from mimo_jax.text import THINK_END, THINK_START, TOOL_CALL_END, TOOL_CALL_START, Tokenizer

log = logging.getLogger("mimo_jax.grammar")

GRAMMAR_KEYS = ("json_object", "json_schema", "regex", "lark", "ebnf", "choice", "tool_call")
SPEC_KEYS = GRAMMAR_KEYS + ("strict", "thinking")
# JSON whitespace between tokens (llguidance's whitespace_pattern, matched at most once in each place):
# by default compact JSON with optional single spaces, as Outlines and SGLang's outlines backend write it;
# any-whitespace grammars let a model emit newlines and tabs without end. GrammarFactory(json_whitespace=)
# (`--json-whitespace`) sets another pattern, e.g. PRETTY_JSON_WHITESPACE; a schema's "x-guidance" wins.
COMPACT_JSON_WHITESPACE = r" ?"
PRETTY_JSON_WHITESPACE = r"[ \t]{0,32}(\r?\n[ \t]{0,32})?"  # one line break, indentation to 8 levels of 4
MAX_LEADING_WHITESPACE_TOKENS = 4  # after `</think>`, before the grammar's first token
# Free text of a tool-call parameter (lazy: it ends at the first `</parameter>`, which it includes), never
# holding the other closing tags; LENGTH is `*` or the schema's {minLength,maxLength}.
_PARAM_TEXT = r"/(?s:.LENGTH)<\/parameter>/ & ~/(?s:.*)(<\/function>|<\/tool_call>)(?s:.*)/"
# The value kinds ToolCallParser keeps as text (mimo_jax.serve.parsers._convert).
_TEXT_KINDS = ("string", "str", "text", "enum")


class GrammarError(ValueError):
    """A spec that does not compile; `key` is the spec entry at fault (e.g. "json_schema")."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


# ----------------------------------------------------------------------------- specs -> llguidance grammars
def check_spec(spec: Any) -> dict:
    """The spec itself if well-formed (one grammar key of the right type); else GrammarError."""
    if not isinstance(spec, dict):
        raise GrammarError(f"a constraint spec is a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - set(SPEC_KEYS))
    if unknown:
        raise GrammarError(f"unknown constraint keys {unknown}; expected one of {list(GRAMMAR_KEYS)}", unknown[0])
    keys = [k for k in GRAMMAR_KEYS if k in spec]
    if len(keys) != 1:
        raise GrammarError(f"a constraint spec names exactly one of {list(GRAMMAR_KEYS)}, got {keys}")
    key, value = keys[0], spec[keys[0]]
    want = {
        "json_object": (bool, "true"),
        "json_schema": (dict, "a JSON schema object"),
        "regex": (str, "a string"),
        "lark": (str, "a string"),
        "ebnf": (str, "a string"),
        "choice": (list, "a list of strings"),
        "tool_call": (dict, "an object"),
    }[key]
    if not isinstance(value, want[0]) or (key == "json_object" and value is not True):
        raise GrammarError(f"'{key}' must be {want[1]}", key)
    if key == "choice" and (not value or not all(isinstance(c, str) for c in value)):
        raise GrammarError("'choice' must be a non-empty list of strings", key)
    if key == "tool_call":
        tools = value.get("tools")
        if not isinstance(tools, list) or not tools:
            raise GrammarError("'tool_call' needs a non-empty 'tools' list", key)
        if "name" in value and not isinstance(value["name"], str):
            raise GrammarError("'tool_call.name' must be a string", key)
    if not isinstance(spec.get("strict", False), bool):
        raise GrammarError("'strict' must be a boolean", "strict")
    if spec.get("thinking", False) not in (False, True, "inside", "optional"):
        raise GrammarError("'thinking' must be 'inside', 'optional' or a boolean", "thinking")
    return spec


def grammar_key(spec: dict) -> str:
    return next(k for k in GRAMMAR_KEYS if k in spec)


# ----------------------------------------------------------------------------- request fields -> specs
# The fields of a chat/completions body (or a batch line) that constrain the output, in the order they are read.
OUTPUT_FIELDS = ("response_format", "regex", "ebnf", "structured_outputs", "guided_json", "guided_regex",
                 "guided_choice", "guided_grammar")  # fmt: skip
_STRUCTURED_OUTPUT_KINDS = ("json", "regex", "grammar", "choice", "json_object")


def _schema_value(value: Any, param: str) -> dict:
    """A JSON schema given as an object or as JSON text."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise GrammarError(f"'{param}' is not valid JSON: {e}", param) from None
    if not isinstance(value, dict):
        raise GrammarError(f"'{param}' must be a JSON schema object", param)
    return value


def _typed(value: Any, kind: type, what: str, param: str) -> Any:
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        raise GrammarError(f"'{param}' must be {what}", param)
    return value


def output_spec(fields: Mapping[str, Any]) -> tuple[dict, str] | None:
    """The constraint spec a request's fields ask for (OpenAI's `response_format`, SGLang's `regex` / `ebnf`, vLLM's
    `structured_outputs` and older `guided_*`; plain JSON values as a body or a batch line holds them), and the field
    that asked; None when none does. GrammarError (its `key` the field) for a malformed one or for two of them."""
    found: list[tuple[dict, str]] = []
    rf = fields.get("response_format")
    if rf is not None:
        if not isinstance(rf, dict) or rf.get("type") not in ("text", "json_object", "json_schema"):
            raise GrammarError(
                '\'response_format\' must be {"type": "text" | "json_object" | "json_schema"}', "response_format"
            )
        if rf["type"] == "json_object":
            found.append(({"json_object": True}, "response_format"))
        elif rf["type"] == "json_schema":
            given = rf.get("json_schema")
            if not isinstance(given, dict):
                raise GrammarError("type 'json_schema' needs a 'json_schema' object", "response_format")
            strict = given.get("strict") or False
            if not isinstance(strict, bool):
                raise GrammarError("'response_format.json_schema.strict' must be a boolean", "response_format")
            schema = given.get("schema")
            spec = {"json_object": True} if schema is None else {
                "json_schema": _schema_value(schema, "response_format"), "strict": strict}  # fmt: skip
            found.append((spec, "response_format"))
    for name, key in (("regex", "regex"), ("ebnf", "ebnf")):
        if fields.get(name) is not None:
            found.append(({key: _typed(fields[name], str, "a string", name)}, name))
    so = fields.get("structured_outputs")
    if so is not None:
        given = [
            (k, so[k]) for k in _STRUCTURED_OUTPUT_KINDS if isinstance(so, dict) and so.get(k) not in (None, False)
        ]
        if len(given) != 1:
            message = f"'structured_outputs' takes exactly one of {', '.join(_STRUCTURED_OUTPUT_KINDS)}"
            raise GrammarError(message, "structured_outputs")
        kind, value = given[0]
        param = f"structured_outputs.{kind}"
        if kind == "json":
            found.append(({"json_schema": _schema_value(value, param)}, param))
        elif kind == "json_object":
            found.append(({"json_object": _typed(value, bool, "true", param)}, param))
        elif kind == "choice":
            found.append(({"choice": _typed(value, list, "a list of strings", param)}, param))
        else:
            found.append(({"ebnf" if kind == "grammar" else kind: _typed(value, str, "a string", param)}, param))
    if fields.get("guided_json") is not None:
        found.append(({"json_schema": _schema_value(fields["guided_json"], "guided_json")}, "guided_json"))
    for name, key, kind, what in (
        ("guided_regex", "regex", str, "a string"),
        ("guided_choice", "choice", list, "a list of strings"),
        ("guided_grammar", "ebnf", str, "a string"),
    ):
        if fields.get(name) is not None:
            found.append(({key: _typed(fields[name], kind, what, name)}, name))
    if len(found) > 1:
        raise GrammarError(f"'{found[0][1]}' and '{found[1][1]}' both constrain the output; give one", found[1][1])
    return found[0] if found else None


def tool_call_spec(tools: Sequence[dict], name: str | None = None, parallel: bool = True) -> dict:
    """The spec of a forced tool call over chat-shaped `tools` ({"type": "function", "function": {...}}): one call of
    `name`, or with no name one or more calls of any (exactly one unless `parallel`); strict if any tool is."""
    call: dict[str, Any] = {"tools": list(tools)}
    if name is not None:
        call["name"] = name
    else:
        call["required"], call["parallel"] = True, parallel
    strict = any(isinstance(t, dict) and (t.get("function") or {}).get("strict") is True for t in tools)
    return {"tool_call": call, "strict": strict}


def thinking_mode(prompt: str, reasoning: bool) -> str | None:
    """How a chat's output may open with reasoning, for a spec's "thinking": "inside" (the prompt opened `<think>`),
    None (no reasoning markers, or the prompt closed an empty block: thinking off) or "optional" (the model may open
    a block itself). `reasoning`: whether the tokenizer has both markers."""
    if not reasoning:
        return None
    if prompt.rfind(THINK_START) > prompt.rfind(THINK_END):
        return "inside"
    if prompt.rstrip().endswith(THINK_END):
        return None
    return "optional"


def _json_options(strict: bool, whitespace: str, schema: Any = None) -> dict:
    # Not strict: keywords llguidance does not implement are ignored (strict: they are an error).
    options = {"lenient": not strict}
    own = schema.get("x-guidance") if isinstance(schema, dict) else None
    if not (isinstance(own, dict) and {"whitespace_flexible", "whitespace_pattern"} & set(own)):
        options["whitespace_pattern"] = whitespace
    return options


def grammar_text(spec: dict, special: Any = None, whitespace: str = COMPACT_JSON_WHITESPACE) -> str:
    """The llguidance grammar (serialized) of a checked spec. `special(marker)` is the Lark atom of a
    tool-call marker (`<[id]>` for a token llguidance keeps special, else the quoted string); `whitespace`
    the JSON whitespace pattern."""
    key = grammar_key(spec)
    value = spec[key]
    strict = spec.get("strict", False)
    from_schema = llguidance.LLMatcher.grammar_from_json_schema
    try:
        if key == "json_object":
            return from_schema({"type": "object"}, defaults=_json_options(False, whitespace))
        if key == "json_schema":
            return from_schema(value, defaults=_json_options(strict, whitespace, value))
        if key == "regex":
            return llguidance.LLMatcher.grammar_from_regex(value)
        if key == "lark":
            return llguidance.LLMatcher.grammar_from_lark(value)
        if key == "ebnf":
            return llguidance.grammar_from("ebnf", value)
        if key == "choice":
            return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in value))
        return llguidance.LLMatcher.grammar_from_lark(tool_call_lark(value, special or json.dumps, strict, whitespace))
    except GrammarError:
        raise
    except (ValueError, TypeError) as e:
        raise GrammarError(str(e), key) from None


def _functions(tools: Sequence[Any]) -> list[tuple[str, dict]]:
    out = []
    for tool in tools:
        fn = tool.get("function", tool) if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise GrammarError("each tool needs a function with a 'name'", "tool_call")
        params = fn.get("parameters") or {}
        if not isinstance(params, dict):
            raise GrammarError(f"function '{fn['name']}': 'parameters' must be a JSON schema object", "tool_call")
        out.append((fn["name"], params))
    return out


def _value_kind(schema: Any) -> str:
    """Whether ToolCallParser keeps a parameter's text as it is ("text") or parses it ("json")."""
    kind = schema.get("type") if isinstance(schema, dict) else None
    kind = (kind[0] if isinstance(kind, list) and kind else kind) or "string"
    return "text" if str(kind).lower() in _TEXT_KINDS else "json"


def tool_call_lark(
    value: dict, special: Any = json.dumps, strict: bool = False, whitespace: str = COMPACT_JSON_WHITESPACE
) -> str:
    """Lark grammar for MiMo tool calls: `value` = {"tools", "required" | "name", "parallel"}."""
    functions = _functions(value["tools"])
    name = value.get("name")
    if name is not None:
        functions = [f for f in functions if f[0] == name]
        if not functions:
            raise GrammarError(f"no tool is named '{name}'", "tool_call")
    single = name is not None or value.get("parallel") is False
    rules = [
        "start: call" if single else 'start: call ("\\n" call)*',
        f'call: {special(TOOL_CALL_START)} "\\n" ({" | ".join(f"fn_{i}" for i in range(len(functions)))}) '
        f'"\\n" {special(TOOL_CALL_END)}',
    ]
    texts: dict[str, str] = {}

    def text_rule(schema: Any) -> str:
        """The rule for a text value with the schema's minLength / maxLength (code points)."""
        low = schema.get("minLength", 0) if isinstance(schema, dict) else 0
        high = schema.get("maxLength") if isinstance(schema, dict) else None
        low = low if isinstance(low, int) and low > 0 else 0
        high = high if isinstance(high, int) and high >= low else None
        length = "*" if (low, high) == (0, None) else f"{{{low},{'' if high is None else high}}}"
        if length not in texts:
            texts[length] = rule = f"param_text_{len(texts)}"
            rules.append(f"{rule}[lazy]: {rule.upper()}")
            rules.append(f"{rule.upper()}: {_PARAM_TEXT.replace('LENGTH', length)}")
        return texts[length]

    for i, (fname, params) in enumerate(functions):
        properties = params.get("properties") or {}
        required = [r for r in params.get("required") or [] if isinstance(r, str)]
        names = list(properties) + [r for r in required if r not in properties]
        defs = {k: params[k] for k in ("$defs", "definitions") if k in params}
        body = []
        for j, pname in enumerate(names):
            schema = properties.get(pname, {})
            rule = f"p_{i}_{j}"
            head = json.dumps(f"<parameter={pname}>")
            if _value_kind(schema) == "text":
                options = schema.get("enum") if isinstance(schema, dict) else None
                if isinstance(schema, dict) and "const" in schema:
                    options = [schema["const"]]
                if isinstance(options, list) and options:
                    values = [o if isinstance(o, str) else json.dumps(o) for o in options]
                    alternatives = " | ".join(json.dumps(v) for v in values)
                    rules.append(f'{rule}: {head} ({alternatives}) "</parameter>\\n"')
                else:
                    rules.append(f'{rule}: {head} {text_rule(schema)} "\\n"')
            else:
                sub = {**defs, **schema} if isinstance(schema, dict) else {}
                sub["x-guidance"] = {**_json_options(strict, whitespace, sub), **(sub.get("x-guidance") or {})}
                rules.append(f'{rule}: {head} v_{i}_{j} "</parameter>\\n"')
                rules.append(f"v_{i}_{j}: %json {json.dumps(sub)}")
            body.append(rule if pname in required else f"{rule}?")
        if not properties and params.get("additionalProperties", True) is not False:
            rules.append(f'any_param_{i}: "<parameter=" PARAM_NAME ">" {text_rule(None)} "\\n"')
            body.append(f"any_param_{i}*")
        rules.append(f'fn_{i}: {json.dumps(f"<function={fname}>")} "\\n" {" ".join(body)} "</function>"')
    rules.append(r"PARAM_NAME: /[A-Za-z_][A-Za-z0-9_.\-]*/")
    return "\n".join(rules) + "\n"


# ----------------------------------------------------------------------------- constraints
class GrammarConstraint:
    """One request's llguidance matcher as a TokenConstraint."""

    def __init__(self, matcher: llguidance.LLMatcher, words: int):
        self.matcher = matcher
        self._words = words
        self._buffer: np.ndarray | None = None

    def fill_allowed(self, bitmask: np.ndarray) -> None:
        if bitmask.dtype == np.int32 and bitmask.size == self._words and bitmask.flags["C_CONTIGUOUS"]:
            self.matcher.unsafe_compute_mask_ptr(bitmask.ctypes.data, bitmask.nbytes)
            return
        if self._buffer is None:
            self._buffer = np.zeros(self._words, np.int32)
        self.matcher.unsafe_compute_mask_ptr(self._buffer.ctypes.data, self._buffer.nbytes)
        n = min(bitmask.size, self._words)
        flat = bitmask.reshape(-1)
        flat[:n] = self._buffer[:n]
        flat[n:] = 0

    def allows(self, token: int) -> bool:
        return self.matcher.validate_tokens([token]) == 1

    def accept(self, token: int) -> None:
        if not self.matcher.consume_token(int(token)):
            log.warning("constrained decoding: token %d rejected (%s)", token, self.matcher.get_error())

    def is_finished(self) -> bool:
        return self.matcher.is_stopped()

    def is_accepting(self) -> bool:
        return self.matcher.is_accepting()


class ThinkingConstraint:
    """Everything until `</think>`, then up to a few whitespace tokens, then the grammar.

    `inside`: the prompt opened the block. Otherwise the first token may be `<think>` (opening a
    block) or the grammar's first token.
    """

    def __init__(self, inner: GrammarConstraint, factory: GrammarFactory, inside: bool):
        self.inner = inner
        self._factory = factory
        self.state = "thinking" if inside else "opening"
        self._tail = b""
        self._leading = 0
        self._finished = False

    def fill_allowed(self, bitmask: np.ndarray) -> None:
        if self.state == "thinking":
            bitmask.fill(-1)
            return
        self.inner.fill_allowed(bitmask)
        flat = bitmask.reshape(-1)
        if self.state == "opening" and self._factory.think_start is not None:
            _set(flat, self._factory.think_start)
        elif self.state == "after" and self._leading < MAX_LEADING_WHITESPACE_TOKENS:
            for t in self._factory.whitespace_tokens:
                _set(flat, t)

    def accept(self, token: int) -> None:
        token = int(token)
        if token in self._factory.eos_token_ids and self.state == "thinking":
            self._finished = True
            return
        if self.state == "thinking":
            self._tail = (self._tail + self._factory.token_bytes(token))[-64:]
            if THINK_END.encode() in self._tail:
                self.state = "after"
            return
        if self.state == "opening" and token == self._factory.think_start and not self.inner.allows(token):
            self.state = "thinking"
            return
        if self.state == "after" and not self.inner.allows(token) and token in self._factory.whitespace_set:
            self._leading += 1
            return
        self.state = "grammar"
        self.inner.accept(token)

    def is_finished(self) -> bool:
        return self._finished or (self.state != "thinking" and self.inner.is_finished())


def _set(words: np.ndarray, token: int) -> None:
    if token // 32 < words.size:
        words[token // 32] |= np.array(1 << (token % 32), np.uint32).view(np.int32)


class GrammarFactory:
    """ConstraintFactory over llguidance for one tokenizer; thread-safe, compiled grammars cached."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        vocab_size: int | None = None,
        eos_token_ids: Sequence[int] | None = None,
        json_whitespace: str = COMPACT_JSON_WHITESPACE,
        cache_size: int = 64,
    ):
        self.tokenizer = tokenizer
        self.vocab_size = max(vocab_size or 0, tokenizer.vocab_size)
        self.eos_token_ids = tuple(sorted(set(tokenizer.eos_token_ids if eos_token_ids is None else eos_token_ids)))
        self.words = (self.vocab_size + 31) // 32
        self.json_whitespace = json_whitespace
        self.lltokenizer = llguidance.LLTokenizer(
            tokenizer.hf.to_str(), n_vocab=self.vocab_size, eos_token=list(self.eos_token_ids) or None
        )
        self.think_start = tokenizer.token_id(THINK_START)
        self._bytes: dict[int, bytes] = {}
        self.whitespace_tokens = self._whitespace_tokens()
        self.whitespace_set = frozenset(self.whitespace_tokens)
        self._cache: collections.OrderedDict[str, llguidance.LLMatcher] = collections.OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def token_bytes(self, token: int) -> bytes:
        if token not in self._bytes:
            self._bytes[token] = self.lltokenizer.decode_bytes([token]) if token < self.tokenizer.vocab_size else b""
        return self._bytes[token]

    def _whitespace_tokens(self) -> tuple[int, ...]:
        out = []
        for t in range(self.tokenizer.vocab_size):
            if self.lltokenizer.is_special_token(t):
                continue
            b = self.lltokenizer.decode_bytes([t])
            if b and not b.strip(b" \t\r\n"):
                out.append(t)
        return tuple(out)

    def special(self, marker: str) -> str:
        """Lark atom of a markup string: by token id where llguidance keeps the token special."""
        token = self.tokenizer.token_id(marker)
        if token is not None and self.lltokenizer.is_special_token(token):
            return f"<[{token}]>"
        return json.dumps(marker)

    def _matcher(self, spec: dict) -> llguidance.LLMatcher:
        check_spec(spec)
        grammar_spec = {k: v for k, v in spec.items() if k != "thinking"}
        key = json.dumps(grammar_spec, sort_keys=True)
        with self._lock:
            matcher = self._cache.get(key)
            if matcher is not None:
                self._cache.move_to_end(key)
                return matcher
        grammar = grammar_text(grammar_spec, self.special, self.json_whitespace)
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise GrammarError(matcher.get_error(), grammar_key(spec))
        for warning in matcher.get_grammar_warnings():
            log.info("constraint %s: %s", grammar_key(spec), warning)
        with self._lock:
            self._cache[key] = matcher
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return matcher

    def validate(self, spec: dict) -> None:
        """Compile the spec's grammar (then cached); GrammarError if it does not compile."""
        self._matcher(spec)

    def __call__(self, spec: dict) -> GrammarConstraint | ThinkingConstraint:
        matcher = self._matcher(spec).deep_copy()
        inner = GrammarConstraint(matcher, self.words)
        thinking = spec.get("thinking", False)
        if thinking:
            return ThinkingConstraint(inner, self, inside=thinking is True or thinking == "inside")
        return inner
