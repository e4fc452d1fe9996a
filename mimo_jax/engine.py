"""The generation engine: a fixed set of batch slots over one KV cache, chunked prefill, a jitted decode loop.

Continuous batching by design: requests take free slots between decode rounds and leave when they
finish or are cancelled, and no shape ever depends on which requests are running (inactive rows
run at position -1: nothing is written to their cache and their outputs are ignored), so nothing
recompiles. The device work is three pure jitted functions (state in, state out; the cache and
slot state are donated):

- `prefill_fn(params, cache, slot, tokens[C], start, length) -> (cache, last_hidden[H])`: one
  chunk of one request's prompt, attending against what the slot already holds. Chunk lengths
  are bucketed (powers of two up to `prefill_chunk`).
- `admit_fn(params, state, slot, hidden, request) -> (state, first)`: samples the first token
  from the prompt's last hidden state and starts the slot.
- `decode_fn(params, cache, state, num_steps) -> (cache, state, RoundOutput)`: a
  `jax.lax.while_loop` of up to `num_steps` (<= `max_round_tokens`) tokens for every active slot,
  stopping each at its stop tokens, its token budget or the context end.

`SlotState` holds everything per slot in one pytree (last token, its position, the last hidden
state before the final norm, counts for penalties, ...): a speculative-decoding loop (MTP draft,
verify, accept) replaces the one-token step of `decode_fn`'s body with the same state.
"""

from __future__ import annotations

import dataclasses
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.cache import LayerKV, cache_shardings, empty_cache, read_slot, write_slot
from mimo_jax.lm import LanguageModel
from mimo_jax.model import MiMoModel
from mimo_jax.sampling import SampleOutput, SamplingOptions, SamplingParams, request_key, sample, step_keys

RUNNING, STOPPED, LENGTH = 0, 1, 2  # SlotState.finish_reason codes
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}


class EngineFull(RuntimeError):
    """No free slot: wait for a request to finish (see `Engine.free_slots`)."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotState:
    """Per-slot decoding state, every array with a leading [B] (max_batch) axis."""

    tokens: jax.Array  # int32, the last emitted token: the next model input
    positions: jax.Array  # int32, the position `tokens` occupies
    hidden: jax.Array  # [B, H] model dtype, residual stream (before the final norm) that predicted `tokens`
    active: jax.Array  # bool, still generating
    finish_reason: jax.Array  # int32: RUNNING / STOPPED / LENGTH
    num_generated: jax.Array  # int32, tokens emitted so far
    max_new_tokens: jax.Array  # int32
    stop_ids: jax.Array  # [B, S] int32, -1 = unused
    sampling: SamplingParams
    rng: jax.Array  # [B, 2] uint32, key data of each request's random stream
    counts: jax.Array  # [B, V] int32, generated-token counts (presence / frequency penalties)
    prompt_mask: jax.Array  # [B, V] bool, tokens of the prompt (repetition penalty)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotRequest:
    """What `admit_fn` needs to start one slot (no batch axis)."""

    prompt_len: jax.Array  # int32
    max_new_tokens: jax.Array  # int32
    stop_ids: jax.Array  # [S] int32
    sampling: SamplingParams  # fields of shape [1]
    rng: jax.Array  # [2] uint32
    prompt_mask: jax.Array  # [V] bool


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutput:
    """Tokens of one decode round: column i holds step i for the slots active at that step."""

    tokens: jax.Array  # [B, N] int32, -1 where nothing was emitted
    logprobs: jax.Array  # [B, N] float32
    top_ids: jax.Array  # [B, N, K] int32
    top_logprobs: jax.Array  # [B, N, K] float32
    count: jax.Array  # [B] int32, tokens emitted per slot this round


def empty_state(batch: int, hidden_size: int, vocab: int, max_stop_ids: int, dtype: jnp.dtype) -> SlotState:
    zeros = jnp.zeros((batch,), jnp.int32)
    return SlotState(
        tokens=zeros,
        positions=zeros,
        hidden=jnp.zeros((batch, hidden_size), dtype),
        active=jnp.zeros((batch,), bool),
        finish_reason=zeros,
        num_generated=zeros,
        max_new_tokens=zeros,
        stop_ids=jnp.full((batch, max_stop_ids), -1, jnp.int32),
        sampling=SamplingParams.make(batch),
        rng=jnp.zeros((batch, 2), jnp.uint32),
        counts=jnp.zeros((batch, vocab), jnp.int32),
        prompt_mask=jnp.zeros((batch, vocab), bool),
    )


def _finish_reason(tokens, positions, num_generated, max_new_tokens, stop_ids, max_context: int) -> jax.Array:
    """RUNNING, or why a slot that just emitted `tokens` at `positions` stops."""
    stopped = jnp.any(tokens[:, None] == stop_ids, axis=-1)
    # The next step would feed the token at `positions`; the sequence may not outgrow the cache.
    out_of_room = (num_generated >= max_new_tokens) | (positions >= max_context - 1)
    return jnp.where(stopped, STOPPED, jnp.where(out_of_room, LENGTH, RUNNING)).astype(jnp.int32)


# ------------------------------------------------------------------ pure step functions
def prefill_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: list[LayerKV],
    slot: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
) -> tuple[list[LayerKV], jax.Array]:
    """Run prompt tokens [C] (the first `length` real, placed at start, start+1, ...) into slot `slot`.

    A chunk starting at 0 begins a new request: the slot's old keys are marked empty first.
    Returns the new cache and the hidden state [H] of the chunk's last real token.
    """
    model = nnx.merge(graphdef, params)
    idx = jnp.arange(tokens.shape[0], dtype=jnp.int32)
    positions = jnp.where(idx < length, start + idx, -1)[None]
    rows = read_slot(cache, slot, clear=start == 0)
    hidden, rows = model.hidden_states(tokens[None], positions, rows)
    return write_slot(cache, rows, slot), hidden[0, length - 1]


def admit_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: SlotState,
    slot: jax.Array,
    hidden: jax.Array,
    request: SlotRequest,
    *,
    max_context: int,
    num_top: int,
) -> tuple[SlotState, SampleOutput, jax.Array]:
    """Sample a request's first token from its prompt's last hidden state and start its slot.

    Returns the new state, the first token (batch of 1) and its finish reason [1].
    """
    model = nnx.merge(graphdef, params)
    logits = model.logits(hidden[None])
    position = request.prompt_len[None]
    counts = jnp.zeros((1, logits.shape[-1]), jnp.int32)
    keys = step_keys(request.rng[None], position)
    first = sample(logits, request.sampling, keys, counts, request.prompt_mask[None], num_top)
    one = jnp.ones((1,), jnp.int32)
    reason = _finish_reason(
        first.tokens, position, one, request.max_new_tokens[None], request.stop_ids[None], max_context
    )
    row = SlotState(
        tokens=first.tokens,
        positions=position,
        hidden=hidden[None].astype(state.hidden.dtype),
        active=reason == RUNNING,
        finish_reason=reason,
        num_generated=one,
        max_new_tokens=request.max_new_tokens[None],
        stop_ids=request.stop_ids[None],
        sampling=request.sampling,
        rng=request.rng[None],
        counts=counts.at[0, first.tokens[0]].add(1),
        prompt_mask=request.prompt_mask[None],
    )
    state = jax.tree.map(lambda all_rows, r: jax.lax.dynamic_update_slice_in_dim(all_rows, r, slot, 0), state, row)
    return state, first, reason


def release_step(state: SlotState, slot: jax.Array) -> SlotState:
    """Stop a slot (cancelled request)."""
    return dataclasses.replace(state, active=state.active.at[slot].set(False))


def decode_one(
    model: MiMoModel, cache: list[LayerKV], state: SlotState, *, max_context: int, num_top: int
) -> tuple[list[LayerKV], SlotState, SampleOutput, jax.Array]:
    """One token for every active slot. Returns (cache, state, sample, emitted mask [B])."""
    active = state.active
    positions = jnp.where(active, state.positions, -1)
    hidden, cache = model.hidden_states(state.tokens[:, None], positions[:, None], cache)
    hidden = hidden[:, 0]
    logits = model.logits(hidden)
    next_positions = state.positions + 1
    keys = step_keys(state.rng, next_positions)
    out = sample(logits, state.sampling, keys, state.counts, state.prompt_mask, num_top)
    num_generated = state.num_generated + 1
    reason = _finish_reason(
        out.tokens, next_positions, num_generated, state.max_new_tokens, state.stop_ids, max_context
    )
    batch = jnp.arange(active.shape[0])
    keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
    state = dataclasses.replace(
        state,
        tokens=keep(out.tokens, state.tokens),
        positions=keep(next_positions, state.positions),
        hidden=keep(hidden.astype(state.hidden.dtype), state.hidden),
        active=active & (reason == RUNNING),
        finish_reason=keep(reason, state.finish_reason),
        num_generated=keep(num_generated, state.num_generated),
        counts=state.counts.at[batch, out.tokens].add(active.astype(jnp.int32)),
    )
    return cache, state, out, active


def decode_round(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: list[LayerKV],
    state: SlotState,
    num_steps: jax.Array,
    *,
    max_steps: int,
    max_context: int,
    num_top: int,
) -> tuple[list[LayerKV], SlotState, RoundOutput]:
    """Up to `num_steps` (<= max_steps) decode steps in one `while_loop`; ends early when no slot is active."""
    batch = state.tokens.shape[0]
    output = RoundOutput(
        tokens=jnp.full((batch, max_steps), -1, jnp.int32),
        logprobs=jnp.zeros((batch, max_steps), jnp.float32),
        top_ids=jnp.zeros((batch, max_steps, num_top), jnp.int32),
        top_logprobs=jnp.zeros((batch, max_steps, num_top), jnp.float32),
        count=jnp.zeros((batch,), jnp.int32),
    )

    def cond(carry):
        i, _, state, _ = carry
        return (i < jnp.minimum(num_steps, max_steps)) & jnp.any(state.active)

    def body(carry):
        i, cache, state, output = carry
        model = nnx.merge(graphdef, params)
        cache, state, out, emitted = decode_one(model, cache, state, max_context=max_context, num_top=num_top)
        col = lambda buf, new: buf.at[:, i].set(
            jnp.where(emitted.reshape((-1,) + (1,) * (new.ndim - 1)), new, buf[:, i])
        )
        output = RoundOutput(
            tokens=col(output.tokens, out.tokens),
            logprobs=col(output.logprobs, out.logprobs),
            top_ids=col(output.top_ids, out.top_ids),
            top_logprobs=col(output.top_logprobs, out.top_logprobs),
            count=output.count + emitted.astype(jnp.int32),
        )
        return i + 1, cache, state, output

    _, cache, state, output = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state, output))
    return cache, state, output


# ------------------------------------------------------------------ host side
@dataclasses.dataclass
class StepOutput:
    """New tokens of one request from one `Engine.step`."""

    request_id: Any
    token_ids: list[int]
    logprobs: list[float] | None  # chosen-token model logprobs, when the request asked for logprobs
    top_logprobs: list[list[tuple[int, float]]] | None  # per token: the model's top-N (id, logprob)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" when finished


@dataclasses.dataclass
class _Request:
    request_id: Any
    prompt: np.ndarray
    options: SamplingOptions
    seed: int
    prefilled: int = 0  # prompt tokens already in the cache
    hidden: jax.Array | None = None  # last prefill chunk's output hidden state
    decoding: bool = False


def prefill_buckets(prefill_chunk: int, smallest: int = 16) -> tuple[int, ...]:
    """Chunk lengths that get compiled: powers of two from `smallest`, and `prefill_chunk` itself."""
    sizes = {prefill_chunk}
    size = smallest
    while size < prefill_chunk:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


def cache_length(max_context: int) -> int:
    """Full-layer cache slots for `max_context`: rounded up (<= 12.5%) so blockwise attention blocks divide it."""
    if max_context <= 2048:
        return max_context
    step = min(8192, 1 << ((max_context // 8).bit_length() - 1))
    return -(-max_context // step) * step


class Engine:
    """Fixed `max_batch` slots over a KV cache of `max_context` positions per slot.

    `add` puts a request into a free slot (its prompt is prefilled during the following `step`s),
    `step` runs pending prefill chunks then one decode round, `cancel` frees a slot.
    """

    def __init__(
        self,
        model: LanguageModel | MiMoModel,
        *,
        max_batch: int = 8,
        max_context: int = 4096,
        prefill_chunk: int = 512,
        max_round_tokens: int = 32,
        max_stop_ids: int = 8,
        max_top_logprobs: int = 0,
        extra_ring_slots: int = 0,
        cache_dtype: Any = None,
    ):
        lm = model if isinstance(model, LanguageModel) else LanguageModel(model)
        if max_batch < 1 or max_context < 2 or prefill_chunk < 1 or max_round_tokens < 1:
            raise ValueError(
                f"max_batch={max_batch}, max_context={max_context}, prefill_chunk={prefill_chunk}, "
                f"max_round_tokens={max_round_tokens}: expected max_context >= 2 and the others >= 1"
            )
        cfg = lm.config
        self.lm = lm
        self.config = cfg
        self.max_batch = max_batch
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.buckets = prefill_buckets(prefill_chunk)
        self.max_round_tokens = max_round_tokens
        self.max_stop_ids = max_stop_ids
        self.max_top_logprobs = max_top_logprobs
        self.params = lm.params
        graphdef = lm.graphdef
        dtype = jnp.dtype(cache_dtype or lm.dtype)

        self.cache_len = cache_length(max_context)
        make_cache = lambda: empty_cache(cfg, max_batch, self.cache_len, dtype, extra_ring_slots)
        make_state = lambda: empty_state(max_batch, cfg.hidden_size, cfg.vocab_size, max_stop_ids, lm.dtype)
        if lm.mesh is not None:
            replicated = jax.sharding.NamedSharding(lm.mesh, jax.sharding.PartitionSpec())
            shardings = cache_shardings(jax.eval_shape(make_cache), lm.mesh)
            self.cache = jax.jit(make_cache, out_shardings=shardings)()
            self.state = jax.jit(make_state, out_shardings=replicated)()
        else:
            self.cache = jax.jit(make_cache)()
            self.state = jax.jit(make_state)()

        def prefill(params, cache, slot, tokens, start, length):
            return prefill_step(graphdef, params, cache, slot, tokens, start, length)

        def admit(params, state, slot, hidden, request):
            return admit_step(
                graphdef, params, state, slot, hidden, request, max_context=max_context, num_top=max_top_logprobs
            )

        def decode(params, cache, state, num_steps):
            return decode_round(
                graphdef,
                params,
                cache,
                state,
                num_steps,
                max_steps=max_round_tokens,
                max_context=max_context,
                num_top=max_top_logprobs,
            )

        self.prefill_fn = jax.jit(prefill, donate_argnums=(1,))
        self.admit_fn = jax.jit(admit, donate_argnums=(1,))
        self.decode_fn = jax.jit(decode, donate_argnums=(1, 2))
        self.release_fn = jax.jit(release_step, donate_argnums=(0,))

        self._slots: list[_Request | None] = [None] * max_batch
        self._prefill_queue: deque[int] = deque()
        self._by_id: dict[Any, int] = {}
        self._seeds = itertools.count(np.random.SeedSequence().entropy % (2**31))

    # ---------------------------------------------------------------- abstract shapes (AOT compilation)
    def abstract_prefill_args(self, chunk: int) -> tuple:
        """Abstract arguments of `prefill_fn` for a chunk of `chunk` tokens: `prefill_fn.lower(*args)`."""
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return (_abstract(self.params), _abstract(self.cache), i32, jax.ShapeDtypeStruct((chunk,), jnp.int32), i32, i32)

    def abstract_admit_args(self) -> tuple:
        hidden = jax.ShapeDtypeStruct((self.config.hidden_size,), self.lm.dtype)
        request = _abstract(self._slot_request(np.zeros(1, np.int32), SamplingOptions(), 0))
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return (_abstract(self.params), _abstract(self.state), i32, hidden, request)

    def abstract_decode_args(self) -> tuple:
        i32 = jax.ShapeDtypeStruct((), jnp.int32)
        return (_abstract(self.params), _abstract(self.cache), _abstract(self.state), i32)

    # ---------------------------------------------------------------- requests
    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self._slots)

    @property
    def num_requests(self) -> int:
        return self.max_batch - self.free_slots

    def has_work(self) -> bool:
        return self.num_requests > 0

    def check_request(self, request_id: Any, prompt_ids: Sequence[int], sampling: SamplingOptions) -> np.ndarray:
        """The prompt as int32 ids if this engine can run the request, else a ValueError saying why."""
        prompt = np.asarray(prompt_ids, dtype=np.int64).reshape(-1)
        if prompt.size == 0:
            raise ValueError(f"request {request_id!r}: the prompt is empty")
        if prompt.min() < 0 or prompt.max() >= self.config.vocab_size:
            raise ValueError(
                f"request {request_id!r}: token ids must lie in [0, {self.config.vocab_size}), "
                f"got [{prompt.min()}, {prompt.max()}]"
            )
        if prompt.size >= self.max_context:
            raise ValueError(
                f"request {request_id!r}: a prompt of {prompt.size} tokens leaves no room "
                f"in max_context={self.max_context}"
            )
        if len(sampling.stop_token_ids) > self.max_stop_ids:
            raise ValueError(
                f"request {request_id!r}: {len(sampling.stop_token_ids)} stop tokens, "
                f"more than the engine's max_stop_ids={self.max_stop_ids}"
            )
        if (sampling.logprobs or 0) > self.max_top_logprobs:
            raise ValueError(
                f"request {request_id!r}: logprobs={sampling.logprobs} exceeds "
                f"the engine's max_top_logprobs={self.max_top_logprobs}"
            )
        return prompt.astype(np.int32)

    def add(self, request_id: Any, prompt_ids: Sequence[int], sampling: SamplingOptions | None = None) -> int:
        """Reserve a slot for a request; its prompt is prefilled by the next `step`s. Returns the slot."""
        sampling = sampling or SamplingOptions()
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = self.check_request(request_id, prompt_ids, sampling)
        try:
            slot = self._slots.index(None)
        except ValueError:
            raise EngineFull(f"all {self.max_batch} slots are busy") from None
        seed = next(self._seeds) if sampling.seed is None else sampling.seed
        self._slots[slot] = _Request(request_id, prompt, sampling, seed)
        self._by_id[request_id] = slot
        self._prefill_queue.append(slot)
        return slot

    def cancel(self, request_id: Any) -> bool:
        """Stop a request and free its slot; False when it is unknown (or already finished)."""
        slot = self._by_id.pop(request_id, None)
        if slot is None:
            return False
        if self._slots[slot].decoding:
            self.state = self.release_fn(self.state, jnp.int32(slot))
        if slot in self._prefill_queue:
            self._prefill_queue.remove(slot)
        self._slots[slot] = None
        return True

    def _slot_request(self, prompt: np.ndarray, options: SamplingOptions, seed: int) -> SlotRequest:
        stop = np.full((self.max_stop_ids,), -1, np.int32)
        stop[: len(options.stop_token_ids)] = options.stop_token_ids
        mask = np.zeros((self.config.vocab_size,), bool)
        mask[prompt] = True
        return SlotRequest(
            prompt_len=jnp.int32(prompt.size),
            max_new_tokens=jnp.int32(options.max_new_tokens),
            stop_ids=jnp.asarray(stop),
            sampling=SamplingParams.make(1, **options.params()),
            rng=jnp.asarray(request_key(seed)),
            prompt_mask=jnp.asarray(mask),
        )

    # ---------------------------------------------------------------- running
    def _prefill_some(self, token_budget: int) -> list[tuple[int, Any, Any]]:
        """Run queued prefill chunks (at least one) up to `token_budget` tokens; admit finished prompts."""
        admitted = []
        spent = 0
        while self._prefill_queue and (spent == 0 or spent < token_budget):
            slot = self._prefill_queue[0]
            req = self._slots[slot]
            start = req.prefilled
            length = min(self.prefill_chunk, req.prompt.size - start)
            bucket = next(b for b in self.buckets if b >= length)
            tokens = np.zeros((bucket,), np.int32)
            tokens[:length] = req.prompt[start : start + length]
            self.cache, req.hidden = self.prefill_fn(
                self.params, self.cache, jnp.int32(slot), jnp.asarray(tokens), jnp.int32(start), jnp.int32(length)
            )
            req.prefilled += length
            spent += length
            if req.prefilled == req.prompt.size:
                self._prefill_queue.popleft()
                request = self._slot_request(req.prompt, req.options, req.seed)
                self.state, first, reason = self.admit_fn(self.params, self.state, jnp.int32(slot), req.hidden, request)
                req.hidden = None
                req.decoding = True
                admitted.append((slot, first, reason))
        return admitted

    def step(self, max_tokens_per_round: int | None = None, prefill_tokens: int | None = None) -> list[StepOutput]:
        """Prefill up to `prefill_tokens` queued prompt tokens (default one chunk), then decode up to
        `max_tokens_per_round` tokens (default and cap: `max_round_tokens`) for every running request."""
        n = self.max_round_tokens if max_tokens_per_round is None else max_tokens_per_round
        if not 1 <= n <= self.max_round_tokens:
            raise ValueError(f"max_tokens_per_round={n}: expected 1..{self.max_round_tokens}")
        admitted = self._prefill_some(self.prefill_chunk if prefill_tokens is None else prefill_tokens)
        decoding = any(r is not None and r.decoding for r in self._slots)
        round_out = None
        if decoding:
            self.cache, self.state, round_out = self.decode_fn(self.params, self.cache, self.state, jnp.int32(n))
        host_admitted, host_round, reasons = to_host((admitted, round_out, self.state.finish_reason))

        results: dict[int, StepOutput] = {}

        def emit(slot, tokens, logprobs, top_ids, top_logprobs):
            req = self._slots[slot]
            out = results.get(slot)
            if out is None:
                want_lp = req.options.logprobs is not None
                out = results[slot] = StepOutput(
                    req.request_id, [], [] if want_lp else None, [] if want_lp else None, False, None
                )
            out.token_ids.extend(int(t) for t in tokens)
            if out.logprobs is not None:
                k = req.options.logprobs
                out.logprobs.extend(float(x) for x in logprobs)
                out.top_logprobs.extend(
                    [(int(i), float(x)) for i, x in zip(ids[:k], lps[:k], strict=True)]
                    for ids, lps in zip(top_ids, top_logprobs, strict=True)
                )

        for slot, first, _ in host_admitted:
            emit(slot, first.tokens, first.logprobs, first.top_ids, first.top_logprobs)
        if host_round is not None:
            for slot in range(self.max_batch):
                c = int(host_round.count[slot])
                if c and self._slots[slot] is not None:
                    emit(
                        slot,
                        host_round.tokens[slot, :c],
                        host_round.logprobs[slot, :c],
                        host_round.top_ids[slot, :c],
                        host_round.top_logprobs[slot, :c],
                    )
        for slot, out in results.items():
            if reasons[slot] != RUNNING:
                out.finished = True
                out.finish_reason = FINISH_REASONS[int(reasons[slot])]
                del self._by_id[out.request_id]
                self._slots[slot] = None
        return list(results.values())


def to_host(tree: Any) -> Any:
    """`jax.device_get` that also works on arrays split across processes (multi-host meshes).

    Such an array (e.g. a round's tokens split over a data axis spanning hosts) is all-gathered,
    a collective: every process must fetch the same arrays in the same order, as the engine's
    identical steps on every process do.
    """
    from jax.experimental import multihost_utils

    def one(x: Any) -> Any:
        if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
            return np.asarray(multihost_utils.process_allgather(x, tiled=True))
        return jax.device_get(x)

    return jax.tree.map(one, tree)


def _abstract(tree: Any) -> Any:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)
