"""The engine's device state as pytrees: the per-slot decoding state, a request's admission, a decode round's
outputs, the KV cache, and their empty constructors (what `steps` compiles against and `host` allocates).

`SlotState` holds everything per slot in one pytree (last token, its position, the last hidden
state before the final norm, counts for penalties, the recent hidden states the MTP drafts read).
The KV cache (`KVCache`) holds one page pool per full-attention layer, shared by every slot through the host's
page tables, and per-slot rings for the SWA layers and (with speculation) the k MTP layers.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mimo_jax.config import MiMoConfig
from mimo_jax.engine.sampling import SamplingParams
from mimo_jax.model.cache import LayerKV, PagePool, empty_layer_kv, empty_page_pools

RUNNING, STOPPED, LENGTH = 0, 1, 2  # SlotState.finish_reason codes
FINISH_REASONS = {STOPPED: "stop", LENGTH: "length"}

MAX_STOP_IDS = 8  # stop tokens a slot holds unless the engine is built with another max_stop_ids
DEFAULT_PAGE_SIZE = 64  # tokens per page of the full layers' KV pools (a prefix-cache hit reuses whole pages)
MAX_LOGIT_BIAS = 64  # logit_bias entries a slot holds unless the engine is built with another max_logit_bias


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
    # speculation (K = k+1, else 0): target hidden states at positions-K .. positions-1, the token after each
    recent_hidden: jax.Array  # [B, K, H]
    recent_tokens: jax.Array  # [B, K] int32, the last one is `tokens`


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SlotRequest:
    """What the admit step needs to start one slot (no batch axis)."""

    prompt_len: jax.Array  # int32
    max_new_tokens: jax.Array  # int32
    stop_ids: jax.Array  # [S] int32
    sampling: SamplingParams  # fields of shape [1] ([1, L] for the logit_bias pairs)
    rng: jax.Array  # [2] uint32
    prompt_mask: jax.Array  # [V] bool
    recent_tokens: jax.Array  # [K] int32, the prompt's last K tokens (speculation; 0 = before the prompt)
    # a request resumed after preemption: its prompt ends with the `generated` tokens it had emitted, whose
    # counts [V] the penalties and min_tokens see (0 and zeros for a new request)
    generated: jax.Array  # int32
    counts: jax.Array  # [V] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RoundOutput:
    """Tokens of one decode round: column i holds step i for the slots active at that step."""

    tokens: jax.Array  # [B, N] int32, -1 where nothing was emitted
    logprobs: jax.Array  # [B, N] float32
    top_ids: jax.Array  # [B, N, K] int32
    top_logprobs: jax.Array  # [B, N, K] float32
    count: jax.Array  # [B] int32, tokens emitted per slot this round
    accepted: jax.Array  # [B, S] int32, drafts accepted by each iteration's verify (-1: slot not running)
    drafts: jax.Array  # [B, S, k] int32, each iteration's draft tokens (k = 0 without speculation)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class IterationOutput:
    """What one decode iteration emits: up to M tokens per slot (M = 1, or k+1 with speculation)."""

    tokens: jax.Array  # [B, M] int32
    logprobs: jax.Array  # [B, M] float32
    top_ids: jax.Array  # [B, M, N] int32
    top_logprobs: jax.Array  # [B, M, N] float32
    count: jax.Array  # [B] int32, how many of the M were emitted (0 for slots not running)
    accepted: jax.Array  # [B] int32, drafts the verify accepted (-1 for slots not running)
    drafts: jax.Array  # [B, k] int32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class PromptScores:
    """What the prompt-scoring prefill returns for one chunk of C positions: at position i, the model's
    distribution over the token after it (the prompt's next token, `targets[i]`)."""

    logprobs: jax.Array  # [C] float32, log-probability of targets[i] (meaningless where targets[i] < 0)
    ranks: jax.Array  # [C] int32, 1 + tokens strictly more likely than targets[i]
    top_ids: jax.Array  # [C, N] int32, the model's N most likely tokens
    top_logprobs: jax.Array  # [C, N] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """The engine's KV cache: the full-attention layers' page pools, shared by every slot (a slot's pages are
    listed in the host's page table), and per-slot rings [max_batch, ...]: one per SWA layer, then one per MTP
    layer speculation uses."""

    pools: list[PagePool]
    rings: list[LayerKV]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class RingSnapshots:
    """Copies of one slot's rings taken at a page boundary of a prompt (the prefix cache's SWA state: full-layer
    pages alone cannot resume a prefix, since every SWA layer's keys depend on a window of the layer below),
    and the prompt's last hidden states there (prefill's `history`)."""

    rings: list[LayerKV]  # as KVCache.rings, with a leading [num_snapshots] axis
    history: jax.Array  # [num_snapshots, max(K, 1), H]


def engine_cache(
    cfg: MiMoConfig,
    batch: int,
    max_context: int,
    num_pages: int,
    page_size: int,
    dtype: Any,
    speculative_steps: int = 0,
    extra_ring_slots: int = 0,
    fp8: bool = False,
) -> KVCache:
    """An empty engine cache: `num_pages` pages of `page_size` tokens per full layer (FP8 with `fp8`), and the
    rings of `batch` slots (SWA layers, then the k MTP layers speculation uses)."""
    k = speculative_steps
    extra = max(extra_ring_slots, k)
    rings = [empty_layer_kv(s, batch, max_context, dtype, extra) for s in cfg.layers if s.sliding]
    rings += [empty_layer_kv(cfg.mtp_layer(), batch, max_context, dtype) for _ in range(k)]
    return KVCache(pools=empty_page_pools(cfg, num_pages, page_size, dtype, fp8), rings=rings)


def empty_snapshots(cache: KVCache, count: int, history: int, hidden_size: int, dtype: Any) -> RingSnapshots:
    """`count` empty snapshots of the rings of `cache` (shapes only are read from it)."""
    rings = [
        LayerKV(
            k=jnp.zeros((count,) + r.k.shape[1:], r.k.dtype),
            v=jnp.zeros((count,) + r.v.shape[1:], r.v.dtype),
            pos=jnp.full((count,) + r.pos.shape[1:], -1, jnp.int32),
            ring=r.ring,
        )
        for r in cache.rings
    ]
    return RingSnapshots(rings=rings, history=jnp.zeros((count, max(history, 1), hidden_size), dtype))


def max_pages(max_context: int, page_size: int, speculative_steps: int = 0) -> int:
    """Page table entries per slot: every position a sequence of `max_context` tokens may write (a verify writes
    up to k + 1 positions past the last accepted one)."""
    return -(-(max_context + speculative_steps + 1) // page_size)


def empty_state(
    batch: int,
    hidden_size: int,
    vocab: int,
    max_stop_ids: int,
    dtype: jnp.dtype,
    history: int = 0,
    max_logit_bias: int = MAX_LOGIT_BIAS,
) -> SlotState:
    """Every slot free: no request, nothing generated; `history` (K) recent hidden states per slot."""
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
        sampling=SamplingParams.make(batch, max_logit_bias=max_logit_bias),
        rng=jnp.zeros((batch, 2), jnp.uint32),
        counts=jnp.zeros((batch, vocab), jnp.int32),
        prompt_mask=jnp.zeros((batch, vocab), bool),
        recent_hidden=jnp.zeros((batch, history, hidden_size), dtype),
        recent_tokens=jnp.zeros((batch, history), jnp.int32),
    )


def empty_request(vocab: int, max_stop_ids: int, history: int = 0, max_logit_bias: int = MAX_LOGIT_BIAS) -> SlotRequest:
    """A request of the shapes the admit step takes (the host fills in a real one per request)."""
    return SlotRequest(
        prompt_len=jnp.int32(0),
        max_new_tokens=jnp.int32(0),
        stop_ids=jnp.full((max_stop_ids,), -1, jnp.int32),
        sampling=SamplingParams.make(1, max_logit_bias=max_logit_bias),
        rng=jnp.zeros((2,), jnp.uint32),
        prompt_mask=jnp.zeros((vocab,), bool),
        recent_tokens=jnp.zeros((history,), jnp.int32),
        generated=jnp.int32(0),
        counts=jnp.zeros((vocab,), jnp.int32),
    )


def _finish_reason(tokens, positions, num_generated, max_new_tokens, stop_ids, max_context: int) -> jax.Array:
    """RUNNING, or why a slot that just emitted `tokens` at `positions` stops (arrays [B] or [B, M])."""
    stop_ids = stop_ids.reshape(stop_ids.shape[:1] + (1,) * (tokens.ndim - 1) + stop_ids.shape[1:])
    stopped = jnp.any(tokens[..., None] == stop_ids, axis=-1)
    # The next step would feed the token at `positions`; the sequence may not outgrow the cache.
    out_of_room = (num_generated >= max_new_tokens) | (positions >= max_context - 1)
    return jnp.where(stopped, STOPPED, jnp.where(out_of_room, LENGTH, RUNNING)).astype(jnp.int32)


def prefill_buckets(prefill_chunk: int, smallest: int = 16) -> tuple[int, ...]:
    """Chunk lengths that get compiled: powers of two from `smallest`, and `prefill_chunk` itself."""
    sizes = {prefill_chunk}
    size = smallest
    while size < prefill_chunk:
        sizes.add(size)
        size *= 2
    return tuple(sorted(sizes))
