"""The one way to drive an engine: rounds described by `RoundPlan`s, run by a `Driver`.

`generate`, the batch script and the server's scheduler each decide what a round does (which
requests to cancel, which to add, whether to step and with what budgets) and hand that to
`Driver.run`. In a multi-host run every process holds a share of the same engine and must make
the same engine calls in the same order: process 0 decides, its driver broadcasts each plan on a
`BroadcastChannel` before applying it, and the other processes run `Driver.follow`, applying the
same plans until a stop plan (or an abort) arrives. Sampling seeds are settled on process 0 and
travel in the plan, so no process picks its own. `warm_up` compiles every program an engine can run, through
plans (the server runs it before it reports ready; benchmarks before they time).

The channel's rules, for every message: process 0 broadcasts the length (int32), then the bytes
zero-padded to a power of two of at least 256 (each shape compiles once, so keep them few); an
empty message sends only its length; a negative length is an abort, which raises `Aborted` on
the receivers.
"""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from jax.experimental import multihost_utils

from mimo_jax.engine.host import Engine, StepOutput
from mimo_jax.engine.sampling import SamplingOptions

RequestId = str | int  # what JSON carries unchanged
MIN_MESSAGE_BYTES = 256
SEED_LIMIT = 2**31  # seeds picked for requests without one lie in [0, SEED_LIMIT) (any signed 64-bit seed works)


class Aborted(RuntimeError):
    """Process 0 stopped the run (an error on its side); raised on the other processes."""


@dataclasses.dataclass
class RoundPlan:
    """Everything one round does to the engine, in this order: cancel, add, step. Identical on every process."""

    cancel: list[RequestId] = dataclasses.field(default_factory=list)
    add: list[tuple[RequestId, list[int], dict[str, Any]]] = dataclasses.field(default_factory=list)  # options dict
    step: bool = False
    round_tokens: int | None = None  # decode steps of the round (None: the engine's max_round_tokens)
    prefill_tokens: int | None = None  # prompt tokens prefilled before it (None: one chunk)
    stop: bool = False  # followers return from `Driver.follow`

    def add_request(self, request_id: RequestId, prompt_ids: Sequence[int], options: SamplingOptions) -> None:
        """Add a request to this round (plain ints and a dict: the plan must survive JSON)."""
        values = dataclasses.asdict(options)
        values["stop_token_ids"] = [int(t) for t in options.stop_token_ids]
        self.add.append((request_id, [int(t) for t in prompt_ids], values))

    def requests(self) -> Iterator[tuple[RequestId, list[int], SamplingOptions]]:
        """The requests to add, with their sampling options rebuilt."""
        for request_id, prompt_ids, values in self.add:
            values = {**values, "stop_token_ids": tuple(values["stop_token_ids"])}
            if values.get("logit_bias") is not None:  # JSON made the token ids strings
                values["logit_bias"] = {int(t): v for t, v in values["logit_bias"].items()}
            yield request_id, prompt_ids, SamplingOptions(**values)

    def encode(self) -> bytes:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> RoundPlan:
        raw = json.loads(data)
        raw["add"] = [(request_id, prompt_ids, values) for request_id, prompt_ids, values in raw["add"]]
        return cls(**raw)


def apply_plan(engine: Engine, plan: RoundPlan) -> list[StepOutput]:
    """Make the plan's engine calls (the same code on every process). Returns the step's outputs."""
    for request_id in plan.cancel:
        engine.cancel(request_id)
    for request_id, prompt_ids, options in plan.requests():
        engine.add(request_id, prompt_ids, options)
    if not plan.step:
        return []
    return engine.step(max_tokens_per_round=plan.round_tokens, prefill_tokens=plan.prefill_tokens)


def padded_size(length: int) -> int:
    """Bytes a message of `length` bytes travels in: a power of two, at least MIN_MESSAGE_BYTES."""
    return max(MIN_MESSAGE_BYTES, 1 << (length - 1).bit_length())


class BroadcastChannel:
    """Messages from process 0 to every process, over `multihost_utils.broadcast_one_to_all`.

    Process 0 calls `send`, `abort` and `share_int`; the others call `receive` and `share_int`,
    at the same points of their programs (each call is a collective).
    """

    def __init__(self, broadcast: Callable[[np.ndarray], Any] = multihost_utils.broadcast_one_to_all):
        self._broadcast = broadcast

    def _bcast(self, array: np.ndarray) -> np.ndarray:
        return np.asarray(self._broadcast(array))

    def send(self, data: bytes) -> None:
        self._bcast(np.array([len(data)], np.int32))
        if data:
            buffer = np.zeros((padded_size(len(data)),), np.uint8)
            buffer[: len(data)] = np.frombuffer(data, np.uint8)
            self._bcast(buffer)

    def receive(self) -> bytes:
        """Process 0's next message; `Aborted` if it aborted instead."""
        length = int(self._bcast(np.zeros((1,), np.int32))[0])
        if length < 0:
            raise Aborted("process 0 stopped the run")
        if length == 0:
            return b""
        return self._bcast(np.zeros((padded_size(length),), np.uint8))[:length].tobytes()

    def abort(self) -> None:
        """Make every pending and future `receive` of this message raise `Aborted`."""
        self._bcast(np.array([-1], np.int32))

    def share_int(self, value: int) -> int:
        """Process 0's `value` on every process (the others' `value` is ignored)."""
        return int(self._bcast(np.array([value], np.int32))[0])


class Driver:
    """Runs `RoundPlan`s against an engine; with a channel, process 0's plans reach the other processes.

    Without a channel (one process, or work every process does alike such as a warm-up) plans
    are applied locally. With one, process 0 calls `run` for each round and `stop` (or `abort`)
    at the end; the others call `follow`.
    """

    def __init__(self, engine: Engine, channel: BroadcastChannel | None = None):
        self.engine = engine
        self.channel = channel
        self._live: dict[RequestId, None] = {}  # added, not yet finished or cancelled (in order)
        self._seeds = random.Random()

    def run(self, plan: RoundPlan) -> list[StepOutput]:
        """Broadcast the plan (with a channel), then apply it. Returns the step's outputs."""
        if self.channel is not None:
            for _, _, values in plan.add:
                if values["seed"] is None:  # each process's engine would pick its own
                    values["seed"] = self._seeds.randrange(SEED_LIMIT)
            data = plan.encode()
            self.channel.send(data)
            plan = RoundPlan.decode(data)  # what the followers apply, to the letter
        return self._apply(plan)

    def follow(self) -> None:
        """Processes other than 0: apply process 0's plans until a stop plan; `Aborted` if it aborts."""
        while True:
            try:
                plan = RoundPlan.decode(self.channel.receive())
            except Aborted:
                self._cancel_live()  # as process 0 does in `abort`: the engines stay in step
                raise
            if plan.stop:
                return
            self._apply(plan)

    def stop(self) -> None:
        """Process 0: release the followers (`follow` returns)."""
        if self.channel is not None:
            self.channel.send(RoundPlan(stop=True).encode())

    def abort(self) -> None:
        """Process 0, after an error: the followers raise `Aborted`; every process cancels the requests in flight,
        so the engine can be used again."""
        if self.channel is not None:
            self.channel.abort()
        self._cancel_live()

    def _apply(self, plan: RoundPlan) -> list[StepOutput]:
        for request_id in plan.cancel:
            self._live.pop(request_id, None)
        for request_id, _, _ in plan.add:  # before the engine calls: a failed step leaves them to cancel
            self._live[request_id] = None
        outputs = apply_plan(self.engine, plan)
        for out in outputs:
            if out.finished:
                self._live.pop(out.request_id, None)
        return outputs

    def _cancel_live(self) -> None:
        live, self._live = list(self._live), {}
        for request_id in live:
            self.engine.cancel(request_id)


def warm_up(driver: Driver, round_tokens: int | None = None, *, prompt_scoring: bool = True) -> None:
    """Compile every shape and loop the engine can run, so nothing compiles once it serves: each prefill chunk
    bucket (and with `prompt_scoring` the prompt-scoring prefill of each, for echo / prompt_logprobs), admit, the
    decode loop for every round size (with speculation its greedy and its sampled loop, and the constrained rows'
    plain loop when the engine takes constraints), the prefix cache's ring snapshot and restore, cancel; with the
    engine's `overlap` as it will run (its reads copy the finish reasons).

    A prefix hit runs nothing else: restore, then the prompt's tail in chunks whose lengths fall in any bucket
    (a chunk runs through the snapshot boundary and returns the rings as of it, so the tail is usually one
    chunk). So the buckets are warmed up with the prefix cache off: the prompts do not hit each other (a hit
    would shorten a chunk below its bucket).
    Deterministic, so on a multi-host run every process runs it itself (a driver without a channel).
    """
    engine = driver.engine
    round_tokens = engine.max_round_tokens if round_tokens is None else round_tokens

    def run_to_the_end(requests: list[tuple[str, list[int], SamplingOptions]]) -> None:
        """Add the requests in one round and step until the engine has nothing left."""
        plan = RoundPlan(step=True, round_tokens=round_tokens, prefill_tokens=1 << 30)
        for request_id, prompt, opts in requests:
            plan.add_request(request_id, prompt, opts)
        driver.run(plan)
        while engine.has_work():
            driver.run(RoundPlan(step=True, round_tokens=round_tokens, prefill_tokens=1 << 30))

    options = SamplingOptions(max_new_tokens=2, seed=0, logprobs=engine.max_top_logprobs or None)
    # With speculation, rounds where every sequence is greedy run a loop of their own: warm up both loops.
    sampled = dataclasses.replace(options, temperature=1.0)
    # One prompt per prefill chunk size; a size past the context is reached by the longest prompt that fits.
    longest = max(1, engine.max_context - 2)
    bucket_of = lambda n: next(b for b in engine.buckets if b >= n)
    lengths = [min(b, longest) for b in engine.buckets if bucket_of(min(b, longest)) == b]
    runs = [("warmup", options, lengths)]
    if prompt_scoring:  # the prompt-scoring prefill (echo + logprobs, prompt_logprobs) is a function of its own
        scoring = SamplingOptions(max_new_tokens=0, seed=0, prompt_logprobs=engine.max_top_logprobs)
        runs.append(("warmup-scoring", scoring, lengths))
    if engine.speculative_steps:
        runs.append(("warmup-sampled", sampled, lengths[:1]))
    # Every decode round size (a bucket of running slots), greedy and (with speculation) sampled.
    loops = [options, sampled] if engine.speculative_steps else [options]
    if engine.speculative_steps and engine.constraint_factory is not None:
        # the constrained rows' plain loop; a thinking block allows every token, so no request ends before
        # its constrained rounds whatever the model says (a JSON object could close with one token)
        constrained = {"json_object": True, "thinking": "inside"}
        loops.append(dataclasses.replace(options, constraint=constrained))
    pages = engine.pages
    caching, pages.prefix_cache = pages.prefix_cache, False
    try:
        for name, opts, prompt_lengths in runs:
            for start in range(0, len(prompt_lengths), engine.max_batch):
                batch = prompt_lengths[start : start + engine.max_batch]
                run_to_the_end([(f"{name}-{start + i}", [0] * n, opts) for i, n in enumerate(batch)])
        for size in engine.steps.decode_buckets:
            for opts in loops:
                short = dataclasses.replace(opts, max_new_tokens=3)
                run_to_the_end([(f"warmup-rows-{size}-{i}", [0], short) for i in range(size)])
    finally:
        pages.prefix_cache = caching
    if caching:  # a ring snapshot taken, then restored; then forgotten
        prompt = [0] * min(2 * engine.page_size + 2, engine.max_context - 3)
        for i in range(2):
            run_to_the_end([(f"warmup-prefix-{i}", prompt, options)])
        pages.reset_prefix_cache()
    plan = RoundPlan(step=True, round_tokens=1, prefill_tokens=1 << 30)
    plan.add_request("warmup-cancel", [0], dataclasses.replace(options, max_new_tokens=8))
    driver.run(plan)
    driver.run(RoundPlan(cancel=["warmup-cancel"]))
