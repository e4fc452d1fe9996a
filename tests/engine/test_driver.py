"""The driver in one process: the channel's padding and abort rules over a stand-in for the collective, and
a follower that applies the leader's broadcast plans making exactly the leader's engine calls (the real
collectives run in tests/batch/test_batch_multihost.py and tests/serve/test_serve_multihost.py); after
`warm_up`, a multi-turn conversation's prefix hits compile nothing, nor do constrained requests beside free ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

import mimo_jax
from mimo_jax.engine.driver import Aborted, BroadcastChannel, Driver, RoundPlan, apply_plan, padded_size, warm_up
from mimo_jax.engine.host import Engine
from mimo_jax.engine.sampling import SamplingOptions
from tests.fixtures import count_compiles, fake_constraint, predictable_model


class Wire:
    """Stand-in for `broadcast_one_to_all` between one sender and one receiver in this process."""

    def __init__(self):
        self.arrays: list[np.ndarray] = []

    def send(self, array: np.ndarray) -> np.ndarray:
        self.arrays.append(array.copy())
        return array

    def receive(self, array: np.ndarray) -> np.ndarray:
        sent = self.arrays.pop(0)
        assert (sent.shape, sent.dtype) == (array.shape, array.dtype), "a collective needs the same shape everywhere"
        return sent


def channels() -> tuple[Wire, BroadcastChannel, BroadcastChannel]:
    wire = Wire()
    return wire, BroadcastChannel(wire.send), BroadcastChannel(wire.receive)


def test_messages_are_padded_to_few_shapes():
    assert [padded_size(n) for n in (1, 255, 256, 257, 1000, 1024, 1025)] == [256, 256, 256, 512, 1024, 1024, 2048]
    wire, sender, receiver = channels()
    for size in (1, 300, 0, 5000):
        data = bytes(range(256)) * (size // 256) + bytes(size % 256)
        sender.send(data)
        shapes = [a.shape for a in wire.arrays]
        assert shapes == ([(1,), (padded_size(size),)] if size else [(1,)])
        assert wire.arrays[0].dtype == np.int32 and int(wire.arrays[0][0]) == size
        assert receiver.receive() == data
        assert not wire.arrays
    assert sender.share_int(41) == 41 and receiver.share_int(0) == 41


def test_abort_raises_on_the_receivers():
    wire, sender, receiver = channels()
    sender.abort()
    assert [a.tolist() for a in wire.arrays] == [[-1]]
    with pytest.raises(Aborted):
        receiver.receive()


@dataclasses.dataclass
class Out:
    request_id: object
    token_ids: list
    finished: bool = False
    finish_reason: str | None = None


class RecordingEngine:
    """The engine's host interface: each step emits one token per request until its max_new_tokens; records calls."""

    def __init__(self):
        self.calls, self.running = [], {}

    def add(self, request_id, prompt_ids, options):
        self.calls.append(("add", request_id, list(prompt_ids), options))
        self.running[request_id] = [options.max_new_tokens, 0]

    def cancel(self, request_id):
        self.calls.append(("cancel", request_id))
        return self.running.pop(request_id, None) is not None

    def step(self, max_tokens_per_round=None, prefill_tokens=None):
        self.calls.append(("step", max_tokens_per_round, prefill_tokens))
        outs = []
        for request_id, budget in list(self.running.items()):
            budget[1] += 1
            done = budget[1] >= budget[0]
            outs.append(Out(request_id, [budget[1]], done, "length" if done else None))
            if done:
                del self.running[request_id]
        return outs


def test_followers_make_the_leaders_engine_calls():
    wire, sender, receiver = channels()
    leader, follower = RecordingEngine(), RecordingEngine()
    driver = Driver(leader, sender)
    first = RoundPlan(step=True, round_tokens=4, prefill_tokens=1 << 62)
    first.add_request(7, np.arange(3), SamplingOptions(max_new_tokens=2, seed=5, stop_token_ids=(1, 2)))
    first.add_request("7", [4], SamplingOptions(max_new_tokens=9, temperature=0.5))  # no seed: process 0 picks
    outputs = driver.run(first)
    assert [(o.request_id, o.token_ids) for o in outputs] == [(7, [1]), ("7", [1])]  # ids keep their type
    driver.run(RoundPlan(step=True))
    driver.run(RoundPlan())  # a heartbeat: nothing to do
    driver.run(RoundPlan(cancel=["7"], step=True))
    driver.stop()
    Driver(follower, receiver).follow()
    assert not wire.arrays
    assert follower.calls == leader.calls
    adds = [c for c in leader.calls if c[0] == "add"]
    assert adds[0][1:] == (7, [0, 1, 2], SamplingOptions(max_new_tokens=2, seed=5, stop_token_ids=(1, 2)))
    assert adds[1][1] == "7" and adds[1][3].seed is not None and adds[1][3].temperature == 0.5
    assert ("step", None, None) in leader.calls and ("step", 4, 1 << 62) in leader.calls


def test_abort_cancels_what_is_in_flight_on_every_process():
    wire, sender, receiver = channels()
    leader, follower = RecordingEngine(), RecordingEngine()
    driver = Driver(leader, sender)
    plan = RoundPlan(step=True)
    for request_id in ("a", "b", "c"):
        plan.add_request(request_id, [1], SamplingOptions(max_new_tokens=1 if request_id == "b" else 5, seed=0))
    driver.run(plan)  # "b" finishes in its first step
    driver.abort()
    with pytest.raises(Aborted):
        Driver(follower, receiver).follow()
    assert leader.calls[-2:] == [("cancel", "a"), ("cancel", "c")]
    assert follower.calls == leader.calls and not leader.running


def test_without_a_channel_plans_apply_locally():
    engine = RecordingEngine()
    driver = Driver(engine)
    plan = RoundPlan(step=True, prefill_tokens=8)
    plan.add_request(0, [3, 4], SamplingOptions(max_new_tokens=1))
    assert [o.finished for o in driver.run(plan)] == [True]
    assert engine.calls[0] == ("add", 0, [3, 4], SamplingOptions(max_new_tokens=1))  # the engine picks the seed
    driver.stop()  # no followers: nothing to do
    driver.abort()
    assert engine.calls[1:] == [("step", None, 8)]
    assert apply_plan(engine, RoundPlan(cancel=[0])) == [] and engine.calls[-1] == ("cancel", 0)


def test_plans_keep_logit_bias_min_tokens_and_constraints_through_json():
    options = SamplingOptions(
        max_new_tokens=9,
        min_tokens=3,
        logit_bias={5: -100.0, 17: 2.5},
        constraint={"type": "json_schema", "schema": {"type": "object", "properties": {"a": {"type": "integer"}}}},
        stop_token_ids=(2,),
        seed=1,
    )
    plan = RoundPlan(step=True)
    plan.add_request("r", [1, 2], options)
    plan.add_request("plain", [3], SamplingOptions(seed=2))
    decoded = list(RoundPlan.decode(plan.encode()).requests())
    assert decoded == [("r", [1, 2], options), ("plain", [3], SamplingOptions(seed=2))]
    assert decoded[0][2].logit_bias == {5: -100.0, 17: 2.5} and all(type(t) is int for t in decoded[0][2].logit_bias)


def _warmed_up_engine(**engine_args) -> Engine:
    """An engine over the predictable model as the server runs it (overlap), after the server's warm-up."""
    eng = Engine(mimo_jax.LanguageModel(predictable_model(noise=100.0, mtp_noise=300.0)), max_batch=2, **engine_args)
    eng.overlap = True
    warm_up(Driver(eng), 4, prompt_scoring=False)
    return eng


@pytest.mark.parametrize("speculative_steps", [0, 2])
def test_after_warm_up_prefix_hits_compile_nothing(speculative_steps):
    """An engine as the server runs it (overlap, prefix cache), warmed up, then agent turns: each turn is the
    conversation so far + new tokens, so it hits the previous turn's pages and ring snapshot and prefills a tail
    that ends at its own snapshot boundary (chunks of lengths no cold prompt makes). Nothing compiles, and the
    hits happen. Buckets 16, 32, 64 and pages of 4 tokens: a warm-up whose prompts hit each other, or split at
    their snapshot boundaries, never compiles the 64-token chunk (the first chunk of turn 1 here)."""
    eng = _warmed_up_engine(
        max_context=320,
        prefill_chunk=64,
        max_round_tokens=4,
        page_size=4,
        prefix_cache=True,
        speculative_steps=speculative_steps,
    )
    assert eng.buckets == (16, 32, 64)
    assert eng.pages.stats().snapshots == 0  # the warm-up's prompts are forgotten
    vocab = eng.lm.config.vocab_size
    rng = np.random.RandomState(0)
    history = {c: rng.randint(1, vocab, 70 + 9 * c).tolist() for c in range(2)}
    cached = {}
    with count_compiles() as compiled:
        for turn, new_tokens in enumerate((0, 5, 23, 41)):  # tails of 1..3 chunks, in every bucket
            for c in history:
                history[c] += rng.randint(1, vocab, new_tokens).tolist()
                options = SamplingOptions(max_new_tokens=6, temperature=float(c), seed=c)  # greedy and sampled
                eng.add((c, turn), history[c], options)
            while eng.has_work():
                for out in eng.step(max_tokens_per_round=4, prefill_tokens=48):
                    if out.cached_tokens is not None:
                        cached[out.request_id] = out.cached_tokens
                    history[out.request_id[0]] += out.token_ids
    assert compiled == []
    assert all(cached[(c, 0)] == 0 for c in history)
    assert all(cached[(c, t)] > 0 for c in history for t in (1, 2, 3))


def _any_constraint(spec: dict):
    """The fake constraints; the warm-up's own spec (JSON after a thinking block) stands for a grammar that
    allows every token here."""
    return fake_constraint(spec if "type" in spec else {"type": "dead_end", "after": 1 << 30})


@pytest.mark.parametrize("speculative_steps", [0, 2])
def test_after_warm_up_constrained_beside_free_compiles_nothing(speculative_steps):
    """An engine that takes constraints, as the server runs it (overlap), warmed up; then constrained requests
    beside free ones (greedy and sampled), joining and leaving: the constrained steps' launches (without
    speculation one iteration over every row, then the free rows' rest; with it the constrained rows' plain loop
    and the others' speculative round) compile nothing."""
    eng = _warmed_up_engine(
        max_context=64,
        prefill_chunk=16,
        max_round_tokens=4,
        speculative_steps=speculative_steps,
        constraint_factory=_any_constraint,
    )
    even = SamplingOptions(max_new_tokens=9, constraint={"type": "even"})
    requests = [
        ("even", [3, 1, 4], even),
        ("free", [5, 9], SamplingOptions(max_new_tokens=14)),
        ("hot", [2, 6, 5], SamplingOptions(max_new_tokens=11, temperature=1.0, seed=1)),
        ("even_hot", [7], dataclasses.replace(even, temperature=1.0, seed=2)),
    ]
    emitted = {}
    with count_compiles() as compiled:
        while requests or eng.has_work():
            while requests and eng.free_slots:
                eng.add(*requests.pop(0))
            for out in eng.step(max_tokens_per_round=4, prefill_tokens=16):
                emitted[out.request_id] = emitted.get(out.request_id, 0) + len(out.token_ids)
    assert compiled == []
    assert emitted == {"even": 9, "free": 14, "hot": 11, "even_hot": 9}
