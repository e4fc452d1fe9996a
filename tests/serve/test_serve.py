"""`python -m mimo_jax.serve` as a real process on a free localhost port, driven over HTTP with the
official `openai` client and with raw httpx. Oracles: offline `mimo_jax.generate` on the same
checkpoint (greedy and seeded output, logprobs), transformers' `apply_chat_template` (prompts),
and the planted script of tests/fixtures.py (reasoning and tool-call parsing).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import socket
import time

import httpx
import numpy as np
import openai
import pytest

from tests import fixtures as sf

# The shared server's settings (tests.fixtures.tiny_server)
MAX_BATCH, MAX_CONTEXT, PREFILL_CHUNK, ROUND_TOKENS, MAX_WAITING = (
    sf.TINY_SERVER[k] for k in ("max_batch", "max_context", "prefill_chunk", "round_tokens", "max_waiting")
)
ENGINE = dict(max_batch=MAX_BATCH, max_context=MAX_CONTEXT, prefill_chunk=PREFILL_CHUNK)
QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


class Served:
    def __init__(self, directory: str, url: str, lm, engine, tokenizer, hf_tokenizer, log_path: str):
        self.directory, self.url, self.log_path = directory, url, log_path
        self.lm, self.engine, self.tok, self.hf_tok = lm, engine, tokenizer, hf_tokenizer
        self.client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
        self.http = httpx.Client(base_url=url, timeout=120)
        self.model = os.path.basename(directory)

    def generate(self, prompts, **kwargs):
        import mimo_jax

        return mimo_jax.generate(self.lm, prompts, engine=self.engine, **kwargs)

    def chat_prompt_ids(self, messages, **kwargs) -> list[int]:
        text = self.hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False, **kwargs)
        return self.tok.encode(text, add_special_tokens=False)

    def assert_serving(self):
        """A normal request after whatever happened before: the server still answers correctly."""
        out = self.client.completions.create(model=self.model, prompt="def fib", max_tokens=4, temperature=0)
        (ref,) = self.generate([self.tok.encode("def fib", add_special_tokens=True)], max_new_tokens=4)
        assert out.choices[0].text == self.tok.decode(ref.token_ids)

    def log_size(self) -> int:
        return os.path.getsize(self.log_path)

    def log_since(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")


@pytest.fixture(scope="module")
def served(tiny_server):
    # While the server warms up, build the offline oracle (same engine shapes) in this process.
    from transformers import AutoTokenizer

    import mimo_jax
    from mimo_jax.text import Tokenizer

    directory = tiny_server.directory
    lm = mimo_jax.load_model(directory, dtype="float32")
    engine = mimo_jax.Engine(lm, **ENGINE, max_stop_ids=9, max_top_logprobs=20, max_round_tokens=ROUND_TOKENS)
    tokenizer = Tokenizer(directory)
    hf_tokenizer = AutoTokenizer.from_pretrained(directory)
    mimo_jax.generate(lm, [[1] * 40, [2]], max_new_tokens=2, engine=engine, logprobs=1)  # compile the oracle now
    served = Served(directory, tiny_server.url(), lm, engine, tokenizer, hf_tokenizer, tiny_server.log_path)
    yield served
    served.http.close()


# ---------------------------------------------------------------------------------------------- basics
def test_models_health_metrics(served):
    models = served.client.models.list()
    assert [m.id for m in models.data] == [served.model]
    assert served.http.get("/health").json()["status"] == "ok"
    served.assert_serving()
    text = served.http.get("/metrics").text
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "time_to_first_token_seconds_bucket",
        "inter_token_latency_seconds_bucket",
        "request_queue_time_seconds_bucket",
        "generation_tokens_per_second",
        "spec_decode_mean_accept_length",
        "xla_compilations_total",
    ):
        assert f"mimo:{name}{{" in text, name
    assert _metric(served, "generation_tokens_total") >= 4
    assert _metric(served, "request_success_total", finished_reason="length") >= 1


def test_completion_greedy_equals_generate(served):
    prompts = ["def fib", "Hello there", "The quick brown"]
    refs = served.generate([served.tok.encode(p, add_special_tokens=True) for p in prompts], max_new_tokens=20)
    out = served.client.completions.create(model=served.model, prompt=prompts, max_tokens=20, temperature=0)
    for choice, ref in zip(sorted(out.choices, key=lambda c: c.index), refs, strict=True):
        assert choice.text == served.tok.decode(ref.token_ids)
        assert choice.finish_reason == ref.finish_reason == "length"
    assert out.usage.completion_tokens == 60
    assert out.usage.prompt_tokens == sum(len(served.tok.encode(p, add_special_tokens=True)) for p in prompts)
    # Token-id prompt, raw HTTP, streamed with usage.
    ids = served.tok.encode("class Point", add_special_tokens=True)
    (ref,) = served.generate([ids], max_new_tokens=17)
    body = {
        "prompt": ids,
        "max_tokens": 17,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    with served.http.stream("POST", "/v1/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == served.tok.decode(ref.token_ids)
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 17
    assert all(c["usage"] is None for c in chunks[:-1])


def test_chat_greedy_equals_generate_with_reasoning_split(served):
    ids = served.chat_prompt_ids(QUESTION)
    (ref,) = served.generate([ids], max_new_tokens=64)
    assert ref.finish_reason == "stop"
    text = served.tok.decode(ref.token_ids)
    assert text == "".join(sf.SCRIPT[1:-1])  # the planted script (EOS is a special token)
    out = served.client.chat.completions.create(model=served.model, messages=QUESTION, temperature=0)
    message = out.choices[0].message
    assert message.reasoning_content == sf.REASONING
    assert message.content == sf.CONTENT + "<tool_call>" + sf.CALL_BODY + "</tool_call>"  # no tools: markup is text
    assert message.tool_calls is None
    assert out.choices[0].finish_reason == "stop"
    assert out.usage.prompt_tokens == len(ids) and out.usage.completion_tokens == len(ref.token_ids)
    # Streamed: reasoning and content arrive as deltas that join to the same texts.
    stream = served.client.chat.completions.create(
        model=served.model, messages=QUESTION, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    reasoning, content, finish, usage = "", "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            reasoning += getattr(c.delta, "reasoning_content", None) or ""
            content += c.delta.content or ""
            finish = c.finish_reason or finish
    assert (reasoning, content, finish) == (message.reasoning_content, message.content, "stop")
    assert usage.completion_tokens == out.usage.completion_tokens


def test_chat_thinking_disabled(served):
    kwargs = {"chat_template_kwargs": {"enable_thinking": False}}
    out = served.client.chat.completions.create(model=served.model, messages=QUESTION, temperature=0, extra_body=kwargs)
    message = out.choices[0].message
    assert message.content.startswith(sf.CONTENT) and message.reasoning_content is None
    ids = served.chat_prompt_ids(QUESTION, enable_thinking=False)
    assert out.usage.prompt_tokens == len(ids)
    # MiMo API's switch means the same.
    same = served.client.chat.completions.create(
        model=served.model, messages=QUESTION, temperature=0, extra_body={"thinking": {"type": "disabled"}}
    )
    assert same.choices[0].message.content == message.content


def test_chat_tool_call(served):
    out = served.client.chat.completions.create(
        model=served.model, messages=QUESTION, tools=[sf.WEATHER_TOOL], temperature=0
    )
    choice = out.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == sf.REASONING
    assert choice.message.content == sf.CONTENT
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3}
    assert out.usage.prompt_tokens == len(served.chat_prompt_ids(QUESTION, tools=[sf.WEATHER_TOOL]))
    # Streamed: the call arrives as one tool_calls delta.
    stream = served.client.chat.completions.create(
        model=served.model, messages=QUESTION, tools=[sf.WEATHER_TOOL], temperature=0, stream=True
    )
    calls, content, finish = [], "", None
    for chunk in stream:
        for c in chunk.choices:
            content += c.delta.content or ""
            calls += c.delta.tool_calls or []
            finish = c.finish_reason or finish
    assert content == sf.CONTENT and finish == "tool_calls"
    assert [(c.index, c.function.name, json.loads(c.function.arguments)) for c in calls] == [
        (0, "get_weather", {"city": "Paris", "days": 3})
    ]
    # The answer goes back into the conversation (arguments as a JSON string) and renders as transformers does.
    history = QUESTION + [
        {"role": "assistant", "content": sf.CONTENT, "reasoning_content": sf.REASONING,
         "tool_calls": [{"id": call.id, "type": "function", "function": {"name": "get_weather",
                                                                          "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny, 21 C"},
    ]  # fmt: skip
    follow = served.client.chat.completions.create(
        model=served.model, messages=history, tools=[sf.WEATHER_TOOL], temperature=0, max_tokens=3
    )
    hf_history = json.loads(json.dumps(history))
    hf_history[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "days": 3}
    assert follow.usage.prompt_tokens == len(served.chat_prompt_ids(hf_history, tools=[sf.WEATHER_TOOL]))


def test_stop_strings_and_stop_token_ids(served):
    # A stop string across three tokens of the script: text is cut right before it, in both modes.
    stop = "Paris.</think>Let"
    for stream in (False, True):
        body = {"messages": QUESTION, "temperature": 0, "stop": [stop, "never appears"], "stream": stream}
        if stream:
            with served.http.stream("POST", "/v1/chat/completions", json=body) as r:
                chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
            reasoning = "".join(c["choices"][0]["delta"].get("reasoning_content") or "" for c in chunks)
            content = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
            finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
        else:
            r = served.http.post("/v1/chat/completions", json=body).json()
            message = r["choices"][0]["message"]
            reasoning, content, finish = (
                message["reasoning_content"],
                message["content"],
                [r["choices"][0]["finish_reason"]],
            )
            assert r["usage"]["completion_tokens"] == 3  # REASONING, </think>, CONTENT: the stop completes there
        assert reasoning == "The user wants the weather in" and content == "" and finish == ["stop"]
    # Random text: cut at a stop string that spans a token boundary, streamed and not.
    ids = served.tok.encode("def fib", add_special_tokens=True)
    (ref,) = served.generate([ids], max_new_tokens=30)
    full = served.tok.decode(ref.token_ids)
    boundaries = [len(p) for p in (served.tok.decode(ref.token_ids[:k]) for k in range(1, 30)) if full.startswith(p)]
    cut = next(
        b for b in boundaries if "\ufffd" not in full[b - 1 : b + 1] and full.index(full[b - 1 : b + 1]) == b - 1
    )
    stop = full[cut - 1 : cut + 1]  # the last character of one token and the first of the next
    for stream in (False, True):
        out = served.client.completions.create(
            model=served.model, prompt=ids, max_tokens=30, temperature=0, stop=stop, stream=stream
        )
        text = "".join(c.choices[0].text for c in out) if stream else out.choices[0].text
        assert text == full[: cut - 1]
    # A stop token id ends generation at that token (which is not part of the text).
    stop_id = ref.token_ids[5]
    first = ref.token_ids.index(stop_id)
    r = served.http.post(
        "/v1/completions", json={"prompt": ids, "max_tokens": 30, "temperature": 0, "stop_token_ids": [stop_id]}
    ).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == served.tok.decode(ref.token_ids[:first])
    assert r["usage"]["completion_tokens"] == first + 1


def test_sampling_seed_n_and_logprobs(served):
    ids = served.tok.encode("The quick", add_special_tokens=True)
    params = dict(temperature=0.9, top_p=0.95, top_k=50, seed=1234)
    refs = served.generate([ids, ids, ids], max_new_tokens=12, **params)
    body = {"prompt": ids, "max_tokens": 12, "n": 3, **params}
    first = served.http.post("/v1/completions", json=body).json()
    again = served.http.post("/v1/completions", json=body).json()
    texts = [c["text"] for c in sorted(first["choices"], key=lambda c: c["index"])]
    assert texts == [served.tok.decode(r.token_ids) for r in refs]  # choice i = generate's stream (seed, i)
    assert texts == [c["text"] for c in sorted(again["choices"], key=lambda c: c["index"])]
    assert len(set(texts)) > 1
    # Chat logprobs: the chosen token's and the top-2 model logprobs of each token.
    ids = served.chat_prompt_ids(QUESTION)
    (ref,) = served.generate([ids], max_new_tokens=64, logprobs=2)
    out = served.client.chat.completions.create(
        model=served.model, messages=QUESTION, temperature=0, logprobs=True, top_logprobs=2
    )
    entries = out.choices[0].logprobs.content
    assert len(entries) == len(ref.token_ids) - 1  # the EOS that ends the answer is not text
    for entry, token, lp, top in zip(entries, ref.token_ids, ref.logprobs, ref.top_logprobs, strict=False):
        assert entry.token == served.tok.token_text(token)
        np.testing.assert_allclose(entry.logprob, lp, rtol=1e-5, atol=1e-6)
        assert [t.token for t in entry.top_logprobs] == [served.tok.token_text(i) for i, _ in top]
        assert bytes(entry.bytes).decode() == entry.token
    # Completions logprobs: tokens, per-token logprobs and offsets into the text.
    r = served.client.completions.create(model=served.model, prompt="def fib", max_tokens=6, temperature=0, logprobs=1)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 6
    assert lp.text_offset[0] == 0


def test_logit_bias_and_min_tokens(served):
    """logit_bias +100 forces a token, -100 bans the greedy one; min_tokens holds a (forced) stop token back."""
    ids = served.tok.encode("The quick", add_special_tokens=True)
    (plain,) = served.generate([ids], max_new_tokens=4)  # greedy token ids, the oracle
    forced = next(t for t in reversed(ids) if t != plain.token_ids[0] and served.tok.decode([t]))

    def complete(**extra):
        r = served.http.post("/v1/completions", json={"prompt": ids, "max_tokens": 4, "temperature": 0, **extra})
        assert r.status_code == 200, r.text
        out = r.json()
        return out["choices"][0]["text"], out["choices"][0]["finish_reason"], out["usage"]["completion_tokens"]

    assert complete()[0] == served.tok.decode(plain.token_ids)
    assert complete(logit_bias={str(forced): 100})[0] == served.tok.decode([forced] * 4)
    assert complete(logit_bias={str(plain.token_ids[0]): -100})[0] != served.tok.decode(plain.token_ids)
    stop = {"stop_token_ids": [forced], "logit_bias": {str(forced): 100}}
    assert complete(**stop)[1:] == ("stop", 1)
    assert complete(**stop, min_tokens=3)[1:] == ("stop", 4)


def test_seeds_are_64_bit_and_used_whole(served):
    """Every signed 64-bit seed is its own stream (the same as generate's); others are a 400 with the engine's rule."""
    from mimo_jax.engine.sampling import check_seed

    ids = served.tok.encode("The quick", add_special_tokens=True)
    params = dict(temperature=1.0, top_p=1.0, top_k=0)
    texts = {}
    for seed in (0, 2**32, -(2**32), 2**63 - 1, -(2**63)):
        r = served.http.post("/v1/completions", json={"prompt": ids, "max_tokens": 12, "seed": seed, **params})
        assert r.status_code == 200, r.text
        texts[seed] = r.json()["choices"][0]["text"]
        (ref,) = served.generate([ids], max_new_tokens=12, seed=seed, **params)
        assert texts[seed] == served.tok.decode(ref.token_ids)
    assert len(set(texts.values())) == len(texts), texts
    for seed in (2**63, -(2**63) - 1, 2**64):
        with pytest.raises(ValueError) as rule:
            check_seed(seed)
        for route, body in (("/v1/completions", {"prompt": "x"}), ("/v1/chat/completions", {"messages": QUESTION})):
            r = served.http.post(route, json={**body, "max_tokens": 2, "seed": seed})
            assert r.status_code == 400, r.text
            error = r.json()["error"]
            assert error["param"] == "seed" and str(rule.value) in error["message"], error


def _forward_scores(served, ids):
    """The full forward's log-softmax over a prompt (the same checkpoint, loaded here): row i scores token i + 1."""
    import jax

    return np.asarray(jax.nn.log_softmax(served.lm.logits(np.array([ids]))[0], axis=-1))


def _streamed_completions(served, body) -> dict[int, dict]:
    """A streamed /v1/completions answer put back together per choice: text, finish_reason, logprobs lists."""
    with served.http.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    out: dict[int, dict] = {}
    for event in events[:-1]:
        for c in json.loads(event)["choices"]:
            choice = out.setdefault(c["index"], {"text": "", "finish_reason": None, "logprobs": None})
            choice["text"] += c["text"]
            choice["finish_reason"] = c["finish_reason"] or choice["finish_reason"]
            if c.get("logprobs"):
                lp = choice["logprobs"] = choice["logprobs"] or {k: [] for k in c["logprobs"]}
                for k, v in c["logprobs"].items():
                    lp[k] += v
    return out


def test_echo_logprobs_score_the_prompt_as_lm_eval_asks(served):
    """lm-eval's local-completions loglikelihood request (token-id prompts, echo, logprobs 1, max_tokens 0 or 1) and
    one that also generates: the prompt tokens' logprobs (the first null) equal the forward's log-softmax at the
    next prompt token, top_logprobs its maximum, then the completion's own; streamed the same."""
    text = " ".join(["The quick brown fox jumps over the lazy dog, and then"] * 8)
    long_ids = served.tok.encode(text, add_special_tokens=True)
    assert len(long_ids) > 2 * PREFILL_CHUNK  # three chunks, the last padded
    prompts = [long_ids, served.tok.encode("def fib(n):", add_special_tokens=True)]
    refs = {k: _forward_scores(served, ids) for k, ids in enumerate(prompts)}
    tok = served.tok
    for max_tokens in (0, 1, 5):
        body = {"prompt": prompts, "temperature": 0, "max_tokens": max_tokens, "logprobs": 1, "echo": True}
        r = served.http.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["usage"]["completion_tokens"] == 2 * max_tokens
        choices = sorted(out["choices"], key=lambda c: c["index"])
        gens = served.generate(prompts, max_new_tokens=max_tokens, logprobs=1) if max_tokens else [None, None]
        for k, (choice, ids, gen) in enumerate(zip(choices, prompts, gens, strict=True)):
            lp, ref, n = choice["logprobs"], refs[k], len(ids)
            generated = gen.token_ids if gen else []
            assert choice["finish_reason"] == "length"
            assert choice["text"] == tok.decode(ids) + tok.decode(generated)
            assert lp["tokens"] == [tok.token_text(t) for t in ids + generated]
            assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
            want = ref[np.arange(n - 1), ids[1:]]
            np.testing.assert_allclose(lp["token_logprobs"][1:n], want, rtol=1e-4, atol=1e-4)
            for i, top in enumerate(lp["top_logprobs"][1:n]):
                ((best, value),) = top.items()
                assert best == tok.token_text(int(ref[i].argmax()))
                np.testing.assert_allclose(value, ref[i].max(), rtol=1e-4, atol=1e-4)
            # lm-eval's is_greedy: the token's logprob is exactly the top one where the token is the argmax
            greedy = [lp["token_logprobs"][i] == max(lp["top_logprobs"][i].values()) for i in range(1, n)]
            assert greedy == [int(ref[i].argmax()) == ids[i + 1] for i in range(n - 1)]
            if gen:
                np.testing.assert_allclose(lp["token_logprobs"][n:], gen.logprobs, rtol=1e-5, atol=1e-6)
            lengths = [len(t) for t in lp["tokens"]]
            assert lp["text_offset"] == [sum(lengths[:i]) for i in range(len(lengths))]
        streamed = _streamed_completions(served, body)
        for choice in choices:
            again = streamed[choice["index"]]
            assert again["text"] == choice["text"] and again["finish_reason"] == "length"
            for key in ("tokens", "token_logprobs", "top_logprobs"):
                assert again["logprobs"][key] == choice["logprobs"][key], key
    # A text prompt echoes as written; echo without logprobs still needs no scores and may generate nothing.
    r = served.client.completions.create(model=served.model, prompt="Hello there", max_tokens=0, echo=True, logprobs=0)
    n = len(tok.encode("Hello there", add_special_tokens=True))
    assert r.choices[0].text == "Hello there" and r.choices[0].logprobs.top_logprobs == [None] + [{}] * (n - 1)
    r = served.http.post("/v1/completions", json={"prompt": "Hello there", "max_tokens": 0, "echo": True}).json()
    assert r["choices"][0]["text"] == "Hello there" and r["choices"][0]["logprobs"] is None
    assert r["usage"]["completion_tokens"] == 0
    served.assert_serving()


def test_prompt_logprobs_as_vllm_returns_them(served):
    """`prompt_logprobs: N` (vLLM's extension): None first, then per prompt token {id: {logprob, rank,
    decoded_token}} for the token itself and the top-N; on completions per choice, on chat for the request."""
    tok = served.tok

    def check(entries, ids, top):
        ref = _forward_scores(served, ids)
        assert len(entries) == len(ids) and entries[0] is None
        for i, entry in enumerate(entries[1:]):
            t = ids[i + 1]
            mine = entry[str(t)]
            np.testing.assert_allclose(mine["logprob"], ref[i, t], rtol=1e-4, atol=1e-4)
            assert mine["rank"] == 1 + int((ref[i] > ref[i, t]).sum())
            assert mine["decoded_token"] == tok.token_text(t)
            order = np.argsort(-ref[i], kind="stable")[:top]
            assert set(entry) == {str(t)} | {str(j) for j in order}
            for rank, j in enumerate(order, 1):
                if j != t:
                    assert entry[str(j)]["rank"] == rank and entry[str(j)]["decoded_token"] == tok.token_text(j)
                    np.testing.assert_allclose(entry[str(j)]["logprob"], ref[i, j], rtol=1e-4, atol=1e-4)

    ids = tok.encode("The quick brown fox", add_special_tokens=True)
    (ref,) = served.generate([ids], max_new_tokens=4)
    body = {"prompt": ids, "max_tokens": 4, "temperature": 0, "prompt_logprobs": 2, "n": 2}
    out = served.http.post("/v1/completions", json=body).json()
    for choice in out["choices"]:
        assert choice["text"] == tok.decode(ref.token_ids)  # the completion is unchanged
        check(choice["prompt_logprobs"], ids, 2)
    out = served.http.post("/v1/completions", json={**body, "max_tokens": 0, "n": 1}).json()
    assert out["choices"][0]["text"] == "" and out["choices"][0]["finish_reason"] == "length"
    check(out["choices"][0]["prompt_logprobs"], ids, 2)
    chat = served.http.post(
        "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 3, "temperature": 0, "prompt_logprobs": 0}
    ).json()
    check(chat["prompt_logprobs"], served.chat_prompt_ids(QUESTION), 0)
    plain = served.http.post("/v1/completions", json={"prompt": ids, "max_tokens": 1}).json()
    assert "prompt_logprobs" not in plain["choices"][0]


def test_sixteen_concurrent_streams(served):
    prompts = [served.tok.encode(f"request {i}: {'abc' * (i % 5)}", add_special_tokens=True) for i in range(16)]
    max_tokens = [8 + (i % 4) * 4 for i in range(16)]
    refs = [served.generate([p], max_new_tokens=m)[0] for p, m in zip(prompts, max_tokens, strict=True)]

    async def one(client, prompt, m):
        stream = await client.completions.create(
            model=served.model, prompt=prompt, max_tokens=m, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )  # fmt: skip
        text, usage = "", None
        async for chunk in stream:
            text += "".join(c.text for c in chunk.choices)
            usage = chunk.usage or usage
        return text, usage

    async def run():
        client = openai.AsyncOpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, timeout=300)
        try:
            return await asyncio.gather(*(one(client, p, m) for p, m in zip(prompts, max_tokens, strict=True)))
        finally:
            await client.close()

    results = asyncio.run(run())
    for (text, usage), ref, m in zip(results, refs, max_tokens, strict=True):
        assert text == served.tok.decode(ref.token_ids)
        assert usage.completion_tokens == len(ref.token_ids) <= m


def _metric(served, name: str, **labels: str) -> float:
    return sf.metric_value(served.http.get("/metrics").text, "mimo:" + name, **labels)


def _wait_for(served, predicate, seconds: float = 60) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        health = served.http.get("/health").json()
        if predicate(health):
            return health
        assert time.monotonic() < deadline, health
        time.sleep(0.02)


LONG = {"max_tokens": MAX_CONTEXT - 16, "temperature": 0, "ignore_eos": True}


def test_cancellation_frees_capacity(served):
    cancelled, generated = _metric(served, "request_cancelled_total"), _metric(served, "generation_tokens_total")
    opened = []
    try:
        for i in range(MAX_BATCH):
            client = httpx.Client(base_url=served.url, timeout=120)
            request = client.build_request(
                "POST", "/v1/completions", json={"prompt": f"long {i}", "stream": True, **LONG}
            )
            response = client.send(request, stream=True)
            assert next(response.iter_lines()).startswith("data: ")  # generating
            opened.append((client, response))
    finally:
        for client, response in opened:  # hang up
            response.close()
            client.close()
    _wait_for(served, lambda h: h["running"] == 0 and h["waiting"] == 0, seconds=30)
    assert _metric(served, "request_cancelled_total") == cancelled + MAX_BATCH
    # The slots were freed long before the requests' own end.
    assert _metric(served, "generation_tokens_total") - generated < MAX_BATCH * LONG["max_tokens"] / 2
    served.assert_serving()
    # A non-streaming client that gives up frees its slot too.
    cancelled = _metric(served, "request_cancelled_total")
    with pytest.raises(httpx.TimeoutException):
        httpx.post(served.url + "/v1/completions", json={"prompt": "y", **LONG}, timeout=0.05)
    _wait_for(served, lambda h: h["running"] == 0 and h["waiting"] == 0, seconds=30)
    assert _metric(served, "request_cancelled_total") == cancelled + 1
    served.assert_serving()


def test_non_streaming_disconnect_is_a_quiet_cancellation(served):
    """A non-streaming client that hangs up mid-generation: the sequence is cancelled and its slot freed,
    nothing is logged as an error (no traceback, no 500 sent into the closed socket)."""
    offset = served.log_size()
    cancelled = _metric(served, "request_cancelled_total")
    for i in range(3):
        with pytest.raises(httpx.TimeoutException):
            httpx.post(served.url + "/v1/completions", json={"prompt": f"def f{i}(", **LONG}, timeout=0.1)
    # A client that hangs up while sending the body.
    with socket.create_connection(("127.0.0.1", int(served.url.rsplit(":", 1)[1]))) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
                  b'Content-Length: 1000\r\n\r\n{"prompt": ')  # fmt: skip
        time.sleep(0.2)
    _wait_for(served, lambda h: h["running"] == 0 and h["waiting"] == 0, seconds=30)
    assert _metric(served, "request_cancelled_total") == cancelled + 3
    assert _metric(served, "num_requests_running") == 0 and _metric(served, "num_requests_waiting") == 0
    served.assert_serving()
    log = served.log_since(offset)
    assert "Traceback" not in log and "ERROR" not in log and "InvalidStateError" not in log, log


def test_full_queue_answers_429(served):
    # 16 sequences in one request: MAX_BATCH run, the rest wait (each runs for hundreds of tokens).
    big = {"prompt": [f"queue {i}" for i in range(16)], **LONG}
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(served.http.post, "/v1/completions", json=big)
        _wait_for(served, lambda h: h["waiting"] >= 16 - MAX_BATCH, seconds=30)
        # 8 more do not fit in the queue of MAX_WAITING: 429 with an OpenAI error body, nobody else is hurt.
        r = served.http.post("/v1/completions", json={**big, "prompt": big["prompt"][:8]})
        assert r.status_code == 429, r.text
        assert r.headers["retry-after"] == "1"
        error = r.json()["error"]
        assert error["type"] == "rate_limit_error" and "retry" in error["message"]
        with pytest.raises(openai.RateLimitError):
            served.client.completions.create(model=served.model, prompt=["x"] * 8, max_tokens=2)
        done = first.result()
    assert done.status_code == 200
    assert done.json()["usage"]["completion_tokens"] == 16 * LONG["max_tokens"]
    served.assert_serving()


BAD_REQUESTS = [
    # (route, raw body or json, status, param)
    ("/v1/chat/completions", b"{not json", 400, None),
    ("/v1/chat/completions", b"", 400, None),
    ("/v1/chat/completions", b"[1, 2]", 400, None),
    ("/v1/chat/completions", {"model": "x", "messages": QUESTION}, 404, "model"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 5}]}, 400, "messages[0].content"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": 1e308}, 400, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": 100.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": -3}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": "10"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": MAX_CONTEXT}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "word " * 400}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": QUESTION, "logprobs": True, "top_logprobs": 50}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "tool_choice": "required"}, 400, "tool_choice"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "json_schema", "json_schema":
      {"name": "x", "schema": {"type": "strin"}}}}, 400, "response_format"),
    ("/v1/chat/completions", {"messages": QUESTION, "response_format": {"type": "xml"}}, 400, "response_format.type"),
    ("/v1/completions", {"prompt": "x", "regex": "a["}, 400, "regex"),
    ("/v1/chat/completions", {"messages": QUESTION, "stream": "yes"}, 400, "stream"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content"),
    ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "model"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
    ("/v1/completions", {"prompt": []}, 400, None),
    ("/v1/completions", {"prompt": [1, 2, 10**6]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "max_tokens": MAX_CONTEXT}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "stop": [123456]}, 400, "stop"),
    ("/v1/completions", {"prompt": "x" * 3000}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "frequency_penalty": 3}, 400, "frequency_penalty"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"100000": 1}}, 400, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2, "min_tokens": 3}, 400, "min_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "min_tokens": -1}, 400, "min_tokens"),
    ("/v1/completions", {"prompt": ["a"] * 2, "n": 16}, 400, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),  # 0 only echoes or scores the prompt
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, 400, "prompt_logprobs"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 21}, 400, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": QUESTION, "prompt_logprobs": -1}, 400, "prompt_logprobs"),
]  # fmt: skip


@pytest.mark.parametrize("route,body,status,param", BAD_REQUESTS)
def test_bad_input_gets_4xx_and_server_keeps_serving(served, route, body, status, param):
    if isinstance(body, bytes):
        r = served.http.post(route, content=body, headers={"content-type": "application/json"})
    else:
        r = served.http.post(route, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    served.assert_serving()


@pytest.mark.parametrize("depth,as_text", [(1000, True), (100000, True), (150, False)])
def test_deeply_nested_tool_call_arguments_get_400(served, depth, as_text):
    """Tool-call arguments nested past the limit (as a JSON string, or as an object pydantic already parsed)
    are refused with a 400 naming the field, before anything recursive (json.loads, the template) meets them."""
    nested = "[" * depth + "]" * depth
    arguments = '{"a": ' + nested + "}"
    call = '{"type": "function", "function": {"name": "get_weather", "arguments": ' + (
        json.dumps(arguments) if as_text else arguments
    )
    assistant = '{"role": "assistant", "content": "", "tool_calls": [' + call + "}}]}"
    body = '{"messages": [{"role": "user", "content": "hi"}, ' + assistant + '], "max_tokens": 2}'
    with httpx.Client(base_url=served.url, timeout=120) as http:  # a fresh connection: a 500 may close it
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == "messages[1].tool_calls[0].function.arguments"
    assert "nested deeper than" in error["message"]
    served.assert_serving()


BAD_TOOL_PARAMETERS = [
    {"type": "object", "properties": "x"},
    {"type": "object", "properties": ["city", "days"]},
    {"type": "object", "properties": {"city": "string"}},
    {"type": "string"},
]


@pytest.mark.parametrize("parameters", BAD_TOOL_PARAMETERS)
def test_bad_tool_schemas_get_400_at_entry(served, parameters):
    """A tool the model will call (the planted script calls get_weather) whose parameters are not an object schema:
    refused before it runs, streamed or not."""
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": parameters}}
    for stream in (False, True):
        body = {"messages": QUESTION, "tools": [tool], "temperature": 0, "max_tokens": 64, "stream": stream}
        with httpx.Client(base_url=served.url, timeout=120) as http:  # a fresh connection: a 500 may close it
            r = http.post("/v1/chat/completions", json=body)
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["param"] == "tools[0].function.parameters", error
    _wait_for(served, lambda h: h["running"] == 0 and h["waiting"] == 0, seconds=30)
    served.assert_serving()


def test_bad_routes_and_openai_client_errors(served):
    assert served.http.get("/v1/nothing").status_code == 404
    r = served.http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    with pytest.raises(openai.NotFoundError):
        served.client.chat.completions.create(model="unknown-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError, match="temperature"):
        served.client.chat.completions.create(model=served.model, messages=QUESTION, temperature=-1)
    served.assert_serving()


def test_browser_reachable_requests_refused(served):
    """Defaults of a server bound to 127.0.0.1: DNS-rebound Host names and non-JSON bodies (what a web page can
    send without a preflight) are refused; /v1/models does not give the checkpoint's path."""
    port = served.url.rsplit(":", 1)[1]
    for host in ("attacker.example", f"attacker.example:{port}", f"127.0.0.1.nip.io:{port}"):
        r = served.http.get("/health", headers={"host": host})
        assert r.status_code == 400 and "host" in r.json()["error"]["message"].lower(), host
        r = served.http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"host": host})
        assert r.status_code == 400, host
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost", f"[::1]:{port}", "LOCALHOST"):
        assert served.http.get("/health", headers={"host": host}).status_code == 200, host
    body = json.dumps({"prompt": "x", "max_tokens": 1})
    for content_type in ("text/plain", "text/plain;charset=UTF-8", "application/x-www-form-urlencoded", None):
        headers = {} if content_type is None else {"content-type": content_type}
        r = served.http.post("/v1/completions", content=body, headers=headers)
        assert r.status_code == 415, (content_type, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = served.http.post("/v1/completions", content=body, headers={"content-type": "Application/JSON; charset=utf-8"})
    assert r.status_code == 200
    (card,) = served.http.get("/v1/models").json()["data"]
    assert card["root"] == served.model and served.directory not in json.dumps(card)
    assert served.directory not in served.http.get(f"/v1/models/{served.model}").text
    served.assert_serving()


FUZZ_VALUES = [None, True, False, 0, -1, 1, 2, 3.5, -2.5, 1e308, 2**70, -(2**70), "", "x", "<think>", "\u0000", [], [1],
               ["a"], [[1, 2]], [-5], {}, {"a": 1}, [{"type": "text"}], [{"role": "user"}], [{"type": "function"}]]  # fmt: skip
FUZZ_FIELDS = [
    "model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "min_p",
    "presence_penalty", "frequency_penalty", "repetition_penalty", "seed", "stop", "stop_token_ids", "n", "stream",
    "stream_options", "logprobs", "top_logprobs", "tools", "tool_choice", "chat_template_kwargs", "thinking", "echo",
    "suffix", "best_of", "ignore_eos", "response_format", "logit_bias", "prompt_logprobs", "regex", "structured_outputs",
    "guided_choice", "functions", "function_call",
]  # fmt: skip


def test_fuzzed_requests_never_hurt_the_server(served):
    """Valid requests with 1-3 fields replaced by arbitrary JSON values: 200 or a 4xx error body, never 5xx."""
    rng = np.random.default_rng(7)
    statuses = []
    for _ in range(150):
        chat = rng.random() < 0.5
        body = {"messages": [{"role": "user", "content": "hi"}]} if chat else {"prompt": "hi"}
        body["max_tokens"] = 3
        for _ in range(int(rng.integers(1, 4))):
            body[FUZZ_FIELDS[rng.integers(len(FUZZ_FIELDS))]] = FUZZ_VALUES[rng.integers(len(FUZZ_VALUES))]
        body["stream"] = False if not isinstance(body.get("stream"), bool) else body["stream"]
        r = served.http.post("/v1/chat/completions" if chat else "/v1/completions", json=body)
        statuses.append(r.status_code)
        assert r.status_code < 500, (body, r.text)
        if r.status_code >= 400:
            assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert statuses.count(200) > 10 and statuses.count(400) > 50
    served.assert_serving()


def test_repeated_prefix_is_served_from_the_prefix_cache(served):
    """The server's prefix cache: a repeated long prompt reports cached_tokens (whole pages up to its ring
    snapshot) and answers what the engine without a cache answers."""
    text = "def prefix_cache_probe():\n" + "".join(f"    x{i} = {i} * {i}\n" for i in range(40))
    ids = served.tok.encode(text, add_special_tokens=True)
    (ref,) = served.generate([ids], max_new_tokens=6)
    outs = [
        served.client.completions.create(model=served.model, prompt=text, max_tokens=6, temperature=0) for _ in "ab"
    ]
    assert [o.choices[0].text for o in outs] == [served.tok.decode(ref.token_ids)] * 2
    cached = [o.usage.prompt_tokens_details.cached_tokens for o in outs]
    assert cached[0] == 0 and 0 < cached[1] < len(ids)
    metrics = served.http.get("/metrics").text
    assert "prefix_cache_hits_total" in metrics and "prefix_cache_queries_total" in metrics
