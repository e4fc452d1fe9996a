"""`python -m mimo_jax.batch` as two processes on localhost (4 CPU devices each, one 8-device mesh, gloo):
process 0 alone reads and writes; both are killed mid-run and restarted; the resumed output equals
single-process `generate`."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import mimo_jax
from mimo_jax import batch, sharding
from mimo_jax.engine.driver import BroadcastChannel, RoundPlan
from tests.fixtures import child_env, read_results, write_batch_checkpoint, write_jsonl

ENGINE = ["--max-batch", "3", "--max-context", "40", "--prefill-chunk", "16", "--round-tokens", "4"]
SEED = 5
GREEDY = [{"id": f"g{i}", "prompt_ids": [4 + i, 20 + 2 * i, 7, 9 + i][: 1 + i % 4]} for i in range(6)]
SAMPLED = [{"id": i, "prompt": " ".join(f"w{5 + (i * j) % 50}" for j in range(1 + i)), "temperature": 0.8}
           for i in range(6)]  # fmt: skip
REQUESTS = [r for pair in zip(GREEDY, SAMPLED, strict=True) for r in pair]
MAX_TOKENS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start(directory: str, tmp, run: str) -> list[subprocess.Popen]:
    """Both processes of one run; process 1 is given paths that do not exist (only process 0 reads or writes)."""
    env = child_env(
        4,
        # the second run reuses the first one's compiled programs
        JAX_COMPILATION_CACHE_DIR=str(tmp / "jax-cache"),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_CPU_COLLECTIVES_IMPLEMENTATION="gloo",  # cross-process collectives on the CPU backend
        **{sharding.COORDINATOR_ENV: f"localhost:{_free_port()}", sharding.NUM_PROCESSES_ENV: "2"},
    )
    procs = []
    for pid in range(2):
        files = [tmp / "in.jsonl", tmp / "out.jsonl"] if pid == 0 else [tmp / "absent/in.jsonl", tmp / "absent/o"]
        cmd = [sys.executable, "-m", "mimo_jax.batch", "--model", directory, "--input", str(files[0]),
               "--output", str(files[1]), "--mesh", "data=2,tensor=2,expert=2", "--dtype", "float32",
               "--seed", str(SEED), "--max-tokens", str(MAX_TOKENS), "--block-size", "3", "--no-progress", *ENGINE]  # fmt: skip
        log = open(tmp / f"{run}-process{pid}.log", "w")
        procs.append(
            subprocess.Popen(cmd, env={**env, sharding.PROCESS_ID_ENV: str(pid)}, stdout=log, stderr=subprocess.STDOUT)
        )
    return procs


def logs(tmp, run: str) -> str:
    return "\n".join(f"--- process {pid}\n" + (tmp / f"{run}-process{pid}.log").read_text() for pid in range(2))


def wait(procs, tmp, run: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(timeout=max(deadline - time.monotonic(), 1))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail(f"{run} timed out\n{logs(tmp, run)[-4000:]}")


def count_lines(path) -> int:
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def test_two_processes_killed_and_resumed_equal_generate(tmp_path):
    directory = write_batch_checkpoint(str(tmp_path / "tiny"))
    write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"

    # Run 1, killed (SIGKILL, both processes) once a few results are on disk.
    procs = start(directory, tmp_path, "run1")
    killed_at = []

    def kill_when_started():
        while all(p.poll() is None for p in procs):
            if (n := count_lines(out)) >= 2:
                for p in procs:
                    p.send_signal(signal.SIGKILL)
                killed_at.append(n)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_when_started)
    watcher.start()
    want = oracle(directory)  # meanwhile, single process
    watcher.join(timeout=600)
    wait(procs, tmp_path, "run1")
    assert killed_at, f"run 1 ended before it could be killed\n{logs(tmp_path, 'run1')[-4000:]}"
    assert all(p.returncode == -signal.SIGKILL for p in procs)
    first = read_results(out)  # whole lines only
    assert 2 <= len(first) < len(REQUESTS)
    with open(out, "ab") as f:
        f.write(b'{"id": "g5", "text": ')  # as if the kill had cut a write short

    # Run 2: both processes again; process 0 cuts the torn line and runs only what is missing.
    procs = start(directory, tmp_path, "run2")
    wait(procs, tmp_path, "run2")
    assert [p.returncode for p in procs] == [0, 0], logs(tmp_path, "run2")[-4000:]
    log0 = (tmp_path / "run2-process0.log").read_text()
    assert "cut a torn last line" in log0
    assert f"{len(REQUESTS) - len(first)} request(s) to run, {len(first)} already in" in log0
    assert "2 process(es)" in log0
    assert not (tmp_path / "absent").exists()

    results = read_results(out)
    assert set(results) == {r["id"] for r in REQUESTS}
    for rid, r in results.items():
        assert r["token_ids"] == want[rid], rid
    assert {k: results[k] for k in first} == first  # earlier lines untouched


def oracle(directory: str) -> dict:
    """Single-process, single-device `generate` with the seeds the batch derives from --seed and the ids."""
    lm = mimo_jax.load_model(directory)
    tok, _ = batch.load_tokenizer(directory)
    engine = mimo_jax.Engine(lm, max_batch=4, max_context=40, prefill_chunk=16, max_round_tokens=8)
    want = {}
    for group, temperature in ((GREEDY, 0.0), (SAMPLED, 0.8)):
        prompts = [r.get("prompt_ids") or tok.encode(r["prompt"], add_special_tokens=True) for r in group]
        seeds = [batch.request_seed(SEED, r["id"]) for r in group]
        results = mimo_jax.generate(
            lm, prompts, max_new_tokens=MAX_TOKENS, temperature=temperature, seed=seeds, engine=engine
        )
        want.update({r["id"]: res.token_ids for r, res in zip(group, results, strict=True)})
    return want


def test_work_blocks_round_trip():
    """What process 1 rebuilds from a broadcast plan is what process 0 runs."""
    items = [
        batch.WorkItem([1, 2, 3], mimo_jax.SamplingOptions(temperature=0.5, top_k=3, seed=9, stop_token_ids=(1, 2))),
        batch.WorkItem([7], mimo_jax.SamplingOptions(logprobs=2, max_new_tokens=5, repetition_penalty=1.2)),
    ]
    plan = RoundPlan()
    for i, w in enumerate(items):
        plan.add_request(i, w.prompt_ids, w.options)
    got = RoundPlan.decode(plan.encode()).requests()
    assert [(ids, options) for _, ids, options in got] == [(w.prompt_ids, w.options) for w in items]


def test_process_zero_error_aborts_every_process(tmp_path):
    """A --strict error on process 0 while reading is sent as an abort: process 0 raises its
    own error, the others raise Aborted (instead of waiting in the next collective)."""
    sent = []

    def fake_broadcast(array):
        sent.append(array.tolist())
        return array

    lm = mimo_jax.load_model(write_batch_checkpoint(str(tmp_path / "tiny")))
    engine = mimo_jax.Engine(lm, max_batch=3, max_context=40, prefill_chunk=16)
    inp = write_jsonl(tmp_path / "in.jsonl", [{"id": "a", "prompt_ids": [1]}, {"id": "b", "prompt_ids": [5] * 60}])
    settings = batch.RunSettings(sampling={}, strict=True, block_size=8, progress=False)
    with pytest.raises(batch.InputError, match="no room"):
        batch.run_batch(engine, inp, str(tmp_path / "out.jsonl"), settings, channel=BroadcastChannel(fake_broadcast))
    assert sent == [[-1]]
    with pytest.raises(batch.Aborted):
        batch.run_batch(engine, None, None, settings, channel=BroadcastChannel(lambda array: np.full_like(array, -1)))
