"""Server pieces without a model: chat template rendering against transformers, the incremental
detokenizer with stop strings against whole-text decoding, the reasoning and tool-call parsers
streamed in every split against their whole-text result, the Prometheus exposition (vLLM's names), and the
scheduler's round plans (timeouts, multi-host followers) over a recording engine, and requests with
structured output (response_format, SGLang / vLLM grammar fields, forced tool calls) turned into
constraint specs or 400s naming the parameter.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types

import numpy as np
import pytest

from mimo_jax.engine.driver import BroadcastChannel, Driver, RoundPlan
from mimo_jax.grammar import GrammarFactory
from mimo_jax.serve import protocol as P
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.parsers import ReasoningParser, TextStream, ToolCallParser
from mimo_jax.serve.protocol import APIError
from mimo_jax.serve.scheduler import Failure, Scheduler, Sequence, Tokens
from mimo_jax.text import ChatTemplate, Tokenizer
from tests import fixtures as sf


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tok")
    sf.write_tokenizer(str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def tokenizer(tok_dir):
    return Tokenizer(tok_dir)


# ---------------------------------------------------------------------------------- chat template
CONVERSATIONS = [
    [{"role": "user", "content": "Hi there"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Caf\u00e9 <b>&</b> \u65e5\u672c"}],
    [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "Checking.",
            "reasoning_content": "Needs a tool.",
            "tool_calls": [
                {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}}
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny.", "tool_calls": None},
        {"role": "user", "content": "Thanks"},
    ],
]

# Exercises what transformers' sandbox adds: special-token variables, namespace, loop controls,
# tojson without HTML escaping, raise_exception, and `{% generation %}` blocks.
FEATURE_TEMPLATE = (
    "{{ bos_token or '' }}{% set ns = namespace(n=0) %}"
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}{% set ns.n = ns.n + 1 %}"
    "{% generation %}[{{ ns.n }}:{{ m.role }}] {{ m.content | tojson }}{% endgeneration %}\n"
    "{% if m.role not in ['user', 'assistant', 'tool'] %}{{ raise_exception('bad role') }}{% endif %}"
    "{% endfor %}{% if tools %}{{ tools | tojson(indent=2) }}{% endif %}"
    "{% if add_generation_prompt %}{{ eos_token }}>>{% endif %}"
)


def _hf_tokenizer(directory, template):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(directory)
    tok.chat_template = template
    return tok


@pytest.mark.parametrize("template_name", ["mimo", "features"])
def test_chat_template_renders_as_transformers(tok_dir, tokenizer, template_name):
    source = sf.CHAT_TEMPLATE if template_name == "mimo" else FEATURE_TEMPLATE
    hf = _hf_tokenizer(tok_dir, source)
    ours = ChatTemplate({"default": source}, ChatTemplate.from_dir(tok_dir).special_tokens)
    for messages in CONVERSATIONS:
        for tools in (None, [sf.WEATHER_TOOL]):
            for kwargs in ({}, {"enable_thinking": False}, {"enable_thinking": True}):
                for gen in (True, False):
                    want = hf.apply_chat_template(
                        messages, tools=tools, add_generation_prompt=gen, tokenize=False, **kwargs
                    )
                    got = ours.render(messages, tools, add_generation_prompt=gen, **kwargs)
                    assert got == want
                    ids = hf.apply_chat_template(messages, tools=tools, add_generation_prompt=gen, **kwargs)
                    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
                    assert tokenizer.encode(got, add_special_tokens=False) == list(ids)


def test_chat_template_lookup_and_errors(tmp_path, tok_dir):
    # Template files take priority over tokenizer_config.json; a named set picks `tool_use` when tools come.
    config = json.load(open(f"{tok_dir}/tokenizer_config.json"))
    config["chat_template"] = [{"name": "default", "template": "D"}, {"name": "tool_use", "template": "T"}]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = ChatTemplate.from_dir(tmp_path)
    msgs = [{"role": "user", "content": "x"}]
    assert t.render(msgs) == "D" and t.render(msgs, tools=[sf.WEATHER_TOOL]) == "T"
    (tmp_path / "chat_template.jinja").write_text("J{{ messages | length }}")
    assert ChatTemplate.from_dir(tmp_path).render(msgs) == "J1"
    bad = ChatTemplate({"default": "{{ raise_exception('no system role') }}"}, {})
    with pytest.raises(ValueError, match="no system role"):
        bad.render(msgs)
    sandboxed = ChatTemplate({"default": "{{ messages.__class__.__mro__ }}"}, {})
    with pytest.raises(ValueError):
        sandboxed.render(msgs)
    assert ChatTemplate.from_dir(tmp_path / "missing") is None


def test_chat_template_refuses_deep_nesting_before_recursing():
    t = ChatTemplate({"default": "{{ messages | tojson }}"}, {})
    deep = {}
    for _ in range(5000):  # far past Python's recursion limit
        deep = {"a": deep}
    call = {"type": "function", "function": {"name": "f", "arguments": deep}}
    for messages, kwargs, what in [
        ([{"role": "assistant", "content": "", "tool_calls": [call]}], {}, "messages"),
        ([{"role": "user", "content": "x"}], {"extra": deep}, "chat_template_kwargs"),
    ]:
        with pytest.raises(ValueError, match=f"{what} nest deeper than"):
            t.render(messages, **kwargs)
    with pytest.raises(ValueError, match="tools nest deeper than"):
        t.render(
            [{"role": "user", "content": "x"}], [{"type": "function", "function": {"name": "f", "parameters": deep}}]
        )
    shallow = {"a": {"b": [1, {"c": 2}]}}
    assert json.loads(t.render([{"role": "user", "content": "x", "meta": shallow}]))[0]["meta"] == shallow


RUNAWAY_TEMPLATES = [
    # (template, words of the error)
    ("{{ range(10**9) | length }}", "range of 1000000000 numbers"),
    ("{% for i in range(10**9) %}{% endfor %}", "range of 1000000000 numbers"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "RecursionError"),
    ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ("{{ ('x' * 10**8) | length }}", "100000000 items"),  # one allocation of 100 MB
    ("{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}", "characters"),  # 100 MB of output
    ("{{ (7 ** (10**6)) > 0 }}", "bits"),  # a 2.8-million-bit integer (jinja's ** is left-associative)
    # 9 million loop steps with no output, call or attribute access in the inner loop: only time bounds it
    ("{% set s = messages[0].content %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "longer than"),
]


@pytest.mark.parametrize("source,words", RUNAWAY_TEMPLATES)
def test_chat_template_failures_and_runaways_are_template_errors(source, words):
    from mimo_jax.text import ChatTemplateError

    template = ChatTemplate({"default": source}, {})
    template.max_seconds = 0.2
    start = time.monotonic()
    with pytest.raises(ChatTemplateError) as error:
        template.render([{"role": "user", "content": "ab" * 1500}])
    assert time.monotonic() - start < 2.0
    assert "chat template ('default')" in str(error.value) and words in str(error.value), str(error.value)
    # Within the bounds, the same constructs render.
    small = ChatTemplate({"default": "{{ range(3) | list }}{{ 'ab' * 2 }}{{ 2 ** 10 }}{{ 7 / 2 }}"}, {})
    assert small.render([{"role": "user", "content": "x"}]) == "[0, 1, 2]abab10243.5"


def test_chat_template_errors_are_400_naming_the_template(tokenizer):
    from starlette.testclient import TestClient

    from mimo_jax.serve.app import create_app

    server, engine, _ = _in_process_server(tokenizer, ChatTemplate({"default": "{{ 1 / 0 }}"}, {}))
    with TestClient(create_app(server), raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages" and "chat template ('default')" in error["message"]
    assert "ZeroDivisionError" in error["message"] and not engine.calls


# ---------------------------------------------------------------------------------- detokenizer
def _random_ids(tokenizer, rng, n):
    return [int(i) for i in rng.integers(3, tokenizer.vocab_size, size=n)]


def test_text_stream_equals_full_decode(tokenizer):
    rng = np.random.default_rng(0)
    for _ in range(50):
        ids = _random_ids(tokenizer, rng, int(rng.integers(1, 40)))
        stream = TextStream(tokenizer)
        text = "".join(stream.add(t) for t in ids) + stream.finish()
        assert text == tokenizer.decode(ids) == stream.text
    # Split characters: UTF-8 bytes spread over tokens come out whole.
    ids = tokenizer.encode("\u65e5\u672c\u8a9e \U0001f600 caf\u00e9", add_special_tokens=False)
    stream = TextStream(tokenizer)
    pieces = [stream.add(t) for t in ids]
    assert "".join(pieces) + stream.finish() == "\u65e5\u672c\u8a9e \U0001f600 caf\u00e9"
    assert all("\ufffd" not in p for p in pieces)


def test_text_stream_cuts_at_stop_strings(tokenizer):
    rng = np.random.default_rng(1)
    for _ in range(60):
        ids = tokenizer.encode("def fibonacci(n): return the quick brown fox", add_special_tokens=False)
        ids = ids + _random_ids(tokenizer, rng, 5)
        full = tokenizer.decode(ids)
        a = int(rng.integers(0, len(full) - 3))
        stop = full[a : a + int(rng.integers(1, 6))]
        if "\ufffd" in stop:
            continue
        stream = TextStream(tokenizer, ["zzz-never", stop])
        text = ""
        for t in ids:
            text += stream.add(t)
            if stream.stopped:
                break
        else:
            text += stream.finish()
        first = full.index(stop)
        assert text == full[:first] and stream.stopped
        # The kept tokens end with the one that completed the stop string.
        kept = stream.token_ids
        assert stop in tokenizer.decode(kept) and stop not in tokenizer.decode(kept[:-1])


# ---------------------------------------------------------------------------------- parsers
def _splits(text: str, rng, count: int = 30):
    yield [text]
    yield list(text)  # one character at a time
    for _ in range(count):
        cuts = sorted(set(rng.integers(0, len(text) + 1, size=int(rng.integers(1, 6)))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _run_reasoning(pieces, in_reasoning):
    parser = ReasoningParser(in_reasoning)
    reasoning, content = "", ""
    for p in pieces:
        r, c = parser.feed(p)
        reasoning, content = reasoning + r, content + c
    r, c = parser.finish()
    return reasoning + r, content + c, parser.saw_reasoning


@pytest.mark.parametrize(
    "text,in_reasoning,want",
    [
        ("I think so.</think>\n\nThe answer is 4.", True, ("I think so.", "The answer is 4.", True)),
        ("\n<think>plan</think>Answer", False, ("plan", "Answer", True)),
        ("No reasoning here <think>x</think>", False, ("", "No reasoning here <think>x</think>", False)),
        ("still thinking </thi", True, ("still thinking </thi", "", True)),
        ("<thi", False, ("", "<thi", False)),
        ("", True, ("", "", True)),
        ("a < b </think>   ", True, ("a < b", "", True)),
        ("<think>\n  step 1\n\n step 2 \n</think>\n\nDone.", False, ("step 1\n\n step 2", "Done.", True)),
        ("\n thinking cut short  \n", True, ("thinking cut short", "", True)),
    ],
)
def test_reasoning_parser_streamed_equals_whole(text, in_reasoning, want):
    rng = np.random.default_rng(2)
    for pieces in _splits(text, rng):
        assert _run_reasoning(pieces, in_reasoning) == want


def _run_tools(pieces, tools):
    parser = ToolCallParser(tools)
    content, calls = "", []
    for p in pieces:
        c, k = parser.feed(p)
        content, calls = content + c, calls + k
    c, k = parser.finish()
    return content + c, [(x.name, x.arguments) for x in calls + k]


SEARCH_TOOL = {
    "type": "function",
    "function": {
        "name": "search",
        "parameters": {
            "type": "object",
            "properties": {
                "query": {"type": "string"},
                "limit": {"type": "integer"},
                "score": {"type": "number"},
                "exact": {"type": "boolean"},
                "filters": {"type": "object"},
                "tags": {"type": "array"},
            },
        },
    },
}


@pytest.mark.parametrize(
    "text,want",
    [
        ("Plain answer, no calls.", ("Plain answer, no calls.", [])),
        (
            "Let me check.<tool_call>" + sf.CALL_BODY + "</tool_call>",
            ("Let me check.", [("get_weather", {"city": "Paris", "days": 3})]),
        ),
        (
            "<tool_call>\n<function=search>\n<parameter=query>a <b> & c\nline 2</parameter>\n<parameter=limit>5"
            "</parameter>\n<parameter=score>0.5</parameter>\n<parameter=exact>True</parameter>\n<parameter=filters>"
            '{"lang": "en"}</parameter>\n<parameter=tags>["x", 1]</parameter>\n</function>\n</tool_call>\n'
            "<tool_call>\n<function=get_weather>\n<parameter=city>null</parameter>\n</function>\n</tool_call>",
            (
                "",
                [
                    (
                        "search",
                        {
                            "query": "a <b> & c\nline 2",
                            "limit": 5,
                            "score": 0.5,
                            "exact": True,
                            "filters": {"lang": "en"},
                            "tags": ["x", 1],
                        },
                    ),
                    ("get_weather", {"city": None}),
                ],
            ),
        ),
        (  # an unknown function stays text; a call cut short is text too
            "A<tool_call><function=rm_rf>\n</function></tool_call>B<tool_call><function=search>",
            ("A<tool_call><function=rm_rf>\n</function></tool_call>B<tool_call><function=search>", []),
        ),
        ("x <tool_ca", ("x <tool_ca", [])),
    ],
)
def test_tool_call_parser_streamed_equals_whole(text, want):
    rng = np.random.default_rng(3)
    tools = [sf.WEATHER_TOOL, SEARCH_TOOL]
    for pieces in _splits(text, rng):
        assert _run_tools(pieces, tools) == want


def test_tool_call_parser_takes_boolean_property_schemas():
    """JSON Schema allows `true`/`false` as a property's schema (the server accepts them): no type, text stays text."""
    tool = {"type": "function", "function": {"name": "f", "parameters": {"properties": {"a": True, "b": False}}}}
    parser = ToolCallParser([tool])
    content, calls = parser.feed("<tool_call>\n<function=f>\n<parameter=a>1</parameter>\n</function>\n</tool_call>")
    assert content == "" and [(c.name, c.arguments) for c in calls] == [("f", {"a": "1"})]


# ---------------------------------------------------------------------------------- metrics
def _parsed(metrics: Metrics) -> dict:
    """Every family of the exposition, as prometheus_client's own parser reads it: name -> (type, samples), each
    sample's key its name and labels other than model_name, e.g. 'mimo:request_success_total{finished_reason=stop}'."""
    from prometheus_client.parser import text_string_to_metric_families

    body, content_type = metrics.render()
    assert content_type.startswith("text/plain; version=0.0.4")
    out = {}
    for family in text_string_to_metric_families(body.decode()):
        samples = {}
        for sample in family.samples:
            assert sample.labels.pop("model_name") == metrics.model_name, sample
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            samples[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
        out[family.name] = (family.type, samples)
    return out


def test_metrics_exposition_has_vllm_names_and_values():
    m = Metrics("tiny", max_batch=4, max_context=100, speculative_steps=3)
    m.set_batch(running=2, waiting=3, kv_tokens_used=50)
    m.on_prompt(7)
    m.on_first_token(0.03)
    for _ in range(5):
        m.on_inter_token(0.004, 4)
    m.on_tokens(21, now=1e12)
    m.on_finish("stop", now=11.5, arrival=10.0, admitted=10.5, first_token=11.0, prompt_tokens=7, generation_tokens=6)
    m.on_finish("length", now=20.2, arrival=20.0, admitted=20.0, first_token=20.1, prompt_tokens=3, generation_tokens=1)
    m.on_reject("queue_full")
    m.on_speculation([3, 1, 0, 2])  # 4 verifies of 3 drafts: 6 accepted
    m.on_speculation([3])
    families = _parsed(m)
    value = lambda family, sample: families[family][1][sample]
    assert (
        families["mimo:num_requests_running"][0] == "gauge"
        and value("mimo:num_requests_running", "mimo:num_requests_running") == 2
    )
    assert value("mimo:num_requests_waiting", "mimo:num_requests_waiting") == 3
    assert value("mimo:kv_cache_tokens_used", "mimo:kv_cache_tokens_used") == 50
    assert value("mimo:prompt_tokens", "mimo:prompt_tokens_total") == 7
    assert value("mimo:generation_tokens", "mimo:generation_tokens_total") == 21
    assert families["mimo:request_success"][1] == {
        "mimo:request_success_total{finished_reason=stop}": 1,
        "mimo:request_success_total{finished_reason=length}": 1,
    }
    itl = families["mimo:inter_token_latency_seconds"]
    assert itl[0] == "histogram"
    assert itl[1]["mimo:inter_token_latency_seconds_bucket{le=0.0025}"] == 0
    assert itl[1]["mimo:inter_token_latency_seconds_bucket{le=0.005}"] == 20
    assert itl[1]["mimo:inter_token_latency_seconds_count"] == 20
    ttft = families["mimo:time_to_first_token_seconds"][1]
    assert ttft["mimo:time_to_first_token_seconds_bucket{le=0.02}"] == 0
    assert ttft["mimo:time_to_first_token_seconds_bucket{le=0.04}"] == 1
    # the request histograms: (queue, prefill, decode, inference, e2e) = (0.5, 0.5, 0.5, 1.0, 1.5) and (0, .1, .1, .2, .2)
    for name, total in (("queue_time", 0.5), ("prefill_time", 0.6), ("decode_time", 0.6), ("inference_time", 1.2)):
        samples = families[f"mimo:request_{name}_seconds"][1]
        assert samples[f"mimo:request_{name}_seconds_count"] == 2
        assert samples[f"mimo:request_{name}_seconds_sum"] == pytest.approx(total)
    assert value("mimo:e2e_request_latency_seconds", "mimo:e2e_request_latency_seconds_sum") == pytest.approx(1.7)
    tpot = families["mimo:request_time_per_output_token_seconds"][1]  # one sequence has 2+ tokens: 0.5 s / 5
    assert tpot["mimo:request_time_per_output_token_seconds_count"] == 1
    assert tpot["mimo:request_time_per_output_token_seconds_sum"] == pytest.approx(0.1)
    prompt = families["mimo:request_prompt_tokens"][1]
    assert prompt["mimo:request_prompt_tokens_bucket{le=5.0}"] == 1 and prompt["mimo:request_prompt_tokens_sum"] == 10
    assert (
        "mimo:request_prompt_tokens_bucket{le=100.0}" in prompt
        and "mimo:request_prompt_tokens_bucket{le=200.0}" not in prompt
    )
    assert value("mimo:request_generation_tokens", "mimo:request_generation_tokens_sum") == 7
    assert value("mimo:request_rejected", "mimo:request_rejected_total{reason=queue_full}") == 1
    assert value("mimo:request_rejected", "mimo:request_rejected_total{reason=timeout}") == 0
    # speculation: vLLM's counters (5 drafts of 3 tokens, 9 accepted; by position: 4 at 0, 3 at 1, 2 at 2)
    assert value("mimo:spec_decode_num_drafts", "mimo:spec_decode_num_drafts_total") == 5
    assert value("mimo:spec_decode_num_draft_tokens", "mimo:spec_decode_num_draft_tokens_total") == 15
    assert value("mimo:spec_decode_num_accepted_tokens", "mimo:spec_decode_num_accepted_tokens_total") == 9
    assert families["mimo:spec_decode_num_accepted_tokens_per_pos"][1] == {
        f"mimo:spec_decode_num_accepted_tokens_per_pos_total{{position={j}}}": n for j, n in enumerate((4, 3, 2))
    }
    assert value("mimo:spec_decode_mean_accept_length", "mimo:spec_decode_mean_accept_length") == (9 + 5) / 5
    assert m.value("generation_tokens_total") == 21 and m.value("request_success_total", finished_reason="stop") == 1
    # OpenMetrics when a scraper asks for it
    body, content_type = m.render("application/openmetrics-text; version=1.0.0")
    assert content_type.startswith("application/openmetrics-text") and body.endswith(b"# EOF\n")


def test_each_server_has_its_own_metrics_and_counts_compilations_after_warmup():
    import jax
    import jax.numpy as jnp

    a, b = Metrics("a", 2, 64), Metrics("b", 2, 64)
    a.on_tokens(5, now=time.monotonic())
    assert a.value("generation_tokens_total") == 5 and b.value("generation_tokens_total") == 0
    x = jnp.arange(7.0)
    a.count_compilations()
    try:
        jax.jit(lambda x: x * 3 + 1)(x).block_until_ready()  # a program never compiled before
        assert a.value("xla_compilations_total") == 1 and a.value("xla_compile_seconds_total") > 0
    finally:
        a.stop_counting_compilations()
    jax.jit(lambda x: x * 5 - 2)(x).block_until_ready()  # not counted any more
    assert a.value("xla_compilations_total") == 1 and b.value("xla_compilations_total") == 0
    # a program loaded from the persistent compilation cache (tests/conftest.py keeps one per run) counts too:
    # after warm-up a load is a jit cache miss as well
    f = jax.jit(lambda x: x * 7 - 3)
    f(x).block_until_ready()
    jax.clear_caches()
    b.count_compilations()
    try:
        f(x).block_until_ready()
        assert b.value("xla_compilations_total") == 1
    finally:
        b.stop_counting_compilations()


# ---------------------------------------------------------------------------------- scheduler
@dataclasses.dataclass
class _Out:
    request_id: str
    token_ids: list
    logprobs: None = None
    top_logprobs: None = None
    finished: bool = False
    finish_reason: str | None = None
    accepted: list = dataclasses.field(default_factory=list)  # MTP: drafts accepted per target forward


class RecordingEngine:
    """Test double with the engine's host interface: each step emits one token per request (its slot number)
    until the request's max_new_tokens. Records every call, so two engines fed the same plans can be compared."""

    max_round_tokens, prefill_chunk, max_batch, max_context, buckets = 8, 16, 2, 64, (16,)
    max_top_logprobs = 0

    def __init__(self):
        self.calls, self.running = [], {}

    @property
    def free_slots(self):
        return self.max_batch - len(self.running)

    def has_work(self):
        return bool(self.running)

    def add(self, rid, prompt, options):
        self.calls.append(("add", rid, list(prompt), options.seed))
        self.running[rid] = [options.max_new_tokens, 0]

    def cancel(self, rid):
        self.calls.append(("cancel", rid))
        return self.running.pop(rid, None) is not None

    def step(self, max_tokens_per_round=None, prefill_tokens=None):
        self.calls.append(("step", max_tokens_per_round, prefill_tokens))
        outs = []
        for rid, budget in list(self.running.items()):
            budget[1] += 1
            done = budget[1] >= budget[0]
            outs.append(_Out(rid, [budget[1]], finished=done, finish_reason="length" if done else None))
            if done:
                del self.running[rid]
        return outs


def _options(max_new_tokens=3, seed=None):
    from mimo_jax.engine.sampling import SamplingOptions

    return SamplingOptions(max_new_tokens=max_new_tokens, seed=seed)


class _ListChannel(BroadcastChannel):
    """In-process stand-in for the broadcast: the bytes that would travel, in order."""

    def __init__(self):
        self.sent = []

    def send(self, data):
        self.sent.append(data)

    def receive(self):
        return self.sent.pop(0)


def test_scheduler_rounds_timeouts_and_multihost_followers():
    leader, channel = RecordingEngine(), _ListChannel()
    events = {}
    scheduler = Scheduler(
        leader,
        Metrics("t", 2, 64),
        dispatch=lambda batch: [deliver(ev) for deliver, ev in batch],
        max_waiting=2,
        round_tokens=4,
        channel=channel,
    )
    seqs = [
        Sequence(f"r{i}", [1, 2, i], _options(3), deliver=lambda ev, i=i: events.setdefault(i, []).append(ev))
        for i in range(3)
    ]
    scheduler.submit(seqs[:2])
    with pytest.raises(APIError) as full:
        scheduler.submit(seqs[2:])
    assert full.value.status == 429
    expired = Sequence("late", [5], _options(3), deliver=lambda ev: events.setdefault("late", []).append(ev))
    expired.deadline = expired.arrival - 1.0
    while not all(i in events and events[i][-1].finish_reason for i in range(2)):
        scheduler._round()
    scheduler.submit([seqs[2], expired])
    while not (2 in events and events[2][-1].finish_reason):
        scheduler._round()
    # Every sequence got its tokens in order and its finish; the expired one a 504 and never ran.
    for i in range(3):
        assert [t for ev in events[i] for t in ev.token_ids] == [1, 2, 3]
        assert all(isinstance(ev, Tokens) for ev in events[i]) and events[i][-1].finish_reason == "length"
    (failure,) = events["late"]
    assert isinstance(failure, Failure) and failure.error.status == 504
    assert not any(c[0] == "add" and c[1] == "late" for c in leader.calls)
    # Seeds were chosen by the leader and travel in the plan.
    assert all(c[3] is not None for c in leader.calls if c[0] == "add")
    # A follower applying the broadcast plans makes exactly the leader's engine calls.
    channel.sent.append(RoundPlan(stop=True).encode())
    follower = RecordingEngine()
    Driver(follower, channel).follow()
    assert follower.calls == leader.calls


def test_scheduler_reports_speculation_acceptance():
    class Speculating(RecordingEngine):
        speculative_steps = 3

        def step(self, max_tokens_per_round=None, prefill_tokens=None):
            outs = super().step(max_tokens_per_round, prefill_tokens)
            for out in outs:
                out.accepted = [3, 1]  # two verifies: 3 + 1 drafts accepted -> 6 tokens in 2 forwards
            return outs

    metrics = Metrics("t", 2, 64, speculative_steps=3)
    scheduler = Scheduler(Speculating(), metrics, dispatch=lambda b: [d(e) for d, e in b], round_tokens=2)
    events = []
    scheduler.submit([Sequence("a", [1], _options(2), deliver=events.append)])
    scheduler._round()
    scheduler._round()
    counts = [metrics.value(f"spec_decode_num_{name}_total") for name in ("draft_tokens", "accepted_tokens", "drafts")]
    assert counts == [12, 8, 4]
    assert metrics.value("spec_decode_mean_accept_length") == 3.0
    assert [metrics.value("spec_decode_num_accepted_tokens_per_pos_total", position=str(j)) for j in range(3)] == [
        4,
        2,
        2,
    ]
    assert [ev.accepted for ev in events] == [[3, 1], [3, 1]]  # each sequence's own acceptance, for its response


def test_scheduler_counts_cancelled_waiting_requests():
    engine, metrics = RecordingEngine(), Metrics("t", 2, 64)
    scheduler = Scheduler(engine, metrics, dispatch=lambda b: None, round_tokens=2)
    scheduler.submit([Sequence(f"r{i}", [1], _options(100), deliver=lambda ev: None) for i in range(3)])
    scheduler._round()
    assert scheduler.counts() == (2, 1)  # two slots: r2 waits
    scheduler.cancel(["r2", "r0"])
    scheduler._round()
    assert scheduler.counts() == (1, 0) and metrics.value("request_cancelled_total") == 2
    assert (metrics.value("num_requests_running"), metrics.value("num_requests_waiting")) == (1, 0)
    assert not any(c[0] == "add" and c[1] == "r2" for c in engine.calls)


class _SlowEngine(RecordingEngine):
    """A RecordingEngine that takes its time per step, with a vocabulary: enough for the whole app to run on it."""

    def __init__(self, vocab_size):
        super().__init__()
        self.config = types.SimpleNamespace(vocab_size=vocab_size)

    def step(self, max_tokens_per_round=None, prefill_tokens=None):
        time.sleep(0.005)
        return super().step(max_tokens_per_round, prefill_tokens)


def _wait_idle(scheduler, seconds):
    deadline = time.monotonic() + seconds
    while scheduler.counts() != (0, 0):
        assert time.monotonic() < deadline, f"still busy: {scheduler.counts()} (running, waiting)"
        time.sleep(0.01)


def _in_process_server(tokenizer, template):
    """A `Server` over a slow recording engine, for the whole app to run on (starlette's TestClient)."""
    from mimo_jax.serve.server import Limits, Server

    engine = _SlowEngine(tokenizer.vocab_size)
    metrics = Metrics("tiny", engine.max_batch, 4096)
    scheduler = Scheduler(engine, metrics, dispatch=lambda batch: None, round_tokens=1)
    server = Server(
        scheduler, tokenizer, template, metrics, model_name="tiny",
        eos_token_ids=tokenizer.eos_token_ids, limits=Limits(4096, 5, 8, None),
    )  # fmt: skip
    return server, engine, metrics


def test_a_failure_after_admission_cancels_the_sequence_and_ends_the_stream(tok_dir, tokenizer, monkeypatch):
    """The output parser raising on a running sequence: the sequence leaves the engine at once; non-streamed the
    client gets a 500 error body, streamed an error event then `data: [DONE]`."""
    from starlette.testclient import TestClient

    from mimo_jax.serve.app import create_app

    def broken(self, text):
        raise RuntimeError("parser bug")

    monkeypatch.setattr(ToolCallParser, "feed", broken)
    server, engine, metrics = _in_process_server(tokenizer, ChatTemplate.from_dir(tok_dir))
    scheduler = server.scheduler
    body = {"messages": [{"role": "user", "content": "hi"}], "tools": [sf.WEATHER_TOOL], "max_tokens": 2000}
    with TestClient(create_app(server), raise_server_exceptions=False) as client:
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 500, r.text
        error = r.json()["error"]
        assert error["type"] == "server_error" and "parser bug" in error["message"]
        _wait_idle(scheduler, 5)  # 2000 steps of 5 ms if nobody cancelled it
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
            assert r.status_code == 200
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]", events
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "parser bug" in error["message"]
        _wait_idle(scheduler, 5)
    added = [c[1] for c in engine.calls if c[0] == "add"]
    assert len(added) == 2 and [c for c in engine.calls if c[0] == "cancel"] == [("cancel", rid) for rid in added]
    assert sum(c[0] == "step" for c in engine.calls) < 500
    assert metrics.value("request_cancelled_total") == 2


def test_scheduler_cancel_frees_the_slot_before_the_next_step():
    engine = RecordingEngine()
    events = []
    scheduler = Scheduler(engine, Metrics("t", 2, 64), dispatch=lambda b: [d(e) for d, e in b], round_tokens=2)
    scheduler.submit([Sequence("a", [1], _options(100), deliver=events.append)])
    scheduler._round()
    assert "a" in engine.running
    scheduler.cancel(["a"])
    scheduler.submit([Sequence("b", [1], _options(1), deliver=events.append)])
    scheduler._round()
    i = engine.calls.index(("cancel", "a"))
    assert engine.calls[i + 1][:2] == ("add", "b") and engine.calls[i + 2][0] == "step"
    assert "a" not in engine.running


# ---------------------------------------------------------------------------------- structured output requests
class _NoEngineScheduler:
    """What request checks read from the scheduler: the model's vocabulary size and the waiting-queue bound."""

    max_waiting = 256

    def __init__(self, vocab_size, speculative_steps=0):
        config = type("C", (), {"vocab_size": vocab_size})()
        self.engine = type("E", (), {"config": config, "speculative_steps": speculative_steps})()


def _server(tok_dir, tokenizer, grammar=True, speculative_steps=0):
    from mimo_jax.serve.server import Limits, Server

    return Server(
        _NoEngineScheduler(tokenizer.vocab_size, speculative_steps),
        tokenizer,
        ChatTemplate.from_dir(tok_dir),
        Metrics("tiny", 4, 512),
        model_name="tiny",
        eos_token_ids=tokenizer.eos_token_ids,
        limits=Limits(max_context=512, max_top_logprobs=20, max_stop_ids=9, request_timeout=None),
        grammar=GrammarFactory(tokenizer, tokenizer.vocab_size) if grammar else None,
    )


@pytest.fixture(scope="module")
def api(tok_dir, tokenizer):
    return _server(tok_dir, tokenizer)


def _constraints(server, body, route="chat"):
    """The constraint specs of a request's sequences (parsed and checked as the routes do)."""
    from mimo_jax.serve.requests import chat_job, completion_job

    if route == "chat":
        req = P.parse_request(P.ChatCompletionRequest, json.dumps({"messages": QUESTION, **body}).encode())
        job, _ = chat_job(server, req)
    else:
        req = P.parse_request(P.CompletionRequest, json.dumps({"prompt": "def fib", **body}).encode())
        job, _ = completion_job(server, req)
    return [seq.options.constraint for seq in job.sequences]


QUESTION = [{"role": "user", "content": "Weather in Paris?"}]
NO_THINKING = {"chat_template_kwargs": {"enable_thinking": False}}
SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
NAMED = {"type": "function", "function": {"name": "get_weather"}}
STRUCTURED = [
    # (request fields, the spec the engine gets); the test template opens `<think>` unless thinking is off
    ({"response_format": {"type": "text"}}, None),
    ({"response_format": {"type": "json_object"}}, {"json_object": True, "thinking": "inside"}),
    ({"response_format": {"type": "json_object"}, **NO_THINKING}, {"json_object": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA, "strict": True}},
      **NO_THINKING}, {"json_schema": SCHEMA, "strict": True}),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": SCHEMA}}, **NO_THINKING},
     {"json_schema": SCHEMA, "strict": False}),
    ({"regex": "[0-9]+", **NO_THINKING}, {"regex": "[0-9]+"}),
    ({"ebnf": 'root ::= "a" | "b"', **NO_THINKING}, {"ebnf": 'root ::= "a" | "b"'}),
    ({"structured_outputs": {"json": SCHEMA}, **NO_THINKING}, {"json_schema": SCHEMA}),
    ({"structured_outputs": {"json": json.dumps(SCHEMA)}, **NO_THINKING}, {"json_schema": SCHEMA}),
    ({"structured_outputs": {"regex": "a+"}, **NO_THINKING}, {"regex": "a+"}),
    ({"structured_outputs": {"choice": ["a", "b"]}, **NO_THINKING}, {"choice": ["a", "b"]}),
    ({"structured_outputs": {"grammar": "start: /x+/"}, **NO_THINKING}, {"ebnf": "start: /x+/"}),
    ({"structured_outputs": {"json_object": True}, **NO_THINKING}, {"json_object": True}),
    ({"guided_json": json.dumps(SCHEMA), **NO_THINKING}, {"json_schema": SCHEMA}),
    ({"guided_regex": "b+", **NO_THINKING}, {"regex": "b+"}),
    ({"guided_choice": ["x", "y"], **NO_THINKING}, {"choice": ["x", "y"]}),
    ({"guided_grammar": "start: /x+/", **NO_THINKING}, {"ebnf": "start: /x+/"}),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": "auto"}, None),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": "required", **NO_THINKING},
     {"tool_call": {"tools": [sf.WEATHER_TOOL], "required": True, "parallel": True}, "strict": False}),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": "required", "parallel_tool_calls": False},
     {"tool_call": {"tools": [sf.WEATHER_TOOL], "required": True, "parallel": False}, "strict": False,
      "thinking": "inside"}),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": NAMED, **NO_THINKING},
     {"tool_call": {"tools": [sf.WEATHER_TOOL], "name": "get_weather"}, "strict": False}),
    ({"functions": [sf.WEATHER_TOOL["function"]], "function_call": {"name": "get_weather"}, **NO_THINKING},
     {"tool_call": {"tools": [sf.WEATHER_TOOL], "name": "get_weather"}, "strict": False}),
    ({"functions": [sf.WEATHER_TOOL["function"]], "function_call": "auto"}, None),
]  # fmt: skip


@pytest.mark.parametrize("body,spec", STRUCTURED)
def test_structured_output_fields_become_constraint_specs(api, body, spec):
    assert _constraints(api, {**body, "n": 2}) == [spec, spec]


def test_legacy_functions_are_tools(api):
    from mimo_jax.serve.requests import chat_job

    body = {"messages": QUESTION, "functions": [sf.WEATHER_TOOL["function"]]}
    job, prompt = chat_job(api, P.parse_request(P.ChatCompletionRequest, json.dumps(body).encode()))
    assert '"name": "get_weather"' in prompt and job.choices[0].tools is not None


def test_completions_take_the_grammar_fields(api):
    assert _constraints(api, {"response_format": {"type": "json_object"}}, "completions") == [{"json_object": True}]
    assert _constraints(api, {"regex": "[a-z]+", "n": 2}, "completions") == [{"regex": "[a-z]+"}] * 2
    assert _constraints(api, {}, "completions") == [None]


BAD_SCHEMA = {"type": "object", "properties": {"city": {"type": "strin"}}}
BAD_STRUCTURED = [
    # (request fields, the parameter the 400 names, part of its message)
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": BAD_SCHEMA}}},
     "response_format", "strin"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "w", "schema": {"type": "string",
      "format": "bogus"}, "strict": True}}}, "response_format", "bogus"),
    ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
    ({"response_format": {"type": "xml"}}, "response_format.type", "json_object"),
    ({"response_format": "json"}, "response_format", None),
    ({"regex": "a["}, "regex", "unclosed"),
    ({"guided_regex": "(x"}, "guided_regex", None),
    ({"ebnf": 'root ::= "a" oops'}, "ebnf", "oops"),
    ({"structured_outputs": {"regex": "a["}}, "structured_outputs.regex", "unclosed"),
    ({"structured_outputs": {"json": BAD_SCHEMA}}, "structured_outputs.json", "strin"),
    ({"structured_outputs": {}}, "structured_outputs", "exactly one"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
    ({"guided_json": "{not json"}, "guided_json", "not valid JSON"),
    ({"guided_json": "[1]"}, "guided_json", "schema object"),
    ({"guided_choice": []}, "guided_choice", "non-empty"),
    ({"regex": "a", "response_format": {"type": "json_object"}}, "regex", "both"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "nope"),
    ({"tools": [sf.WEATHER_TOOL], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "response_format", "cannot be combined"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties":
      {"x": {"type": "integr"}}}}}], "tool_choice": "required"}, "tools", "integr"),
    ({"tools": [sf.WEATHER_TOOL], "functions": [sf.WEATHER_TOOL["function"]]}, "functions", "not both"),
    ({"functions": [sf.WEATHER_TOOL["function"]], "function_call": {"name": "x"}}, "function_call", "'x'"),
    ({"functions": [sf.WEATHER_TOOL["function"]], "function_call": "auto", "tool_choice": "auto"}, "function_call",
     "not both"),
    ({"function_call": {"name": "get_weather"}}, "function_call", "needs tools"),
]  # fmt: skip


@pytest.mark.parametrize("body,param,message", BAD_STRUCTURED)
def test_bad_structured_output_is_400_naming_the_field(api, body, param, message):
    with pytest.raises(APIError) as e:
        _constraints(api, body)
    assert (e.value.status, e.value.param) == (400, param), e.value.message
    assert message is None or message in e.value.message


def test_unconstrainable_engine_answers_400(tok_dir, tokenizer):
    server = _server(tok_dir, tokenizer, grammar=False)
    assert _constraints(server, {"tools": [sf.WEATHER_TOOL]}) == [None]
    for body, param in [
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"tools": [sf.WEATHER_TOOL], "tool_choice": "required"}, "tools"),
        ({"guided_regex": "a"}, "guided_regex"),
    ]:
        with pytest.raises(APIError) as e:
            _constraints(server, body)
        assert (e.value.status, e.value.param, e.value.code) == (400, param, "unsupported_value")


def test_speculative_engine_takes_constraints(tok_dir, tokenizer):
    """A speculating engine decodes constrained requests with its plain loop: their fields are accepted."""
    server = _server(tok_dir, tokenizer, speculative_steps=2)
    assert _constraints(server, {"response_format": {"type": "json_object"}}, "completions") == [{"json_object": True}]
    assert _constraints(server, {"guided_regex": "a"}, "completions") == [{"regex": "a"}]


def test_explicit_nulls_are_fields_left_out():
    """`"n": null`, `"stream": null`, `"logprobs": null`, `"echo": null` ... as OpenAI clients send them."""
    nulls = dict(n=None, stream=None, logprobs=None, echo=None, stop=None, seed=None, temperature=None, top_p=None)
    req = P.parse_request(P.CompletionRequest, json.dumps({"prompt": "x", **nulls}).encode())
    assert (req.n, req.stream, req.logprobs, req.echo, req.stop) == (1, False, None, False, None)
    chat = {"messages": [{"role": "user", "content": "hi", "name": None}], "tools": None, "tool_choice": None, **nulls}
    req = P.parse_request(P.ChatCompletionRequest, json.dumps(chat).encode())
    assert (req.n, req.stream, req.tools) == (1, False, None)
