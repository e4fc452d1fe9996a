"""The engine's device work: pure step functions (state in, state out) and `build_steps`, which jits them once
for `Engine`, `mimo_jax.tools.aot` and the benchmarks alike.

No shape depends on which requests are running beyond a decode round's bucket (inactive rows run at
position -1: nothing is written to their cache and their outputs are ignored), so nothing recompiles as
requests come and go once each bucket has compiled. The work (the cache and slot state are donated):

- `prefill(params, cache, slot, pages[M], tokens[C + k], start, length, history[K, H], mark) -> (cache, history,
  snapshot row)` (`prefill_step`): one chunk of one request's prompt (the first `length` of tokens[:C]; the k
  tokens after the chunk feed the MTP layers), attending against what the slot already holds: its
  full layers' pages (its page table `pages`) and its rings. `history` rolls the prompt's last K hidden
  states through the chunks (K = 1 without speculation). Chunk lengths are bucketed (powers of two up to
  `prefill_chunk`). The snapshot row is the slot's rings and history as of position `mark` (the prompt's
  snapshot boundary when the chunk crosses it, else -1): a chunk runs past the boundary, so a prefix hit's
  tail is one forward, not two.
- `prefill_logprobs(..., history, mark, targets[C]) -> (cache, history, snapshot row, PromptScores)`
  (`prefill_logprobs_step`): the same chunk, also scoring the prompt: at each chunk position the
  log-softmax of the lm_head at the prompt's next token (`targets`, which the host knows, so the
  chunk's last position scores the next chunk's first token), its rank and the top-N. A separate
  compiled function, run only for requests that ask for prompt logprobs.
- `admit(params, state, slot, history, request, allowed[W]) -> (state, first, reason)` (`admit_step`):
  samples the first token from the prompt's last hidden state and starts the slot.
- `decode(params, cache, state, rows[b], page_table[b, M], num_steps, allowed[b, W]) -> (cache, state, RoundOutput)`
  (`decode_rows`): the rows `rows` of the slot state and of the rings are taken out, run through
  `decode_round` (a `jax.lax.while_loop` of up to `num_steps` <= `max_round_tokens` iterations) with the
  full layers reading and writing their pages through `page_table`, and put back. b is a bucket
  (`decode_buckets`: powers of two up to max_batch), so a round costs what the running requests need,
  not what the engine's slots would (one compile per bucket). Where the slots and pages split over D
  (data x expert) shards, b is D segments of one per-shard bucket, segment d rows of shard d, and every row
  runs where its rings and pages are (`page_shards`). Each row stops at its stop tokens, its
  token budget or the context end. An iteration is one token (`decode_one`), or with
  `speculative_steps=k` one MTP draft-verify-accept round (1..k+1 tokens per row,
  `mimo_jax.engine.speculative.decode_speculative`); `greedy_decode` is the same loop for rounds where
  every running request is greedy (the host picks it: drafts and verify compare argmaxes).
  `constrained_decode` is the same with the one-token iterations over the target layers only, even
  with k > 0: the rounds of a speculative engine's constrained requests (the masks apply).
- `save_snapshot` / `restore_snapshot`: store a prefill's snapshot row in / copy a snapshot's rings (and prompt
  history) into a slot from the prefix cache's snapshot store (`RingSnapshots`).

`release(state, slot) -> state` (`release_step`) stops a cancelled request's slot.

`allowed` is constrained decoding's token mask (`mimo_jax.engine.constraints`): int32 bitmasks,
W = ceil(vocab / 32) words per row, all ones for a request without a constraint. It is an input
of fixed shape, so masks never recompile anything; the host sends a real one only for rounds of one
token (the mask holds for every iteration of a round), and with speculation only to `constrained_decode`
(speculative iterations ignore it).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Sequence
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
    DEFAULT_PAGE_SIZE,
    MAX_LOGIT_BIAS,
    MAX_STOP_IDS,
    RUNNING,
    IterationOutput,
    KVCache,
    PromptScores,
    RingSnapshots,
    RoundOutput,
    SlotRequest,
    SlotState,
    _finish_reason,
    empty_request,
    empty_snapshots,
    empty_state,
    engine_cache,
    max_pages,
    prefill_buckets,
)
from mimo_jax.model.cache import (
    LayerKV,
    cache_shardings,
    page_pool_shardings,
    paged_layer_caches,
    read_slot,
    remap_ring,
    split_layer_caches,
    write_slot,
)
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.sharding import axes_size, batch_axes


# ------------------------------------------------------------------ pure step functions
def prefill_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    slot: jax.Array,
    pages: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
    mark: jax.Array,
    *,
    mark_slack: int,
    page_shards: tuple[str, ...] = (),
) -> tuple[KVCache, jax.Array, RingSnapshots]:
    """Run a prompt chunk into slot `slot` whose page table is `pages` [max_pages]: tokens [C + k], of which the
    first `length` are the chunk (placed at start, start+1, ...) and tokens[length:] the prompt's next tokens
    (-1 past its end), which only the k MTP layers read.

    A chunk starting at 0 begins a new request: the slot's old ring entries are marked empty first (its pages
    are its own: what they held before is never read, as every position is written before it is read).
    Returns the new cache, `history` [K, H] advanced by the chunk (the prompt's last K hidden states) and the
    slot's state as of position `mark` (`_prefill_chunk`): one snapshot row for `save_snapshot`.
    `page_shards`: the mesh axes the pools' pages split over (the slot's pages are on its shard).
    """
    model = nnx.merge(graphdef, params)
    args = (cache, slot, pages, tokens, start, length, history, mark)
    cache, history, at_mark, _ = _prefill_chunk(model, *args, mark_slack=mark_slack, page_shards=page_shards)
    return cache, history, at_mark


def layer_caches(
    model: MiMoModel,
    cache: KVCache,
    rings: list[LayerKV],
    page_table: jax.Array,
    page_shards: tuple[str, ...] = (),
    rows_on_shards: bool = False,
) -> list:
    """What the model's layers take (each full layer its pool and `page_table` [B, max_pages], each SWA layer
    its ring from `rings`), then the MTP layers' rings: the list the decode loop and the speculative round use.
    `page_shards`: the mesh axes the pools' pages split over; `rows_on_shards`: the rows are laid out as the
    slots (a decode round's segments), else every shard sees them (see `mimo_jax.model.cache.PagedKV`)."""
    num_swa = sum(s.sliding for s in model.config.layers)
    paged = paged_layer_caches(model.config, cache.pools, page_table, rings[:num_swa], page_shards, rows_on_shards)
    return paged + rings[num_swa:]


def _prefill_chunk(
    model: MiMoModel,
    cache: KVCache,
    slot: jax.Array,
    pages: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
    mark: jax.Array,
    *,
    mark_slack: int,
    page_shards: tuple[str, ...] = (),
) -> tuple[KVCache, jax.Array, RingSnapshots, jax.Array]:
    """`prefill_step`'s work; also returns the chunk's hidden states [1, C, H] (before the final norm).

    The snapshot row it returns holds the slot's rings and history as of position `mark` (the prompt's snapshot
    boundary, start < mark <= start + length, fewer than `mark_slack` (static) positions before the chunk's
    end; -1 when the chunk holds no boundary), so a prompt's tail runs as one chunk, not two split at the
    boundary. The rings run the chunk widened by that slack (`remap_ring`: old positions the chunk would
    overwrite stay, masked by the window as any key past it), then are narrowed twice: as of the chunk's end
    (kept) and as of `mark`.
    """
    num_layers = len(model.layers)
    rings = read_slot(cache.rings, slot, clear=start == 0)
    chunk = tokens.shape[0] - (len(rings) - sum(s.sliding for s in model.config.layers))
    spare = min(mark_slack, chunk)  # the boundary lies fewer than `spare` positions before the chunk's end
    wide = [remap_ring(r, r.slots + spare, start) for r in rings]
    layers = layer_caches(model, cache, wide, pages[None], page_shards)  # every page shard sees the one row
    idx = jnp.arange(chunk, dtype=jnp.int32)
    positions = jnp.where(idx < length, start + idx, -1)[None]
    hidden, target = model.hidden_states(jnp.maximum(tokens[None, :chunk], 0), positions, layers[:num_layers])
    mtp_rows = mtp_prefill(model, layers[num_layers:], hidden, tokens[None], positions)
    joined = jnp.concatenate([history, hidden[0].astype(history.dtype)], axis=0)  # positions start - K ...
    pools, wide = split_layer_caches(target + mtp_rows)
    end = start + length
    rows = [remap_ring(w, r.slots, end) for w, r in zip(wide, rings, strict=True)]
    at_mark = RingSnapshots(
        rings=[remap_ring(w, r.slots, mark) for w, r in zip(wide, rings, strict=True)],
        history=jax.lax.dynamic_slice_in_dim(joined, mark - start, history.shape[0], axis=0)[None],
    )
    history = jax.lax.dynamic_slice_in_dim(joined, length, history.shape[0], axis=0)
    return KVCache(pools, write_slot(cache.rings, rows, slot)), history, at_mark, hidden


def save_snapshot_step(snapshots: RingSnapshots, row: RingSnapshots, snapshot: jax.Array) -> RingSnapshots:
    """Store a slot's rings and prompt history as of its snapshot boundary (`row`, from the prefill chunk that
    crossed it) as snapshot `snapshot` (the prefix cache)."""
    rings = write_slot(snapshots.rings, row.rings, snapshot)
    history = row.history.astype(snapshots.history.dtype)
    history = jax.lax.dynamic_update_slice_in_dim(snapshots.history, history, snapshot, axis=0)
    return RingSnapshots(rings, history)


def restore_snapshot_step(
    cache: KVCache, snapshots: RingSnapshots, snapshot: jax.Array, slot: jax.Array
) -> tuple[KVCache, jax.Array]:
    """Put snapshot `snapshot`'s rings into slot `slot`; returns the cache and the history to prefill on from."""
    rows = read_slot(snapshots.rings, snapshot, clear=jnp.bool_(False))
    return KVCache(cache.pools, write_slot(cache.rings, rows, slot)), snapshots.history[snapshot]


def prefill_logprobs_step(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    slot: jax.Array,
    pages: jax.Array,
    tokens: jax.Array,
    start: jax.Array,
    length: jax.Array,
    history: jax.Array,
    mark: jax.Array,
    targets: jax.Array,
    *,
    num_top: int,
    mark_slack: int,
    page_shards: tuple[str, ...] = (),
) -> tuple[KVCache, jax.Array, RingSnapshots, PromptScores]:
    """`prefill_step`, and the prompt's scores: `targets` [C] holds, for each chunk position, the prompt's
    next token (-1 where there is none: past the chunk, or the prompt's last token). Position i's
    scores are the model's log-softmax (of the raw logits, as sampled tokens' logprobs are) at
    targets[i], its rank and the top-`num_top` (static). The lm_head runs over the whole chunk:
    C x vocab float32 logits."""
    model = nnx.merge(graphdef, params)
    args = (cache, slot, pages, tokens, start, length, history, mark)
    cache, history, at_mark, hidden = _prefill_chunk(model, *args, mark_slack=mark_slack, page_shards=page_shards)
    logprobs = jax.nn.log_softmax(model.logits(hidden)[0], axis=-1)  # [C, V] float32
    chosen = jnp.take_along_axis(logprobs, jnp.maximum(targets, 0)[:, None], axis=-1)[:, 0]
    ranks = 1 + jnp.sum(logprobs > chosen[:, None], axis=-1, dtype=jnp.int32)
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(logprobs, num_top)
    else:
        top_logprobs = jnp.zeros((logprobs.shape[0], 0), jnp.float32)
        top_ids = jnp.zeros((logprobs.shape[0], 0), jnp.int32)
    return cache, history, at_mark, PromptScores(chosen, ranks, top_ids.astype(jnp.int32), top_logprobs)


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
    counts = request.counts[None]
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
    generated = request.generated[None] + 1
    reason = _finish_reason(
        first.tokens, position, generated, request.max_new_tokens[None], request.stop_ids[None], max_context
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
        num_generated=generated,
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
    requests run rounds of one token); speculative iterations ignore it (a speculative engine runs its
    constrained requests with `speculative_steps=0` over the target layers: `decode_rows(target_only=True)`).
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


def take_rows(rings: list[LayerKV], rows: jax.Array, shard_axes: tuple[str, ...] = ()) -> list[LayerKV]:
    """The per-slot rings of the batch rows `rows` [b] (a decode round's rows). `shard_axes`: the mesh axes the
    rings' slots split over, and `rows` laid out to match (segment d holds slots of shard d): each shard takes its
    own rows, no ring crosses devices."""
    if shard_axes and rings:
        return _on_slot_shards(lambda rings, rows: take_rows(rings, rows), rings, (rows,), shard_axes)
    return [LayerKV(k=c.k[rows], v=c.v[rows], pos=c.pos[rows], ring=c.ring) for c in rings]


def put_rows(
    rings: list[LayerKV], sub: list[LayerKV], rows: jax.Array, shard_axes: tuple[str, ...] = ()
) -> list[LayerKV]:
    """`rings` with the rows `rows` replaced by `sub` (from `take_rows`, after the round; `shard_axes` as there)."""
    if shard_axes and rings:
        return _on_slot_shards(lambda rings, sub, rows: put_rows(rings, sub, rows), rings, (sub, rows), shard_axes)
    put = lambda x, y: x.at[rows].set(y)
    return [
        LayerKV(k=put(c.k, r.k), v=put(c.v, r.v), pos=put(c.pos, r.pos), ring=c.ring)
        for c, r in zip(rings, sub, strict=True)
    ]


def _on_slot_shards(fn: Callable, rings: list[LayerKV], args: tuple, shard_axes: tuple[str, ...]) -> Any:
    """fn(local rings, *args with `rows` last as local slot indices) in a `jax.shard_map` over `shard_axes`: the
    rings' slots, `args` and the result split over them (rows of segment d are slots of shard d)."""
    spec = jax.sharding.PartitionSpec(shard_axes)

    def local(rings, *args):
        first = jax.lax.axis_index(shard_axes) * rings[0].pos.shape[0]  # this shard's first slot
        return fn(rings, *args[:-1], args[-1] - first)

    in_specs = jax.tree.map(lambda _: spec, (rings, *args))
    return jax.shard_map(local, in_specs=in_specs, out_specs=spec, axis_names=frozenset(shard_axes))(rings, *args)


def decode_rows(
    graphdef: nnx.GraphDef,
    params: nnx.State,
    cache: KVCache,
    state: SlotState,
    rows: jax.Array,
    page_table: jax.Array,
    num_steps: jax.Array,
    allowed: jax.Array,
    *,
    target_only: bool = False,
    page_shards: tuple[str, ...] = (),
    **round_options: Any,
) -> tuple[KVCache, SlotState, RoundOutput]:
    """`decode_round` over the slots `rows` [b] only (page tables `page_table` [b, max_pages]): their state and
    rings are taken out, run, and put back; the pools are shared. Row i of the output is slot rows[i].

    `target_only` (static): the plain one-token loop over the target layers only, in an engine with MTP
    layers (constrained rows of a speculative engine); their MTP rings pass through unchanged, and their
    `recent_hidden` / `recent_tokens` go stale, which is harmless: a constrained request never drafts (its
    constraint lasts for its lifetime).

    A row whose `allowed` row is all zeros sits the round out (inactive for it, as it was after): a bucket's
    filler slot that another launch of the same step decodes (in a constrained step's second launch, the
    constrained rows: its first launch decoded them).

    `page_shards` (static): the mesh axes the slots and the pools' pages split over; `rows` then holds D equal
    segments, segment d slots of shard d (`EngineSteps.round_rows`), so every row runs where its rings and
    pages are."""
    model = nnx.merge(graphdef, params)
    sub_state = jax.tree.map(lambda x: x[rows], state)
    sits_out = ~jnp.any(allowed != 0, axis=-1)
    was_active = sub_state.active
    sub_state = dataclasses.replace(sub_state, active=was_active & ~sits_out)
    sub_rings = take_rows(cache.rings, rows, page_shards)
    layers = layer_caches(model, cache, sub_rings, page_table, page_shards, rows_on_shards=True)
    if target_only:
        num_layers = len(model.layers)
        target, mtp_rings = layers[:num_layers], layers[num_layers:]
        target, sub_state, out = decode_round(graphdef, params, target, sub_state, num_steps, allowed, **round_options)
        layers = target + mtp_rings
    else:
        layers, sub_state, out = decode_round(graphdef, params, layers, sub_state, num_steps, allowed, **round_options)
    sub_state = dataclasses.replace(sub_state, active=jnp.where(sits_out, was_active, sub_state.active))
    pools, sub_rings = split_layer_caches(layers)  # the SWA layers' rings, then the MTP layers'
    state = jax.tree.map(lambda x, y: x.at[rows].set(y), state, sub_state)
    return KVCache(pools, put_rows(cache.rings, sub_rings, rows, page_shards)), state, out


def decode_buckets(max_batch: int) -> tuple[int, ...]:
    """Decode round sizes that get compiled: powers of two below `max_batch`, and `max_batch` itself."""
    sizes = {max_batch}
    size = 1
    while size < max_batch:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))


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

    # (params, cache, slot, pages, tokens, start, length, history, mark) -> (cache, history, snapshot row)
    prefill: JitUnderMesh
    # (params, cache, slot, pages, tokens, start, length, history, mark, targets)
    #   -> (cache, history, snapshot row, PromptScores)
    prefill_logprobs: JitUnderMesh
    admit: JitUnderMesh  # (params, state, slot, history, request, allowed) -> (state, first, finish reason [1])
    # (params, cache, state, rows, page_table, num_steps, allowed) -> (cache, state, RoundOutput of the rows)
    decode: JitUnderMesh
    greedy_decode: JitUnderMesh  # decode for rounds where every running request is greedy (decode itself if k = 0)
    # decode for constrained rows: the plain one-token loop, masks applied, even with k > 0 (decode itself if k = 0)
    constrained_decode: JitUnderMesh
    release: JitUnderMesh  # (state, slot) -> state
    save_snapshot: JitUnderMesh  # (snapshots, snapshot row from prefill, snapshot) -> snapshots
    restore_snapshot: JitUnderMesh  # (cache, snapshots, snapshot, slot) -> (cache, history)
    params: Any  # abstract parameters
    cache: KVCache  # abstract KV cache
    snapshots: RingSnapshots  # abstract ring snapshots (the prefix cache's SWA state)
    snapshot_row: RingSnapshots  # abstract snapshot row (one slot's rings and history: prefill's third output)
    state: SlotState  # abstract slot state
    request: SlotRequest  # abstract admit request
    replicated: jax.sharding.Sharding  # the slot state's, and that of scalars, `history`, page tables and requests
    make_cache: Callable[[], KVCache]  # an empty cache of these shapes: jit it with `shardings(cache)`
    make_snapshots: Callable[[], RingSnapshots]  # empty snapshots: jit it with `shardings(snapshots)`
    make_state: Callable[[], SlotState]  # every slot free: jit it with `shardings(state)`
    buckets: tuple[int, ...]  # prefill chunk lengths that get compiled
    decode_buckets: tuple[int, ...]  # decode round sizes (rows) that get compiled
    num_pages: int  # pages per full layer's pool (all shards together)
    num_snapshots: int  # ring snapshots in the prefix cache's store (all shards together)
    page_size: int  # tokens per page
    page_shards: tuple[str, ...]  # mesh axes the slots and the pools' pages split over (D shards; () for D = 1)
    num_page_shards: int  # D: shard d holds slots d*B/D .. and pages d*P/D .., each slot's pages on its shard
    max_pages: int  # page table entries per slot
    history_len: int  # K: recent hidden states per slot for the MTP drafts (0 without speculation)
    speculative_steps: int  # k
    hidden_size: int
    vocab_size: int
    dtype: Any  # of the slot state's hidden states and of `history`

    def _scalar(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct((), jnp.int32, sharding=self.replicated)

    def _history(self) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(self.empty_history().shape, self.dtype, sharding=self.replicated)

    def _pages(self, *batch: int) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(batch + (self.max_pages,), jnp.int32, sharding=self.replicated)

    def prefill_args(self, chunk: int) -> tuple:
        """Abstract arguments of `prefill` for a chunk of `chunk` tokens (and the k after it)."""
        i32 = self._scalar()
        tokens = jax.ShapeDtypeStruct((chunk + self.speculative_steps,), jnp.int32, sharding=self.replicated)
        return (self.params, self.cache, i32, self._pages(), tokens, i32, i32, self._history(), i32)

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

    def decode_args(self, bucket: int | None = None) -> tuple:
        """Abstract arguments of `decode` and `greedy_decode` for a round of `bucket` rows (default: every slot)."""
        bucket = bucket or self.state.tokens.shape[0]
        rows = jax.ShapeDtypeStruct((bucket,), jnp.int32, sharding=self.replicated)
        return (self.params, self.cache, self.state, rows, self._pages(bucket), self._scalar(), self._allowed(bucket))

    def allow_all(self, rows: int | None = None) -> np.ndarray:
        """`decode`'s `allowed` for a round of `rows` rows without constraints: int32 [rows, W] of all ones
        ([W]: `admit`'s, when rows is None)."""
        return full_bitmask(self.vocab_size, rows)

    def shard_of_slot(self, slot: int) -> int:
        """The page shard holding slot `slot`'s rings and pages."""
        return int(slot) // (self.state.tokens.shape[0] // self.num_page_shards)

    def shard_pages(self, shard: int) -> range:
        """The global ids of the pages shard `shard` owns."""
        per_shard = self.num_pages // self.num_page_shards
        return range(shard * per_shard, (shard + 1) * per_shard)

    def round_rows(self, running: Sequence[int]) -> np.ndarray:
        """`decode`'s `rows` for the running slots: D segments of one per-shard bucket (the smallest that holds
        the most running slots of a shard), segment d the running slots of shard d (in order), then other slots of
        that shard (distinct rows; the others are inactive, so the round leaves them as they are). D = 1: the
        running slots first, then fillers up to the smallest bucket."""
        d = self.num_page_shards
        per_shard = self.state.tokens.shape[0] // d
        segments = [[s for s in running if self.shard_of_slot(s) == shard] for shard in range(d)]
        bucket = next(b for b in self.decode_buckets if b >= d * max(map(len, segments))) // d
        taken = set(running)
        rows = []
        for shard, mine in enumerate(segments):
            fill = [s for s in range(shard * per_shard, (shard + 1) * per_shard) if s not in taken]
            rows += mine + fill[: bucket - len(mine)]
        return np.asarray(rows, np.int32)

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
    num_pages: int | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    num_snapshots: int = 0,
    cache_dtype: Any = None,
    kv_fp8: bool = False,
    max_stop_ids: int = MAX_STOP_IDS,
    max_top_logprobs: int = 0,
    speculative_steps: int = 0,
    extra_ring_slots: int = 0,
    max_logit_bias: int = MAX_LOGIT_BIAS,
    decode_compiler_options: dict[str, str] | None = None,
) -> EngineSteps:
    """Jit the engine's steps for `params` (arrays, or ShapeDtypeStructs with their shardings: AOT).

    The full layers' pools hold `num_pages` pages of `page_size` tokens (default: enough for every slot at
    `max_context`), FP8 with `kv_fp8`; `num_snapshots` ring snapshots back the prefix cache (0: none).
    With a mesh the cache is sharded by the rules of `mimo_jax.sharding` and the slot state replicated; where
    the slots split over (data, expert) (D shards) the pools' pages split the same way (`num_pages` rounded up
    to a multiple of D, as is `num_snapshots`; `page_shards`), so every chip holds P/D pages, and decode rounds run
    in D segments;
    without one everything lives on the parameters' device (the first device for abstract parameters
    without a sharding). `cache_dtype` (of rings, and of pools unless FP8) defaults to `state_dtype`.
    `decode_compiler_options`: XLA options of the decode rounds' compiles (`RunOptions.decode_compiler_options`).
    """
    k = speculative_steps
    state_dtype = jnp.dtype(state_dtype)
    cache_dtype = jnp.dtype(cache_dtype or state_dtype)
    history = history_length(k)
    pages_per_slot = max_pages(max_context, page_size, k)
    page_shards = batch_axes(mesh, max_batch)
    shards = axes_size(mesh, page_shards)
    num_pages = -(-(num_pages or max_batch * pages_per_slot) // shards) * shards
    num_snapshots = -(-num_snapshots // shards) * shards  # each page shard keeps its own

    def make_cache() -> KVCache:
        return engine_cache(cfg, max_batch, max_context, num_pages, page_size, cache_dtype, k, extra_ring_slots, kv_fp8)

    def make_state() -> SlotState:
        return empty_state(
            max_batch, cfg.hidden_size, cfg.vocab_size, max_stop_ids, state_dtype, history, max_logit_bias
        )

    cache_shapes = jax.eval_shape(make_cache)

    def make_snapshots() -> RingSnapshots:
        return empty_snapshots(cache_shapes, num_snapshots, history, cfg.hidden_size, state_dtype)

    snapshot_shapes = jax.eval_shape(make_snapshots)
    # one slot's rings and history as of its snapshot boundary (prefill's), laid out as the store's rows are
    row_shapes = jax.eval_shape(lambda: empty_snapshots(cache_shapes, 1, history, cfg.hidden_size, state_dtype))
    if mesh is not None:
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        cache_sharding = KVCache(
            pools=page_pool_shardings(cache_shapes.pools, mesh, page_shards),
            rings=cache_shardings(cache_shapes.rings, mesh),
        )
        snapshot_sharding = RingSnapshots(rings=cache_shardings(snapshot_shapes.rings, mesh), history=replicated)
        row_sharding = RingSnapshots(rings=cache_shardings(row_shapes.rings, mesh), history=replicated)
    else:  # committed to the parameters' device, like every output (one compiled step)
        sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
        device = next(iter(sharding.device_set)) if sharding is not None else jax.devices()[0]
        replicated = jax.sharding.SingleDeviceSharding(device)
        cache_sharding = jax.tree.map(lambda _: replicated, cache_shapes)
        snapshot_sharding = jax.tree.map(lambda _: replicated, snapshot_shapes)
        row_sharding = jax.tree.map(lambda _: replicated, row_shapes)
    state_shapes = jax.eval_shape(make_state)
    state_sharding = jax.tree.map(lambda _: replicated, state_shapes)
    request_shapes = jax.eval_shape(lambda: empty_request(cfg.vocab_size, max_stop_ids, history, max_logit_bias))

    mark_slack = page_size + max(k, 1)  # a snapshot boundary leaves max(k, 1) tokens after it: within a page + that

    def prefill(params, cache, slot, pages, tokens, start, length, history, mark):
        args = (cache, slot, pages, tokens, start, length, history, mark)
        return prefill_step(graphdef, params, *args, mark_slack=mark_slack, page_shards=page_shards)

    def prefill_logprobs(params, cache, slot, pages, tokens, start, length, history, mark, targets):
        args = (cache, slot, pages, tokens, start, length, history, mark, targets)
        options = dict(num_top=max_top_logprobs, mark_slack=mark_slack, page_shards=page_shards)
        return prefill_logprobs_step(graphdef, params, *args, **options)

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

    def decode(params, cache, state, rows, page_table, num_steps, allowed, greedy=False):
        return decode_rows(
            graphdef,
            params,
            cache,
            state,
            rows,
            page_table,
            num_steps,
            allowed,
            max_steps=max_round_tokens,
            max_context=max_context,
            num_top=max_top_logprobs,
            speculative_steps=k,
            greedy=greedy,
            page_shards=page_shards,
        )

    def greedy_decode(params, cache, state, rows, page_table, num_steps, allowed):
        return decode(params, cache, state, rows, page_table, num_steps, allowed, True)

    def constrained_decode(params, cache, state, rows, page_table, num_steps, allowed):
        return decode_rows(
            graphdef,
            params,
            cache,
            state,
            rows,
            page_table,
            num_steps,
            allowed,
            target_only=True,
            page_shards=page_shards,
            max_steps=max_round_tokens,
            max_context=max_context,
            num_top=max_top_logprobs,
        )

    # Outputs keep the layouts the cache and state are made with, so every call after the first hits the
    # same compiled step (equivalent but differently spelled shardings would recompile). Unused parameters
    # stay arguments (prefill reads no lm_head): a compiled step's memory counts every resident weight.
    def jit(fn: Callable, donate_argnums: tuple[int, ...], out_shardings: Any, options: Any = None) -> JitUnderMesh:
        jitted = jax.jit(
            fn, donate_argnums=donate_argnums, out_shardings=out_shardings, keep_unused=True, compiler_options=options
        )
        return JitUnderMesh(jitted, mesh)

    def jit_decode(fn: Callable) -> JitUnderMesh:  # a decode loop: cache and state donated, its compile options
        return jit(fn, (1, 2), (cache_sharding, state_sharding, None), decode_compiler_options)

    decode_fn = jit_decode(decode)
    return EngineSteps(
        prefill=jit(prefill, (1,), (cache_sharding, replicated, row_sharding)),
        # compiled (per chunk length) on the first request that asks for prompt logprobs
        prefill_logprobs=jit(prefill_logprobs, (1,), (cache_sharding, replicated, row_sharding, replicated)),
        admit=jit(admit, (1,), (state_sharding, None, None)),
        decode=decode_fn,
        # Speculation when every running request is greedy (the host knows): drafts and verify compare
        # argmaxes, no distributions. Without speculation the same function as decode.
        greedy_decode=jit_decode(greedy_decode) if k else decode_fn,
        # Constrained rows with speculation: the plain one-token loop (masks apply) over the target layers.
        constrained_decode=jit_decode(constrained_decode) if k else decode_fn,
        release=jit(release_step, (0,), state_sharding),
        save_snapshot=jit(save_snapshot_step, (0,), snapshot_sharding),
        restore_snapshot=jit(restore_snapshot_step, (0,), (cache_sharding, replicated)),
        params=abstract(params),
        cache=with_shardings(cache_shapes, cache_sharding),
        snapshots=with_shardings(snapshot_shapes, snapshot_sharding),
        snapshot_row=with_shardings(row_shapes, row_sharding),
        state=with_shardings(state_shapes, state_sharding),
        request=with_shardings(request_shapes, jax.tree.map(lambda _: replicated, request_shapes)),
        replicated=replicated,
        make_cache=make_cache,
        make_snapshots=make_snapshots,
        make_state=make_state,
        buckets=prefill_buckets(prefill_chunk),
        decode_buckets=tuple(shards * b for b in decode_buckets(max_batch // shards)),  # D per-shard segments
        num_pages=num_pages,
        num_snapshots=num_snapshots,
        page_size=page_size,
        page_shards=page_shards,
        num_page_shards=shards,
        max_pages=pages_per_slot,
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
