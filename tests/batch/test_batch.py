"""`python -m mimo_jax.batch` on a tiny checkpoint over 8 CPU devices: results equal `generate`, resume
after a crash (and a torn last line), malformed lines reported by line number, --strict, launchers."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

import mimo_jax
from mimo_jax import batch
from mimo_jax.sharding import make_mesh
from tests.fixtures import ROOT, read_results, write_batch_checkpoint, write_jsonl

ENGINE = dict(max_batch=3, max_context=48, prefill_chunk=16, max_round_tokens=4, max_stop_ids=4, max_top_logprobs=2)
SETTINGS = dict(max_new_tokens=12)


def without_timing(results: dict) -> dict:
    return {k: {f: v for f, v in r.items() if f != "timing"} for k, r in results.items()}


REQUESTS = [
    {"id": "a", "prompt": "w5 w17 w33 w2 w40 w41 w8"},
    {"id": 7, "prompt_ids": [60, 1, 20, 21, 61], "temperature": 0.9, "top_p": 0.9, "max_tokens": 9},
    {"id": "chat", "messages": [{"role": "user", "content": "w12 w13"}], "temperature": 1.0, "seed": 123},
    {"id": "think", "messages": [{"role": "user", "content": "w12 w13"}], "chat_template_kwargs": {"thinking": 1}},
    {"id": "lp", "prompt": "w50 w51", "logprobs": 2, "stop_token_ids": [30, 31], "metadata": {"k": [1]}},
    {"id": "long", "prompt_ids": list(range(4, 34)), "max_new_tokens": 5, "ignore_eos": True, "top_k": 5,
     "temperature": 0.7},
    {"id": "7", "prompt": "w5", "repetition_penalty": 1.3, "presence_penalty": 0.5},
]  # fmt: skip


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_batch_checkpoint(str(tmp_path_factory.mktemp("batch") / "tiny"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    lm = mimo_jax.load_model(checkpoint, mesh=make_mesh(data=2, tensor=2, expert=2))
    return mimo_jax.Engine(lm, **ENGINE)


@pytest.fixture(scope="module")
def tokenizer(checkpoint):
    return batch.load_tokenizer(checkpoint)


def run(engine, tokenizer, input_path, output_path, logs=None, **settings):
    options = dict(sampling=SETTINGS, progress=False, block_size=2)
    options.update(settings)
    return batch.run_batch(
        engine,
        str(input_path),
        str(output_path),
        batch.RunSettings(**options),
        tokenizer=tokenizer[0],
        template=tokenizer[1],
        log=(logs.append if logs is not None else None),
    )


@pytest.fixture(scope="module")
def full_run(engine, tokenizer, tmp_path_factory):
    """Every request of REQUESTS once, uninterrupted."""
    tmp = tmp_path_factory.mktemp("full")
    summary = run(engine, tokenizer, write_jsonl(tmp / "in.jsonl", REQUESTS), tmp / "out.jsonl", seed=11)
    return summary, read_results(tmp / "out.jsonl")


def test_results_equal_generate(engine, tokenizer, full_run):
    """Each line equals `generate` on the same prompt ids with the line's settings and derived seed."""
    tok, template = tokenizer
    summary, results = full_run
    assert summary.completed == len(REQUESTS) and summary.skipped == 0
    assert set(results) == {r["id"] for r in REQUESTS}
    eos = (61,)
    for req in REQUESTS:
        got = results[req["id"]]
        if "prompt_ids" in req:
            ids = req["prompt_ids"]
        elif "prompt" in req:
            ids = tok.encode(req["prompt"], add_special_tokens=True)
        else:
            text = template.render(req["messages"], **req.get("chat_template_kwargs", {}))
            ids = tok.encode(text, add_special_tokens=False)
        seed = req.get("seed", batch.request_seed(11, req["id"]))
        kwargs = {
            k: req[k] for k in ("temperature", "top_p", "top_k", "repetition_penalty", "presence_penalty") if k in req
        }
        stops = tuple(req.get("stop_token_ids", ())) + (() if req.get("ignore_eos") else eos)
        max_new = req.get("max_tokens", req.get("max_new_tokens", SETTINGS["max_new_tokens"]))
        (want,) = mimo_jax.generate(
            engine.lm, [ids], max_new_tokens=max_new, seed=[seed], stop_token_ids=stops, ignore_eos=True,
            logprobs=req.get("logprobs"), engine=engine, **kwargs,
        )  # fmt: skip
        assert got["token_ids"] == want.token_ids, req["id"]
        assert got["finish_reason"] == want.finish_reason
        assert got["seed"] == seed
        assert got["text"] == tok.decode(want.token_ids, skip_special_tokens=True)
        assert got["usage"] == {
            "prompt_tokens": len(ids),
            "completion_tokens": len(want.token_ids),
            "total_tokens": len(ids) + len(want.token_ids),
        }
        assert got["timing"]["wait_s"] >= 0 and 0 <= got["timing"]["first_tokens_s"] <= got["timing"]["total_s"]
        if "logprobs" in req:
            np.testing.assert_allclose(got["logprobs"], want.logprobs, rtol=1e-6)
            assert [[t for t, _ in top] for top in got["top_logprobs"]] == [
                [t for t, _ in top] for top in want.top_logprobs
            ]
        else:
            assert "logprobs" not in got
    assert results["lp"]["metadata"] == {"k": [1]} and "metadata" not in results["a"]
    assert results["think"]["usage"]["prompt_tokens"] == results["chat"]["usage"]["prompt_tokens"] - 1
    assert results[7]["token_ids"] != results["7"]["token_ids"]  # 7 and "7" are different ids
    assert results["long"]["finish_reason"] == "length" and len(results["long"]["token_ids"]) == 5


def test_resume_after_a_crash_and_a_torn_line(engine, tokenizer, full_run, tmp_path, monkeypatch):
    """A run that dies mid-way leaves whole lines; a rerun cuts a torn tail and runs only what is missing."""
    _, want = full_run
    inp = write_jsonl(tmp_path / "in.jsonl", REQUESTS)
    out = tmp_path / "out.jsonl"
    real_step, steps = engine.step, []

    def crashing_step(*args, **kwargs):
        steps.append(1)
        if len(steps) == 4:
            raise RuntimeError("simulated crash")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(engine, "step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(engine, tokenizer, inp, out, seed=11)
    monkeypatch.undo()
    first = read_results(out)
    assert 0 < len(first) < len(REQUESTS)
    with open(out, "ab") as f:  # a write cut short by the crash
        f.write(b'{"id": "half", "text": "w1 w')
    for engine_slot_id in list(engine._by_id):  # the crashed run's requests were left in the engine
        engine.cancel(engine_slot_id)

    done, cut = batch.ResultWriter.recover(str(out))
    assert cut == len(b'{"id": "half", "text": "w1 w') and done == {batch.id_key(k) for k in first}
    with open(out, "ab") as f:
        f.write(b'{"id": "half"')
    summary = run(engine, tokenizer, inp, out, seed=11)
    assert summary.done_before == len(first) and summary.completed == len(REQUESTS) - len(first)
    assert without_timing(read_results(out)) == without_timing(want)
    again = run(engine, tokenizer, inp, out, seed=11)  # nothing left to do
    assert again.completed == 0 and again.done_before == len(REQUESTS)


BAD_LINES = [
    {"id": "ok1", "prompt": "w5 w6"},
    '{"id": "broken", "prompt": ',  # 2: not JSON
    {"prompt": "w5"},  # 3: no id
    {"id": "two", "prompt": "w5", "prompt_ids": [1]},  # 4: two prompts
    {"id": "ok1", "prompt": "w7"},  # 5: repeated id
    {"id": "bad_t", "prompt": "w5", "temperature": -1},  # 6: out of range
    {"id": "typo", "prompt": "w5", "temprature": 0.5},  # 7: unknown field
    "",  # 8: blank, fine
    {"id": "toolong", "prompt_ids": [5] * 60},  # 9: does not fit max_context=48
    {"id": "vocab", "prompt_ids": [5, 64]},  # 10: outside the vocabulary
    {"id": "ok2", "prompt_ids": [8, 9]},
    "[1, 2]",  # 12: not an object
    {"id": 1.5, "prompt": "w5"},  # 13: float id
    {"id": "lp", "prompt": "w5", "logprobs": 3},  # 14: more than --max-logprobs
]


def test_malformed_lines_are_reported_and_skipped(engine, tokenizer, tmp_path):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_LINES)
    logs = []
    summary = run(engine, tokenizer, inp, tmp_path / "out.jsonl", logs)
    assert set(read_results(tmp_path / "out.jsonl")) == {"ok1", "ok2"}
    reported = {int(m.split(":")[1]): m for m in logs if m.startswith(inp + ":")}
    assert sorted(reported) == [2, 3, 4, 5, 6, 7, 9, 10, 12, 13, 14] and summary.skipped == 11
    for line, words in {
        2: "not valid JSON",
        3: 'missing "id"',
        4: "exactly one of",
        5: "repeats line 1",
        6: "temperature=-1",
        7: "temprature",
        9: "max_context=48",
        10: "token ids must lie in [0, 64)",
        12: "expected a JSON object",
        13: '"id" must be',
        14: "max_top_logprobs=2",
    }.items():
        assert words in reported[line], reported[line]
    # --strict: a prompt that does not fit stops the run where it is met
    with pytest.raises(batch.InputError, match="max_context=48"):
        run(engine, tokenizer, write_jsonl(tmp_path / "in2.jsonl", BAD_LINES[8:9]), tmp_path / "o2.jsonl", strict=True)


def nested(depth: int) -> str:
    """JSON text of `depth` nested arrays around a number: [[[...1...]]]."""
    return "[" * depth + "1" + "]" * depth


def deep_tool_call(depth: int) -> str:
    """A chat line whose assistant message carries tool-call arguments nested `depth` levels deep."""
    call = '{"id": "c1", "type": "function", "function": {"name": "f", "arguments": ' + nested(depth) + "}}"
    return (
        '{"id": "deep_chat", "messages": [{"role": "user", "content": "w12"}, '
        '{"role": "assistant", "content": "w13", "tool_calls": [' + call + "]}, "
        '{"role": "user", "content": "w14"}]}'
    )


DEEP_LINES = [
    {"id": "ok1", "prompt": "w5 w6"},
    '{"id": "deep", "prompt": "w5", "metadata": ' + nested(100_000) + "}",  # 2: json.loads would recurse
    deep_tool_call(900),  # 3: json.loads copes, rendering the chat template would recurse
    {"id": "ok2", "messages": [{"role": "user", "content": "w12 w13"}]},
]


def test_deeply_nested_lines_are_reported_and_skipped(checkpoint, tmp_path, capsys):
    """Lines nested too deeply are bad lines like any other: reported as FILE:LINE, skipped, the run goes on
    (and a rerun skips them again instead of dying on them)."""
    inp = write_jsonl(tmp_path / "in.jsonl", DEEP_LINES)
    out = tmp_path / "out.jsonl"
    argv = ["--model", checkpoint, "--input", inp, "--output", str(out), "--mesh", "data=2,tensor=2,expert=2",
            "--max-batch", "3", "--max-context", "48", "--prefill-chunk", "16", "--round-tokens", "4",
            "--max-tokens", "4", "--no-progress"]  # fmt: skip
    assert batch.main(argv) == batch.EXIT_SKIPPED
    err = capsys.readouterr().err
    assert f"{inp}:2: " in err and f"{inp}:3: " in err and "nested" in err
    assert set(read_results(out)) == {"ok1", "ok2"}
    assert batch.main(argv) == batch.EXIT_SKIPPED  # the rerun: nothing left, the same lines reported
    err = capsys.readouterr().err
    assert f"{inp}:2: " in err and f"{inp}:3: " in err and "0 request(s) to run, 2 already in" in err


def test_recursion_while_parsing_or_prompting_is_a_bad_line(engine, tokenizer, tmp_path, monkeypatch):
    """Without the depth bound the fallbacks hold: json.loads' RecursionError (depth 100000) and the chat
    template's (tool-call arguments 600 deep parse, then recurse while rendering) are reported and skipped."""
    monkeypatch.setattr("mimo_jax.batch.run.MAX_JSON_DEPTH", 10**9, raising=False)
    lines = DEEP_LINES[:2] + [deep_tool_call(600)] + DEEP_LINES[3:]
    assert batch.parse_line(lines[2], 3) is not None  # reaches the prompting step
    inp = write_jsonl(tmp_path / "in.jsonl", lines)
    logs = []
    summary = run(engine, tokenizer, inp, tmp_path / "out.jsonl", logs)
    assert set(read_results(tmp_path / "out.jsonl")) == {"ok1", "ok2"}
    reported = {int(m.split(":")[1]): m for m in logs if m.startswith(inp + ":")}
    assert sorted(reported) == [2, 3] and summary.skipped == 2 and summary.completed == 2
    # line 3: the chat template's own depth bound (text.py) refuses it before rendering could recurse
    assert "nested too deeply to parse" in reported[2] and "nest deeper than 200 levels" in reported[3]


def test_cli_strict_fails_before_loading_the_model(tmp_path, capsys):
    inp = write_jsonl(tmp_path / "in.jsonl", BAD_LINES[:3])
    argv = ["--model", str(tmp_path / "no-such-model"), "--input", inp, "--output", str(tmp_path / "out.jsonl")]
    assert batch.main(argv + ["--strict"]) == batch.EXIT_FAILED
    err = capsys.readouterr().err
    assert f"{inp}:2: not valid JSON" in err and f"{inp}:3: missing" in err and "nothing was run" in err
    assert not (tmp_path / "out.jsonl").exists() or not (tmp_path / "out.jsonl").read_text()
    assert batch.main(argv + ["--output", inp]) == batch.EXIT_FAILED  # never append to the input
    assert "must not be the input" in capsys.readouterr().err
    # nothing left to run (the output has ok1): no model is loaded, the bad lines are still reported
    write_jsonl(tmp_path / "out.jsonl", [{"id": "ok1", "token_ids": []}])
    assert batch.main(argv) == batch.EXIT_SKIPPED
    assert "0 request(s) to run, 1 already in" in capsys.readouterr().err


def test_request_seeds_and_ids():
    assert batch.request_seed(0, "a") == batch.request_seed(0, "a")
    seeds = {batch.request_seed(s, i) for s in range(3) for i in ["a", "b", 1, "1"]}
    assert len(seeds) == 12 and all(0 <= s < 2**31 for s in seeds)
    assert batch.id_key(1) != batch.id_key("1")
    # Seeds: the engine's one rule (a signed 64-bit integer, used whole), with its message.
    from mimo_jax.engine.sampling import check_seed

    for seed in (2**31, 2**32, -(2**32), 2**63 - 1, -(2**63)):
        assert batch.parse_line(json.dumps({"id": 1, "prompt": "x", "seed": seed}), 1).settings["seed"] == seed
    for seed in (2**63, -(2**63) - 1):
        with pytest.raises(ValueError) as rule:
            check_seed(seed)
        with pytest.raises(batch.InputError) as error:
            batch.parse_line(json.dumps({"id": 1, "prompt": "x", "seed": seed}), 1)
        assert str(error.value) == str(rule.value)
    with pytest.raises(batch.InputError, match="not valid UTF-8"):
        batch.parse_line(b'{"id": 1, "prompt": "\xff"}', 4)
    with pytest.raises(batch.InputError, match="max_new_tokens=0: expected >= 1"):  # the engine's 0 only prefills
        batch.parse_line(json.dumps({"id": 1, "prompt": "x", "max_tokens": 0}), 1)


def test_deeply_nested_lines_are_input_errors():
    deep = "[" * 100000 + "]" * 100000
    with pytest.raises(batch.InputError, match="nested too deeply"):
        batch.parse_line('{"id": 1, "prompt": "x", "metadata": ' + deep + "}", 3)


def test_temperature_is_bounded_as_in_the_server():
    from mimo_jax.engine.sampling import MAX_TEMPERATURE

    assert batch.parse_line(json.dumps({"id": 1, "prompt": "x", "temperature": MAX_TEMPERATURE}), 1)
    for value in (1e308, MAX_TEMPERATURE + 0.5):
        with pytest.raises(batch.InputError, match=re.escape(f"temperature={value!r}: expected in [0, 100]")):
            batch.parse_line(json.dumps({"id": 1, "prompt": "x", "temperature": value}), 2)


def test_launchers_dry_run(tmp_path):
    wrapper = subprocess.run(
        [sys.executable, os.path.join(ROOT, "launch", "batch_infer.py"), "--help"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "--input" in wrapper.stdout and "--coordinator-address" in wrapper.stdout
    for script in ("tpu_vm.sh", "gpu_multinode.sh"):
        subprocess.run(["bash", "-n", os.path.join(ROOT, "launch", script)], check=True)
    env = {**os.environ, "DRY_RUN": "1", "HOSTS": "node-a node-b node-c", "PORT": "9999"}
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "gpu_multinode.sh"), "--model", "/ckpt", "--input", "in.jsonl",
         "--output", "out.jsonl", "--mesh", "tensor=8,expert=3"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    lines = [line for line in out.splitlines() if "mimo_jax.batch" in line]
    assert len(lines) == 3
    for pid, line in enumerate(lines):
        assert f"MIMO_PROCESS_ID={pid}" in line and "MIMO_NUM_PROCESSES=3" in line
        assert "MIMO_COORDINATOR_ADDRESS=node-a:9999" in line and "--mesh tensor=8,expert=3" in line
    env = {**os.environ, "DRY_RUN": "1", "TPU_NAME": "v5p-64", "ZONE": "us-east5-a", "WORKERS": "8"}
    out = subprocess.run(
        ["bash", os.path.join(ROOT, "launch", "tpu_vm.sh"), "--model", "/ckpt", "--input", "in.jsonl",
         "--output", "out.jsonl", "--mesh", "tensor=4,expert=16"],
        env=env, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    assert "--worker=all" in out and "MIMO_NUM_PROCESSES=8" in out and "agent-worker-number" in out
    assert "--mesh tensor=4,expert=16" in out
