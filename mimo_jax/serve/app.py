"""FastAPI routes: /v1/chat/completions, /v1/completions (streaming and not), /v1/models, /health, /metrics.

The HTTP layer: reading the body, checking it into a `Job` (`requests`), submitting it to the scheduler, and
collecting or streaming its output (`jobs`). Every failure a client can cause is an `APIError` answered with
an OpenAI error body.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from mimo_jax.serve import protocol as P
from mimo_jax.serve.jobs import Job, chat_response, chat_stream, completion_response, completion_stream
from mimo_jax.serve.requests import Server, chat_job, completion_job

log = logging.getLogger("mimo_jax.serve")

MAX_BODY_BYTES = 32 << 20


# ---------------------------------------------------------------------------- the HTTP layer
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
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise P.APIError(413, f"request body larger than {MAX_BODY_BYTES} bytes", "invalid_request_error")
    return await request.body()


def _client_gone() -> Response:
    """The answer to a request whose client hung up: nothing reaches it (uvicorn drops what is sent to a closed
    connection); 499 is nginx's "client closed request", for access logs."""
    return Response(status_code=499)


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

    @app.exception_handler(ClientDisconnect)
    async def client_disconnect(request: Request, exc: ClientDisconnect):
        return _client_gone()  # hung up while sending the body: nothing to answer, nothing went wrong here

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception):
        log.exception("unhandled error in %s %s", request.method, request.url.path)
        return JSONResponse(P.APIError(500, f"internal error: {exc}", "server_error").body(), status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        req = P.parse_request(P.ChatCompletionRequest, await _body(request))
        server.check_model(req.model)
        job, _ = chat_job(server, req)
        _submit(server, job)
        if req.stream:
            return StreamingResponse(chat_stream(server, req, job), media_type="text/event-stream")
        if not await _collect(request, job):
            return _client_gone()
        return JSONResponse(chat_response(server, req, job).model_dump(exclude_none=False))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        req = P.parse_request(P.CompletionRequest, await _body(request))
        server.check_model(req.model)
        job, echo = completion_job(server, req)
        _submit(server, job)
        if req.stream:
            return StreamingResponse(completion_stream(server, req, job, echo), media_type="text/event-stream")
        if not await _collect(request, job):
            return _client_gone()
        return JSONResponse(completion_response(server, req, job, echo).model_dump(exclude_none=False))

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
