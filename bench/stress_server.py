"""Stress `python -m mimo_jax.serve` on loopback and report, item by item, how it copes (not run in CI).

Starts the server on the demo model (or --model DIR) on a free 127.0.0.1 port with --access-log, or
attaches to a running one with --url (loopback only; give --pid and --log to get its RSS and log
counts), then reproduces the reliability issue's server items and the general bar:

  1. big bodies while /health is polled: a --chunked-mb body sent with Transfer-Encoding: chunked
     (JSON whitespace around a tiny request: the body limit, not the prompt, is under test) and a
     --prompt-mb prompt sent with Content-Length: status, worst /health latency, server RSS before/after;
  2. --disconnects non-streaming requests (`def f(`, 1000 tokens, ignore_eos) whose client gives up
     after 1-3 s: tracebacks / InvalidStateError / 500s in the server log, and whether the
     `mimo:num_requests_running` gauge returns to 0 (no leaked slots);
  3. tool-call arguments nested 900 and 100000 deep in an assistant message (a JSON string, as
     OpenAI sends them, and an object): status codes;
  4. a tool schema whose `properties` is a string or a list (the demo model's `read_source` tool, which
     it calls when asked for a function's source: a valid schema is the control), non-streamed and
     streamed: status, and for the stream whether it ended with an error event and `data: [DONE]`;
  5. keep-alive after a 5xx: on one raw HTTP/1.1 connection, a request that gets a 5xx, then a good one;
  bar: --clients concurrent clients for --seconds, streaming requests with random disconnects mixed
     with garbage requests (malformed JSON, wrong types): 5xx count, streams cut without [DONE], and
     slots still running after the run.

Every phase is bounded in count and wall time (--seconds, --big-timeout, --settle-seconds) and stops by
itself; only 127.0.0.1 is contacted. Prints a markdown table; --json FILE writes everything measured.

    PYTHONPATH=. python bench/stress_server.py --clients 16 --seconds 20          # start a demo server
    PYTHONPATH=. python bench/stress_server.py --url http://127.0.0.1:8000 --json /tmp/stress.json
    PYTHONPATH=. python bench/stress_server.py --items 2,5,bar --clients 64 --seconds 60
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse

import httpx

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOOPBACK = {"127.0.0.1", "localhost", "::1"}
ITEMS = ("1", "2", "3", "4", "5", "bar")
MB = 1 << 20


# ============================================================================= the server under test
class Target:
    """The server: its URL, and (when known) its process id and log file."""

    def __init__(self, url: str, pid: int | None = None, log_path: str | None = None, proc=None):
        self.url = url.rstrip("/")
        self.pid = pid
        self.log_path = log_path
        self.proc = proc
        parsed = urllib.parse.urlsplit(self.url)
        self.host, self.port = parsed.hostname, parsed.port or 80

    # ---------------------------------------------------------------- memory (Linux /proc)
    def memory(self) -> dict | None:
        """VmRSS and VmHWM (peak RSS since the process started) in MiB, or None without a local pid."""
        if self.pid is None:
            return None
        try:
            with open(f"/proc/{self.pid}/status") as f:
                fields = dict(line.split(":", 1) for line in f if ":" in line)
        except OSError:
            return None
        return {k: round(int(fields[k].split()[0]) / 1024, 1) for k in ("VmRSS", "VmHWM") if k in fields}

    # ---------------------------------------------------------------- the log
    def log_mark(self) -> int:
        return os.path.getsize(self.log_path) if self.log_path and os.path.exists(self.log_path) else 0

    def log_since(self, mark: int) -> str | None:
        if not self.log_path or not os.path.exists(self.log_path):
            return None
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    def log_counts(self, mark: int) -> dict | None:
        """What went wrong in the log since `mark`: tracebacks, InvalidStateError, 5xx answers (access log)."""
        text = self.log_since(mark)
        if text is None:
            return None
        return {
            "tracebacks": text.count("Traceback (most recent call last)"),
            "InvalidStateError": text.count("InvalidStateError"),
            "5xx_logged": len(re.findall(r'HTTP/1\.[01]" 5\d\d', text)),
            "unhandled_errors": text.count("unhandled error in"),
        }

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args: argparse.Namespace, workdir: str) -> Target:
    """`python -m mimo_jax.serve` on a free loopback port, its output in a log file; waits for its ready line."""
    port = _free_port()
    log_path = args.server_log or os.path.join(workdir, "server.log")
    cmd = [sys.executable, "-m", "mimo_jax.serve", "--host", "127.0.0.1", "--port", str(port)]
    cmd += ["--max-batch", str(args.max_batch), "--access-log"]
    if args.model:
        cmd += ["--model", args.model]
    if args.max_context:
        cmd += ["--max-context", str(args.max_context)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    log_file = open(log_path, "wb")  # noqa: SIM115 (the child writes it for its whole life)
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    log_file.close()
    target = Target(f"http://127.0.0.1:{port}", proc.pid, log_path, proc)
    print(f"started {' '.join(cmd[1:])} (pid {proc.pid}, log {log_path})", file=sys.stderr, flush=True)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited with status {proc.returncode}; see {log_path}")
        if "ready: serving" in (target.log_since(0) or ""):  # our server's line, not another on the port
            return target
        time.sleep(1.0)
    stop_server(target)
    raise SystemExit(f"the server was not ready in {args.startup_timeout} s; see {log_path}")


def stop_server(target: Target) -> None:
    proc = target.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


# ============================================================================= helpers
def completion(prompt: str = "def f(", max_tokens: int = 16, **extra) -> dict:
    return {"prompt": prompt, "max_tokens": max_tokens, **extra}


def chat(content: str = "Write a haiku about the sea.", max_tokens: int = 16, **extra) -> dict:
    return {"messages": [{"role": "user", "content": content}], "max_tokens": max_tokens, **extra}


async def gauges(client: httpx.AsyncClient, target: Target) -> dict | None:
    """The running/waiting gauges of /metrics, or None if it does not answer."""
    try:
        text = (await client.get(target.url + "/metrics", timeout=10)).text
    except httpx.HTTPError:
        return None
    out = {}
    for name in ("running", "waiting"):
        m = re.search(rf"^mimo:num_requests_{name}{{[^}}]*}} (\S+)$", text, re.M)
        out[name] = float(m.group(1)) if m else None
    return out


async def settle(target: Target, seconds: float) -> dict:
    """Wait (at most `seconds`) until no request runs or waits; the gauges at the end, and how long it took."""
    t0 = time.monotonic()
    async with httpx.AsyncClient() as client:
        while True:
            g = await gauges(client, target)
            done = g is not None and g["running"] == 0 and g["waiting"] == 0
            if done or time.monotonic() - t0 > seconds:
                return {"running": g and g["running"], "waiting": g and g["waiting"], "waited_s": _s(t0)}
            await asyncio.sleep(0.25)


def _s(t0: float) -> float:
    return round(time.monotonic() - t0, 2)


def _status(exc: Exception) -> str:
    if isinstance(exc, httpx.TimeoutException | TimeoutError):
        return "client timeout"
    return f"{type(exc).__name__}"


async def post(client: httpx.AsyncClient, url: str, body: dict | bytes | str, timeout: float = 60) -> tuple:
    """(status or what went wrong, body text)."""
    content = body if isinstance(body, bytes) else body.encode() if isinstance(body, str) else json.dumps(body)
    try:
        r = await client.post(url, content=content, headers={"content-type": "application/json"}, timeout=timeout)
        return r.status_code, r.text
    except (TimeoutError, httpx.HTTPError) as e:
        return _status(e), ""


async def read_stream(response: httpx.Response, stop_after: int | None = None, deadline: float | None = None) -> dict:
    """Read an SSE body: events, an error event, [DONE], a transport failure mid-stream (`broken`); stops
    early (a client disconnect) after `stop_after` events (`disconnected`) or at `deadline` (`at_deadline`)."""
    seen = {"events": 0, "error_event": False, "done": False, "disconnected": False, "at_deadline": False}
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            seen["events"] += 1
            if line == "data: [DONE]":
                seen["done"] = True
            elif line.startswith('data: {"error"'):
                seen["error_event"] = True
            if seen["done"]:
                continue
            if stop_after is not None and seen["events"] >= stop_after:
                seen["disconnected"] = True
                break
            if deadline is not None and time.monotonic() > deadline:
                seen["at_deadline"] = True
                break
    except httpx.HTTPError as e:
        seen["broken"] = _status(e)
    return seen


# ============================================================================= item 1: big bodies
async def poll_health(target: Target, stop: asyncio.Event, timeout: float, max_polls: int = 100_000) -> dict:
    """GET /health back to back (5 per second) until `stop`: the worst latency, and failures."""
    worst, polls, failures = 0.0, 0, collections.Counter()
    async with httpx.AsyncClient() as client:
        while not stop.is_set() and polls < max_polls:
            t0 = time.monotonic()
            try:
                r = await client.get(target.url + "/health", timeout=timeout)
                if r.status_code != 200:
                    failures[str(r.status_code)] += 1
            except httpx.HTTPError as e:
                failures[_status(e)] += 1
            worst = max(worst, time.monotonic() - t0)
            polls += 1
            await asyncio.sleep(0.2)
    return {"health_worst_s": round(worst, 2), "health_polls": polls, "health_failures": dict(failures)}


async def big_request(target: Target, args: argparse.Namespace, send) -> dict:
    """Run `send(client)` (-> status) while /health is polled; RSS before and after, log counts."""
    before, mark = target.memory(), target.log_mark()
    stop = asyncio.Event()
    poller = asyncio.create_task(poll_health(target, stop, timeout=args.big_timeout + args.settle_seconds))
    t0 = time.monotonic()
    async with httpx.AsyncClient(timeout=args.big_timeout) as client:
        try:
            status = await asyncio.wait_for(send(client), args.big_timeout)
        except (TimeoutError, httpx.HTTPError) as e:
            status = _status(e)
    took = _s(t0)
    stop.set()
    health = await poller  # waits for a /health call stuck behind the big request
    idle = await settle(target, args.settle_seconds)
    return {
        "status": status,
        "seconds": took,
        **health,
        "rss_before_mib": before and before.get("VmRSS"),
        "rss_after_mib": (after := target.memory()) and after.get("VmRSS"),
        "rss_peak_mib": after and after.get("VmHWM"),
        "settled": idle,
        "log": target.log_counts(mark),
    }


JSON = {"content-type": "application/json"}  # the server answers 415 to any other body type


async def item1_big_bodies(target: Target, args: argparse.Namespace) -> dict:
    head, tail = b'{"prompt": "def f(", "max_tokens": 4', b"}"

    async def chunked(client: httpx.AsyncClient):
        async def body():  # an async iterator without a length: httpx sends Transfer-Encoding: chunked
            yield head
            for _ in range(args.chunked_mb):
                yield b" " * MB
            yield tail

        r = await client.post(target.url + "/v1/completions", content=body(), headers=JSON)
        return r.status_code

    line = b"def f(x): return x + 1\n"
    prompt = line * (args.prompt_mb * MB // len(line))
    payload = b'{"prompt": "' + prompt.replace(b"\n", b"\\n") + b'", "max_tokens": 1}'

    async def with_length(client: httpx.AsyncClient):
        r = await client.post(target.url + "/v1/completions", content=payload, headers=JSON)  # Content-Length set
        return r.status_code

    return {
        f"chunked_{args.chunked_mb}mb": await big_request(target, args, chunked),
        f"prompt_{args.prompt_mb}mb_content_length": await big_request(target, args, with_length),
    }


# ============================================================================= item 2: non-streaming disconnects
async def item2_disconnects(target: Target, args: argparse.Namespace) -> dict:
    mark, rng = target.log_mark(), random.Random(args.seed)
    outcomes = collections.Counter()
    body = completion(max_tokens=1000, ignore_eos=True)
    async with httpx.AsyncClient() as client:
        for _ in range(args.disconnects):
            status, _ = await post(client, target.url + "/v1/completions", body, timeout=rng.uniform(1.0, 3.0))
            outcomes[str(status)] += 1
    idle = await settle(target, args.settle_seconds)
    return {"requests": args.disconnects, "outcomes": dict(outcomes), "after": idle, "log": target.log_counts(mark)}


# ============================================================================= item 3: deep tool-call arguments
def nested_list(depth: int) -> str:
    return "[" * depth + "]" * depth


def deep_arguments_body(depth: int, as_string: bool) -> str:
    """A chat body (JSON text: too deep for json.dumps) whose assistant tool call nests `depth` levels."""
    args = '{"x": ' + nested_list(depth) + "}"
    value = json.dumps(args) if as_string else args  # a JSON string of the arguments, as OpenAI sends them
    call = '{"id": "call_1", "type": "function", "function": {"name": "f", "arguments": ' + value + "}}"
    return (
        '{"max_tokens": 4, "messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "", "tool_calls": [' + call + "]}, "
        '{"role": "tool", "tool_call_id": "call_1", "content": "ok"}]}'
    )


async def item3_deep_arguments(target: Target, args: argparse.Namespace) -> dict:
    mark, out = target.log_mark(), {}
    for depth in (900, 100_000):
        for form in ("string", "object"):
            body = deep_arguments_body(depth, form == "string")
            async with httpx.AsyncClient() as client:  # a connection each (a 5xx may close it: item 5)
                out[f"depth_{depth}_{form}"], _ = await post(client, target.url + "/v1/chat/completions", body)
    return {**out, "log": target.log_counts(mark)}


# ============================================================================= item 4: bad tool schemas
def bad_tool_body(properties, stream: bool) -> dict:
    """The demo model's own tool (it was trained to call `read_source` for this question), whose schema's
    `properties` is `properties`: greedy decoding writes a complete call, which the server then parses."""
    tool = {
        "type": "function",
        "function": {
            "name": "read_source",
            "description": "Read the source code of a function or method of the Python standard library.",
            "parameters": {"type": "object", "properties": properties, "required": ["qualified_name"]},
        },
    }
    return chat(
        "Show me how `os.path.join` is implemented.", max_tokens=100, tools=[tool], stream=stream, temperature=0
    )


async def item4_bad_tool_schema(target: Target, args: argparse.Namespace) -> dict:
    """A valid schema first (the control: the answer should hold a tool call), then `properties` as a string
    and as a list. Each request on its own connection (a 5xx may close it: item 5)."""
    mark, out = target.log_mark(), {}
    url = target.url + "/v1/chat/completions"
    cases = {
        "valid_schema_control": {"qualified_name": {"type": "string"}},
        "properties_string": "qualified_name",
        "properties_list": ["qualified_name"],
    }
    for name, properties in cases.items():
        async with httpx.AsyncClient(timeout=120) as client:
            status, text = await post(client, url, bad_tool_body(properties, False), timeout=120)
            out[name] = {"status": status, "tool_call": '"tool_calls":[{' in text.replace(" ", "")}
        async with httpx.AsyncClient(timeout=120) as client:
            try:
                async with client.stream("POST", url, json=bad_tool_body(properties, True)) as r:
                    seen = await read_stream(r) if r.status_code == 200 else {}
                    out[f"{name}_stream"] = {"status": r.status_code, **seen}
            except httpx.HTTPError as e:
                out[f"{name}_stream"] = {"status": _status(e)}
    return {**out, "log": target.log_counts(mark)}


# ============================================================================= item 5: keep-alive after a 5xx
async def _http_exchange(reader, writer, target: Target, path: str, body: bytes, timeout: float) -> dict:
    """One HTTP/1.1 request on an open connection: status, Connection header, or how the connection failed."""
    head = (
        f"POST {path} HTTP/1.1\r\nHost: {target.host}:{target.port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    try:
        writer.write(head + body)
        await writer.drain()
        raw = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        lines = raw.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in lines[1:] if h)}
        length = int(headers.get("content-length", 0))
        if headers.get("transfer-encoding") == "chunked":
            while size := int((await asyncio.wait_for(reader.readline(), timeout)).strip() or b"0", 16):
                await asyncio.wait_for(reader.readexactly(size + 2), timeout)
            await asyncio.wait_for(reader.readline(), timeout)
        else:
            await asyncio.wait_for(reader.readexactly(length), timeout)
        return {"status": int(lines[0].split()[1]), "connection": headers.get("connection", "")}
    except asyncio.IncompleteReadError:
        return {"status": "connection closed"}
    except (TimeoutError, ConnectionError) as e:
        return {"status": type(e).__name__}


async def item5_keepalive_after_5xx(target: Target, args: argparse.Namespace) -> dict:
    """Candidates that gave a 5xx on this server's code are tried in turn until one does; then the
    next request on the same connection is a plain completion."""
    candidates = {
        "deep_arguments_900_string": ("/v1/chat/completions", deep_arguments_body(900, True).encode()),
        "deep_arguments_100000_string": ("/v1/chat/completions", deep_arguments_body(100_000, True).encode()),
        "tool_properties_list": ("/v1/chat/completions", json.dumps(bad_tool_body(["x"], False)).encode()),
    }
    mark, tried = target.log_mark(), {}
    good = json.dumps(completion(max_tokens=4)).encode()
    for name, (path, body) in candidates.items():
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            first = await _http_exchange(reader, writer, target, path, body, timeout=60)
            tried[name] = first["status"]
            if isinstance(first["status"], int) and first["status"] >= 500:
                second = await _http_exchange(reader, writer, target, "/v1/completions", good, timeout=60)
                return {
                    "trigger": name,
                    "trigger_status": first["status"],
                    "trigger_connection_header": first.get("connection"),
                    "next_request_same_connection": second["status"],
                    "log": target.log_counts(mark),
                }
        finally:
            writer.close()
    return {"trigger": None, "tried": tried, "next_request_same_connection": "no 5xx provoked", "log": None}


# ============================================================================= the bar: many clients
GARBAGE = [
    ("/v1/completions", b'{"prompt": "def f(", "max_tokens": '),  # cut short
    ("/v1/completions", b"this is not json"),
    ("/v1/completions", b"\xff\xfe\x00\x01garbage"),
    ("/v1/completions", b"[]"),
    ("/v1/completions", b"null"),
    ("/v1/completions", b'"a string"'),
    ("/v1/completions", b""),
    ("/v1/completions", b'{"prompt": 5}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": "ten"}'),
    ("/v1/completions", b'{"prompt": "x", "temperature": "hot"}'),
    ("/v1/completions", b'{"prompt": "x", "n": -1}'),
    ("/v1/completions", b'{"prompt": "x", "stream": "yes"}'),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000000}'),
    ("/v1/completions", b'{"prompt": [[1, 2], "x", null]}'),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 1000}'),
    ("/v1/completions", b'{"prompt": "x", "stop": {"a": 1}}'),
    ("/v1/completions", b'{"prompt": [99999999], "max_tokens": 2}'),
    ("/v1/completions", b'{"prompt": "x", "stream": true, "stream_options": {"include_usage": "yes"}}'),
    ("/v1/chat/completions", b'{"messages": "hello"}'),
    ("/v1/chat/completions", b'{"messages": []}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 5}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "wizard", "content": "hi"}]}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "tools": "none"}'),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "chat_template_kwargs": 3}'),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "assistant", "tool_calls": [{"id": "1", "type": "function", '
        b'"function": {"name": "f", "arguments": "{not json"}}]}]}',
    ),
]


async def _stream_client(index: int, target: Target, args: argparse.Namespace, deadline: float, stats) -> None:
    rng = random.Random(args.seed * 1000 + index)
    async with httpx.AsyncClient(timeout=httpx.Timeout(60, connect=10)) as client:
        for _ in range(args.max_requests_per_client):
            if time.monotonic() >= deadline:
                return
            if rng.random() < args.garbage_fraction:
                path, body = rng.choice(GARBAGE)
                status, _ = await post(client, target.url + path, body, timeout=60)
                stats["garbage"] += 1
                stats[f"garbage_{status if isinstance(status, str) else f'{status // 100}xx'}"] += 1
                stats["5xx"] += isinstance(status, int) and status >= 500
                continue
            use_chat = rng.random() < 0.5
            max_tokens = rng.randint(4, 128)
            body = (
                chat(max_tokens=max_tokens, stream=True) if use_chat else completion(max_tokens=max_tokens, stream=True)
            )
            body["temperature"] = rng.choice([0.0, 0.7, 1.0])
            stop_after = rng.randint(1, 8) if rng.random() < args.disconnect_fraction else None
            path = "/v1/chat/completions" if use_chat else "/v1/completions"
            stats["streams"] += 1
            try:
                async with client.stream("POST", target.url + path, json=body) as r:
                    if r.status_code != 200:
                        await r.aread()
                        stats[f"stream_http_{r.status_code}"] += 1
                        stats["5xx"] += r.status_code >= 500
                        continue
                    seen = await read_stream(r, stop_after, deadline)
            except httpx.HTTPError as e:
                stats[f"stream_{_status(e)}"] += 1
                continue
            if seen["disconnected"]:
                stats["disconnects"] += 1
            elif seen["at_deadline"]:
                stats["streams_left_at_deadline"] += 1
            elif seen["done"]:
                stats["streams_done"] += 1
            else:
                stats["streams_cut_without_done"] += 1
            if "broken" in seen:
                stats[f"stream_broken_{seen['broken']}"] += 1
            stats["stream_error_events"] += seen["error_event"]


async def bar_many_clients(target: Target, args: argparse.Namespace) -> dict:
    mark, stats = target.log_mark(), collections.Counter()
    t0 = time.monotonic()
    deadline = t0 + args.seconds
    tasks = [_stream_client(i, target, args, deadline, stats) for i in range(args.clients)]
    try:
        await asyncio.wait_for(asyncio.gather(*tasks), args.seconds + 90)  # in-flight requests end by the deadline
    except TimeoutError:
        stats["clients_stopped_by_wall_limit"] += 1
    ran = _s(t0)
    idle = await settle(target, args.settle_seconds)
    main_keys = ("5xx", "streams", "streams_done", "disconnects", "streams_cut_without_done")
    return {
        "clients": args.clients,
        "seconds": ran,
        **{k: stats[k] for k in main_keys},
        "other": {k: v for k, v in sorted(stats.items()) if k not in main_keys},
        "after": idle,
        "leaked_slots": idle["running"],
        "log": target.log_counts(mark),
    }


# ============================================================================= report
def _log_cell(log: dict | None) -> str:
    if log is None:
        return "log: n/a"
    return (
        f"log: {log['tracebacks']} traceback(s), {log['InvalidStateError']} InvalidStateError, "
        f"{log['unhandled_errors']} unhandled error(s) (500), {log['5xx_logged']} 5xx in the access log"
    )


def table(results: dict) -> str:
    rows = []
    r = results.get("1")
    if r:
        for name, v in r.items():
            rows.append((
                "1 big body",
                name,
                f"status {v['status']} after {v['seconds']} s; /health worst {v['health_worst_s']} s "
                f"({v['health_polls']} polls, failures {v['health_failures'] or 0}); RSS {v['rss_before_mib']} -> "
                f"{v['rss_after_mib']} MiB (peak {v['rss_peak_mib']}); {_log_cell(v['log'])}",
            ))  # fmt: skip
    r = results.get("2")
    if r:
        rows.append((
            "2 disconnect (non-stream)",
            f"{r['requests']} clients gone after 1-3 s",
            f"outcomes {r['outcomes']}; running gauge after {r['after']['waited_s']} s: {r['after']['running']} "
            f"(waiting {r['after']['waiting']}); {_log_cell(r['log'])}",
        ))  # fmt: skip
    r = results.get("3")
    if r:
        for name, v in r.items():
            if name != "log":
                rows.append(("3 deep tool-call args", name, f"status {v}"))
        rows.append(("3 deep tool-call args", "server log", _log_cell(r["log"])))
    r = results.get("4")
    if r:
        for name, v in r.items():
            if name == "log":
                rows.append(("4 bad tool schema", "server log", _log_cell(v)))
            elif "events" in v:
                detail = f", {v['events']} events, error event: {v['error_event']}, [DONE]: {v['done']}"
                detail += f", stream broke: {v['broken']}" if "broken" in v else ""
                rows.append(("4 bad tool schema", name, f"status {v['status']}{detail}"))
            else:
                detail = f", tool call in the answer: {v['tool_call']}" if "tool_call" in v else ""
                rows.append(("4 bad tool schema", name, f"status {v['status']}{detail}"))
    r = results.get("5")
    if r:
        if r["trigger"] is None:
            rows.append(("5 keep-alive after 5xx", "no trigger", f"no 5xx provoked: {r['tried']}"))
        else:
            rows.append((
                "5 keep-alive after 5xx",
                f"{r['trigger']} -> {r['trigger_status']} (Connection: {r['trigger_connection_header'] or '-'})",
                f"next request on the same connection: {r['next_request_same_connection']}; {_log_cell(r['log'])}",
            ))  # fmt: skip
    r = results.get("bar")
    if r:
        other = ", ".join(f"{k} {v}" for k, v in r["other"].items())
        rows.append((
            "bar",
            f"{r['clients']} clients x {r['seconds']} s",
            f"5xx: {r['5xx']}; streams {r['streams']} ({r['streams_done']} with [DONE], {r['disconnects']} "
            f"dropped by the client, {r['streams_cut_without_done']} cut without [DONE]); {other}; "
            f"leaked slots (running after {r['after']['waited_s']} s): {r['leaked_slots']}; {_log_cell(r['log'])}",
        ))  # fmt: skip
    final = results.get("final", {})
    rows.append(("end", "server", f"alive: {final.get('alive')}, /health: {final.get('health')}"))
    out = ["| item | case | result |", "|---|---|---|"]
    out += [f"| {a} | {b} | {c.replace('|', '/')} |" for a, b, c in rows]
    return "\n".join(out)


# ============================================================================= main
PHASES = {
    "1": item1_big_bodies,
    "2": item2_disconnects,
    "3": item3_deep_arguments,
    "4": item4_bad_tool_schema,
    "5": item5_keepalive_after_5xx,
    "bar": bar_many_clients,
}


async def run_all(target: Target, args: argparse.Namespace, items: list[str]) -> dict:
    results: dict = {"url": target.url, "pid": target.pid, "args": vars(args)}
    for item in items:
        print(f"item {item} ...", file=sys.stderr, flush=True)
        t0 = time.monotonic()
        await settle(target, args.settle_seconds)  # start each item from an idle server (bounded wait)
        results[item] = await PHASES[item](target, args)
        print(f"item {item} done in {_s(t0)} s: {json.dumps(results[item])[:400]}", file=sys.stderr, flush=True)
        if not target.alive():
            print(f"the server died during item {item}", file=sys.stderr, flush=True)
            break
    async with httpx.AsyncClient() as client:
        try:
            health = (await client.get(target.url + "/health", timeout=30)).status_code
        except httpx.HTTPError as e:
            health = _status(e)
    results["final"] = {"alive": target.alive(), "health": health, "memory_mib": target.memory()}
    return results


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", help="attach to a server on loopback, e.g. http://127.0.0.1:8000 (default: start one)")
    p.add_argument("--pid", type=int, help="with --url: the server's process id (RSS from /proc)")
    p.add_argument("--log", help="with --url: the server's log file (tracebacks, 5xx with --access-log)")
    p.add_argument("--model", help="checkpoint for the started server (default: the demo model)")
    p.add_argument("--max-batch", type=int, default=16, help="--max-batch of the started server")
    p.add_argument("--max-context", type=int, help="--max-context of the started server")
    p.add_argument("--server-log", help="where the started server's output goes (default: a new /tmp directory)")
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--items", default=",".join(ITEMS), help=f"which to run, comma-separated from {ITEMS}")
    p.add_argument("--clients", type=int, default=64, help="bar: concurrent clients")
    p.add_argument("--seconds", type=float, default=60, help="bar: how long the clients run")
    p.add_argument("--max-requests-per-client", type=int, default=1000, help="bar: a bound on each client's count")
    p.add_argument("--disconnect-fraction", type=float, default=0.4, help="bar: streams dropped after 1-8 events")
    p.add_argument("--garbage-fraction", type=float, default=0.2, help="bar: requests that are garbage")
    p.add_argument("--disconnects", type=int, default=10, help="item 2: clients that give up after 1-3 s")
    p.add_argument("--chunked-mb", type=int, default=50, help="item 1: the chunked body's size")
    p.add_argument("--prompt-mb", type=int, default=30, help="item 1: the Content-Length prompt's size")
    p.add_argument("--big-timeout", type=float, default=300, help="item 1: seconds the client waits for an answer")
    p.add_argument("--settle-seconds", type=float, default=30, help="wait for idle gauges after a phase")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the results here")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    items = [i.strip() for i in args.items.split(",") if i.strip()]
    unknown = sorted(set(items) - set(ITEMS))
    if unknown:
        raise SystemExit(f"--items: unknown {unknown}; choose from {ITEMS}")
    if args.clients < 1 or args.seconds <= 0 or args.disconnects < 0:
        raise SystemExit("--clients must be >= 1, --seconds > 0, --disconnects >= 0")
    if args.url:
        host = urllib.parse.urlsplit(args.url).hostname
        if host not in LOOPBACK:
            raise SystemExit(f"--url {args.url}: only a loopback server (127.0.0.1) may be stressed")
        target = Target(args.url, args.pid, args.log)
    else:
        target = start_server(args, tempfile.mkdtemp(prefix="stress_server."))  # the log stays for reading
    try:
        results = asyncio.run(run_all(target, args, items))
    finally:
        stop_server(target)
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
