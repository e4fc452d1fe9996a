"""FastAPI routes: /v1/chat/completions, /v1/completions (streaming and not), /v1/models, /health, /metrics.

A request becomes one `Job`: its prompts are checked and tokenized here, each choice becomes one
scheduler `Sequence`, and the tokens coming back are turned into text on this (event loop) thread:
detokenization with stop strings, then for chat the `<think>` split and tool-call parsing.
Every failure a client can cause is an `APIError` answered with an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mimo_jax.serve import protocol as P
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.parsers import (
    THINK_END,
    THINK_START,
    ParsedToolCall,
    ReasoningParser,
    TextStream,
    ToolCallParser,
)
from mimo_jax.serve.scheduler import Failure, Scheduler, Sequence, Tokens
from mimo_jax.text import ChatTemplate, ChatTemplateError, Tokenizer

log = logging.getLogger("mimo_jax.serve")

MAX_BODY_BYTES = 32 << 20
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


@dataclasses.dataclass
class Limits:
    max_context: int
    max_top_logprobs: int
    max_stop_ids: int
    request_timeout: float | None


class Server:
    """What the routes need: tokenizer, chat template, scheduler, metrics, limits."""

    def __init__(
        self,
        scheduler: Scheduler,
        tokenizer: Tokenizer,
        template: ChatTemplate | None,
        metrics: Metrics,
        *,
        model_name: str,
        model_root: str | None,
        eos_token_ids: tuple[int, ...],
        limits: Limits,
        sampling_defaults: dict[str, float] | None = None,
    ):
        self.scheduler = scheduler
        self.tokenizer = tokenizer
        self.template = template
        self.metrics = metrics
        self.model_name = model_name
        self.model_root = model_root
        self.eos_token_ids = tuple(eos_token_ids)
        self.limits = limits
        # Defaults for omitted parameters (the checkpoint's generation_config.json; else OpenAI's).
        self.defaults = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, **(sampling_defaults or {})}
        self.created = P.now()
        # `<think>` splitting needs both markers as tokens of this vocabulary.
        self.reasoning = tokenizer.token_id(THINK_START) is not None and tokenizer.token_id(THINK_END) is not None

    # ------------------------------------------------------------------ request checks
    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name:
            raise P.APIError(
                404,
                f"The model '{model}' does not exist; this server serves '{self.model_name}'",
                "invalid_request_error",
                "model",
                "model_not_found",
            )

    def check_prompt(self, prompt_ids: list[int], what: str) -> None:
        n, ctx = len(prompt_ids), self.limits.max_context
        if n == 0:
            raise P.invalid(f"the {what} is empty after tokenization", "messages" if what == "messages" else "prompt")
        if n >= ctx:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, your {what} resulted in {n} tokens "
                "(no room left to generate). Please reduce the length of the input.",
                "messages" if what == "messages" else "prompt",
                "context_length_exceeded",
            )
        vocab = self.scheduler.engine.config.vocab_size
        bad = [t for t in prompt_ids if not 0 <= t < vocab]
        if bad:
            raise P.invalid(f"token id {bad[0]} is outside the vocabulary [0, {vocab})", "prompt", "invalid_value")

    def max_new_tokens(self, requested: int | None, param: str, prompt_len: int, default: int | None) -> int:
        ctx = self.limits.max_context
        room = ctx - prompt_len
        if requested is None:
            return room if default is None else min(default, room)
        if requested <= 0:
            raise P.invalid(f"'{param}' must be at least 1, got {requested}", param, "invalid_value")
        if requested > room:
            raise P.invalid(
                f"This model's maximum context length is {ctx} tokens. However, you requested "
                f"{prompt_len + requested} tokens ({prompt_len} in the input, {requested} in the completion). "
                f"Please reduce the input or '{param}'.",
                param,
                "context_length_exceeded",
            )
        return requested

    def stop_ids(self, req: P.SamplingFields) -> tuple[int, ...]:
        vocab = self.scheduler.engine.config.vocab_size
        user = req.stop_ids()
        for t in user:
            if t >= vocab:
                raise P.invalid(f"stop token id {t} is outside the vocabulary [0, {vocab})", "stop", "invalid_value")
        ids = tuple(sorted(set(user) | (set() if req.ignore_eos else set(self.eos_token_ids))))
        if len(ids) > self.limits.max_stop_ids:
            raise P.invalid(
                f"{len(user)} stop token ids given; this server takes at most "
                f"{self.limits.max_stop_ids - len(self.eos_token_ids)} besides the model's EOS",
                "stop",
                "invalid_value",
            )
        return ids

    def check_logprobs(self, top: int | None, param: str) -> None:
        if top is not None and top > self.limits.max_top_logprobs:
            raise P.invalid(
                f"'{param}'={top} exceeds this server's limit of {self.limits.max_top_logprobs} "
                "(start it with a larger --max-logprobs)",
                param,
                "invalid_value",
            )

    def sampling_options(self, req: P.SamplingFields, max_new: int, stop_ids: tuple[int, ...], logprobs, seed):
        from mimo_jax.engine.sampling import SamplingOptions

        pick = lambda value, name: self.defaults[name] if value is None else value
        return SamplingOptions(
            temperature=pick(req.temperature, "temperature"),
            top_p=pick(req.top_p, "top_p"),
            top_k=max(pick(req.top_k, "top_k"), 0),
            min_p=req.min_p or 0.0,
            presence_penalty=req.presence_penalty or 0.0,
            frequency_penalty=req.frequency_penalty or 0.0,
            repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
            seed=seed,
            max_new_tokens=max_new,
            stop_token_ids=stop_ids,
            logprobs=logprobs,
        )

    def token_bytes(self, token_id: int) -> list[int]:
        return list(self.tokenizer.token_bytes(token_id))


# ---------------------------------------------------------------------------- one choice's output
@dataclasses.dataclass
class Piece:
    """What one event added to one choice."""

    content: str = ""
    reasoning: str = ""
    calls: list[ParsedToolCall] = dataclasses.field(default_factory=list)
    tokens: list[tuple[int, float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None


class ChoiceOutput:
    """Token ids of one choice -> text (stop strings), then for chat reasoning and tool calls."""

    def __init__(
        self,
        index: int,
        tokenizer: Tokenizer,
        stop_strings: list[str],
        stop_ids: tuple[int, ...],
        skip_special_tokens: bool,
        reasoning: ReasoningParser | None = None,
        tools: ToolCallParser | None = None,
    ):
        self.index = index
        self.text = TextStream(tokenizer, stop_strings, skip_special_tokens)
        self.stop_ids = set(stop_ids)
        self.reasoning = reasoning
        self.tools = tools
        self.completion_tokens = 0
        self.finish_reason: str | None = None
        self.content: list[str] = []
        self.reasoning_text: list[str] = []
        self.calls: list[ParsedToolCall] = []
        self.token_log: list[tuple[int, float, list[tuple[int, float]]]] = []

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def stopped_by_string(self) -> bool:
        return self.text.stopped

    def on_tokens(self, event: Tokens) -> Piece:
        piece = Piece()
        if self.finished:
            return piece
        ids = list(event.token_ids)
        stop_token = event.finish_reason == "stop" and ids and ids[-1] in self.stop_ids
        visible = ids[:-1] if stop_token else ids
        released = []
        for k, token in enumerate(visible):
            released.append(self.text.add(token))
            if event.logprobs is not None:
                piece.tokens.append((token, event.logprobs[k], event.top_logprobs[k] if event.top_logprobs else []))
            if self.text.stopped:
                break
        if self.text.stopped:
            self.completion_tokens = len(self.text.token_ids)
            self.finish_reason = "stop"
        else:
            self.completion_tokens += len(ids)
            if event.finish_reason is not None:
                released.append(self.text.finish())
                self.finish_reason = event.finish_reason
        self._parse("".join(released), piece, final=self.finished)
        if self.finished:
            if self.calls and self.finish_reason == "stop":
                self.finish_reason = "tool_calls"
            piece.finish_reason = self.finish_reason
        self.token_log.extend(piece.tokens)
        return piece

    def fail(self) -> None:
        self.finish_reason = "error"

    def _parse(self, text: str, piece: Piece, final: bool) -> None:
        content = text
        if self.reasoning is not None:
            reasoning, content = self.reasoning.feed(text)
            if final:
                r2, c2 = self.reasoning.finish()
                reasoning, content = reasoning + r2, content + c2
            piece.reasoning = reasoning
        if self.tools is not None:
            content, calls = self.tools.feed(content)
            if final:
                c2, calls2 = self.tools.finish()
                content, calls = content + c2, calls + calls2
            piece.calls = calls
        piece.content = content
        self.content.append(piece.content)
        self.reasoning_text.append(piece.reasoning)
        self.calls.extend(piece.calls)


# ---------------------------------------------------------------------------- one request
class Job:
    """The choices of one HTTP request, as scheduler sequences, with an event queue on the loop."""

    def __init__(self, server: Server, choices: list[ChoiceOutput], prompts: list[list[int]], options: list[Any]):
        self.server = server
        self.choices = choices
        self.id_prefix = P.new_id("req")
        self.queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
        timeout = server.limits.request_timeout
        now = time.monotonic()
        self.sequences = [
            Sequence(
                request_id=f"{self.id_prefix}-{i}",
                prompt_ids=prompt,
                options=opts,
                deliver=lambda ev, i=i: self.queue.put_nowait((i, ev)),
                arrival=now,
                deadline=None if timeout is None else now + timeout,
            )
            for i, (prompt, opts) in enumerate(zip(prompts, options, strict=True))
        ]
        self.prompt_tokens = 0

    def submit(self) -> None:
        self.server.scheduler.submit(self.sequences)

    def cancel_unfinished(self) -> None:
        ids = [s.request_id for s, c in zip(self.sequences, self.choices, strict=True) if not c.finished]
        if ids:
            self.server.scheduler.cancel(ids)

    async def events(self) -> AsyncIterator[tuple[ChoiceOutput, Piece]]:
        """Pieces as they come; raises the `APIError` of a failed sequence."""
        while not all(c.finished for c in self.choices):
            i, event = await self.queue.get()
            choice = self.choices[i]
            if isinstance(event, Failure):
                for c in self.choices:
                    if not c.finished:
                        c.fail()
                self.cancel_unfinished_after_failure(i)
                raise event.error
            piece = choice.on_tokens(event)
            if choice.stopped_by_string and event.finish_reason is None:
                self.server.scheduler.cancel([self.sequences[i].request_id])  # the engine does not know stop strings
            yield choice, piece

    def cancel_unfinished_after_failure(self, failed: int) -> None:
        ids = [s.request_id for k, s in enumerate(self.sequences) if k != failed]
        self.server.scheduler.cancel(ids)

    def usage(self) -> P.Usage:
        completion = sum(c.completion_tokens for c in self.choices)
        return P.Usage(
            prompt_tokens=self.prompt_tokens, completion_tokens=completion, total_tokens=self.prompt_tokens + completion
        )


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, job: Job) -> None:
    """Run a non-streaming job to the end; a client that hangs up cancels it at once."""

    async def drain():
        async for _ in job.events():
            pass

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            job.cancel_unfinished()
    if work.cancelled():
        raise asyncio.CancelledError
    work.result()  # re-raise a failure


def _sse(payload: Any) -> bytes:
    if isinstance(payload, P.BaseModel):
        return b"data: " + payload.model_dump_json(exclude_none=True).encode() + b"\n\n"
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


async def _stream(job: Job, chunks: Callable[[ChoiceOutput, Piece], list[Any]], opening: list[Any], closing) -> Any:
    """SSE body: opening chunks, one chunk per piece, closing chunks, `data: [DONE]`. Cancels on disconnect."""
    try:
        for chunk in opening:
            yield _sse(chunk)
        try:
            async for choice, piece in job.events():
                for chunk in chunks(choice, piece):
                    yield _sse(chunk)
        except P.APIError as e:
            yield _sse(e.body())
        else:
            for chunk in closing():
                yield _sse(chunk)
        yield b"data: [DONE]\n\n"
    finally:  # normal end, or the client went away (the generator is closed/cancelled)
        job.cancel_unfinished()


def _usage_options(req: P.SamplingFields) -> tuple[bool, bool]:
    """(usage chunk at the end, usage in every chunk): `stream_options.include_usage` / `continuous_usage_stats`."""
    options = req.stream_options
    if options is None:
        return False, False
    return options.include_usage, options.include_usage and options.continuous_usage_stats


# ---------------------------------------------------------------------------- logprobs formatting
def _chat_logprobs(server: Server, tokens: list, want: bool) -> P.ChoiceLogprobs | None:
    if not want:
        return None
    tok = server.tokenizer
    return P.ChoiceLogprobs(
        content=[
            P.TokenLogprob(
                token=tok.token_text(t),
                logprob=lp,
                bytes=server.token_bytes(t),
                top_logprobs=[
                    P.TopLogprob(token=tok.token_text(i), logprob=x, bytes=server.token_bytes(i)) for i, x in top
                ],
            )
            for t, lp, top in tokens
        ]
    )


def _completion_logprobs(server: Server, tokens: list, want: bool, offset: int) -> P.CompletionLogprobs | None:
    if not want:
        return None
    tok = server.tokenizer
    out = P.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for t, lp, top in tokens:
        text = tok.token_text(t)
        out.tokens.append(text)
        out.token_logprobs.append(lp)
        out.top_logprobs.append({tok.token_text(i): x for i, x in top})
        out.text_offset.append(offset)
        offset += len(text)
    return out


# ---------------------------------------------------------------------------- chat
def _template_messages(req: P.ChatCompletionRequest) -> list[dict]:
    messages = []
    for k, m in enumerate(req.messages):
        d = m.model_dump(exclude_none=True)
        if isinstance(m.content, list):
            d["content"] = "\n".join(part.text for part in m.content)
        for j, call in enumerate(d.get("tool_calls") or []):
            args = call["function"].get("arguments")
            if isinstance(args, str):  # templates read arguments as a mapping (as vLLM passes them)
                try:
                    call["function"]["arguments"] = json.loads(args) if args.strip() else {}
                except ValueError:
                    raise P.invalid(
                        "tool call arguments must be a JSON object",
                        f"messages[{k}].tool_calls[{j}].function.arguments",
                        "invalid_value",
                    ) from None
        messages.append(d)
    return messages


def _chat_job(server: Server, req: P.ChatCompletionRequest) -> tuple[Job, str]:
    if server.template is None:
        raise P.invalid("this model has no chat template; use /v1/completions", "messages")
    tool_choice = req.tool_choice
    if tool_choice == "required" or isinstance(tool_choice, P.NamedToolChoice):
        raise P.invalid(
            "tool_choice 'required' and named functions need constrained decoding, which this server does not "
            "implement; use 'auto' (the default when tools are given) or 'none'",
            "tool_choice",
            "unsupported_value",
        )
    if req.response_format is not None and req.response_format.get("type", "text") != "text":
        raise P.invalid("only response_format type 'text' is supported", "response_format", "unsupported_value")
    use_tools = bool(req.tools) and tool_choice != "none"
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if use_tools else None
    kwargs = dict(req.chat_template_kwargs or {})
    if req.thinking is not None and "enable_thinking" not in kwargs:
        kwargs["enable_thinking"] = req.thinking.type == "enabled"
    reserved = {"messages", "tools", "documents", "add_generation_prompt"} & set(kwargs)
    if reserved:
        raise P.invalid(f"chat_template_kwargs may not set {sorted(reserved)}", "chat_template_kwargs")
    try:
        prompt = server.template.render(_template_messages(req), tools, add_generation_prompt=True, **kwargs)
    except ChatTemplateError as e:
        raise P.invalid(str(e), "messages", "invalid_value") from None
    prompt_ids = server.tokenizer.encode(prompt, add_special_tokens=False)
    server.check_prompt(prompt_ids, "messages")
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
    max_new = server.max_new_tokens(requested, param, len(prompt_ids), None)
    top = (req.top_logprobs or 0) if req.logprobs else None
    server.check_logprobs(top, "top_logprobs")
    stop_ids = server.stop_ids(req)
    # The prompt may already open the thinking block (the template wrote `<think>`).
    in_reasoning = server.reasoning and prompt.rfind(THINK_START) > prompt.rfind(THINK_END)
    choices, options = [], []
    for i in range(req.n):
        choices.append(
            ChoiceOutput(
                i,
                server.tokenizer,
                req.stop_strings(),
                stop_ids,
                req.skip_special_tokens,
                ReasoningParser(in_reasoning) if server.reasoning else None,
                ToolCallParser(tools) if use_tools else None,
            )
        )
        options.append(server.sampling_options(req, max_new, stop_ids, top, _seed(req.seed, i)))
    job = Job(server, choices, [prompt_ids] * req.n, options)
    job.prompt_tokens = len(prompt_ids)
    return job, prompt


def _seed(seed: int | None, i: int) -> int | None:
    # Choice i draws from stream seed * 1_000_003 + i: the same stream `mimo_jax.generate(seed=seed)` uses for prompt i.
    return None if seed is None else (seed * 1_000_003 + i) % (1 << 62)


def _tool_call_out(call: ParsedToolCall) -> P.ToolCallOut:
    return P.ToolCallOut(id=call.id, function=P.FunctionCallOut(name=call.name, arguments=call.arguments_json()))


def _chat_response(server: Server, req: P.ChatCompletionRequest, job: Job) -> P.ChatCompletion:
    choices = []
    for c in job.choices:
        content = "".join(c.content)
        reasoning = "".join(c.reasoning_text)
        message = P.AssistantMessage(
            content=content if content or not c.calls else None,
            reasoning_content=reasoning if c.reasoning is not None and c.reasoning.saw_reasoning else None,
            tool_calls=[_tool_call_out(call) for call in c.calls] or None,
        )
        choices.append(
            P.ChatChoice(
                index=c.index,
                message=message,
                logprobs=_chat_logprobs(server, c.token_log, req.logprobs),
                finish_reason=c.finish_reason,
            )
        )
    return P.ChatCompletion(
        id=job.id_prefix.replace("req", "chatcmpl", 1),
        created=P.now(),
        model=server.model_name,
        choices=choices,
        usage=job.usage(),
    )


def _chat_stream(server: Server, req: P.ChatCompletionRequest, job: Job) -> AsyncIterator[bytes]:
    cid, created = job.id_prefix.replace("req", "chatcmpl", 1), P.now()
    include_usage, continuous = _usage_options(req)

    def chunk(choices: list[P.ChatChunkChoice], usage: P.Usage | None = None) -> dict:
        out = P.ChatCompletionChunk(id=cid, created=created, model=server.model_name, choices=choices)
        body = out.model_dump(exclude_none=True)
        for choice in body["choices"]:
            choice.setdefault("finish_reason", None)
            choice.setdefault("logprobs", None)
        if include_usage:
            usage = usage or (job.usage() if continuous else None)
            body["usage"] = usage.model_dump() if usage is not None else None
        return body

    opening = [
        chunk([P.ChatChunkChoice(index=c.index, delta=P.ChatDelta(role="assistant", content=""))]) for c in job.choices
    ]

    def chunks(choice: ChoiceOutput, piece: Piece) -> list[dict]:
        calls = [
            P.ToolCallDelta(
                index=choice.calls.index(call),
                id=call.id,
                type="function",
                function=P.FunctionCallOut(name=call.name, arguments=call.arguments_json()),
            )
            for call in piece.calls
        ]
        delta = P.ChatDelta(
            content=piece.content or None, reasoning_content=piece.reasoning or None, tool_calls=calls or None
        )
        has_news = piece.content or piece.reasoning or calls or piece.tokens
        out = []
        if has_news:
            out.append(
                chunk(
                    [
                        P.ChatChunkChoice(
                            index=choice.index,
                            delta=delta,
                            logprobs=_chat_logprobs(server, piece.tokens, req.logprobs),
                        )
                    ]
                )
            )
        if piece.finish_reason is not None:
            out.append(
                chunk([P.ChatChunkChoice(index=choice.index, delta=P.ChatDelta(), finish_reason=piece.finish_reason)])
            )
        return out

    def closing() -> list[dict]:
        return [chunk([], job.usage())] if include_usage else []

    return _stream(job, chunks, opening, closing)


# ---------------------------------------------------------------------------- completions
def _completion_job(server: Server, req: P.CompletionRequest) -> tuple[Job, list[str]]:
    if req.suffix:
        raise P.invalid("'suffix' is not supported", "suffix", "unsupported_value")
    if req.best_of is not None and req.best_of != req.n:
        raise P.invalid("'best_of' other than n is not supported", "best_of", "unsupported_value")
    if req.echo and req.logprobs is not None:
        raise P.invalid("echo with logprobs (prompt logprobs) is not supported", "echo", "unsupported_value")
    server.check_logprobs(req.logprobs, "logprobs")
    stop_ids = server.stop_ids(req)
    prompts, texts = [], []
    for p in req.prompts():
        ids = server.tokenizer.encode(p, add_special_tokens=True) if isinstance(p, str) else list(p)
        server.check_prompt(ids, "prompt")
        prompts.append(ids)
        texts.append(p if isinstance(p, str) else server.tokenizer.decode(ids, req.skip_special_tokens))
    max_news = [
        server.max_new_tokens(req.max_tokens, "max_tokens", len(ids), COMPLETIONS_DEFAULT_MAX_TOKENS) for ids in prompts
    ]
    choices, seq_prompts, options = [], [], []
    for k, ids in enumerate(prompts):
        for j in range(req.n):
            i = k * req.n + j
            choices.append(ChoiceOutput(i, server.tokenizer, req.stop_strings(), stop_ids, req.skip_special_tokens))
            seq_prompts.append(ids)
            options.append(server.sampling_options(req, max_news[k], stop_ids, req.logprobs, _seed(req.seed, i)))
    job = Job(server, choices, seq_prompts, options)
    job.prompt_tokens = sum(len(ids) for ids in prompts)
    echo = [texts[i // req.n] if req.echo else "" for i in range(len(choices))]
    return job, echo


def _completion_response(server: Server, req: P.CompletionRequest, job: Job, echo: list[str]) -> P.Completion:
    return P.Completion(
        id=job.id_prefix.replace("req", "cmpl", 1),
        created=P.now(),
        model=server.model_name,
        choices=[
            P.CompletionChoice(
                index=c.index,
                text=echo[c.index] + "".join(c.content),
                logprobs=_completion_logprobs(server, c.token_log, req.logprobs is not None, len(echo[c.index])),
                finish_reason=c.finish_reason,
            )
            for c in job.choices
        ],
        usage=job.usage(),
    )


def _completion_stream(server: Server, req: P.CompletionRequest, job: Job, echo: list[str]) -> AsyncIterator[bytes]:
    cid, created = job.id_prefix.replace("req", "cmpl", 1), P.now()
    include_usage, continuous = _usage_options(req)
    offsets = [len(e) for e in echo]

    def chunk(choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> dict:
        body = P.Completion(id=cid, created=created, model=server.model_name, choices=choices).model_dump()
        if include_usage:
            usage = usage or (job.usage() if continuous else None)
            body["usage"] = usage.model_dump() if usage is not None else None
        else:
            body.pop("usage")
        return body

    opening = [
        chunk([P.CompletionChoice(index=i, text=text, finish_reason=None)]) for i, text in enumerate(echo) if text
    ]

    def chunks(choice: ChoiceOutput, piece: Piece) -> list[dict]:
        if not (piece.content or piece.tokens or piece.finish_reason):
            return []
        logprobs = _completion_logprobs(server, piece.tokens, req.logprobs is not None, offsets[choice.index])
        offsets[choice.index] += len(piece.content)
        return [
            chunk(
                [
                    P.CompletionChoice(
                        index=choice.index, text=piece.content, logprobs=logprobs, finish_reason=piece.finish_reason
                    )
                ]
            )
        ]

    def closing() -> list[dict]:
        return [chunk([], job.usage())] if include_usage else []

    return _stream(job, chunks, opening, closing)


# ---------------------------------------------------------------------------- the app
async def _body(request: Request) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise P.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
    return await request.body()


def _submit(server: Server, job: Job) -> None:
    if server.scheduler.error is not None:
        raise P.APIError(503, "the engine failed; the server cannot take requests", "server_error")
    if len(job.sequences) > server.scheduler.max_waiting:
        raise P.invalid(
            f"this request asks for {len(job.sequences)} sequences (prompts x n); the server queues at most "
            f"{server.scheduler.max_waiting}",
            "n",
        )
    job.submit()


def create_app(server: Server, on_shutdown: Callable[[], None] | None = None) -> FastAPI:
    """The ASGI app. The scheduler thread starts with the app (its loop is where tokens are delivered);
    `on_shutdown` runs after the scheduler has stopped."""
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()

        def run_batch(batch):
            for deliver, event in batch:
                deliver(event)

        server.scheduler.dispatch = lambda batch: loop.call_soon_threadsafe(run_batch, batch)
        server.scheduler.start()
        try:
            yield
        finally:
            server.scheduler.shutdown()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="mimo_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(P.APIError(exc.status_code, message, kind).body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(P.APIError(500, f"internal error: {exc}", "server_error").body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = P.parse_request(P.ChatCompletionRequest, await _body(request))
        server.check_model(req.model)
        job, _ = _chat_job(server, req)
        _submit(server, job)
        if req.stream:
            return StreamingResponse(_chat_stream(server, req, job), media_type="text/event-stream")
        await _collect(request, job)
        return JSONResponse(_chat_response(server, req, job).model_dump(exclude_none=False))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = P.parse_request(P.CompletionRequest, await _body(request))
        server.check_model(req.model)
        job, echo = _completion_job(server, req)
        _submit(server, job)
        if req.stream:
            return StreamingResponse(_completion_stream(server, req, job, echo), media_type="text/event-stream")
        await _collect(request, job)
        return JSONResponse(_completion_response(server, req, job, echo).model_dump(exclude_none=False))

    def model_card() -> P.ModelCard:
        return P.ModelCard(
            id=server.model_name,
            created=server.created,
            root=server.model_root,
            max_model_len=server.limits.max_context,
        )

    @app.get("/v1/models")
    async def models() -> Response:
        return JSONResponse(P.ModelList(data=[model_card()]).model_dump())

    @app.get("/v1/models/{name:path}")
    async def model(name: str) -> Response:
        server.check_model(name)
        return JSONResponse(model_card().model_dump())

    @app.get("/health")
    async def health() -> Response:
        if not server.scheduler.alive:
            return JSONResponse(P.APIError(503, "the scheduler is not running", "server_error").body(), 503)
        running, waiting = server.scheduler.counts()
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(server.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
