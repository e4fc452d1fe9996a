"""Tokenizer and chat template of a checkpoint, rendered exactly as transformers' `apply_chat_template`.

The template is the checkpoint's own (`chat_template.jinja`, `additional_chat_templates/`, or
`tokenizer_config.json`'s `chat_template`), run in the same sandboxed jinja2 environment with the
same globals, filters and variables (`messages`, `tools`, `documents`, `add_generation_prompt`,
the tokenizer's named special tokens, and the request's `chat_template_kwargs`).

A template is code: whatever it raises is a `ChatTemplateError` naming it, and a render is bounded
in time, output size, `range` length, loop steps (every `for` checks the clock) and the size of what
`*` and `**` build (`ChatTemplate.max_seconds`, `max_chars`, `max_range`).
"""

from __future__ import annotations

import contextvars
import json
import os
import random
import re
import threading
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

# transformers' `SPECIAL_TOKENS_ATTRIBUTES`: named special tokens every template may read.
NAMED_SPECIAL_TOKENS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Deepest nesting of objects/arrays in what a template is given (messages, tools, kwargs).
MAX_NESTING = 200
# Names a message's reasoning may arrive under; templates read `reasoning_content` (transformers aliases them).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")

# MiMo's reasoning and tool-call markup (the chat template writes it; the server's parsers and the grammars read it)
THINK_START, THINK_END = "<think>", "</think>"
TOOL_CALL_START, TOOL_CALL_END = "<tool_call>", "</tool_call>"


class ChatTemplateError(ValueError):
    """The conversation cannot be rendered (the template raised, or the input is not a chat)."""


def _token_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):  # serialized AddedToken
        return value["content"]
    return None


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore attributes, as transformers' sandbox does."""

    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


class _Generation(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers) renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False):
    # Like transformers: no HTML escaping (jinja's own tojson escapes <, >, &, ').
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


# ---------------------------------------------------------------------------- render bounds
class _LimitExceeded(Exception):
    """A render went past one of its bounds (not a TypeError/LookupError: jinja must not swallow it)."""


class _Bounds:
    """The bounds of one render, reached through `_BOUNDS` by the sandbox hooks on the rendering thread."""

    def __init__(self, max_seconds: float, max_chars: int, max_range: int):
        self.max_seconds, self.max_chars, self.max_range = max_seconds, max_chars, max_range
        self.deadline = time.monotonic() + max_seconds

    def tick(self) -> None:
        if time.monotonic() > self.deadline:
            raise _LimitExceeded(f"took longer than {self.max_seconds:g} s to render")

    def check_binop(self, operator: str, left: Any, right: Any) -> None:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, str | list | tuple) and isinstance(n, int) and len(seq) * n > self.max_chars:
                    raise _LimitExceeded(
                        f"would build a {type(seq).__name__} of {len(seq) * n} items (limit {self.max_chars})"
                    )
        elif operator == "**" and isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
            bits = right * (abs(left) - 1).bit_length()
            if bits > _MAX_POWER_BITS:
                raise _LimitExceeded(f"would compute a number of about {bits} bits (limit {_MAX_POWER_BITS})")


_MAX_POWER_BITS = 1 << 16
_BOUNDS: contextvars.ContextVar[_Bounds | None] = contextvars.ContextVar("mimo_jax_chat_template", default=None)


def _tick() -> None:
    bounds = _BOUNDS.get()
    if bounds is not None:
        bounds.tick()


def _range(*args: int) -> range:
    """`range` for templates: at most `max_range` numbers (jinja's sandbox allows 100000)."""
    numbers = range(*args)
    bounds = _BOUNDS.get()
    limit = bounds.max_range if bounds is not None else ChatTemplate.max_range
    try:
        size = len(numbers)
    except OverflowError:  # more than sys.maxsize
        size = (numbers.stop - numbers.start) // numbers.step
    if size > limit:
        raise _LimitExceeded(f"asked for a range of {size} numbers (limit {limit})")
    return numbers


_LOOP_FILTER = "_mimo_jax_bounded_loop"


def _bounded_loop(iterable: Any) -> Any:
    """What every `{% for %}` of a template iterates: the items, checking the clock before each."""
    bounds = _BOUNDS.get()
    if bounds is None:
        return iterable
    return _ticking(iterable, bounds)


def _ticking(iterable: Any, bounds: _Bounds) -> Any:
    for item in iterable:
        bounds.tick()
        yield item


class _Sandbox(ImmutableSandboxedEnvironment):
    """transformers' sandbox, with the clock checked at every call, attribute and item access, and bounded
    `*` / `**` results."""

    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        bounds = _BOUNDS.get()
        if bounds is not None:
            bounds.tick()
            bounds.check_binop(operator, left, right)
        return super().call_binop(context, operator, left, right)

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _tick()
        return super().call(context, obj, *args, **kwargs)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _tick()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        _tick()
        return super().getitem(obj, argument)


def _compile(source: str) -> jinja2.Template:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.filters[_LOOP_FILTER] = _bounded_loop
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = lambda *args, **kwargs: dict(*args, **kwargs)
    env.globals["namespace"] = _Namespace
    env.globals["range"] = _range
    tree = env.parse(source)
    for loop in tree.find_all(jinja2.nodes.For):  # every loop iterates through the clock check
        loop.iter = jinja2.nodes.Filter(loop.iter, _LOOP_FILTER, [], [], None, None, lineno=loop.lineno)
    return env.from_string(tree)


def nested_deeper_than(value: Any, limit: int) -> bool:
    """Whether JSON-like data nests more than `limit` levels of mappings/sequences (iterative: safe at any depth)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _plain(value: Any) -> Any:
    """JSON-only copy of what the template sees (the sandbox should never meet rich objects)."""
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return str(value)


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class ChatTemplate:
    """A checkpoint's chat template(s) plus the special-token variables transformers passes them."""

    max_seconds = 1.0  # one render's time
    max_chars = 1 << 24  # its output, and any string or list a `*` builds
    max_range = 100_000  # numbers of one `range(...)`, as jinja's sandbox

    def __init__(self, templates: dict[str, str], special_tokens: dict[str, str]):
        if not templates:
            raise ChatTemplateError("no chat template")
        self.templates = dict(templates)
        self.special_tokens = dict(special_tokens)
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> ChatTemplate | None:
        """The template of a checkpoint directory, or None if it has none. Same lookup order as transformers."""
        directory = os.fspath(directory)
        config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        templates: dict[str, str] = {}
        raw = config.get("chat_template")
        if isinstance(raw, str):
            templates["default"] = raw
        elif isinstance(raw, list):
            templates.update({t["name"]: t["template"] for t in raw})
        files: dict[str, str] = {}
        jinja_file = os.path.join(directory, "chat_template.jinja")
        if os.path.exists(jinja_file):
            with open(jinja_file, encoding="utf-8") as f:
                files["default"] = f.read()
        extra_dir = os.path.join(directory, "additional_chat_templates")
        if os.path.isdir(extra_dir):
            for name in sorted(os.listdir(extra_dir)):
                if name.endswith(".jinja"):
                    with open(os.path.join(extra_dir, name), encoding="utf-8") as f:
                        files[name.removesuffix(".jinja")] = f.read()
        templates = files or templates  # template files take priority over tokenizer_config entries
        if not templates:
            return None
        return cls(templates, special_tokens_of(config))

    def source(self, tools: list | None) -> str:
        return self.templates[self.name(tools)]

    def name(self, tools: list | None) -> str:
        """Which of the checkpoint's templates renders a conversation with (or without) tools."""
        if len(self.templates) == 1 and "default" in self.templates:
            return "default"
        if tools is not None and "tool_use" in self.templates:
            return "tool_use"
        if "default" in self.templates:
            return "default"
        raise ChatTemplateError(f"several chat templates and no default: {sorted(self.templates)}")

    def render(
        self,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text, as `tokenizer.apply_chat_template(messages, tools, tokenize=False, ...)` returns it."""
        if not messages:
            raise ChatTemplateError("messages must not be empty")
        # Copying and rendering recurse: refuse what would exhaust the stack before they start.
        for what, value in (("messages", messages), ("tools", tools), ("chat_template_kwargs", template_kwargs)):
            if nested_deeper_than(value, MAX_NESTING):
                raise ChatTemplateError(f"{what} nest deeper than {MAX_NESTING} levels")
        chat = []
        for message in messages:
            if not isinstance(message, dict):
                raise ChatTemplateError(f"each message must be an object, got {type(message).__name__}")
            message = {k: v for k, v in _plain(message).items() if v is not None}  # as transformers: None keys drop
            reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
            if reasoning is not None:
                message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
            chat.append(message)
        name = self.name(tools)
        source = self.templates[name]
        variables = {**self.special_tokens, **_plain(template_kwargs)}  # request kwargs override special tokens
        what = f"the model's chat template ({name!r})"
        bounds = _Bounds(self.max_seconds, self.max_chars, self.max_range)
        token = _BOUNDS.set(bounds)
        try:
            if source not in self._compiled:
                self._compiled[source] = _compile(source)
            pieces, size = [], 0
            for piece in self._compiled[source].generate(
                messages=chat,
                tools=_plain(tools),
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **variables,
            ):
                size += len(piece)
                if size > self.max_chars:
                    raise _LimitExceeded(f"rendered more than {self.max_chars} characters")
                bounds.tick()
                pieces.append(piece)
            return "".join(pieces)
        except _LimitExceeded as e:
            raise ChatTemplateError(f"{what} {e}") from None
        except jinja2.exceptions.TemplateError as e:
            raise ChatTemplateError(f"{what} failed: {e}") from e
        except Exception as e:  # a template is code: whatever it raises (1/0, recursion, memory) is its failure
            raise ChatTemplateError(f"{what} could not render this conversation: {type(e).__name__}: {e}") from e
        finally:
            _BOUNDS.reset(token)

    def render_ids(
        self,
        tokenizer: Tokenizer,
        messages: list[dict],
        tools: list[dict] | None = None,
        add_generation_prompt: bool = True,
        template_kwargs: dict[str, Any] | None = None,
        check_text: Callable[[str], None] | None = None,
    ) -> tuple[str, list[int]]:
        """The prompt text and its token ids, with special tokens only where the template wrote them.

        Special-token text inside the messages or tools (`<|im_end|>` in a user's message, a tool's output, a
        tool description; or two strings that the template puts side by side, `<|im_` + `end|>`) is tokenized
        as plain text, so it cannot open or close a turn. Without such text the ids are exactly those of
        tokenizing the rendered text (as transformers does). With it, the template renders the conversation
        with every such text broken by a marker (and a marker at the edge of a string that begins or ends like
        part of one); the specials found in that rendering are the template's own, and the stretches between
        them that hold a marker are re-encoded, markers removed, with special-token parsing off. The ids are
        the same as for the rendered text wherever no marker was needed. (`template_kwargs` come from the
        operator's client, not the conversation, and are left as they are.) `check_text` sees the rendered text
        before it is tokenized.
        """
        kwargs = template_kwargs or {}
        given = (messages, tools)
        text = self.render(messages, tools, add_generation_prompt, **kwargs)
        if check_text is not None:
            check_text(text)
        if not tokenizer.has_special_text(given):
            return text, tokenizer.encode(text, add_special_tokens=False)
        mark = tokenizer.fresh_mark(given)
        marked_messages, marked_tools = tokenizer.mark_special_text(given, mark)
        marked = self.render(marked_messages, marked_tools, add_generation_prompt, **kwargs)
        if marked.replace(mark, "") != text:
            raise ChatTemplateError(
                "the conversation holds special-token text that this chat template rewrites, so it cannot be kept "
                "as plain text; remove the special tokens from the messages"
            )
        return text, tokenizer.encode_marked(marked, mark)


def special_tokens_of(tokenizer_config: dict) -> dict[str, str]:
    """Named special tokens (and model-specific `*_token` keys) as transformers puts them in `special_tokens_map`."""
    out = {}
    for key, value in tokenizer_config.items():
        if key in NAMED_SPECIAL_TOKENS or key.endswith("_token"):
            text = _token_text(value)
            if text is not None:
                out[key] = text
    return out


class Tokenizer:
    """A checkpoint's `tokenizer.json` (HF `tokenizers`) with the facts the server needs from its configs."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer as HFTokenizer

        directory = os.fspath(directory)
        path = os.path.join(directory, "tokenizer.json")
        if not os.path.exists(path):
            raise FileNotFoundError(f"{directory} has no tokenizer.json; the server needs the checkpoint's tokenizer")
        self.hf = HFTokenizer.from_file(path)
        self.config = _read_json(os.path.join(directory, "tokenizer_config.json"))
        self.special_tokens = special_tokens_of(self.config)
        self.vocab_size = self.hf.get_vocab_size(with_added_tokens=True)
        # EOS: the tokenizer's eos_token and generation_config.json's eos_token_id (config.json's come via the model).
        eos = set()
        eos_text = self.special_tokens.get("eos_token")
        if eos_text is not None and self.hf.token_to_id(eos_text) is not None:
            eos.add(self.hf.token_to_id(eos_text))
        generation = _read_json(os.path.join(directory, "generation_config.json")).get("eos_token_id")
        eos.update([generation] if isinstance(generation, int) else (generation or []))
        self.eos_token_ids = tuple(sorted(eos))
        added = self.hf.get_added_tokens_decoder()
        self.added_ids = set(added)
        self.byte_level = _uses_byte_level(self.hf)
        # Special tokens (role and turn markers) that chat rendering keeps out of the conversation's own text.
        self.special_ids = {i for i, t in added.items() if t.special}
        texts = sorted({t.content for t in added.values() if t.special and len(t.content) > 1}, key=len, reverse=True)
        self._special_text = re.compile("|".join(map(re.escape, texts))) if texts else None
        self._special_heads = tuple({t[:i] for t in texts for i in range(1, len(t))})  # proper prefixes
        self._special_tails = tuple({t[i:] for t in texts for i in range(1, len(t))})  # proper suffixes
        self._path = path
        self._literal: Any = None  # a copy that reads special-token text as text (made on first use)
        self._literal_lock = threading.Lock()
        # A bound on the characters one token stands for, so a text far too long for the context is refused
        # without tokenizing it. Byte-level vocabularies spell every byte of the text, so a token covers at most
        # its piece's bytes; Unicode normalization (NFC and the like) may fold up to 4 characters into one.
        # None: no such bound for this tokenizer (word-level vocabularies may drop whitespace).
        self.max_token_chars: int | None = None
        if self.byte_level:
            longest = max(len(piece) for piece in self.hf.get_vocab(with_added_tokens=True))
            self.max_token_chars = 4 * max(longest, 1)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        # encode_batch releases the GIL while it works (encode holds it): a long prompt tokenized on a worker
        # thread leaves the server's event loop running.
        return self.hf.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def encode_literal(self, text: str) -> list[int]:
        """Ids of `text` with special-token text read as plain text (no control tokens come out)."""
        with self._literal_lock:
            if self._literal is None:
                from tokenizers import Tokenizer as HFTokenizer

                literal = HFTokenizer.from_file(self._path)
                literal.encode_special_tokens = True
                self._literal = literal
        return self._literal.encode_batch([text], add_special_tokens=False)[0].ids

    def has_special_text(self, value: Any) -> bool:
        """Whether any string in `value` (JSON-like: dicts, lists, strings) holds a special token's text, or
        begins or ends with part of one (another string beside it may complete it)."""
        if self._special_text is None:
            return False
        return any(
            self._special_text.search(s) or s.endswith(self._special_heads) or s.startswith(self._special_tails)
            for s in _strings(value)
        )

    def fresh_mark(self, value: Any) -> str:
        """A marker found in no string of `value`; ASCII (DEL and digits) so escaping and case filters keep it."""
        strings = list(_strings(value))
        while True:
            mark = f"\x7f{random.randrange(10**15):015d}\x7f"
            if not any(mark in s for s in strings):
                return mark

    def mark_special_text(self, value: Any, mark: str) -> Any:
        """`value` with `mark` inside every special token's text (after its first character) and at the edges of
        strings that begin or end with part of one, keys included."""
        if isinstance(value, str):
            marked = self._special_text.sub(lambda m: m[0][0] + mark + m[0][1:], value)
            head = mark if value.startswith(self._special_tails) else ""
            tail = mark if value.endswith(self._special_heads) else ""
            return head + marked + tail
        if isinstance(value, dict):
            return {self.mark_special_text(k, mark): self.mark_special_text(v, mark) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return type(value)(self.mark_special_text(v, mark) for v in value)
        return value

    def encode_marked(self, text: str, mark: str) -> list[int]:
        """Ids of a rendering whose conversation text was marked (`mark_special_text`): its special tokens are the
        template's; each stretch between them that holds a marker is encoded without it, as plain text."""
        encoding = self.hf.encode_batch([text], add_special_tokens=False)[0]
        ids, offsets = encoding.ids, encoding.offsets
        out: list[int] = []
        start, run = 0, 0  # text and token index where the current stretch between specials begins
        for k in [k for k, i in enumerate(ids) if i in self.special_ids] + [len(ids)]:
            end = offsets[k][0] if k < len(ids) else len(text)
            stretch = text[start:end]
            out += self.encode_literal(stretch.replace(mark, "")) if mark in stretch else ids[run:k]
            if k < len(ids):
                out.append(ids[k])
                start, run = offsets[k][1], k + 1
        return out

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.hf.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        """What one token reads as on its own (logprobs entries)."""
        return self.hf.decode([token_id], skip_special_tokens=False)

    def token_id(self, text: str) -> int | None:
        return self.hf.token_to_id(text)

    def token_bytes(self, token_id: int) -> bytes:
        """A token's own bytes (a byte-level token may be part of a character, whose text would be U+FFFD)."""
        piece = self.hf.id_to_token(token_id)
        if self.byte_level and piece is not None and token_id not in self.added_ids:
            if all(c in _BYTE_DECODER for c in piece):
                return bytes(_BYTE_DECODER[c] for c in piece)
        return self.token_text(token_id).encode("utf-8")


def _strings(value: Any):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield from _strings(k)
            yield from _strings(v)
    elif isinstance(value, list | tuple):
        for v in value:
            yield from _strings(v)


def _uses_byte_level(hf: Any) -> bool:
    decoder = json.loads(hf.to_str()).get("decoder") or {}
    kinds = [decoder.get("type")] + [d.get("type") for d in decoder.get("decoders") or []]
    return "ByteLevel" in kinds


def _byte_decoder() -> dict[str, int]:
    """GPT-2 byte-level alphabet: printable stand-in character -> byte."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return {c: b for b, c in enumerate(chars)}


_BYTE_DECODER = _byte_decoder()
