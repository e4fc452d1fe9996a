"""`python -m mimo_jax.batch`: offline generation over a JSONL file of prompts, on one host or many.

    python -m mimo_jax.batch --model DIR --input prompts.jsonl --output results.jsonl \\
        --mesh tensor=4,expert=2 --max-batch 64 --max-context 8192 --max-tokens 512

Input: one JSON object per line, `{"id": ..., "prompt": "text"}` or `"messages": [...]` (rendered
with the checkpoint's chat template, `mimo_jax.text`) or `"prompt_ids": [...]` (token ids), plus
optional per-request settings overriding the command line: `max_tokens` (or `max_new_tokens`),
`temperature`, `top_p`, `top_k`, `min_p`, `presence_penalty`, `frequency_penalty`,
`repetition_penalty`, `seed`, `stop_token_ids`, `ignore_eos`, `logprobs`, `tools`, `tool_choice`,
`parallel_tool_calls` and `chat_template_kwargs` (chats), `metadata` (copied to the result), and the
structured-output fields of chat/completions bodies (`response_format`, `regex`, `ebnf`,
`structured_outputs`, `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`; or
`tool_choice` "required" / a named function with `tools`), decoded under the grammar
(`mimo_jax.grammar`; `text` then holds the JSON, or the tool-call markup). Blank lines are allowed;
any other key is an error (a misspelt setting is never silently ignored).

Output: one line per request as it finishes: `id`, `text`, `token_ids`, `finish_reason`
("stop" | "length"), `usage` (prompt / completion / total tokens), `timing` (seconds: `wait_s`
from the start of the run to taking a slot, then `first_tokens_s` to the end of the engine step
that returned its first tokens - prefill and one decode round - and `total_s` to the end), `seed`,
and `logprobs` / `top_logprobs` when asked, `metadata` when given.

Behaviour:
- Continuous batching: requests fill `--max-batch` engine slots and leave when done, so long and
  short prompts share the slots; the next prompts join as slots free up.
- Resumable: ids already in the output are skipped. Each finished step's lines are appended
  whole, flushed and fsynced, so a crash loses at most the requests in flight; a torn last line
  (a crash mid-write) is detected and cut off at the next start.
- Deterministic: a request's seed is its `seed` field, else derived from `--seed` and its id
  (`request_seed`), and the engine's draws do not depend on which slot or batch a request runs in.
- A malformed line is reported as `FILE:LINE: why` and skipped (exit status 3 at the end), or
  with `--strict` stops the run (exit status 1) - before the model loads when the line is
  malformed JSON or has bad fields, as soon as it is met when the prompt does not fit. A line
  nested more than `MAX_JSON_DEPTH` (64) levels of arrays/objects deep is malformed; one whose
  chat template recurses too deeply to render is a bad line too, never a crash of the run.

Multi-host: start the same command on every host (`launch/tpu_vm.sh`, `launch/gpu_multinode.sh`;
`mimo_jax.sharding.initialize_distributed` reads `MIMO_COORDINATOR_ADDRESS`, `MIMO_NUM_PROCESSES`,
`MIMO_PROCESS_ID` or the matching flags). Only process 0 reads the input, tokenizes, schedules and
writes the output, so the input and output paths need only exist on host 0 (no shared file
system): it drives the engine through a `mimo_jax.engine.driver.Driver`, which broadcasts each
round's plan (adds with their token ids and sampling settings, step sizes) before applying it,
and the other processes follow the plans on the global mesh. If process 0 stops (a --strict error,
or any error while reading) it aborts the others through the same channel, and every process exits
with status 1; if it dies, the others abort at once (the JAX coordination service lives in
process 0).
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import itertools
import json
import os
import re
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
from tqdm import tqdm

from mimo_jax import sharding
from mimo_jax.engine.driver import SEED_LIMIT, Aborted, BroadcastChannel, Driver, RoundPlan
from mimo_jax.engine.host import Engine, kv_cache_pages
from mimo_jax.engine.sampling import SamplingOptions, check_seed
from mimo_jax.engine.state import DEFAULT_PAGE_SIZE
from mimo_jax.grammar import OUTPUT_FIELDS, GrammarError, GrammarFactory, output_spec, thinking_mode, tool_call_spec
from mimo_jax.lm import load_model
from mimo_jax.sharding import add_distributed_arguments, make_mesh, parse_mesh_arg
from mimo_jax.text import THINK_END, THINK_START, ChatTemplate, ChatTemplateError, Tokenizer

FLOAT_FIELDS = ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty")
INT_FIELDS = ("top_k", "max_new_tokens", "seed", "logprobs")
PROMPT_FIELDS = ("prompt", "messages", "prompt_ids")
OTHER_FIELDS = ("id", "stop_token_ids", "ignore_eos", "tools", "chat_template_kwargs", "metadata", "max_tokens")
TOOL_FIELDS = ("tool_choice", "parallel_tool_calls")
KNOWN_FIELDS = frozenset(PROMPT_FIELDS + OTHER_FIELDS + FLOAT_FIELDS + INT_FIELDS + TOOL_FIELDS + OUTPUT_FIELDS)

EXIT_OK, EXIT_FAILED, EXIT_SKIPPED = 0, 1, 3

# Deepest nesting of arrays and objects a line may have. Parsing (json.loads) and rendering a chat
# template (tojson of tool-call arguments) recurse per level and die with RecursionError near
# Python's recursion limit (1000); real requests stay far below this.
MAX_JSON_DEPTH = 64
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_BRACKETS = re.compile(r"[\[\]{}]")


class InputError(ValueError):
    """A request line that cannot run; `line` is its 1-based line number in the input."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line


def request_seed(global_seed: int, request_id: str | int) -> int:
    """The seed of a request without its own: a hash of the run's seed and the id (not of its position)."""
    digest = hashlib.sha256(f"{global_seed}\0{json.dumps(request_id)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") % SEED_LIMIT


def id_key(request_id: str | int) -> str:
    """Ids compare by their JSON text: 7 and "7" are different requests."""
    return json.dumps(request_id, ensure_ascii=False)


@dataclasses.dataclass
class Request:
    """One parsed input line (process 0 only)."""

    line: int
    id: str | int
    prompt: str | None
    messages: list[dict] | None
    prompt_ids: list[int] | None
    settings: dict[str, Any]  # SamplingOptions fields given on the line (defaults not applied)
    ignore_eos: bool | None
    tools: list | None
    chat_template_kwargs: dict
    metadata: Any
    has_metadata: bool
    constraint: tuple[dict, str] | None = None  # (constraint spec, the field that asked), thinking not yet set

    @property
    def key(self) -> str:
        return id_key(self.id)


def json_depth_exceeds(text: str, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than `limit` (brackets inside strings do not count).

    Iterative and linear in the text, so it is safe on any line before `json.loads` recurses into it.
    """
    if text.count("[") + text.count("{") <= limit:
        return False  # the common case: too few brackets to be that deep
    depth = 0
    for bracket in _BRACKETS.findall(_JSON_STRING.sub("", text)):
        if bracket in "[{":
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def parse_line(text: str | bytes, line: int) -> Request | None:
    """A JSONL line -> Request (None for a blank line); InputError names what is wrong."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(line, f"not valid UTF-8 (byte {e.start})") from None
    if not text.strip():
        return None
    if json_depth_exceeds(text, MAX_JSON_DEPTH):
        raise InputError(line, f"nested too deeply (more than {MAX_JSON_DEPTH} levels of arrays/objects)")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(line, f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
        raise InputError(line, "nested too deeply to parse (RecursionError)") from None
    if not isinstance(obj, dict):
        raise InputError(line, f"expected a JSON object, got {type(obj).__name__}")
    unknown = sorted(set(obj) - KNOWN_FIELDS)
    if unknown:
        raise InputError(line, f"unknown field(s) {unknown}; known: {sorted(KNOWN_FIELDS)}")
    if "id" not in obj:
        raise InputError(line, 'missing "id"')
    rid = obj["id"]
    if isinstance(rid, bool) or not isinstance(rid, str | int):
        raise InputError(line, f'"id" must be a string or an integer, got {json.dumps(rid)}')
    given = [k for k in PROMPT_FIELDS if k in obj]
    if len(given) != 1:
        raise InputError(line, f"expected exactly one of {list(PROMPT_FIELDS)}, got {given or 'none'}")
    prompt, messages, prompt_ids = obj.get("prompt"), obj.get("messages"), obj.get("prompt_ids")
    if "prompt" in obj and (not isinstance(prompt, str) or not prompt):
        raise InputError(line, '"prompt" must be a non-empty string')
    if "messages" in obj and (
        not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages)
    ):
        raise InputError(line, '"messages" must be a non-empty list of objects')
    if "prompt_ids" in obj and (
        not isinstance(prompt_ids, list) or not prompt_ids or not all(_is_int(t) and t >= 0 for t in prompt_ids)
    ):
        raise InputError(line, '"prompt_ids" must be a non-empty list of non-negative integers')
    if "max_tokens" in obj and "max_new_tokens" in obj:
        raise InputError(line, 'give "max_tokens" or "max_new_tokens", not both')
    settings: dict[str, Any] = {}
    for name in FLOAT_FIELDS + INT_FIELDS + ("max_tokens",):
        if name not in obj:
            continue
        value = obj[name]
        field = "max_new_tokens" if name == "max_tokens" else name
        if field in INT_FIELDS and not _is_int(value):
            raise InputError(line, f'"{name}" must be an integer, got {json.dumps(value)}')
        if field in FLOAT_FIELDS and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise InputError(line, f'"{name}" must be a number, got {json.dumps(value)}')
        settings[field] = value
    if "seed" in settings:
        try:
            check_seed(settings["seed"])  # the engine's rule, with its message (as the server answers it)
        except ValueError as e:
            raise InputError(line, str(e)) from None
    if "stop_token_ids" in obj:
        stops = obj["stop_token_ids"]
        if not isinstance(stops, list) or not all(_is_int(t) and t >= 0 for t in stops):
            raise InputError(line, '"stop_token_ids" must be a list of non-negative integers')
        settings["stop_token_ids"] = tuple(stops)
    ignore_eos = obj.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise InputError(line, '"ignore_eos" must be true or false')
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise InputError(line, '"tools" must be a list')
    kwargs = obj.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise InputError(line, '"chat_template_kwargs" must be an object')
    if (tools is not None or "chat_template_kwargs" in obj or "tool_choice" in obj) and messages is None:
        raise InputError(line, '"tools", "tool_choice" and "chat_template_kwargs" apply to "messages" only')
    try:
        constraint = output_spec(obj)
        forced, tools = _tool_choice(obj, tools)
    except GrammarError as e:
        raise InputError(line, f'"{e.key}": {e}') from None
    if forced is not None:
        if constraint is not None:
            raise InputError(line, f'"{constraint[1]}" cannot be combined with a forced tool call ("tool_choice")')
        constraint = (forced, "tool_choice")
    try:
        SamplingOptions(**{**settings, "seed": 0})  # range checks, with the defaults for what is left out
    except ValueError as e:
        raise InputError(line, str(e)) from None
    if settings.get("max_new_tokens", 1) < 1:  # the engine's 0 (prefill only) scores prompts: not a batch result
        raise InputError(line, f"max_new_tokens={settings['max_new_tokens']}: expected >= 1")
    return Request(
        line=line,
        id=rid,
        prompt=prompt,
        messages=messages,
        prompt_ids=prompt_ids,
        settings=settings,
        ignore_eos=ignore_eos,
        tools=tools,
        chat_template_kwargs=kwargs,
        metadata=obj.get("metadata"),
        has_metadata="metadata" in obj,
        constraint=constraint,
    )


def _tool_choice(obj: dict, tools: list | None) -> tuple[dict | None, list | None]:
    """A line's forced tool call as a constraint spec (None for "auto", none given), and the tools the template
    renders (none for "none"), as chat completions read `tool_choice` and `parallel_tool_calls`."""
    choice, parallel = obj.get("tool_choice", "auto"), obj.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise GrammarError("must be true or false", "parallel_tool_calls")
    if choice in ("auto", "none"):
        return None, (None if choice == "none" else tools)
    name = None
    if isinstance(choice, dict):
        function = choice.get("function")
        name = function.get("name") if isinstance(function, dict) else None
        if choice.get("type", "function") != "function" or not isinstance(name, str):
            raise GrammarError('a named tool choice is {"type": "function", "function": {"name": NAME}}', "tool_choice")
    elif choice != "required":
        raise GrammarError(
            f'expected "auto", "none", "required" or a named function, got {json.dumps(choice)}', "tool_choice"
        )
    names = [t.get("function", {}).get("name") for t in tools or [] if isinstance(t, dict)]
    if not names:
        raise GrammarError('"required" or a named function needs "tools"', "tool_choice")
    if name is not None and name not in names:
        raise GrammarError(f"names {name!r}, which is not among the tools", "tool_choice")
    return tool_call_spec(tools, name, parallel), tools


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@dataclasses.dataclass
class InputScan:
    """What a first pass over the input found."""

    pending: int  # requests to run
    done: int  # requests skipped because the output has them
    errors: list[InputError]
    bad_lines: set[int]


def scan_input(path: str, done_keys: set[str]) -> InputScan:
    """Parse every line once: count the work, collect malformed lines and repeated ids."""
    errors: list[InputError] = []
    seen: dict[str, int] = {}
    pending = done = 0
    for line, text in _lines(path):
        try:
            req = parse_line(text, line)
            if req is None:
                continue
            if req.key in seen:
                raise InputError(line, f"id {req.key} repeats line {seen[req.key]}")
        except InputError as e:
            errors.append(e)
            continue
        seen[req.key] = line
        if req.key in done_keys:
            done += 1
        else:
            pending += 1
    return InputScan(pending, done, errors, {e.line for e in errors})


def iter_requests(path: str, scan: InputScan, done_keys: set[str]) -> Iterator[Request]:
    """The requests still to run, in input order (the lines `scan_input` accepted)."""
    for line, text in _lines(path):
        if line in scan.bad_lines:
            continue
        req = parse_line(text, line)
        if req is not None and req.key not in done_keys:
            yield req


def _lines(path: str) -> Iterator[tuple[int, bytes]]:
    with open(path, "rb") as f:
        yield from enumerate(f, start=1)


# ------------------------------------------------------------------ output file
class ResultWriter:
    """Appends whole JSON lines, then flush + fsync: after a crash the file holds complete lines
    and at most one torn last line, which `recover` cuts off."""

    def __init__(self, path: str):
        self.path = path
        self._file = open(path, "ab")  # noqa: SIM115 (held for the run)

    @staticmethod
    def recover(path: str) -> tuple[set[str], int]:
        """Ids already written (as `id_key`s), truncating a torn last line; returns (ids, bytes cut)."""
        if not os.path.exists(path):
            return set(), 0
        done: set[str] = set()
        good_end = 0
        with open(path, "rb") as f:
            for line, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    break  # a torn last line: everything up to good_end stays
                try:
                    obj = json.loads(raw)
                    done.add(id_key(obj["id"]))
                except (json.JSONDecodeError, UnicodeDecodeError, TypeError, KeyError):
                    raise ValueError(
                        f"{path}:{line}: not a result line (the file was changed by something else?); "
                        "fix or remove it, then rerun"
                    ) from None
                good_end += len(raw)
            size = f.seek(0, os.SEEK_END)
        if size > good_end:
            with open(path, "r+b") as f:
                f.truncate(good_end)
                f.flush()
                os.fsync(f.fileno())
        return done, size - good_end

    def write(self, records: Sequence[dict]) -> None:
        if not records:
            return
        data = b"".join(json.dumps(r, ensure_ascii=False).encode("utf-8") + b"\n" for r in records)
        self._file.write(data)
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


# ------------------------------------------------------------------ work
@dataclasses.dataclass
class WorkItem:
    """One request as the engine runs it (token ids, sampling settings settled), with its parsed line."""

    prompt_ids: list[int]
    options: SamplingOptions
    request: Request | None = None


# ------------------------------------------------------------------ the run
@dataclasses.dataclass(frozen=True)
class RunSettings:
    """Command-line defaults for what a line leaves out, and how to schedule."""

    sampling: dict[str, Any]  # SamplingOptions fields
    seed: int = 0
    ignore_eos: bool = False
    chat_template_kwargs: dict = dataclasses.field(default_factory=dict)
    strict: bool = False
    block_size: int = 256  # requests process 0 reads from the input at a time
    prefill_tokens: int | None = None  # per engine step; None: everything waiting
    progress: bool = True


@dataclasses.dataclass
class RunSummary:
    completed: int = 0
    skipped: int = 0  # lines reported and not run
    done_before: int = 0  # ids already in the output
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0


class _Prompter:
    """Process 0: a Request -> WorkItem (tokenized, stops and seed settled, checked against the engine)."""

    def __init__(self, engine: Any, tokenizer: Any, template: Any, settings: RunSettings, eos: Sequence[int]):
        self.engine = engine
        self.tokenizer = tokenizer
        self.template = template
        self.settings = settings
        self.eos = tuple(eos)

    def __call__(self, req: Request) -> WorkItem:
        if req.prompt_ids is not None:
            ids = list(req.prompt_ids)
        elif self.tokenizer is None:
            raise InputError(req.line, 'the model has no tokenizer.json: give "prompt_ids" instead of text')
        elif req.prompt is not None:
            ids = self.tokenizer.encode(req.prompt, add_special_tokens=True)
        else:
            if self.template is None:
                raise InputError(req.line, 'the model has no chat template: give "prompt" or "prompt_ids"')
            kwargs = {**self.settings.chat_template_kwargs, **req.chat_template_kwargs}
            try:
                text = self.template.render(req.messages, tools=req.tools, add_generation_prompt=True, **kwargs)
            except ChatTemplateError as e:
                raise InputError(req.line, str(e)) from None
            except RecursionError:  # e.g. tool-call arguments nested deeper than the template can render
                raise InputError(req.line, "messages nested too deeply to render the chat template") from None
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        values = {**self.settings.sampling, **req.settings}
        if req.constraint is not None:
            values["constraint"] = self._constraint(req, text if req.messages is not None else None)
        ignore_eos = self.settings.ignore_eos if req.ignore_eos is None else req.ignore_eos
        stops = set(values.get("stop_token_ids", ())) | (set() if ignore_eos else set(self.eos))
        values["stop_token_ids"] = tuple(sorted(stops))
        if values.get("seed") is None:
            values["seed"] = request_seed(self.settings.seed, req.id)
        try:
            options = SamplingOptions(**values)
            prompt = self.engine.check_request(req.id, ids, options)
        except ValueError as e:
            raise InputError(req.line, str(e)) from None
        return WorkItem(prompt.tolist(), options, req)

    def _constraint(self, req: Request, chat_prompt: str | None) -> dict:
        """The line's checked constraint spec (a chat's grammar waits while the model thinks, as the server's)."""
        factory = self.engine.constraint_factory
        spec, field = req.constraint
        if factory is None:
            raise InputError(req.line, f'"{field}" needs constrained decoding: llguidance cannot use this tokenizer')
        reasoning = self.tokenizer.token_id(THINK_START) is not None and self.tokenizer.token_id(THINK_END) is not None
        thinking = thinking_mode(chat_prompt, reasoning) if chat_prompt is not None else None
        if thinking is not None:
            spec = {**spec, "thinking": thinking}
        try:
            factory.validate(spec)
        except ValueError as e:
            raise InputError(req.line, f'"{field}": {e}') from None
        return spec


def run_batch(
    engine: Any,
    input_path: str | None,
    output_path: str | None,
    settings: RunSettings,
    *,
    tokenizer: Any = None,
    template: Any = None,
    scan: InputScan | None = None,
    done_keys: set[str] | None = None,
    log=None,
    channel: BroadcastChannel | None = None,
) -> RunSummary:
    """Run the input's pending requests through `engine` and append their results to the output.

    Single process: give the paths (`scan` and `done_keys` when already made, with the scan's
    errors already reported). Multi-process: every process calls this with the same engine
    settings and the same `channel` (default: a new `BroadcastChannel`); process 0 gives the
    paths and decides each round, the others give None and follow its plans. On an error the
    requests in flight are cancelled, so the engine can be used again; in a multi-process run
    an error on process 0 aborts the others (they raise `Aborted`).
    """

    if channel is None and jax.process_count() > 1:
        channel = BroadcastChannel()
    driver = Driver(engine, channel)
    summary = RunSummary()
    if input_path is None:  # a follower: process 0 reads, schedules and writes
        driver.follow()
        return summary
    log = log or _log
    writer = bar = None
    try:
        if done_keys is None:
            done_keys, cut = ResultWriter.recover(output_path)
            if cut:
                log(f"{output_path}: cut a torn last line ({cut} bytes) left by an interrupted run")
        if scan is None:
            scan = scan_input(input_path, done_keys)
            for e in scan.errors:
                log(f"{input_path}:{e.line}: {e}")
            if scan.errors and settings.strict:
                raise scan.errors[0]
        summary.done_before = scan.done
        summary.skipped = len(scan.errors)
        if settings.progress:
            bar = tqdm(total=scan.pending, unit="prompt", dynamic_ncols=True, file=sys.stderr)
        eos = tuple(engine.config.eos_token_ids) + (tokenizer.eos_token_ids if tokenizer is not None else ())
        prompter = _Prompter(engine, tokenizer, template, settings, eos)

        def items() -> Iterator[WorkItem]:
            for req in iter_requests(input_path, scan, done_keys):
                try:
                    yield prompter(req)
                except InputError as e:
                    log(f"{input_path}:{e.line}: {e}")
                    if settings.strict:
                        raise
                    summary.skipped += 1
                    if bar is not None:
                        bar.total -= 1

        source = items()
        writer = ResultWriter(output_path)
        start = time.perf_counter()
        queue: collections.deque[WorkItem] = collections.deque()
        in_flight: dict[int, dict] = {}  # engine request id -> result so far
        next_id = 0
        exhausted = False
        while True:
            plan = RoundPlan(step=True, prefill_tokens=settings.prefill_tokens or 1 << 62)
            for _ in range(engine.free_slots):
                if not queue and not exhausted:
                    queue.extend(itertools.islice(source, settings.block_size))
                    exhausted = not queue
                if not queue:
                    break
                item = queue.popleft()
                plan.add_request(next_id, item.prompt_ids, item.options)
                in_flight[next_id] = _start_record(item, start)
                next_id += 1
            if not (plan.add or engine.has_work()):
                break
            outputs = driver.run(plan)
            now = time.perf_counter()
            finished = []
            for out in outputs:
                rec = in_flight[out.request_id]
                if out.finished:
                    del in_flight[out.request_id]
                rec["first"] = rec["first"] or now
                rec["token_ids"].extend(out.token_ids)
                if rec["logprobs"] is not None:
                    rec["logprobs"].extend(out.logprobs)
                    rec["top_logprobs"].extend([[list(p) for p in top] for top in out.top_logprobs])
                summary.completion_tokens += len(out.token_ids)
                if out.finished:
                    finished.append(_finish_record(rec, out.finish_reason, now, tokenizer))
            writer.write(finished)
            summary.completed += len(finished)
            summary.prompt_tokens += sum(r["usage"]["prompt_tokens"] for r in finished)
            if bar is not None:
                bar.update(len(finished))
                bar.set_postfix_str(f"{summary.completion_tokens / max(now - start, 1e-9):.1f} tok/s", refresh=False)
        driver.stop()
    except BaseException:
        driver.abort()  # the followers exit too; every engine cancels the requests in flight
        raise
    finally:
        if bar is not None:
            bar.close()
        if writer is not None:
            writer.close()
    summary.seconds = time.perf_counter() - start
    return summary


def _start_record(item: WorkItem, run_start: float) -> dict:
    want_lp = item.options.logprobs is not None
    return dict(
        request=item.request,
        prompt_tokens=len(item.prompt_ids),
        seed=item.options.seed,
        token_ids=[],
        logprobs=[] if want_lp else None,
        top_logprobs=[] if want_lp else None,
        waited=time.perf_counter() - run_start,
        added=time.perf_counter(),
        first=None,
    )


def _finish_record(rec: dict, finish_reason: str, now: float, tokenizer: Any) -> dict:
    req: Request = rec["request"]
    ids = rec["token_ids"]
    out = {
        "id": req.id,
        "text": tokenizer.decode(ids, skip_special_tokens=True) if tokenizer is not None else None,
        "token_ids": ids,
        "finish_reason": finish_reason,
        "usage": {
            "prompt_tokens": rec["prompt_tokens"],
            "completion_tokens": len(ids),
            "total_tokens": rec["prompt_tokens"] + len(ids),
        },
        "timing": {
            "wait_s": round(rec["waited"], 6),
            "first_tokens_s": round(rec["first"] - rec["added"], 6),
            "total_s": round(now - rec["added"], 6),
        },
        "seed": rec["seed"],
    }
    if rec["logprobs"] is not None:
        out["logprobs"] = rec["logprobs"]
        out["top_logprobs"] = rec["top_logprobs"]
    if req.has_metadata:
        out["metadata"] = req.metadata
    return out


# ------------------------------------------------------------------ command line
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m mimo_jax.batch",
        description="Generate completions for a JSONL file of prompts (resumable; one host or many).",
    )
    p.add_argument("--model", default="demo", help='checkpoint directory (config.json + safetensors) or "demo"')
    p.add_argument("--input", required=True, help="JSONL prompts (read by process 0 only)")
    p.add_argument("--output", required=True, help="JSONL results, appended; ids already there are skipped")
    p.add_argument("--mesh", default=None, help="data=..,tensor=..,expert=.. (default: every device on expert)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--weights", default="bf16", choices=["bf16", "fp8"], help="fp8: keep FP8 blocks on device")
    g = p.add_argument_group("engine")
    g.add_argument("--max-batch", type=int, default=32, help="engine slots (requests decoded together)")
    g.add_argument("--max-context", type=int, default=4096, help="prompt + completion tokens per request")
    g.add_argument("--prefill-chunk", type=int, default=512, help="prompt tokens per prefill call")
    g.add_argument("--round-tokens", type=int, default=32, help="decode steps per engine round")
    g.add_argument("--prefill-per-step", type=int, default=0, help="prompt tokens prefilled per step (0: all waiting)")
    g.add_argument("--max-logprobs", type=int, default=0, help="largest `logprobs` a line may ask for")
    g.add_argument("--max-stop-ids", type=int, default=16, help="largest number of stop tokens of a request")
    g.add_argument("--block-size", type=int, default=256, help="requests read from the input at a time")
    g.add_argument(
        "--kv-cache-memory",
        type=float,
        help="GB for the full layers' KV pages (default: 0.9 of the accelerator's memory left after the weights; "
        "on CPU room for --max-batch requests of --max-context tokens)",
    )
    g.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="tokens per KV page")
    g.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8_e4m3"], help="full layers' KV pages")
    g.add_argument("--no-prefix-cache", action="store_true", help="do not reuse the KV of earlier prompts' prefixes")
    s = p.add_argument_group("sampling defaults (a line's own fields win)")
    s.add_argument("--max-tokens", type=int, default=256)
    s.add_argument("--temperature", type=float, default=0.0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--min-p", type=float, default=0.0)
    s.add_argument("--presence-penalty", type=float, default=0.0)
    s.add_argument("--frequency-penalty", type=float, default=0.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)
    s.add_argument("--seed", type=int, default=0, help="run seed: a request's seed derives from it and its id")
    s.add_argument("--ignore-eos", action="store_true")
    s.add_argument("--chat-template-kwargs", type=json.loads, default={}, help='JSON, e.g. {"enable_thinking": false}')
    p.add_argument("--strict", action="store_true", help="stop at the first bad line instead of skipping it")
    p.add_argument("--no-progress", action="store_true")
    add_distributed_arguments(p)
    return p


def settings_from_args(args: argparse.Namespace) -> RunSettings:
    sampling = dict(
        max_new_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        presence_penalty=args.presence_penalty,
        frequency_penalty=args.frequency_penalty,
        repetition_penalty=args.repetition_penalty,
    )
    SamplingOptions(**sampling)  # range checks
    check_seed(args.seed)
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens={args.max_tokens}: expected >= 1")
    if not isinstance(args.chat_template_kwargs, dict):
        raise ValueError("--chat-template-kwargs must be a JSON object")
    return RunSettings(
        sampling=sampling,
        seed=args.seed,
        ignore_eos=args.ignore_eos,
        chat_template_kwargs=args.chat_template_kwargs,
        strict=args.strict,
        block_size=args.block_size,
        prefill_tokens=args.prefill_per_step or None,
        progress=not args.no_progress,
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as e:
        parser.error(str(e))
    for name in (
        "max_batch",
        "max_context",
        "prefill_chunk",
        "round_tokens",
        "block_size",
        "max_stop_ids",
        "page_size",
    ):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")

    multiprocess = sharding.initialize_distributed(args.coordinator_address, args.num_processes, args.process_id)
    try:
        return _main(args, settings, multiprocess)
    except InputError:  # --strict, already reported with its line
        _log("--strict: stopped at the first bad line")
        return EXIT_FAILED
    except Aborted as e:
        _log(str(e))
        return EXIT_FAILED
    finally:
        if multiprocess:
            jax.distributed.shutdown()


def _log(message: str) -> None:
    print(f"mimo_jax.batch: {message}", file=sys.stderr, flush=True)


def _main(args: argparse.Namespace, settings: RunSettings, multiprocess: bool) -> int:
    leader = jax.process_index() == 0
    scan = done_keys = None
    pending = -1  # what process 0 tells everyone: requests to run, or -1 to stop
    if leader:
        try:
            done_keys, scan = _prepare_files(args)
        except (OSError, ValueError) as e:
            _log(str(e))
        else:
            for e in scan.errors:
                _log(f"{args.input}:{e.line}: {e}")
            if scan.errors and args.strict:
                _log(f"--strict: {len(scan.errors)} bad line(s); nothing was run")
            else:
                skipped = f", {len(scan.errors)} bad line(s) skipped" if scan.errors else ""
                _log(f"{scan.pending} request(s) to run, {scan.done} already in {args.output}{skipped}")
                pending = scan.pending
    channel = BroadcastChannel() if multiprocess else None
    if channel is not None:  # everyone learns whether there is work before loading the model
        pending = channel.share_int(pending)
    if pending < 0:
        return EXIT_FAILED
    if pending == 0:
        return EXIT_SKIPPED if scan is not None and scan.errors else EXIT_OK

    mesh = make_mesh(**parse_mesh_arg(args.mesh or "")) if args.mesh is not None or jax.device_count() > 1 else None
    if leader:
        where = dict(mesh.shape) if mesh is not None else "one device"
        _log(
            f"loading {args.model} ({args.dtype}, weights {args.weights}) on {where}, {jax.process_count()} process(es)"
        )
    lm = load_model(
        args.model, dtype=args.dtype, weights=args.weights, mesh=mesh, progress=leader and not args.no_progress
    )
    num_pages = kv_cache_pages(
        lm, args.kv_cache_memory, 0.9, args.max_batch, args.max_context, args.page_size, args.kv_cache_dtype
    )
    engine = Engine(
        lm,
        max_batch=args.max_batch,
        max_context=args.max_context,
        prefill_chunk=args.prefill_chunk,
        max_round_tokens=args.round_tokens,
        max_stop_ids=args.max_stop_ids,
        max_top_logprobs=args.max_logprobs,
        num_pages=num_pages,
        page_size=args.page_size,
        prefix_cache=not args.no_prefix_cache,
        kv_cache_dtype=args.kv_cache_dtype,
        constraint_factory=grammar_factory(lm.source, lm.config.vocab_size, lm.config.eos_token_ids),
    )
    tokenizer, template = load_tokenizer(lm.source) if leader else (None, None)  # "demo" resolved
    summary = run_batch(
        engine,
        args.input if leader else None,
        args.output if leader else None,
        settings,
        tokenizer=tokenizer,
        template=template,
        scan=scan,
        done_keys=done_keys,
        log=_log,
        channel=channel,
    )
    if not leader:
        return EXIT_OK
    seconds = max(summary.seconds, 1e-9)
    _log(
        f"{summary.completed} request(s) done in {summary.seconds:.1f} s ({summary.completed / seconds:.2f} prompts/s, "
        f"{summary.completion_tokens / seconds:.1f} generated tokens/s); {summary.prompt_tokens} prompt + "
        f"{summary.completion_tokens} completion tokens"
        + (f"; {summary.skipped} bad line(s) skipped" if summary.skipped else "")
    )
    return EXIT_SKIPPED if summary.skipped else EXIT_OK


def _prepare_files(args: argparse.Namespace) -> tuple[set[str], InputScan]:
    """Process 0: check the paths, recover the output (cut a torn line), scan the input."""
    if not os.path.isfile(args.input):
        raise ValueError(f"--input {args.input}: no such file")
    if os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise ValueError("--output must not be the input file")
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    done_keys, cut = ResultWriter.recover(args.output)
    if cut:
        _log(f"{args.output}: cut a torn last line ({cut} bytes) left by an interrupted run")
    return done_keys, scan_input(args.input, done_keys)


def grammar_factory(directory: str, vocab_size: int, eos_token_ids: Sequence[int]) -> GrammarFactory | None:
    """Constrained decoding over the checkpoint's tokenizer, on every process (each builds the constraints of the
    broadcast plans itself); None without tokenizer.json or where llguidance cannot read it (then a constrained
    line is a bad line)."""
    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return None
    tokenizer = Tokenizer(directory)
    eos = tuple(sorted(set(eos_token_ids) | set(tokenizer.eos_token_ids)))
    try:
        return GrammarFactory(tokenizer, vocab_size, eos)
    except Exception as e:  # any tokenizer llguidance cannot load
        _log(f"constrained decoding is off: llguidance cannot use this tokenizer ({e})")
        return None


def load_tokenizer(directory: str) -> tuple[Any, Any]:
    """(Tokenizer, ChatTemplate) of a checkpoint directory; (None, None) without tokenizer.json."""

    if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
        return None, None
    return Tokenizer(directory), ChatTemplate.from_dir(directory)
