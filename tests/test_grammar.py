"""mimo_jax.grammar with the real llguidance: constraints driven by simulated decoding.

A simulated decoder asks the constraint for its mask, draws one allowed token at random (seeded; now
and then it tries to spell a closing string such as `"` or `</parameter>` so outputs end), accepts
it, and stops when the constraint is finished or EOS was drawn. The decoded text must then parse:
JSON valid for the schema (jsonschema), text matching the regex, tool calls that ToolCallParser
turns into calls of the given functions with arguments valid for their schemas. Tokenizers: the
served test checkpoint's byte-level BPE (with a model vocabulary padded past the tokenizer's) and
the demo model's.
"""

from __future__ import annotations

import json
import re

import jsonschema
import numpy as np
import pytest

from mimo_jax.grammar import PRETTY_JSON_WHITESPACE, GrammarError, GrammarFactory, tool_call_lark
from mimo_jax.serve.parsers import ReasoningParser, ToolCallParser
from mimo_jax.text import Tokenizer
from tests import fixtures as sf

SEEDS = range(12)
MODEL_VOCAB = 352  # the served tokenizer has 337 tokens; the model's rows past them are padding


@pytest.fixture(scope="module")
def factory(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    sf.write_tokenizer(str(directory))
    return GrammarFactory(Tokenizer(str(directory)), MODEL_VOCAB)


@pytest.fixture(scope="module")
def demo_factory():
    from mimo_jax.weights.demo import demo_model_dir

    return GrammarFactory(Tokenizer(str(demo_model_dir())), 8192)


def allowed_ids(mask: np.ndarray) -> np.ndarray:
    return np.nonzero(np.unpackbits(mask.view(np.uint8), bitorder="little"))[0]


CLOSERS = ['"', "}", "]", "0", "\n", "</parameter>\n"]


def simulate(factory, constraint, seed, max_steps=3000, think_end_p=0.0):
    """Tokens a random decoder produces under `constraint` (EOS, if drawn, is the last)."""
    tok = factory.tokenizer
    rng = np.random.default_rng(seed)
    closers = [tok.encode(c, add_special_tokens=False) for c in CLOSERS]
    think_end = tok.token_id(sf.ADDED_TOKENS[1])
    mask = np.zeros(factory.words, np.int32)
    tokens, burst = [], []
    while not constraint.is_finished():
        assert len(tokens) < max_steps, "no end in sight: " + tok.decode(tokens)
        constraint.fill_allowed(mask)
        allowed = allowed_ids(mask)
        assert allowed.size, "empty mask before the constraint finished"
        assert allowed.max() < tok.vocab_size or len(allowed) == 32 * factory.words  # padding: only when free
        allowed = allowed[allowed < tok.vocab_size]
        if getattr(constraint, "state", None) == "thinking":
            allowed = allowed[~np.isin(allowed, factory.eos_token_ids)]  # a thought that ends the answer: elsewhere
            if rng.random() < think_end_p:
                allowed = np.array([think_end])
        if not burst and rng.random() < 0.3:
            burst = list(closers[rng.integers(len(closers))])
        if burst and burst[0] in allowed:
            token = burst.pop(0)
        else:
            burst = []
            token = int(rng.choice(allowed))
        constraint.accept(token)
        tokens.append(token)
        if token in factory.eos_token_ids:
            break
    return tokens


def text_of(factory, tokens) -> str:
    return factory.tokenizer.decode([t for t in tokens if t not in factory.eos_token_ids])


# ----------------------------------------------------------------------------- JSON
SCHEMAS = {
    "required_fields": {
        "type": "object",
        "properties": {
            "name": {"type": "string", "maxLength": 12},
            "age": {"type": "integer", "minimum": 0, "maximum": 150},
            "email": {"type": "string"},
        },
        "required": ["name", "age"],
        "additionalProperties": False,
    },
    "enums_and_literals": {
        "type": "object",
        "properties": {
            "color": {"enum": ["red", "green", "blue"]},
            "ok": {"type": "boolean"},
            "nothing": {"type": "null"},
            "kind": {"const": "point"},
            "size": {"type": "string", "enum": ["S", "M", "L"]},
        },
        "required": ["color", "ok", "kind"],
        "additionalProperties": False,
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "minItems": 1, "maxItems": 3},
            "scores": {"type": "array", "items": {"type": "number"}},
            "pair": {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "boolean"}], "items": False},
        },
        "required": ["tags", "pair"],
        "additionalProperties": False,
    },
    "nested_refs_anyof": {
        "type": "object",
        "$defs": {
            "point": {
                "type": "object",
                "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                "required": ["x", "y"],
                "additionalProperties": False,
            }
        },
        "properties": {
            "start": {"$ref": "#/$defs/point"},
            "path": {"type": "array", "items": {"$ref": "#/$defs/point"}, "maxItems": 3},
            "label": {"anyOf": [{"type": "string", "maxLength": 4}, {"type": "integer"}]},
            "meta": {
                "type": "object",
                "properties": {"depth": {"type": "integer"}, "note": {"type": ["string", "null"]}},
                "required": ["depth"],
                "additionalProperties": False,
            },
        },
        "required": ["start", "label", "meta"],
        "additionalProperties": False,
    },
    "top_level_array": {"type": "array", "items": {"type": "integer"}, "maxItems": 4},
    "open_object": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_outputs_validate(factory, name):
    schema = SCHEMAS[name]
    for seed in SEEDS:
        tokens = simulate(factory, factory({"json_schema": schema}), seed)
        text = text_of(factory, tokens)
        jsonschema.validate(json.loads(text), schema)


def test_json_object_outputs_are_objects(factory):
    for seed in SEEDS:
        value = json.loads(text_of(factory, simulate(factory, factory({"json_object": True}), seed)))
        assert isinstance(value, dict)


def test_json_on_the_demo_tokenizer(demo_factory):
    schema = SCHEMAS["nested_refs_anyof"]
    for seed in range(6):
        tokens = simulate(demo_factory, demo_factory({"json_schema": schema, "strict": True}), seed)
        jsonschema.validate(json.loads(text_of(demo_factory, tokens)), schema)


# ----------------------------------------------------------------------------- regex, choice, grammars
def test_regex_choice_and_grammars(factory):
    regex = r"[a-z]{2,5}-[0-9]{1,4}( (ok|no))?"
    lark = 'start: "(" num ("," num)* ")"\nnum: /[0-9]{1,3}/'
    gbnf = 'root ::= "v" [0-9] ("." [0-9])?'
    for seed in SEEDS:
        assert re.fullmatch(regex, text_of(factory, simulate(factory, factory({"regex": regex}), seed)))
        assert text_of(factory, simulate(factory, factory({"choice": ["yes", "no", "maybe"]}), seed)) in (
            "yes",
            "no",
            "maybe",
        )
        assert re.fullmatch(r"\([0-9]{1,3}(,[0-9]{1,3})*\)", text_of(factory, simulate(factory, factory({"lark": lark}), seed)))
        assert re.fullmatch(r"v[0-9](\.[0-9])?", text_of(factory, simulate(factory, factory({"ebnf": gbnf}), seed)))


def test_only_eos_after_the_grammar_is_complete(factory):
    tok = factory.tokenizer
    c = factory({"choice": ["yes", "yesterday"]})
    for t in tok.encode("yes", add_special_tokens=False):
        c.accept(t)
    mask = np.zeros(factory.words, np.int32)
    c.fill_allowed(mask)
    assert set(factory.eos_token_ids) < set(allowed_ids(mask).tolist())  # may end or go on
    assert not c.is_finished()
    for t in tok.encode("terday", add_special_tokens=False):
        c.accept(t)
    c.fill_allowed(mask)
    assert allowed_ids(mask).tolist() == list(factory.eos_token_ids)  # complete: EOS only
    assert c.is_finished()


def test_masks_fit_any_bitmask_size_and_constraints_are_independent(factory):
    spec = {"regex": "ab+"}
    a, b = factory(spec), factory(spec)
    exact = np.zeros(factory.words, np.int32)
    a.fill_allowed(exact)
    wide = np.full(factory.words + 3, -1, np.int32)
    a.fill_allowed(wide)
    assert (wide[: factory.words] == exact).all() and not wide[factory.words :].any()
    narrow = np.zeros(2, np.int32)
    a.fill_allowed(narrow)
    assert (narrow == exact[:2]).all()
    a.accept(factory.tokenizer.encode("a", add_special_tokens=False)[0])
    after = np.zeros(factory.words, np.int32)
    a.fill_allowed(after)
    fresh = np.zeros(factory.words, np.int32)
    b.fill_allowed(fresh)
    assert (fresh == exact).all() and not (after == exact).all()
    assert len([k for k in factory._cache if "ab+" in k]) == 1  # compiled once, copied per request


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize(
    "spec,key,match",
    [
        ({"json_schema": {"type": "strin"}}, "json_schema", "strin"),
        ({"json_schema": {"type": "string", "format": "bogus"}, "strict": True}, "json_schema", "bogus"),
        ({"regex": "a["}, "regex", "unclosed"),
        ({"lark": "start: missing_rule"}, "lark", "missing_rule"),
        ({"ebnf": 'root ::= "a" bad'}, "ebnf", "bad"),
        ({"tool_call": {"tools": [sf.WEATHER_TOOL], "name": "nope"}}, "tool_call", "nope"),
        ({"tool_call": {"tools": [{"function": {"parameters": {}}}], "required": True}}, "tool_call", "name"),
        ({"tool_call": {"tools": []}}, "tool_call", "tools"),
        ({"regex": 5}, "regex", "string"),
        ({"json_object": False}, "json_object", "true"),
        ({"choice": []}, "choice", "non-empty"),
        ({"regex": "a", "thinking": "sometimes"}, "thinking", "thinking"),
        ({"regexp": "a"}, "regexp", "unknown"),
        ({"regex": "a", "choice": ["b"]}, None, "exactly one"),
        ({}, None, "exactly one"),
    ],
)
def test_bad_specs_raise_with_the_key(factory, spec, key, match):
    with pytest.raises(GrammarError, match=match) as e:
        factory.validate(spec)
    assert e.value.key == key
    assert isinstance(e.value, ValueError)


def test_not_strict_ignores_unknown_formats(factory):
    factory.validate({"json_schema": {"type": "string", "format": "bogus"}})


# ----------------------------------------------------------------------------- tool calls
SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string", "minLength": 2, "maxLength": 12},
                "note": {"type": "string"},
                "mode": {"const": "fast"},
                "limit": {"type": "integer", "minimum": 1, "maximum": 10},
                "score": {"type": "number"},
                "exact": {"type": "boolean"},
                "unit": {"type": "string", "enum": ["c", "f"]},
                "filters": {
                    "type": "object",
                    "properties": {"lang": {"enum": ["en", "fr"]}, "year": {"type": "integer"}},
                    "required": ["lang"],
                    "additionalProperties": False,
                },
                "tags": {"type": "array", "items": {"type": "string", "maxLength": 6}, "maxItems": 3},
            },
            "required": ["query", "exact"],
        },
    },
}
NOW_TOOL = {"type": "function", "function": {"name": "now"}}  # no parameters at all
TOOLS = [sf.WEATHER_TOOL, SEARCH_TOOL, NOW_TOOL]


def _check_calls(text, tools, name=None, parallel=True):
    parser = ToolCallParser(tools)
    content, calls = parser.feed(text)
    tail, more = parser.finish()
    assert content + tail == "" and calls and not more, text
    assert parallel or len(calls) == 1
    schemas = {t["function"]["name"]: t["function"].get("parameters") or {"type": "object"} for t in tools}
    for call in calls:
        assert call.name == name if name else call.name in schemas
        jsonschema.validate(call.arguments, schemas[call.name])
        assert json.loads(call.arguments_json()) == call.arguments
    return calls


def test_tool_call_required(factory):
    names = set()
    for seed in SEEDS:
        tokens = simulate(factory, factory({"tool_call": {"tools": TOOLS, "required": True}}), seed)
        names |= {c.name for c in _check_calls(text_of(factory, tokens), TOOLS)}
    assert names == {"get_weather", "search", "now"}


def test_tool_call_named_and_single(factory, demo_factory):
    for f in (factory, demo_factory):
        for seed in SEEDS:
            c = f({"tool_call": {"tools": TOOLS, "name": "search"}})
            _check_calls(text_of(f, simulate(f, c, seed)), TOOLS, name="search", parallel=False)
            c = f({"tool_call": {"tools": TOOLS, "required": True, "parallel": False}})
            _check_calls(text_of(f, simulate(f, c, seed)), TOOLS, parallel=False)


def test_tool_call_markup_is_the_templates(demo_factory):
    """Calls as the demo model's chat template writes them (history messages) are sentences of the grammar,
    token for token."""
    from mimo_jax.text import ChatTemplate
    from mimo_jax.weights.demo import demo_model_dir

    calls = [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}},
        {
            "type": "function",
            "function": {
                "name": "search",
                "arguments": {"query": "a <b>\nc", "exact": True, "filters": {"lang": "en"}, "tags": ["x", "y"]},
            },
        },
    ]
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": calls}]
    text = ChatTemplate.from_dir(demo_model_dir()).render(messages, TOOLS, add_generation_prompt=False)
    answer = text[text.rindex("<|im_start|>assistant") :]  # (the system prompt shows an example call)
    markup = answer[answer.index("<tool_call>") : answer.rindex("</tool_call>") + len("</tool_call>")]
    c = demo_factory({"tool_call": {"tools": TOOLS, "required": True}})
    mask = np.zeros(demo_factory.words, np.int32)
    for t in demo_factory.tokenizer.encode(markup, add_special_tokens=False):
        c.fill_allowed(mask)
        assert t in allowed_ids(mask)
        c.accept(t)
    assert c.is_accepting()
    _check_calls(markup, TOOLS)
    assert '"<parameter=city>" param_text' in tool_call_lark({"tools": [sf.WEATHER_TOOL], "required": True})


# ----------------------------------------------------------------------------- thinking
def test_thinking_inside_then_the_grammar(factory):
    schema = SCHEMAS["required_fields"]
    think_end = factory.tokenizer.token_id("</think>")
    for seed in SEEDS:
        c = factory({"json_schema": schema, "thinking": "inside"})
        tokens = simulate(factory, c, seed, think_end_p=0.05)
        assert think_end in tokens
        parser = ReasoningParser(in_reasoning=True)
        text = factory.tokenizer.decode(tokens, skip_special_tokens=False).removesuffix("<|im_end|>")
        reasoning, content = parser.feed(text)
        more_reasoning, more_content = parser.finish()
        jsonschema.validate(json.loads(content + more_content), schema)


def test_thinking_optional_opening(factory):
    tok = factory.tokenizer
    think_start, think_end = tok.token_id("<think>"), tok.token_id("</think>")
    brace = tok.encode("{", add_special_tokens=False)[0]
    spec = {"json_object": True, "thinking": "optional"}
    mask = np.zeros(factory.words, np.int32)
    c = factory(spec)
    c.fill_allowed(mask)
    assert set(allowed_ids(mask).tolist()) == {think_start, brace}
    c.accept(brace)  # no thinking: the grammar from the first token on
    c.fill_allowed(mask)
    assert think_start not in allowed_ids(mask) and c.state == "grammar"
    c = factory(spec)
    c.accept(think_start)
    c.fill_allowed(mask)
    assert len(allowed_ids(mask)) == 32 * factory.words  # thinking: anything
    for t in tok.encode("hmm {", add_special_tokens=False) + [think_end]:
        c.accept(t)
    newline = tok.encode("\n", add_special_tokens=False)[0]
    for _ in range(10):  # a few whitespace tokens may follow `</think>`, then the grammar
        c.fill_allowed(mask)
        if newline not in allowed_ids(mask):
            break
        c.accept(newline)
    assert set(allowed_ids(mask).tolist()) == {brace}
    c = factory(spec)
    c.accept(think_start)
    c.accept(factory.eos_token_ids[0])  # EOS while thinking ends the output
    assert c.is_finished()


def test_thinking_end_spelled_in_pieces(factory):
    tok = factory.tokenizer
    c = factory({"regex": "ok", "thinking": "inside"})
    pieces = [tok.encode(p, add_special_tokens=False) for p in ("a</", "think", ">")]
    for t in [t for p in pieces for t in p]:
        assert c.state == "thinking"
        c.accept(t)
    assert c.state == "after"


def test_json_whitespace_compact_pretty_or_the_schemas(factory):
    tok = factory.tokenizer
    value = {"a": [1, {"b": "c"}], "d": None}
    mask = np.zeros(factory.words, np.int32)
    newline, space = (tok.encode(w, add_special_tokens=False)[0] for w in ("\n", " "))
    brace = tok.encode("{", add_special_tokens=False)[0]

    def fits(f, spec, text):
        c = f(spec)
        ids = f.lltokenizer.tokenize_str(text)
        return c.matcher.try_consume_tokens(ids) == len(ids) and c.is_finished()

    # Default: compact, a single optional space between tokens (json.dumps' own separators fit).
    assert fits(factory, {"json_object": True}, json.dumps(value))
    assert fits(factory, {"json_object": True}, json.dumps(value, separators=(",", ":")))
    assert not fits(factory, {"json_object": True}, json.dumps(value, indent=2))
    c = factory({"json_object": True})
    c.accept(brace)
    c.fill_allowed(mask)
    assert space in allowed_ids(mask) and newline not in allowed_ids(mask)
    c.accept(space)
    c.fill_allowed(mask)
    assert space not in allowed_ids(mask)
    # Pretty: one line break and indentation, never blank lines.
    pretty = GrammarFactory(tok, MODEL_VOCAB, json_whitespace=PRETTY_JSON_WHITESPACE)
    assert fits(pretty, {"json_object": True}, json.dumps(value, indent=2))
    assert fits(pretty, {"json_object": True}, json.dumps(value, indent=4))
    c = pretty({"json_object": True})
    c.accept(brace)
    c.accept(newline)
    c.fill_allowed(mask)
    assert newline not in allowed_ids(mask)
    # The schema's own whitespace options win.
    schema = {"type": "object", "x-guidance": {"whitespace_flexible": False}}
    for f in (factory, pretty):
        c = f({"json_schema": schema})
        c.accept(brace)
        c.fill_allowed(mask)
        assert newline not in allowed_ids(mask) and space not in allowed_ids(mask)
