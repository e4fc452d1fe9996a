"""One request's output, on the event-loop thread: `Job` (its choices as scheduler sequences, their events,
usage), `ChoiceOutput` (token ids -> text, reasoning, tool calls), and the OpenAI response bodies and SSE streams."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from mimo_jax.serve import protocol as P
from mimo_jax.serve.parsers import ParsedToolCall, ReasoningParser, TextStream, ToolCallParser
from mimo_jax.serve.scheduler import Failure, Sequence, Tokens
from mimo_jax.serve.server import Server
from mimo_jax.text import Tokenizer

log = logging.getLogger("mimo_jax.serve")


# ---------------------------------------------------------------------------- one choice's output
@dataclasses.dataclass
class PromptLogprobs:
    """A sequence's prompt scores, per prompt token (None for the first): its model logprob given the tokens
    before it, its rank, and the top-N (id, logprob) of that distribution."""

    logprobs: list[float | None]
    ranks: list[int | None]
    top: list[list[tuple[int, float]] | None]


@dataclasses.dataclass
class Piece:
    """What one event added to one choice."""

    content: str = ""
    reasoning: str = ""
    calls: list[ParsedToolCall] = dataclasses.field(default_factory=list)
    tokens: list[tuple[int, float, list[tuple[int, float]]]] = dataclasses.field(default_factory=list)
    finish_reason: str | None = None
    prompt: PromptLogprobs | None = None  # with the choice's first piece, when the prompt was scored


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
        self.prompt: PromptLogprobs | None = None
        self.accepted: list[int] = []  # with MTP speculation: drafts accepted by each target forward

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
        if event.accepted:
            self.accepted.extend(event.accepted)
        if event.prompt_logprobs is not None:
            piece.prompt = self.prompt = PromptLogprobs(
                event.prompt_logprobs, event.prompt_ranks, event.prompt_top_logprobs
            )
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
        self.cached_tokens = [0] * len(self.sequences)  # per sequence: prompt tokens the prefix cache served

    def submit(self) -> None:
        self.server.scheduler.submit(self.sequences)

    def cancel_unfinished(self) -> None:
        ids = [s.request_id for s, c in zip(self.sequences, self.choices, strict=True) if not c.finished]
        if ids:
            self.server.scheduler.cancel(ids)

    async def events(self) -> AsyncIterator[tuple[ChoiceOutput, Piece]]:
        """Pieces as they come; raises the `APIError` of a failed sequence, or a 500 `APIError` when turning
        tokens into output fails (every sequence of the job is cancelled first)."""
        while not all(c.finished for c in self.choices):
            i, event = await self.queue.get()
            choice = self.choices[i]
            if isinstance(event, Failure):
                for c in self.choices:
                    if not c.finished:
                        c.fail()
                self.cancel_unfinished_after_failure(i)
                raise event.error
            if event.cached_tokens is not None:
                self.cached_tokens[i] = event.cached_tokens
            try:
                piece = choice.on_tokens(event)
            except Exception as e:  # a bug in detokenizing/parsing: end the job, free its slots
                raise self.fail_internal(e) from e
            if choice.stopped_by_string and event.finish_reason is None:
                self.server.scheduler.cancel([self.sequences[i].request_id])  # the engine does not know stop strings
            yield choice, piece

    def fail_internal(self, error: Exception) -> P.APIError:
        """Cancel every sequence (one that stopped on a stop string may still run) and fail every choice;
        the 500 to answer."""
        log.exception("request %s failed after admission", self.id_prefix, exc_info=error)
        self.server.scheduler.cancel([s.request_id for s in self.sequences])
        for c in self.choices:
            if not c.finished:
                c.fail()
        return P.APIError(
            500, f"internal error while producing the output: {type(error).__name__}: {error}", "server_error"
        )

    def cancel_unfinished_after_failure(self, failed: int) -> None:
        ids = [s.request_id for k, s in enumerate(self.sequences) if k != failed]
        self.server.scheduler.cancel(ids)

    def usage(self) -> P.Usage:
        """Token counts; `prompt_tokens_details.cached_tokens` (OpenAI's field): the prompt tokens the prefix cache
        served, in the proportion the job's sequences had them (exact with one sequence per prompt)."""
        completion = sum(c.completion_tokens for c in self.choices)
        sequence_prompts = sum(len(s.prompt_ids) for s in self.sequences) or 1
        cached = round(sum(self.cached_tokens) * self.prompt_tokens / sequence_prompts)
        return P.Usage(
            prompt_tokens=self.prompt_tokens,
            completion_tokens=completion,
            total_tokens=self.prompt_tokens + completion,
            prompt_tokens_details=P.PromptTokensDetails(cached_tokens=cached),
        )


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
        except Exception as e:  # a bug while formatting chunks: the client still gets an error and the end
            yield _sse(job.fail_internal(e).body())
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


def spec_decode_metrics(server: Server, job: Job) -> dict:
    """vLLM's per-request acceptance metrics (`--per-request-spec-decode-metrics summary|detailed`): the
    response's `metrics.speculative_decoding`, for one-sequence requests of a speculating server (else null);
    nothing when the level is "none". The engine drafts k tokens at every target forward (`num_spec_steps`)."""
    level = server.spec_decode_metrics
    if level == "none":
        return {}
    k = getattr(server.scheduler.engine, "speculative_steps", 0)
    if not k or len(job.choices) != 1:
        return {"metrics": {"speculative_decoding": None}}
    accepted = job.choices[0].accepted
    steps, total = len(accepted), sum(accepted)
    histogram = [0] * (k + 1)
    for a in accepted:
        histogram[a] += 1
    stats = {
        "mean_acceptance_length": 1 + total / steps if steps else 0.0,
        "draft_acceptance_rate": total / (steps * k) if steps else 0.0,
        "acceptance_histogram": histogram,
        "acceptance_histogram_by_draft_length": {str(k): histogram} if steps else {},
        "num_spec_steps": steps,
        "num_accepted_draft_tokens": total,
        "num_draft_tokens": steps * k,
        "num_spec_tokens": k,
    }
    if level == "detailed":
        stats["per_step_accepted"] = list(accepted)
        stats["per_step_drafted"] = [k] * steps
    return {"metrics": {"speculative_decoding": stats}}


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


def _prompt_completion_logprobs(
    server: Server, prompt_ids: list[int], prompt: PromptLogprobs | None, top: int
) -> P.CompletionLogprobs:
    """The prompt's part of echo + logprobs (OpenAI's legacy format): its tokens, their logprobs and top-N
    (null for the first token), offsets from 0 (each token's text follows the one before)."""
    tok = server.tokenizer
    out = P.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    offset = 0
    for k, t in enumerate(prompt_ids):
        text = tok.token_text(t)
        tops = None if prompt is None else prompt.top[k]
        out.tokens.append(text)
        out.token_logprobs.append(None if prompt is None else prompt.logprobs[k])
        out.top_logprobs.append(None if tops is None else {tok.token_text(i): x for i, x in tops[:top]})
        out.text_offset.append(offset)
        offset += len(text)
    return out


def _end_offset(logprobs: P.CompletionLogprobs) -> int:
    return logprobs.text_offset[-1] + len(logprobs.tokens[-1]) if logprobs.tokens else 0


def _joined(head: P.CompletionLogprobs, tail: P.CompletionLogprobs) -> P.CompletionLogprobs:
    return P.CompletionLogprobs(
        tokens=head.tokens + tail.tokens,
        token_logprobs=head.token_logprobs + tail.token_logprobs,
        top_logprobs=head.top_logprobs + tail.top_logprobs,
        text_offset=head.text_offset + tail.text_offset,
    )


def _vllm_prompt_logprobs(
    server: Server, prompt_ids: list[int], prompt: PromptLogprobs | None, top: int
) -> list[dict[str, dict] | None]:
    """vLLM's `prompt_logprobs`: None for the first token, then per prompt token a map token id (a string in
    JSON) -> {logprob, rank, decoded_token}: the token itself, then the top-N (ranks 1..N)."""
    tok = server.tokenizer
    entry = lambda lp, rank, t: {"logprob": lp, "rank": rank, "decoded_token": tok.token_text(t)}
    out: list[dict[str, dict] | None] = [None]
    for k in range(1, len(prompt_ids)):
        if prompt is None:
            out.append(None)
            continue
        t = prompt_ids[k]
        scores = {str(t): entry(prompt.logprobs[k], prompt.ranks[k], t)}
        for rank, (i, x) in enumerate(prompt.top[k][:top], 1):
            scores.setdefault(str(i), entry(x, rank, i))
        out.append(scores)
    return out


# ---------------------------------------------------------------------------- chat
def _tool_call_out(call: ParsedToolCall) -> P.ToolCallOut:
    return P.ToolCallOut(id=call.id, function=P.FunctionCallOut(name=call.name, arguments=call.arguments_json()))


def chat_response(server: Server, req: P.ChatCompletionRequest, job: Job) -> P.ChatCompletion:
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
    extra = {}
    if req.prompt_logprobs is not None:  # vLLM's extension: one list for the request (its one prompt)
        prompt_ids, prompt = job.sequences[0].prompt_ids, job.choices[0].prompt
        extra["prompt_logprobs"] = _vllm_prompt_logprobs(server, prompt_ids, prompt, req.prompt_logprobs)
    return P.ChatCompletion(
        id=job.id_prefix.replace("req", "chatcmpl", 1),
        created=P.now(),
        model=server.model_name,
        choices=choices,
        usage=job.usage(),
        **extra,
        **spec_decode_metrics(server, job),
    )


def chat_stream(server: Server, req: P.ChatCompletionRequest, job: Job) -> AsyncIterator[bytes]:
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

    def closing() -> list[dict]:  # per-request metrics ride the usage chunk (as vLLM's)
        return [{**chunk([], job.usage()), **spec_decode_metrics(server, job)}] if include_usage else []

    return _stream(job, chunks, opening, closing)


# ---------------------------------------------------------------------------- completions
def completion_response(server: Server, req: P.CompletionRequest, job: Job, echo: list[str]) -> P.Completion:
    choices = []
    for c in job.choices:
        prompt_ids = job.sequences[c.index].prompt_ids
        if req.echo and req.logprobs is not None:  # the prompt's tokens first (the first one's logprob null)
            head = _prompt_completion_logprobs(server, prompt_ids, c.prompt, req.logprobs)
            logprobs = _joined(head, _completion_logprobs(server, c.token_log, True, _end_offset(head)))
        else:
            logprobs = _completion_logprobs(server, c.token_log, req.logprobs is not None, len(echo[c.index]))
        extra = {}
        if req.prompt_logprobs is not None:
            extra["prompt_logprobs"] = _vllm_prompt_logprobs(server, prompt_ids, c.prompt, req.prompt_logprobs)
        choices.append(
            P.CompletionChoice(
                index=c.index,
                text=echo[c.index] + "".join(c.content),
                logprobs=logprobs,
                finish_reason=c.finish_reason,
                **extra,
            )
        )
    return P.Completion(
        id=job.id_prefix.replace("req", "cmpl", 1),
        created=P.now(),
        model=server.model_name,
        choices=choices,
        usage=job.usage(),
        **spec_decode_metrics(server, job),
    )


def completion_stream(server: Server, req: P.CompletionRequest, job: Job, echo: list[str]) -> AsyncIterator[bytes]:
    cid, created = job.id_prefix.replace("req", "cmpl", 1), P.now()
    include_usage, continuous = _usage_options(req)
    offsets = [len(e) for e in echo]
    # echo + logprobs: the echoed prompt comes with its tokens' logprobs, known once the prompt is prefilled, so in
    # the choice's first chunk (with its first tokens) rather than in an opening chunk
    echo_logprobs = req.echo and req.logprobs is not None

    def chunk(choices: list[P.CompletionChoice], usage: P.Usage | None = None) -> dict:
        body = P.Completion(id=cid, created=created, model=server.model_name, choices=choices).model_dump()
        if include_usage:
            usage = usage or (job.usage() if continuous else None)
            body["usage"] = usage.model_dump() if usage is not None else None
        else:
            body.pop("usage")
        return body

    opening = [
        chunk([P.CompletionChoice(index=i, text=text, finish_reason=None)])
        for i, text in enumerate(echo)
        if text and not echo_logprobs
    ]

    def chunks(choice: ChoiceOutput, piece: Piece) -> list[dict]:
        head, text = None, piece.content
        if echo_logprobs and piece.prompt is not None:
            prompt_ids = job.sequences[choice.index].prompt_ids
            head = _prompt_completion_logprobs(server, prompt_ids, piece.prompt, req.logprobs)
            offsets[choice.index] = _end_offset(head)
            text = echo[choice.index] + text
        elif not (piece.content or piece.tokens or piece.finish_reason):
            return []
        logprobs = _completion_logprobs(server, piece.tokens, req.logprobs is not None, offsets[choice.index])
        if head is not None:
            logprobs = _joined(head, logprobs)
        offsets[choice.index] += len(piece.content)
        out = P.CompletionChoice(index=choice.index, text=text, logprobs=logprobs, finish_reason=piece.finish_reason)
        return [chunk([out])]

    def closing() -> list[dict]:  # per-request metrics ride the usage chunk (as vLLM's)
        return [{**chunk([], job.usage()), **spec_decode_metrics(server, job)}] if include_usage else []

    return _stream(job, chunks, opening, closing)
