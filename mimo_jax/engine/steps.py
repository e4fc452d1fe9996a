"""The engine's device work: pure step functions (state in, state out) and `build_steps`, which jits them once
for `Engine`, `mimo_jax.tools.aot` and the benchmarks alike.

No shape depends on which requests are running (inactive rows run at position -1: nothing is
written to their cache and their outputs are ignored), so nothing recompiles as requests come
and go. Three functions do the work (the cache and slot state are donated):

- `prefill(params, cache, slot, tokens[C + k], start, length, history[K, H]) -> (cache, history)`
  (`prefill_step`): one chunk of one request's prompt (the first `length` of tokens[:C]; the k
  tokens after the chunk feed the MTP layers), attending against what the slot already holds.
  `history` rolls the prompt's last K hidden states through the chunks (K = 1 without
  speculation). Chunk lengths are bucketed (powers of two up to `prefill_chunk`).
- `prefill_logprobs(..., history, targets[C]) -> (cache, history, PromptScores)`
  (`prefill_logprobs_step`): the same chunk, also scoring the prompt: at each chunk position the
  log-softmax of the lm_head at the prompt's next token (`targets`, which the host knows, so the
  chunk's last position scores the next chunk's first token), its rank and the top-N. A separate
  compiled function, run only for requests that ask for prompt logprobs.
- `admit(params, state, slot, history, request, allowed[W]) -> (state, first, reason)` (`admit_step`):
  samples the first token from the prompt's last hidden state and starts the slot.
- `decode(params, cache, state, num_steps, allowed[B, W]) -> (cache, state, RoundOutput)` (`decode_round`): a
  `jax.lax.while_loop` of up to `num_steps` (<= `max_round_tokens`) iterations for every active
  slot, stopping each at its stop tokens, its token budget or the context end. An iteration is
  one token (`decode_one`), or with `speculative_steps=k` one MTP draft-verify-accept round
  (1..k+1 tokens per slot, `mimo_jax.engine.speculative.decode_speculative`); `greedy_decode` is
  the same loop for rounds where every running request is greedy (the host picks it: drafts and
  verify compare argmaxes).

`release(state, slot) -> state` (`release_step`) stops a cancelled request's slot.

`allowed` is constrained decoding's token mask (`mimo_jax.engine.constraints`): int32 bitmasks,
W = ceil(vocab / 32) words per row, all ones for a request without a constraint. It is an input
of fixed shape, so masks never recompile anything; the host sends a real one only for rounds of one
token (the mask holds for every iteration of a round), and never to a speculative engine, whose
iterations ignore it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mimo_jax.config import MiMoConfig
from mimo_jax.engine.constraints import bitmask_words, full_bitmask
from mimo_jax.engine.sampling import SampleOutput, sample, step_keys
from mimo_jax.engine.speculative import decode_speculative, history_length, mtp_prefill
from mimo_jax.engine.state import (
    MAX_LOGIT_BIAS,
    MAX_STOP_IDS,
    RUNNING,
    IterationOutput,
    PromptScores,
    RoundOutput,
    SlotRequest,
    SlotState,
    _finish_reason,
    cache_length,
    empty_request,
    empty_state,
    engine_cache,
    prefill_buckets,
)
from mimo_jax.model.cache import LayerKV, cache_shardings, read_slot, write_slot
from mimo_jax.model.mimo import MiMoModel


# ------------------------------------------------------------------ pure step functions
def prefill_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: list[LayerKV],
    slot: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
) -> tuple[list[LayerKV], jax.Array]:
    """Run a prompt chunk into slot `slot`: tokens [C + k], of which the first `length` are the chunk
    (placed at start, start+1, ...) and tokens[length:] the prompt's next tokens (-1 past its end),
    which only the k MTP layers read (k = len(cache) - num_layers).

    A chunk starting at 0 begins a new request: the slot's old keys are marked empty first.
    Returns the new cache and `history` [K, H] advanced by the chunk (the prompt's last K hidden states).
    """
    cache, history, _ = _prefill_chunk(nnx.merge(graphdef, params), cache, slot, tokens, start, length, history)
    return cache, history


def _prefill_chunk(
    model: MiMoModel,
    cache: list[LayerKV],
    slot: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
) -> tuple[list[LayerKV], jax.Array, jax.Array]:
    """`prefill_step`'s work; also returns the chunk's hidden states [1, C, H] (before the final norm)."""
    num_layers = len(model.layers)
    chunk = tokens.shape[0] - (len(cache) - num_layers)
    idx = jnp.arange(chunk, dtype=jnp.int32)
    positions = jnp.where(idx < length, start + idx, -1)[None]
    rows = read_slot(cache, slot, clear=start == 0)
    hidden, target_rows = model.hidden_states(jnp.maximum(tokens[None, :chunk], 0), positions, rows[:num_layers])
    mtp_rows = mtp_prefill(model, rows[num_layers:], hidden, tokens[None], positions)
    joined = jnp.concatenate([history, hidden[0].astype(history.dtype)], axis=0)
    history = jax.lax.dynamic_slice_in_dim(joined, length, history.shape[0], axis=0)
    return write_slot(cache, target_rows + mtp_rows, slot), history, hidden


def prefill_logprobs_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: list[LayerKV],
    slot: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
    targets: jax.Array,
    *,
    num_top: int,
) -> tuple[list[LayerKV], jax.Array, PromptScores]:
    """`prefill_step`, and the prompt's scores: `targets` [C] holds, for each chunk position, the prompt's
    next token (-1 where there is none: past the chunk, or the prompt's last token). Position i's
    scores are the model's log-softmax (of the raw logits, as sampled tokens' logprobs are) at
    targets[i], its rank and the top-`num_top` (static). The lm_head runs over the whole chunk:
    C x vocab float32 logits."""
    model = nnx.merge(graphdef, params)
    cache, history, hidden = _prefill_chunk(model, cache, slot, tokens, start, length, history)
    logprobs = jax.nn.log_softmax(model.logits(hidden)[0], axis=-1)  # [C, V] float32
    chosen = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1, dtype=jnp.int32)
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_logprobs = jnp.zeros((logprobs.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logprobs.shape[0], 0), jnp.int32)
    return cache, history, PromptScores(chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)


def admit_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    state: SlotState,
    slot: jax.Array,
    history: jax.Array,
    request: SlotRequest,
    allowed: jax.Array,
    *,
    max_context: int,
    num_top: int,
) -> tuple[SlotState, SampleOutput, jax.Array]:
    """Sample a request's first token from its prompt's last hidden state (`history[-1]`) and start its slot;
    `allowed` [W]: the tokens the request's constraint allows first (all ones without one).

    Returns the new state, the first token (batch of 1) and its finish reason [1].
    """
    model = nnx.merge(graphdef, params)
    hidden = history[-1]
    logits = model.logits(hidden[None])
    position = request.prompt_len[None]
    counts = jnp.zeros((1, logits.shape[-1]), jnp.int32)
    keys = step_keys(request.rng[None], position)
    first = sample(
        logits,
        request.sampling,
        keys,
        counts,
        request.prompt_mask[None],
        num_top,
        stop_ids=request.stop_ids[None],
        allowed=allowed[None],
    )
    one = jnp.ones((1,), jnp.int32)
    reason = _finish_reason(
        first.tokens, position, one, request.max_new_tokens[None], request.stop_ids[None], max_context
    )
    hist = state.recent_tokens.shape[1]  # K (0 without speculation)
    recent_tokens = state.recent_tokens[:1]
    if hist:
        recent_tokens = jnp.concatenate([request.recent_tokens[1:], first.tokens])[None]
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
        recent_hidden=history[history.shape[0] - hist :][None].astype(state.hidden.dtype),
        recent_tokens=recent_tokens,
    )
    state = jax.tree.map(lambda all_rows, r: jax.lax.dynamic_update_slice_in_dim(all_rows, r, slot, 0), state, row)
    return state, first, reason


def release_step(state: SlotState, slot: jax.Array) -> SlotState:
    """Stop a slot (cancelled request)."""
    return dataclasses.replace(state, active=state.active.at[slot].set(False))


def decode_one(
    model: MiMoModel, cache: list[LayerKV], state: SlotState, allowed: jax.Array, *, max_context: int, num_top: int
) -> tuple[list[LayerKV], SlotState, SampleOutput, jax.Array]:
    """One token for every active slot, each among the tokens its row of `allowed` [B, W] allows.
    Returns (cache, state, sample, emitted mask [B])."""
    active = state.active
    positions = jnp.where(active, state.positions, -1)
    hidden, cache = model.hidden_states(state.tokens[:, None], positions[:, None], cache)
    hidden = hidden[:, 0]
    logits = model.logits(hidden)
    next_positions = state.positions + 1
    keys = step_keys(state.rng, next_positions)
    out = sample(
        logits,
        state.sampling,
        keys,
        state.counts,
        state.prompt_mask,
        num_top,
        stop_ids=state.stop_ids,
        allowed=allowed,
    )
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
    allowed: jax.Array,
    *,
    max_steps: int,
    max_context: int,
    num_top: int,
    speculative_steps: int = 0,
    greedy: bool = False,
) -> tuple[list[LayerKV], SlotState, RoundOutput]:
    """Up to `num_steps` (<= max_steps) decode iterations in one `while_loop`; ends early when no slot is active.

    An iteration is one token, or with `speculative_steps=k` one draft-verify-accept round that
    emits 1..k+1 tokens per slot (so the round holds up to max_steps * (k+1) tokens per slot).
    `allowed` [B, W]: each slot's allowed-token bitmask, the same for every iteration (constrained
    requests run rounds of one token); speculative iterations ignore it (the engine runs no
    constrained request with speculation).
    `greedy` (static, speculation only): the caller knows every running slot is greedy.
    """
    batch = state.tokens.shape[0]
    k = speculative_steps
    width = max_steps * (k + 1)
    output = RoundOutput(
        tokens=jnp.full((batch, width), -1, jnp.int32),
        logprobs=jnp.zeros((batch, width), jnp.float32),
        top_ids=jnp.zeros((batch, width, num_top), jnp.int32),
        top_logprobs=jnp.zeros((batch, width, num_top), jnp.float32),
        count=jnp.zeros((batch,), jnp.int32),
        accepted=jnp.full((batch, max_steps), -1, jnp.int32),
        drafts=jnp.zeros((batch, max_steps, k), jnp.int32),
    )

    def cond(carry):
        i, _, state, _ = carry
        return (i < jnp.minimum(num_steps, max_steps)) & jnp.any(state.active)

    def body(carry):
        i, cache, state, output = carry
        model = nnx.merge(graphdef, params)
        if k:
            cache, state, out = decode_speculative(
                model, cache, state, max_context=max_context, num_top=num_top, greedy=greedy
            )
        else:
            cache, state, sampled, emitted = decode_one(
                model, cache, state, allowed, max_context=max_context, num_top=num_top
            )
            out = IterationOutput(
                tokens=sampled.tokens[:, None],
                logprobs=sampled.logprobs[:, None],
                top_ids=sampled.top_ids[:, None],
                top_logprobs=sampled.top_logprobs[:, None],
                count=emitted.astype(jnp.int32),
                accepted=jnp.where(emitted, 0, -1),
                drafts=jnp.zeros((batch, 0), jnp.int32),
            )
        # this iteration's tokens go to columns count .. count+emitted-1 of each slot's row
        m = out.tokens.shape[1]
        cols = output.count[:, None] + jnp.arange(m)
        cols = jnp.where(jnp.arange(m)[None, :] < out.count[:, None], cols, width)  # out of range: dropped
        rows = jnp.arange(batch)[:, None]
        put = lambda buf, new: buf.at[rows, cols].set(new, mode="drop")
        output = RoundOutput(
            tokens=put(output.tokens, out.tokens),
            logprobs=put(output.logprobs, out.logprobs),
            top_ids=put(output.top_ids, out.top_ids),
            top_logprobs=put(output.top_logprobs, out.top_logprobs),
            count=output.count + out.count,
            accepted=output.accepted.at[:, i].set(out.accepted),
            drafts=output.drafts.at[:, i].set(out.drafts),
        )
        return i + 1, cache, state, output

    _, cache, state, output = jax.lax.while_loop(cond, body, (jnp.int32(0), cache, state, output))
    return cache, state, output


# ------------------------------------------------------------------ the jitted steps, built once
class JitUnderMesh:
    """A jitted step that is traced, run and lowered under a mesh, whoever calls it (as LanguageModel's
    forward is): the expert-parallel MoE and the per-shard cache reads find it there. No mesh: plain jit."""

    def __init__(self, jitted: Any, mesh: jax.sharding.Mesh | None):
        self._jitted, self._mesh = jitted, mesh

    def _context(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext() if self._mesh is None else jax.set_mesh(self._mesh)

    def __call__(self, *args: Any) -> Any:
        with self._context():
            return self._jitted(*args)

    def lower(self, *args: Any) -> Any:
        with self._context():
            return self._jitted.lower(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._jitted, name)


@dataclasses.dataclass(frozen=True)
class EngineSteps:
    """The engine's jitted device functions and the abstract values they take (ShapeDtypeStructs carrying
    the shardings the functions are called with): `steps.prefill.lower(*steps.prefill_args(chunk))`."""

    prefill: JitUnderMesh  # (params, cache, slot, tokens, start, length, history) -> (cache, history)
    # (params, cache, slot, tokens, start, length, history, targets) -> (cache, history, PromptScores)
    prefill_logprobs: JitUnderMesh
    admit: JitUnderMesh  # (params, state, slot, history, request, allowed) -> (state, first, finish reason [1])
    decode: JitUnderMesh  # (params, cache, state, num_steps, allowed) -> (cache, state, RoundOutput)
    greedy_decode: JitUnderMesh  # decode for rounds where every running request is greedy (decode itself if k = 0)
    release: JitUnderMesh  # (state, slot) -> state
    params: Any  # abstract parameters
    cache: list[LayerKV]  # abstract KV cache
    state: SlotState  # abstract slot state
    request: SlotRequest  # abstract admit request
    replicated: jax.sharding.Sharding  # the slot state's, and that of scalars, `history` and requests
    make_cache: Callable[[], list[LayerKV]]  # an empty cache of these shapes: jit it with `shardings(cache)`
    make_state: Callable[[], SlotState]  # every slot free: jit it with `shardings(state)`
    buckets: tuple[int, ...]  # prefill chunk lengths that get compiled
    cache_len: int  # full-layer cache slots (`cache_length(max_context)`)
    history_len: int  # K: recent hidden states per slot for the MTP drafts (0 without speculation)
    speculative_steps: int  # k
    hidden_size: int
    vocab_size: int
    dtype: Any  # of the slot state's hidden states and of `history`

    def _scalar(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)

    def _history(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.empty_history().shape, self.dtype, sharding=self.replicated)

    def prefill_args(self, chunk: int) -> tuple:
        """Abstract arguments of `prefill` for a chunk of `chunk` tokens (and the k after it)."""
        i32 = self._scalar()
        tokens = jax.ShapeDtypeStruct((chunk + self.speculative_steps,), jnp.int32, sharding=self.replicated)
        return (self.params, self.cache, i32, tokens, i32, i32, self._history())

    def _allowed(self, *batch: int) -> jax.ShapeDtypeStruct:
        shape = batch + (bitmask_words(self.vocab_size),)
        return jax.ShapeDtypeStruct(shape, jnp.int32, sharding=self.replicated)

    def prefill_logprobs_args(self, chunk: int) -> tuple:
        """Abstract arguments of `prefill_logprobs` for a chunk of `chunk` tokens."""
        targets = jax.ShapeDtypeStruct((chunk,), jnp.int32, sharding=self.replicated)
        return self.prefill_args(chunk) + (targets,)

    def admit_args(self) -> tuple:
        """Abstract arguments of `admit`."""
        return (self.params, self.state, self._scalar(), self._history(), self.request, self._allowed())

    def decode_args(self) -> tuple:
        """Abstract arguments of `decode` and `greedy_decode`."""
        batch = self.state.tokens.shape[0]
        return (self.params, self.cache, self.state, self._scalar(), self._allowed(batch))

    def allow_all(self, batch: bool = True) -> np.ndarray:
        """`decode`'s `allowed` for rounds without constraints: int32 [B, W] of all ones ([W]: `admit`'s)."""
        return full_bitmask(self.vocab_size, self.state.tokens.shape[0] if batch else None)

    def empty_history(self) -> np.ndarray:
        """prefill's `history` before a prompt's first chunk: the last max(K, 1) hidden states."""
        return np.zeros((max(self.history_len, 1), self.hidden_size), self.dtype)

    def prefill_tokens(self, prompt: np.ndarray, start: int, length: int, bucket: int) -> np.ndarray:
        """prefill's `tokens` for prompt[start : start+length] padded to `bucket`: the chunk, then
        the k prompt tokens after it (-1 past the prompt's end) for the MTP layers."""
        k = self.speculative_steps
        tokens = np.full((bucket + k,), -1, np.int32)
        tokens[:length] = prompt[start : start + length]
        after = prompt[start + length : start + length + k]
        tokens[length : length + after.size] = after
        return tokens

    @staticmethod
    def prompt_targets(prompt: np.ndarray, start: int, length: int, bucket: int) -> np.ndarray:
        """prefill_logprobs' `targets` for prompt[start : start+length] padded to `bucket`: the token after
        each position (-1 after the prompt's last token and in the padding)."""
        targets = np.full((bucket,), -1, np.int32)
        after = prompt[start + 1 : start + length + 1]
        targets[: after.size] = after
        return targets


def build_steps(
    graphdef: nnx.GraphDef,
    params: Any,
    cfg: MiMoConfig,
    *,
    mesh: jax.sharding.Mesh | None,
    max_batch: int,
    max_context: int,
    prefill_chunk: int,
    max_round_tokens: int,
    state_dtype: Any,
    cache_dtype: Any = None,
    max_stop_ids: int = MAX_STOP_IDS,
    max_top_logprobs: int = 0,
    speculative_steps: int = 0,
    extra_ring_slots: int = 0,
    max_logit_bias: int = MAX_LOGIT_BIAS,
) -> EngineSteps:
    """Jit the engine's steps for `params` (arrays, or ShapeDtypeStructs with their shardings: AOT).

    With a mesh the cache is sharded by the rules of `mimo_jax.sharding` and the slot state replicated;
    without one everything lives on the parameters' device (the first device for abstract parameters
    without a sharding). `cache_dtype` defaults to `state_dtype` (the model's dtype).
    """
    k = speculative_steps
    state_dtype = jnp.dtype(state_dtype)
    cache_dtype = jnp.dtype(cache_dtype or state_dtype)
    cache_len = cache_length(max_context)
    history = history_length(k)

    def make_cache() -> list[LayerKV]:
        return engine_cache(cfg, max_batch, cache_len, cache_dtype, k, extra_ring_slots)

    def make_state() -> SlotState:
        return empty_state(
            max_batch, cfg.hidden_size, cfg.vocab_size, max_stop_ids, state_dtype, history, max_logit_bias
        )

    cache_shapes = jax.eval_shape(make_cache)
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        cache_sharding = cache_shardings(cache_shapes, mesh)
    else:  # committed to the parameters' device, like every output (one compiled step)
        sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
        replicated = jax.sharding.SingleDeviceSharding(device)
        cache_sharding = jax.tree.map(lambda _: replicated, cache_shapes)
    state_shapes = jax.eval_shape(make_state)
    state_sharding = jax.tree.map(lambda _: replicated, state_shapes)
    request_shapes = jax.eval_shape(lambda: empty_request(cfg.vocab_size, max_stop_ids, history, max_logit_bias))

    def prefill(params, cache, slot, tokens, start, length, history):
        return prefill_step(graphdef, params, cache, slot, tokens, start, length, history)

    def prefill_logprobs(params, cache, slot, tokens, start, length, history, targets):
        return prefill_logprobs_step(
            graphdef, params, cache, slot, tokens, start, length, history, targets, num_top=max_top_logprobs
        )

    def admit(params, state, slot, history, request, allowed):
        return admit_step(
            graphdef,
            params,
            state,
            slot,
            history,
            request,
            allowed,
            max_context=max_context,
            num_top=max_top_logprobs,
        )

    def decode(params, cache, state, num_steps, allowed, greedy=False):
        return decode_round(
            graphdef,
            params,
            cache,
            state,
            num_steps,
            allowed,
            max_steps=max_round_tokens,
            max_context=max_context,
            num_top=max_top_logprobs,
            speculative_steps=k,
            greedy=greedy,
        )

    def greedy_decode(params, cache, state, num_steps, allowed):
        return decode(params, cache, state, num_steps, allowed, True)

    # Outputs keep the layouts the cache and state are made with, so every call after the first hits the
    # same compiled step (equivalent but differently spelled shardings would recompile). Unused parameters
    # stay arguments (prefill reads no lm_head): a compiled step's memory counts every resident weight.
    def jit(fn: Callable, donate_argnums: tuple[int, ...], out_shardings: Any) -> JitUnderMesh:
        jitted = jax.jit(fn, donate_argnums=donate_argnums, out_shardings=out_shardings, keep_unused=True)
        return JitUnderMesh(jitted, mesh)

    decode_out = (cache_sharding, state_sharding, None)
    decode_fn = jit(decode, (1, 2), decode_out)
    return EngineSteps(
        prefill=jit(prefill, (1,), (cache_sharding, replicated)),
        # compiled (per chunk length) on the first request that asks for prompt logprobs
        prefill_logprobs=jit(prefill_logprobs, (1,), (cache_sharding, replicated, replicated)),
        admit=jit(admit, (1,), (state_sharding, None, None)),
        decode=decode_fn,
        # Speculation when every running request is greedy (the host knows): drafts and verify compare
        # argmaxes, no distributions. Without speculation the same function as decode.
        greedy_decode=jit(greedy_decode, (1, 2), decode_out) if k else decode_fn,
        release=jit(release_step, (0,), state_sharding),
        params=abstract(params),
        cache=with_shardings(cache_shapes, cache_sharding),
        state=with_shardings(state_shapes, state_sharding),
        request=with_shardings(request_shapes, jax.tree.map(lambda _: replicated, request_shapes)),
        replicated=replicated,
        make_cache=make_cache,
        make_state=make_state,
        buckets=prefill_buckets(prefill_chunk),
        cache_len=cache_len,
        history_len=history,
        speculative_steps=k,
        hidden_size=cfg.hidden_size,
        vocab_size=cfg.vocab_size,
        dtype=state_dtype,
    )


def shardings(tree: Any) -> Any:
    """The sharding of every leaf of a pytree of arrays or ShapeDtypeStructs."""
    return jax.tree.map(lambda x: x.sharding, tree)


def abstract(tree: Any) -> Any:
    """ShapeDtypeStructs of a pytree of arrays (or of ShapeDtypeStructs), keeping their shardings."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def with_shardings(shapes: Any, sharding_tree: Any) -> Any:
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding_tree)
