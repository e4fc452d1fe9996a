"""FastAPI routes: /v1/chat/completions, /v1/completions, /v1/responses (streaming and not), /tokenize, /detokenize,
/v1/models, /health, /metrics.

The HTTP layer: reading the body (at most MAX_BODY_BYTES), checking it into a `Job` (`requests`; on a small
worker pool, so parsing, template rendering and tokenization never stall the event loop), submitting it to the
scheduler, and collecting or streaming its output (`jobs`). Every failure a client can cause is an `APIError`
answered with an OpenAI error body. Around the routes: the Host check, CORS (off unless origins are given) and
the API key (every route but /health and, unless protected too, /metrics).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import logging
from collections.abc import Callable, Collection
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect

from mimo_jax.serve import protocol as P
from mimo_jax.serve import responses, tokenization
from mimo_jax.serve.jobs import Job, chat_response, chat_stream, completion_response, completion_stream
from mimo_jax.serve.requests import chat_job, completion_job
from mimo_jax.serve.server import Server

log = logging.getLogger("mimo_jax.serve")

MAX_BODY_BYTES = 32 << 20
RETRY_AFTER_S = 1  # seconds a client told 429 (queue full) or 503 (draining) waits before trying again
# Threads that parse, render and tokenize requests (CPU work kept off the event loop, which must keep
# answering /health and delivering tokens); more requests than this wait their turn.
PREPARE_WORKERS = 4


# ---------------------------------------------------------------------------- the HTTP layer
class _InternalErrors:
    """ASGI middleware: an unexpected exception becomes a 500 OpenAI error body and the connection stays usable.

    (Starlette's own handler re-raises after answering, and uvicorn then drops the keep-alive connection
    without `Connection: close`, so a client's next request on it fails.) An exception after the response
    started (a stream cut short) still goes up: the connection cannot carry a half response."""

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def tracking_send(message: dict) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except Exception:
            if started:
                raise
            log.exception("unhandled error in %s %s", scope.get("method"), scope.get("path"))
            # The exception's text stays in the log: it may name paths or internals.
            body = P.APIError(500, "internal server error (see the server log)", "server_error").body()
            await JSONResponse(body, status_code=500)(scope, receive, send)


def host_name(value: str) -> str:
    """The host part of a Host header or an address, lower case; IPv6 literals in brackets."""
    value = value.strip().lower()
    if value.startswith("["):
        return value[: value.find("]") + 1] if "]" in value else value
    if value.count(":") > 1:  # a bare IPv6 address
        return f"[{value}]"
    return value.rsplit(":", 1)[0] if ":" in value else value


class _AllowedHosts:
    """ASGI middleware: 400 for a Host header naming none of `hosts` (DNS rebinding: a web page whose name
    resolves to this machine would otherwise reach a server bound to 127.0.0.1)."""

    def __init__(self, app: Any, hosts: Collection[str]):
        self.app = app
        self.hosts = {host_name(h) for h in hosts}

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http":
            host = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"host"), "")
            if host_name(host) not in self.hosts:
                message = f"Host {host!r} is not served here (the server's --allowed-hosts names the hosts it answers)"
                body = P.APIError(400, message, "invalid_request_error").body()
                return await JSONResponse(body, status_code=400)(scope, receive, send)
        await self.app(scope, receive, send)


class _ApiKey:
    """ASGI middleware: every path but `open_paths` needs `Authorization: Bearer <key>`; else 401 with OpenAI's
    error body (code "invalid_api_key"). Keys are compared as SHA-256 digests in constant time (neither the
    key's characters nor its length leak through timing)."""

    def __init__(self, app: Any, key: str, open_paths: Collection[str]):
        self.app = app
        self.digest = hashlib.sha256(key.encode()).digest()
        self.open_paths = frozenset(open_paths)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in self.open_paths:
            header = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"authorization"), "")
            scheme, _, token = header.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                message = (
                    "You didn't provide an API key. This server needs one in an Authorization header using Bearer "
                    "auth (Authorization: Bearer YOUR_KEY)."
                )
            elif not hmac.compare_digest(hashlib.sha256(token.strip().encode()).digest(), self.digest):
                message = "Incorrect API key provided."
            else:
                return await self.app(scope, receive, send)
            body = P.APIError(401, message, "invalid_request_error", code="invalid_api_key").body()
            # The body is not read: the connection cannot carry another request.
            headers = {"www-authenticate": "Bearer", "connection": "close"}
            return await JSONResponse(body, status_code=401, headers=headers)(scope, receive, send)
        await self.app(scope, receive, send)


async def _until_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _collect(request: Request, job: Job) -> bool:
    """Run a non-streaming job to the end; False if the client hung up first (the job is then cancelled:
    its sequences leave the engine at the next round)."""

    async def drain():
        async for _ in job.events():
            pass

    work = asyncio.ensure_future(drain())
    gone = asyncio.ensure_future(_until_disconnect(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        finished = work.done()
        if not finished:
            job.cancel_unfinished()
        # cancel() only asks; wait until both tasks have really ended, so neither is left pending
        # and no result of theirs is read too early.
        work.cancel()
        gone.cancel()
        await asyncio.gather(work, gone, return_exceptions=True)
    if not finished:
        return False
    work.result()  # re-raise a failure
    return True


async def _body(request: Request) -> bytes:
    """The body, counted as it arrives (a chunked upload has no Content-Length): 413 once past the limit.

    Only `application/json` (415 otherwise): a web page can POST text/plain or form bodies to a local server
    without the browser asking first, and those must not be read as requests."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise P.APIError(
            415, f"Content-Type must be application/json, got {content_type or 'none'!r}", "invalid_request_error"
        )
    too_large = P.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _client_gone() -> Response:
    """The answer to a request whose client hung up: nothing reaches it (uvicorn drops what is sent to a closed
    connection); 499 is nginx's "client closed request", for access logs."""
    return Response(status_code=499)


def _submit(server: Server, job: Job) -> None:
    if server.scheduler.error is not None:
        raise P.APIError(503, "the engine failed; the server cannot take requests", "server_error")
    server.check_sequences(len(job.sequences))
    job.submit()


def _prepare_chat(server: Server, body: bytes) -> tuple[P.ChatCompletionRequest, Job]:
    req = P.parse_request(P.ChatCompletionRequest, body)
    server.check_model(req.model)
    job, _ = chat_job(server, req)
    return req, job


def _prepare_completion(server: Server, body: bytes) -> tuple[P.CompletionRequest, Job, list[str]]:
    req = P.parse_request(P.CompletionRequest, body)
    server.check_model(req.model)
    job, echo = completion_job(server, req)
    return req, job, echo


def _prepare_response(server: Server, body: bytes) -> tuple[responses.ResponsesRequest, Job]:
    req = responses.parse(body)
    _, job = responses.job(server, req)
    return req, job


def create_app(
    server: Server,
    on_shutdown: Callable[[], None] | None = None,
    allowed_hosts: Collection[str] | None = None,
    *,
    api_key: str | None = None,
    protect_metrics: bool = False,
    allowed_origins: Collection[str] | None = None,
) -> FastAPI:
    """The ASGI app. The scheduler thread starts with the app (its loop is where tokens are delivered);
    `on_shutdown` runs after the scheduler has stopped. `allowed_hosts`: the Host header names answered
    (None: any). `api_key`: every route but /health (and /metrics unless `protect_metrics`) needs it as a
    Bearer token. `allowed_origins`: CORS for these browser origins ("*": any; None: no CORS headers)."""
    if protect_metrics and not api_key:
        raise ValueError("protect_metrics needs an api_key")

    pool = concurrent.futures.ThreadPoolExecutor(PREPARE_WORKERS, thread_name_prefix="mimo-prepare")

    async def prepare(fn: Callable[..., Any], *args: Any) -> Any:
        """Run a request's parsing, checks, template rendering and tokenization on the worker pool."""
        return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(fn, *args))

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
            pool.shutdown(wait=False, cancel_futures=True)
            server.scheduler.shutdown()
            if on_shutdown is not None:
                on_shutdown()

    app = FastAPI(title="mimo_jax", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # Starlette runs the middleware added last first: Host check, then CORS (a preflight carries no key), then key.
    app.add_middleware(_InternalErrors)
    if api_key:
        app.add_middleware(_ApiKey, key=api_key, open_paths={"/health"} | (set() if protect_metrics else {"/metrics"}))
    if allowed_origins is not None:
        app.add_middleware(
            CORSMiddleware, allow_origins=list(allowed_origins), allow_methods=["*"], allow_headers=["*"]
        )
    if allowed_hosts is not None:
        app.add_middleware(_AllowedHosts, hosts=allowed_hosts)  # outermost: before anything else runs

    @app.exception_handler(P.APIError)
    async def api_error(request: Request, exc: P.APIError):
        # 413, 415: the rest of the body is not read, so the connection cannot carry another request.
        headers = {"connection": "close"} if exc.status in (413, 415) else None
        if exc.status in (429, 503):  # queue full, draining: clients (openai's retries) come back in a second
            headers = {"retry-after": str(RETRY_AFTER_S)}
        return JSONResponse(exc.body(), status_code=exc.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return JSONResponse(P.APIError(exc.status_code, message, kind).body(), status_code=exc.status_code)

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, exc: ClientDisconnect):
        return _client_gone()  # hung up while sending the body: nothing to answer, nothing went wrong here

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req, job = await prepare(_prepare_chat, server, await _body(request))
        _submit(server, job)
        if req.stream:
            return StreamingResponse(chat_stream(server, req, job), media_type="text/event-stream")
        if not await _collect(request, job):
            return _client_gone()
        return JSONResponse(chat_response(server, req, job).model_dump(exclude_none=False))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req, job, echo = await prepare(_prepare_completion, server, await _body(request))
        _submit(server, job)
        if req.stream:
            return StreamingResponse(completion_stream(server, req, job, echo), media_type="text/event-stream")
        if not await _collect(request, job):
            return _client_gone()
        return JSONResponse(completion_response(server, req, job, echo).model_dump(exclude_none=False))

    @app.post("/v1/responses")
    async def create_response(request: Request) -> Response:
        req, job = await prepare(_prepare_response, server, await _body(request))
        _submit(server, job)
        if req.stream:
            return StreamingResponse(responses.response_stream(server, req, job), media_type="text/event-stream")
        if not await _collect(request, job):
            return _client_gone()
        return JSONResponse(responses.response_body(server, req, job))

    @app.post("/tokenize")
    async def tokenize(request: Request) -> Response:
        return JSONResponse(await prepare(tokenization.tokenize, server, await _body(request)))

    @app.post("/detokenize")
    async def detokenize(request: Request) -> Response:
        return JSONResponse(await prepare(tokenization.detokenize, server, await _body(request)))

    def model_card() -> P.ModelCard:
        return P.ModelCard(
            id=server.model_name,
            created=server.created,
            root=server.model_name,  # not the checkpoint's path
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
        if server.scheduler.draining:  # load balancers stop sending; what runs finishes
            body = {"status": "draining", "running": running, "waiting": waiting}
            return JSONResponse(body, 503, headers={"retry-after": str(RETRY_AFTER_S)})
        return JSONResponse({"status": "ok", "running": running, "waiting": waiting})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        body, content_type = server.metrics.render(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    return app
