"""The server with MTP speculative decoding on the embedded demo model (trained MTP layers):
greedy answers equal offline `generate` without speculation (it is lossless), and /metrics
reports the acceptance the engine measured (more than one token per target forward).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest

from mimo_jax.weights.demo import DEMO_MODEL
from tests.fixtures import ROOT

PROMPTS = ["def fibonacci(n):", "import os\n\n\ndef list_files(path):", "class Stack:\n    def push(self, item):"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _metric(text: str, name: str) -> float:
    line = next(x for x in text.splitlines() if x.startswith(f"mimo_jax_{name} "))
    return float(line.split()[1])


@pytest.mark.skipif(not (DEMO_MODEL / "model_mtp.safetensors").exists(), reason="demo model without MTP layers")
def test_speculative_server_is_lossless_and_reports_acceptance(tmp_path):
    port = _free_port()
    cmd = [
        sys.executable, "-m", "mimo_jax.serve", "--port", str(port), "--dtype", "float32", "--speculative-steps", "2",
        "--max-batch", "2", "--max-context", "256", "--prefill-chunk", "32", "--round-tokens", "8",
        "--log-level", "warning",
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("XLA_FLAGS", None)
    log_path = tmp_path / "server.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        import mimo_jax
        from mimo_jax.text import Tokenizer

        tok = Tokenizer(DEMO_MODEL)
        prompts = [tok.encode(p, add_special_tokens=True) for p in PROMPTS]
        lm = mimo_jax.load_model(DEMO_MODEL, dtype="float32")
        refs = mimo_jax.generate(lm, prompts, max_new_tokens=40, max_batch=2, prefill_chunk=32, max_context=256)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log_path.read_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready:\n" + log_path.read_text()
            time.sleep(0.5)
        r = httpx.post(
            url + "/v1/completions", json={"prompt": prompts, "max_tokens": 40, "temperature": 0}, timeout=300
        )
        choices = sorted(r.json()["choices"], key=lambda c: c["index"])
        assert [c["text"] for c in choices] == [tok.decode(ref.token_ids) for ref in refs]
        metrics = httpx.get(url + "/metrics").text
        forwards_tokens = _metric(metrics, "spec_decode_mean_accept_length")
        assert _metric(metrics, "spec_decode_draft_tokens_total") > 0
        assert 1.0 < forwards_tokens <= 3.0  # 2 drafts: at most 3 tokens per target forward
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
