"""The server with MTP speculative decoding on the embedded demo model (trained MTP layers), as a real process:
greedy answers equal offline `generate` without speculation (it is lossless); /metrics reports the acceptance the
engine measured (more than one token per target forward) under vLLM's spec_decode names, and each request's own
acceptance (vLLM's `metrics.speculative_decoding`) adds up to those counters; a first sampled request after the
ready line compiles nothing (the warm-up ran both speculative loops), nor does a `json_object` request beside a
speculating one (the constrained rows' plain loop), whose answer parses as JSON; SIGTERM drains: /health answers 503, new
requests 503, the running stream completes, and the process exits 0.
"""

from __future__ import annotations

import concurrent.futures
import json
import pathlib
import signal
import time

import httpx
import pytest

from mimo_jax.weights.demo import DEMO_MODEL
from tests.fixtures import MTP_SERVER_STEPS, metric_value

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_files(path):", "class Stack:\n    def push(self, item):"]
K = MTP_SERVER_STEPS  # drafts per target forward


def _spec_counters(url: str) -> dict[str, float]:
    text = httpx.get(url + "/metrics").text
    names = ("num_drafts", "num_draft_tokens", "num_accepted_tokens")
    return {name: metric_value(text, f"mimo:spec_decode_{name}_total") for name in names}


def _check_request_stats(stats: dict, tokens: int) -> None:
    """One request's `metrics.speculative_decoding` is consistent in itself (vLLM's definitions)."""
    steps, accepted = stats["num_spec_steps"], stats["per_step_accepted"]
    assert stats["num_spec_tokens"] == K and len(stats["acceptance_histogram"]) == K + 1
    assert len(accepted) == steps and stats["per_step_drafted"] == [K] * steps
    assert stats["acceptance_histogram"] == [accepted.count(j) for j in range(K + 1)]
    assert stats["num_accepted_draft_tokens"] == sum(accepted) and stats["num_draft_tokens"] == K * steps
    assert stats["mean_acceptance_length"] == pytest.approx(1 + sum(accepted) / steps)
    assert stats["draft_acceptance_rate"] == pytest.approx(sum(accepted) / (K * steps))
    # The first token comes from the prompt's prefill; each verify then emits its accepted drafts + 1 (the last
    # one fewer where max_tokens cut it).
    assert steps + 1 <= tokens <= 1 + steps + sum(accepted)


@pytest.mark.skipif(not (DEMO_MODEL / "model_mtp.safetensors").exists(), reason="demo model without MTP layers")
def test_speculative_server_lossless_acceptance_no_compile_after_ready_and_drain(mtp_server_process):
    server = mtp_server_process  # tests.fixtures.MTP_SERVER_ARGS; started with the session, warming up meanwhile
    proc, log_path = server.proc, pathlib.Path(server.log_path)
    try:
        import mimo_jax
        from mimo_jax.text import Tokenizer

        tok = Tokenizer(DEMO_MODEL)
        prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]
        lm = mimo_jax.load_model(DEMO_MODEL, dtype="float32")
        refs = mimo_jax.generate(lm, prompts, max_new_tokens=40, max_batch=2, prefill_chunk=32, max_context=256)
        url = server.url()
        http = httpx.Client(base_url=url, timeout=300)

        # Lossless, and the acceptance in /metrics.
        r = http.post("/v1/completions", json={"prompt": prompts, "max_tokens": 40, "temperature": 0})
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == [tok.decode(ref.token_ids) for ref in refs]
        assert r.json()["metrics"] == {"speculative_decoding": None}  # several sequences: none (as vLLM)
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "mimo:spec_decode_num_draft_tokens_total") > 0
        assert 1.0 < metric_value(metrics, "mimo:spec_decode_mean_accept_length") <= K + 1

        # One request's acceptance, sampled (the first sampled request: it must not compile anything).
        before = _spec_counters(url)
        r = http.post("/v1/completions", json={"prompt": PROMPTS[0], "max_tokens": 48, "temperature": 0.7, "seed": 3})
        stats = r.json()["metrics"]["speculative_decoding"]
        _check_request_stats(stats, r.json()["usage"]["completion_tokens"])
        after = _spec_counters(url)
        assert after["num_drafts"] - before["num_drafts"] == stats["num_spec_steps"]
        assert after["num_draft_tokens"] - before["num_draft_tokens"] == stats["num_draft_tokens"]
        assert after["num_accepted_tokens"] - before["num_accepted_tokens"] == stats["num_accepted_draft_tokens"]
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "mimo:xla_compilations_total") == 0, log_path.read_text()[-3000:]
        # A constrained request (the plain loop over its rows) beside a speculating one: valid JSON, the other
        # still lossless, and nothing compiles (the warm-up ran the constrained loop for every round size).
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            body = {
                "prompt": PROMPTS[2],
                "max_tokens": 40,
                "temperature": 0,
                "response_format": {"type": "json_object"},
            }
            constrained = pool.submit(http.post, "/v1/completions", json=body)
            free = pool.submit(
                http.post, "/v1/completions", json={"prompt": prompts[0], "max_tokens": 40, "temperature": 0}
            )
            constrained, free = constrained.result(), free.result()
        assert constrained.status_code == 200, constrained.text
        choice = constrained.json()["choices"][0]
        assert choice["finish_reason"] == "stop" and isinstance(json.loads(choice["text"]), dict), choice
        assert free.json()["choices"][0]["text"] == tok.decode(refs[0].token_ids)
        metrics = http.get("/metrics").text
        assert metric_value(metrics, "mimo:xla_compilations_total") == 0, log_path.read_text()[-3000:]
        # Streamed chat: the stats ride the usage chunk.
        body = {"messages": [{"role": "user", "content": "def add(a, b):"}], "max_tokens": 24, "temperature": 0}
        body |= {"stream": True, "stream_options": {"include_usage": True}}
        with http.stream("POST", "/v1/chat/completions", json=body) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        _check_request_stats(events[-1]["metrics"]["speculative_decoding"], events[-1]["usage"]["completion_tokens"])
        assert all("metrics" not in e for e in events[:-1])

        # SIGTERM while a long stream runs: it completes, /health and new requests answer 503, the exit is 0.
        long = {"prompt": PROMPTS[1], "max_tokens": 400, "temperature": 0, "ignore_eos": True, "stream": True}
        with concurrent.futures.ThreadPoolExecutor(1) as pool:

            def stream() -> list[str]:
                with httpx.stream("POST", url + "/v1/completions", json=long, timeout=120) as s:
                    return [line[6:] for line in s.iter_lines() if line.startswith("data: ")]

            streamed = pool.submit(stream)
            while http.get("/health").json()["running"] == 0:
                time.sleep(0.01)
            proc.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 10
            while (health := http.get("/health")).status_code == 200:  # the signal is handled between bytecodes
                assert time.monotonic() < deadline
                time.sleep(0.01)
            assert health.status_code == 503 and health.json()["status"] == "draining"
            assert not streamed.done()
            refused = http.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
            events = streamed.result(timeout=120)
        assert events[-1] == "[DONE]" and json.loads(events[-2])["choices"][0]["finish_reason"] == "length"
        assert sum(len(tok.encode(json.loads(e)["choices"][0]["text"], add_special_tokens=False)) for e in events[:-1])
        assert proc.wait(60) == 0, log_path.read_text()[-3000:]
        assert "draining" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
