"""The HTTP server's life: uvicorn, a ready line, and a graceful drain on SIGTERM or SIGINT.

A stopping signal does not close the listening socket at once (uvicorn's own behaviour): the scheduler takes no
new sequences (requests answer 503 with Retry-After), /health answers 503 {"status": "draining"} so a load
balancer stops sending, and what is queued or running finishes for up to `drain_timeout` seconds. What still
runs then ends with an error (a stream gets an error event and `data: [DONE]`), and uvicorn shuts down: the
process exits 0. A second signal ends the drain at once, the same way.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn

from mimo_jax.serve.protocol import APIError
from mimo_jax.serve.scheduler import Scheduler

log = logging.getLogger("mimo_jax.serve")

POLL_S = 0.05  # how often a drain looks whether the scheduler is idle


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` whose stopping signals drain the scheduler first (see the module's docstring).

    `on_ready` runs once uvicorn listens. `begin_drain()` (any thread) does what a first signal does."""

    def __init__(
        self,
        config: uvicorn.Config,
        scheduler: Scheduler,
        drain_timeout: float,
        on_ready: Callable[[], None] | None = None,
    ):
        super().__init__(config)
        self.scheduler = scheduler
        self.drain_timeout = drain_timeout
        self.on_ready = on_ready
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task | None = None
        self._hurry: asyncio.Event | None = None

    async def startup(self, sockets: list | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._hurry = asyncio.Event()
        await super().startup(sockets)
        if self.started and self.on_ready is not None:
            self.on_ready()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The signal handler (uvicorn installs it for SIGINT and SIGTERM). Until uvicorn listens it stops as
        uvicorn does; then it only schedules the drain on the event loop (a handler may run between any two
        bytecodes of the loop's own code). Not recording the signal is what makes the exit status 0: uvicorn
        re-raises recorded signals after its shutdown."""
        if self._loop is None or not self.started:
            return super().handle_exit(sig, frame)
        self._loop.call_soon_threadsafe(self._on_signal, signal.Signals(sig).name)

    def begin_drain(self) -> None:
        """What a stopping signal does; callable from any thread once the server has started."""
        assert self._loop is not None, "the server has not started"
        self._loop.call_soon_threadsafe(self._on_signal, "a drain request")

    def _on_signal(self, what: str) -> None:
        if self._drain is None:
            running, waiting = self.scheduler.counts()
            log.info(
                "%s: draining (no new requests; %d running and %d queued sequences get up to %g s to finish)",
                what,
                running,
                waiting,
                self.drain_timeout,
            )
            self._drain = asyncio.ensure_future(self._drain_then_exit())
        else:
            log.warning("%s during the drain: ending what still runs now", what)
            self._hurry.set()

    async def _drain_then_exit(self) -> None:
        self.scheduler.drain()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.drain_timeout
        while not self.scheduler.idle and not self._hurry.is_set() and loop.time() < deadline:
            try:
                await asyncio.wait_for(self._hurry.wait(), min(POLL_S, max(deadline - loop.time(), 0.0)))
            except TimeoutError:
                pass
        if not self.scheduler.idle:
            running, waiting = self.scheduler.counts()
            log.warning("drain ended with %d running and %d queued sequences: cancelling them", running, waiting)
            error = APIError(
                503,
                "the server shut down before this request finished (its --drain-timeout passed)",
                "server_error",
                code="server_shutdown",
            )
            self.scheduler.abort(error)
            while not self.scheduler.idle and self.scheduler.alive:  # the abort's round hands out the errors
                await asyncio.sleep(POLL_S)
        log.info("drained; shutting down")
        self.should_exit = True
