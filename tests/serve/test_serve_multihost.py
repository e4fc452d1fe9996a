"""Multi-host serving: two processes (jax.distributed over gloo on localhost, two CPU devices each)
run the same `python -m mimo_jax.serve` command on one 4-device mesh. Process 0 listens and
broadcasts each round's plan; process 1 follows. Answers equal single-process `generate` (and the
planted chat script), and
stopping process 0 shuts both down cleanly.
"""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import httpx
import jax
import numpy as np

from mimo_jax import sharding
from tests import fixtures as sf


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_server_follows_process_zero(tmp_path):
    directory = sf.write_checkpoint(str(tmp_path / "tiny-mimo"))
    port = _free_port()
    env = sf.child_env(2, **{sharding.COORDINATOR_ENV: f"127.0.0.1:{_free_port()}", sharding.NUM_PROCESSES_ENV: "2"})
    cmd = [
        sys.executable, "-m", "mimo_jax.serve", "--model", directory, "--port", str(port), "--dtype", "float32",
        "--max-batch", "2", "--max-context", "256", "--prefill-chunk", "32", "--round-tokens", "4",
        "--mesh", "tensor=2,expert=2",
    ]  # fmt: skip
    logs = [open(tmp_path / f"process{pid}.log", "w") for pid in range(2)]
    procs = [
        subprocess.Popen(
            cmd, env={**env, sharding.PROCESS_ID_ENV: str(pid)}, stdout=logs[pid], stderr=subprocess.STDOUT
        )
        for pid in range(2)
    ]

    def log_text() -> str:
        return "\n".join(f"--- process {pid}\n" + (tmp_path / f"process{pid}.log").read_text() for pid in range(2))

    try:
        import mimo_jax
        from mimo_jax.text import Tokenizer

        tok = Tokenizer(directory)
        prompts = [tok.encode(p, add_special_tokens=True) for p in ("def fib", "Hello there")]
        lm = mimo_jax.load_model(directory, dtype="float32")
        refs = mimo_jax.generate(lm, prompts, max_new_tokens=10, max_batch=2, prefill_chunk=32, max_context=256)
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 300
        while True:
            assert all(p.poll() is None for p in procs), log_text()
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "not ready:\n" + log_text()
            time.sleep(0.5)
        r = httpx.post(
            url + "/v1/completions", json={"prompt": prompts, "max_tokens": 10, "temperature": 0}, timeout=120
        )
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [tok.decode(ref.token_ids) for ref in refs]
        # Prompt scores (echo + logprobs, lm-eval's loglikelihood shape) reach process 0 like tokens do.
        body = {"prompt": prompts, "max_tokens": 0, "echo": True, "logprobs": 1}
        scored = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
        for choice in scored["choices"]:
            ids = prompts[choice["index"]]
            ref = np.asarray(jax.nn.log_softmax(lm.logits(np.array([ids]))[0], axis=-1))
            assert choice["logprobs"]["token_logprobs"][0] is None
            got = choice["logprobs"]["token_logprobs"][1:]
            np.testing.assert_allclose(got, ref[np.arange(len(ids) - 1), ids[1:]], rtol=1e-4, atol=1e-4)
        # The prefix cache on two processes: a repeated long prompt is served from it on both (the followers make
        # the same page and snapshot decisions from the same plans), with the same tokens as without it.
        long_prompt = "def prefix_probe():\n" + "".join(f"    x{i} = {i}\n" for i in range(30))
        ids = tok.encode(long_prompt, add_special_tokens=True)
        (long_ref,) = mimo_jax.generate(lm, [ids], max_new_tokens=5, max_batch=2, prefill_chunk=32, max_context=256)
        for attempt in range(2):
            body = {"prompt": long_prompt, "max_tokens": 5, "temperature": 0}
            out = httpx.post(url + "/v1/completions", json=body, timeout=120).json()
            assert out["choices"][0]["text"] == tok.decode(long_ref.token_ids)
            assert (out["usage"]["prompt_tokens_details"]["cached_tokens"] > 0) == (attempt == 1), out["usage"]
        chat = httpx.post(
            url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "Weather?"}], "temperature": 0, "stream": False},
            timeout=120,
        ).json()
        assert chat["choices"][0]["message"]["reasoning_content"] == sf.REASONING, chat
        # Stopping process 0 stops process 1 too (it receives the shutdown plan), both without error.
        procs[0].send_signal(signal.SIGTERM)
        for p in procs:
            p.wait(60)
        assert procs[1].returncode == 0, log_text()
        assert "process 0 shut down" in (tmp_path / "process1.log").read_text()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        for f in logs:
            f.close()
