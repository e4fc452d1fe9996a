"""Continuous batching: one background thread drives the engine for every HTTP request.

Each round the scheduler thread
1. applies cancellations (client gone, stop string seen, timeout): the engine slot is freed before
   anything else runs;
2. admits waiting sequences (first come, first served) into free engine slots;
3. runs one `engine.step`: prefill chunks of newly admitted prompts (a bounded token budget, so
   running requests keep decoding between the chunks of a long prompt; unbounded while fewer than
   half the slots decode, since an idle slot costs a full one), then a decode round of up to
   `round_tokens` tokens for every running sequence;
4. hands each sequence's new tokens to its HTTP handler on the event loop (one loop callback per
   round), where detokenization and parsing happen, off this thread.

Nothing here changes a compiled shape: sequences join and leave between rounds. A drain (`drain`,
then maybe `abort`) stops admitting new sequences and lets the others finish, or ends them with an error.

Multi-host: every process holds the engine; only process 0 runs this scheduler and the HTTP
server. Each round's decisions (cancel, add, step) form a `mimo_jax.engine.driver.RoundPlan` that
the scheduler's `Driver` broadcasts on its `BroadcastChannel` before applying it; the other
processes run `Driver.follow`, applying the same plans in the same order, so their engines stay in
lockstep. Seeds are always chosen on process 0 and travel in the plan; an idle leader broadcasts
an empty plan every IDLE_TICK_S.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import random
import threading
import time
from collections.abc import Callable
from typing import Any

from mimo_jax.engine.driver import BroadcastChannel, Driver, RoundPlan, warm_up
from mimo_jax.serve.metrics import Metrics
from mimo_jax.serve.protocol import APIError

log = logging.getLogger("mimo_jax.serve")

IDLE_TICK_S = 1.0  # an idle multi-host leader broadcasts an empty plan this often (keeps followers' collectives alive)


@dataclasses.dataclass
class Tokens:
    """New tokens of one sequence (empty when only the finish is news)."""

    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[list[tuple[int, float]]] | None
    finish_reason: str | None  # None while running; "stop" | "length"
    # requests with prompt_logprobs, in their first event: per prompt token (None for the first) its logprob,
    # rank and the top-N (id, logprob), as the engine's StepOutput has them
    prompt_logprobs: list[float | None] | None = None
    prompt_ranks: list[int | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    # with MTP speculation: the drafts each target forward that made these tokens accepted (0..k)
    accepted: list[int] | None = None
    cached_tokens: int | None = None  # in the first event: prompt tokens the prefix cache served


@dataclasses.dataclass
class Failure:
    """The sequence ended with an error (e.g. its timeout); the handler reports it."""

    error: APIError


Event = Tokens | Failure


@dataclasses.dataclass
class Sequence:
    """One sequence to generate: one choice of one HTTP request."""

    request_id: str
    prompt_ids: list[int]
    options: Any  # mimo_jax.engine.sampling.SamplingOptions
    deliver: Callable[[Event], None]  # runs on the event loop thread
    arrival: float = dataclasses.field(default_factory=time.monotonic)
    deadline: float | None = None
    # scheduler-thread bookkeeping
    admitted_at: float | None = None
    generated: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None


class Scheduler:
    """Owns the engine: a bounded waiting queue, admission, rounds, cancellation, timeouts, metrics.

    `submit` and `cancel` are thread-safe (called from HTTP handlers); everything else runs on the
    scheduler thread. `dispatch(batch)` must run each `(deliver, event)` pair of a round on the
    handlers' event loop (the app passes `loop.call_soon_threadsafe`-based dispatch).
    """

    def __init__(
        self,
        engine: Any,
        metrics: Metrics,
        dispatch: Callable[[list[tuple[Callable[[Event], None], Event]]], None],
        *,
        max_waiting: int = 256,
        round_tokens: int = 8,
        prefill_tokens: int | None = None,
        channel: BroadcastChannel | None = None,
    ):
        self.engine = engine
        self.metrics = metrics
        self.dispatch = dispatch
        self.max_waiting = max_waiting
        self.round_tokens = min(round_tokens, engine.max_round_tokens)
        self.prefill_tokens = prefill_tokens or engine.prefill_chunk
        self.driver = Driver(engine, channel)  # with a channel (multi-host process 0): every plan is broadcast
        self._cv = threading.Condition()
        self._waiting: collections.deque[Sequence] = collections.deque()
        self._cancels: set[str] = set()
        self._running: dict[str, Sequence] = {}
        self._stopping = False
        self._draining = False  # no new sequences; the queued and running ones finish
        self._abort: APIError | None = None  # fail every queued and running sequence with this, next round
        self._thread: threading.Thread | None = None
        self._seeds = random.Random()
        self.error: BaseException | None = None  # set if the scheduler thread died

    # ------------------------------------------------------------------ any thread
    def submit(self, sequences: list[Sequence]) -> None:
        """Queue all of them or none: 429 when the waiting queue cannot take them, 503 when stopped."""
        with self._cv:
            if self._stopping or self.error is not None:
                raise APIError(503, "the server is shutting down or its scheduler failed", "server_error")
            if self._draining:
                raise APIError(
                    503, "the server is shutting down and takes no new requests", "server_error", code="draining"
                )
            if len(self._waiting) + len(sequences) > self.max_waiting:
                self.metrics.on_reject("queue_full")
                raise APIError(
                    429,
                    f"server busy: {len(self._waiting)} requests are already waiting (limit {self.max_waiting}); "
                    "retry later",
                    "rate_limit_error",
                    code="queue_full",
                )
            for seq in sequences:
                if seq.options.seed is None:
                    seq.options = dataclasses.replace(seq.options, seed=self._seeds.getrandbits(31))
                self._waiting.append(seq)
            self._cv.notify()

    def cancel(self, request_ids: list[str]) -> None:
        """Free these sequences' slots (or drop them from the queue) before the next round."""
        with self._cv:
            self._cancels.update(request_ids)
            self._cv.notify()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.error is None

    def counts(self) -> tuple[int, int]:
        with self._cv:
            return len(self._running), len(self._waiting)

    def drain(self) -> None:
        """Take no new sequences (`submit` answers 503); those queued or running go on until they finish."""
        with self._cv:
            self._draining = True

    @property
    def draining(self) -> bool:
        return self._draining

    @property
    def idle(self) -> bool:
        """Nothing queued or running."""
        with self._cv:
            return not (self._running or self._waiting)

    def abort(self, error: APIError) -> None:
        """End every queued and running sequence with `error` at the next round (their slots are freed)."""
        with self._cv:
            self._abort = error
            self._cv.notify()

    # ------------------------------------------------------------------ lifecycle
    def warmup(self) -> None:
        """Compile every shape and loop the server will run before serving (`mimo_jax.engine.driver.warm_up`),
        with rounds of the size it will run. Deterministic, so on a multi-host run every process runs it itself."""
        warm_up(Driver(self.engine), self.round_tokens)  # no channel: every process warms up itself

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="mimo-scheduler", daemon=True)
        self._thread.start()

    def shutdown(self, timeout: float = 30.0) -> None:
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------------ scheduler thread
    def _run(self) -> None:
        try:
            while self._round():
                pass
        except BaseException as e:  # a dead scheduler must not leave clients waiting forever
            self.error = e
            log.exception("scheduler thread failed")
            failure = Failure(APIError(500, "the engine failed (see the server log)", "server_error"))
            with self._cv:
                doomed = list(self._running.values()) + list(self._waiting)
                self._running.clear()
                self._waiting.clear()
            self.dispatch([(seq.deliver, failure) for seq in doomed])
        finally:
            self.driver.stop()

    def _round(self) -> bool:
        plan = RoundPlan(round_tokens=self.round_tokens, prefill_tokens=self.prefill_tokens)
        deliveries: list[tuple[Callable[[Event], None], Event]] = []
        with self._cv:
            while not (self._stopping or self._waiting or self._running or self._cancels):
                self._cv.wait(IDLE_TICK_S)
                if self.driver.channel is not None and not (self._stopping or self._waiting or self._cancels):
                    self.driver.run(RoundPlan())  # heartbeat: followers wait in a collective that may time out
            if self._stopping:
                return False
            now = time.monotonic()
            # 0. a drain that ran out of time: every sequence ends with the error
            if self._abort is not None:
                error, self._abort = self._abort, None
                deliveries.extend((seq.deliver, Failure(error)) for seq in [*self._running.values(), *self._waiting])
                plan.cancel.extend(self._running)  # counted below with the other cancellations
                if self._waiting:
                    self.metrics.on_cancel(len(self._waiting))
                self._running.clear()
                self._waiting.clear()
            # 1. cancellations and timeouts
            cancels, self._cancels = self._cancels, set()
            if cancels:
                waiting = len(self._waiting)
                self._waiting = collections.deque(s for s in self._waiting if s.request_id not in cancels)
                if len(self._waiting) < waiting:
                    self.metrics.on_cancel(waiting - len(self._waiting))  # never ran: counted here, not below
            for seq in list(self._running.values()):
                if seq.deadline is not None and now > seq.deadline:
                    cancels.add(seq.request_id)
                    deliveries.append((seq.deliver, Failure(_timeout_error(seq, now))))
            expired = [s for s in self._waiting if s.deadline is not None and now > s.deadline]
            for seq in expired:
                self._waiting.remove(seq)
                self.metrics.on_reject("timeout")
                deliveries.append((seq.deliver, Failure(_timeout_error(seq, now))))
            for rid in cancels:
                if self._running.pop(rid, None) is not None:
                    plan.cancel.append(rid)
            if plan.cancel:
                self.metrics.on_cancel(len(plan.cancel))
            # 2. admission
            free = self.engine.free_slots + len(plan.cancel)
            while self._waiting and free > 0:
                seq = self._waiting.popleft()
                seq.admitted_at = now
                self._running[seq.request_id] = seq
                plan.add_request(seq.request_id, seq.prompt_ids, seq.options)
                self.metrics.on_prompt(len(seq.prompt_ids))
                free -= 1
            plan.step = bool(self._running)
            # While fewer than half the slots are decoding, prefill everything admitted before decoding (as
            # offline generate does: the decode rounds are small then, and a wave of arrivals starts sooner);
            # else at most prefill_tokens per round, which bounds the pause the running requests see.
            decoding = sum(s.first_token_at is not None for s in self._running.values())
            if decoding < self.engine.max_batch / 2:
                plan.prefill_tokens = 1 << 30
            # Requests tend to come in waves: while one is arriving (admissions this round) and the batch
            # is under half full, a short decode round lets the rest of the wave join a few steps later.
            if plan.add and len(self._running) < self.engine.max_batch / 2:
                plan.round_tokens = max(1, self.round_tokens // 4)
            running = dict(self._running)

        outputs = self.driver.run(plan)

        # 3. hand the tokens to their handlers
        now = time.monotonic()
        finished = []
        new_tokens = 0
        draft_len = getattr(self.engine, "speculative_steps", 0)
        for out in outputs:
            seq = running.get(out.request_id)
            if seq is None:
                continue
            # With MTP speculation: drafts accepted by each target forward that made these tokens.
            accepted = [a for a in getattr(out, "accepted", None) or [] if a >= 0] if draft_len else []
            if accepted:
                self.metrics.on_speculation(accepted)
            n = len(out.token_ids)
            if n:
                new_tokens += n
                if seq.first_token_at is None:
                    seq.first_token_at = now
                    self.metrics.on_first_token(now - seq.arrival)
                    if n > 1:
                        self.metrics.on_inter_token(0.0, n - 1)  # tokens that arrived together with the first
                else:
                    self.metrics.on_inter_token((now - seq.last_token_at) / n, n)
                seq.last_token_at = now
                seq.generated += n
            reason = out.finish_reason if out.finished else None
            event = Tokens(out.token_ids, out.logprobs, out.top_logprobs, reason, accepted=accepted or None)
            event.cached_tokens = getattr(out, "cached_tokens", None)
            if getattr(out, "prompt_logprobs", None) is not None:
                event.prompt_logprobs, event.prompt_ranks = out.prompt_logprobs, out.prompt_ranks
                event.prompt_top_logprobs = out.prompt_top_logprobs
            deliveries.append((seq.deliver, event))
            if out.finished:
                finished.append(out.request_id)
                self.metrics.on_finish(
                    reason or "stop",
                    now=now,
                    arrival=seq.arrival,
                    admitted=seq.admitted_at,
                    first_token=seq.first_token_at,
                    prompt_tokens=len(seq.prompt_ids),
                    generation_tokens=seq.generated,
                )
        if new_tokens:
            self.metrics.on_tokens(new_tokens, now)
        with self._cv:
            for rid in finished:
                self._running.pop(rid, None)
            kv_used = sum(len(s.prompt_ids) + s.generated for s in self._running.values())
            self.metrics.set_batch(len(self._running), len(self._waiting), kv_used)
        pages = getattr(self.engine, "pages", None)  # test stand-ins have no page pool
        if pages is not None:
            self.metrics.set_kv(pages.stats(), self.engine.num_preemptions)
        if deliveries:
            self.dispatch(deliveries)
        return True


def _timeout_error(seq: Sequence, now: float) -> APIError:
    return APIError(
        504,
        f"request timed out after {now - seq.arrival:.1f} s (the server's --request-timeout)",
        "timeout_error",
        code="timeout",
    )
