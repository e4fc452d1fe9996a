"""MTP speculative decoding: draft with the model's own MTP layers, verify in one target forward, accept.

The whole round lives here (`decode_speculative`, one iteration of the engine's decode loop with
`speculative_steps=k`), with its parts (`draft_chain`, `verify`, `accept_drafts`) and the prompt's
writes into the MTP layers' caches (`mtp_prefill`).

Wiring (SGLang's default multi-layer EAGLE worker for MiMoV2, vLLM and sglang-jax): MTP layer j
at position i reads the target's hidden state after the final norm, norm(h_i) (`model.mtp_input`;
h_i itself for a checkpoint whose config says `mtp_hidden_before_norm`), and the embedding of token
t_{i+j+1}, and predicts t_{i+j+2}. Every layer has its own KV cache of such entries,
keyed by i (SWA rings, like the target's sliding layers).

One round for a sequence whose target states are known up to position P (`h_P`, the hidden
state that predicted the last emitted token b = t_{P+1}, which the target has not read yet):

- draft (`draft_chain`): step j = 0..k-1 runs MTP layer j with its query at position P and input
  token d_j (d_0 = b), giving d_{j+1} (top-1 when greedy, else drawn from the processed draft
  distribution q_j). Layer j's entries at positions P-j+1..P read the tokens t_{P+2..P+j+1}, i.e.
  this chain's own drafts, and entries written by earlier rounds there may hold drafts that were
  rejected since. So each step recomputes the window of positions [P-k, P] (real tokens where
  they are known, this chain's drafts after) from the last k+1 target hidden states. That window
  is all that can be stale or missing: the previous round (at P' = P-a-1 after a accepted drafts)
  wrote layer j up to P' and read drafts only at positions past P'-j, of which those past P-1-j read
  a rejected one; so [P-max(a, j), P] needs writing, inside [P-k, P] as a <= k and j < k.
- verify: the target reads [b, d_1..d_k] at positions P+1..P+k+1; row m predicts t_{P+m+2}.
- accept (`accept_drafts`): standard speculative rejection sampling. Draft d_{m+1} is accepted
  with probability min(1, p_m(d)/q_m(d)); at the first rejection the token comes from
  norm(max(0, p_m - q_m)), after k acceptances the bonus from p_k. The emitted tokens are then
  distributed exactly as the target's (p_m: `sampling.processed_logprobs`, penalties and min_tokens
  counting the drafts before m, logit_bias alike). Greedy rows have one-hot p and q, so this is:
  accept while the draft equals the target's argmax, then the target's argmax. Constrained
  decoding's token masks are not applied here: the engine refuses constrained requests with speculation.

Rejected positions leave no trace: the target's full layers write slot = position, the next
verify starts at the first rejected position and rewrites it before reading (masks come from
positions); SWA rings mask slots at or past a chunk's first position and hold k extra slots
(`extra_ring_slots`), so a rejected write never evicts a position still in the window; the MTP
rings are rewritten over the window above before they are read.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from mimo_jax.engine.sampling import SamplingParams, apply_penalties, draw, processed_logprobs, step_keys
from mimo_jax.engine.state import RUNNING, IterationOutput, SlotState, _finish_reason
from mimo_jax.model.cache import LayerKV
from mimo_jax.model.mimo import MiMoModel

# Purposes folded into the per-position keys (sampling.step_keys); 0 is plain sampling.
DRAFT_KEY, COIN_KEY, CORRECTION_KEY = 1, 2, 3


def history_length(num_drafts: int) -> int:
    """Target hidden states (and the tokens after them) a slot keeps for the draft windows: k+1 (0 for k = 0)."""
    return num_drafts + 1 if num_drafts else 0


def mtp_prefill(
    model: MiMoModel, mtp_cache: list[LayerKV], hidden: jax.Array, tokens: jax.Array, positions: jax.Array
) -> list[LayerKV]:
    """Write a prompt chunk into the MTP layers' caches.

    hidden [B, C, H]: the target's hidden states of the chunk; positions [B, C] (-1 = padding);
    tokens [B, C + k]: the chunk's tokens followed by the k prompt tokens after it, -1 where
    unknown (past the prompt). Layer j writes position i only where t_{i+j+1} is known.
    """
    c = hidden.shape[1]
    mtp_hidden = model.mtp_input(hidden)  # once for all k layers
    out = []
    for j, kv in enumerate(mtp_cache):
        nxt = tokens[:, j + 1 : j + 1 + c]
        pos = jnp.where(nxt >= 0, positions, -1)
        _, kv = model.mtp[j](model.embed(jnp.maximum(nxt, 0)), mtp_hidden, pos, kv)
        out.append(kv)
    return out


def draft_chain(
    model: MiMoModel,
    mtp_cache: list[LayerKV],
    recent_hidden: jax.Array,
    recent_tokens: jax.Array,
    last: jax.Array,
    sampling: SamplingParams,
    counts: jax.Array,
    prompt_mask: jax.Array,
    stop_ids: jax.Array,
    rng: jax.Array,
    greedy: bool,
) -> tuple[jax.Array, jax.Array | None, list[LayerKV]]:
    """k = len(mtp_cache) draft tokens per row from the MTP layers, one layer per step.

    recent_hidden [B, K, H]: target hidden states at positions last-K+1 .. last (K >= k+1: `history_length`);
    recent_tokens [B, K]: the token after each of them (t_{last-K+2} .. t_{last+1});
    last [B]: P, the position of the newest target hidden state (-1 = inactive row);
    greedy (static): every row is greedy, so drafts are argmaxes and no distribution is formed.
    Returns drafts [B, k] (tokens for positions P+2 .. P+k+1), the processed draft
    log-probabilities they were drawn from [B, k, V] (None when greedy) and the MTP caches.
    """
    k = len(mtp_cache)
    hist = recent_hidden.shape[1]
    batch = jnp.arange(last.shape[0])
    drafts = jnp.zeros((last.shape[0], 0), jnp.int32)
    mtp_hidden = model.mtp_input(recent_hidden)  # once for all k steps
    draft_lp, out_cache = [], []
    for j, kv in enumerate(mtp_cache):
        width = k + 1  # positions P-k .. P (see the module docstring)
        offsets = jnp.arange(width, dtype=jnp.int32) - (width - 1)
        pos = last[:, None] + offsets
        pos = jnp.where((last[:, None] >= 0) & (pos >= 0), pos, -1)
        # position i reads t_{i+j+1}: real tokens up to t_{P+1}, then this chain's drafts
        tokens = jnp.concatenate([recent_tokens, drafts], axis=1)[:, hist + j - width :]
        layer = model.mtp[j]
        h, kv = layer(model.embed(tokens), mtp_hidden[:, hist - width :], pos, kv)
        logits = model.draft_logits(h[:, -1], layer.final_layernorm)  # the draft vocabulary, if the model has one
        if greedy:
            penalized = apply_penalties(logits, sampling, counts, prompt_mask, stop_ids)
            token = jnp.argmax(penalized, axis=-1).astype(jnp.int32)
        else:
            lp = processed_logprobs(logits, sampling, counts, prompt_mask, stop_ids)  # one-hot for greedy rows
            token = draw(lp, step_keys(rng, last + j + 2, DRAFT_KEY))
            draft_lp.append(lp)
        drafts = jnp.concatenate([drafts, token[:, None]], axis=1)
        counts = counts.at[batch, token].add(1)
        out_cache.append(kv)
    return drafts, None if greedy else jnp.stack(draft_lp, axis=1), out_cache


def _row_counts(counts: jax.Array, drafts: jax.Array) -> jax.Array:
    """[B, k+1, V]: generated-token counts before each verify row (row m also counts d_1..d_m)."""
    one_hot = jax.nn.one_hot(drafts, counts.shape[-1], dtype=counts.dtype)
    before = jnp.concatenate([jnp.zeros_like(one_hot[:, :1]), jnp.cumsum(one_hot, axis=1)], axis=1)
    return counts[:, None, :] + before


def verify(
    logits: jax.Array,
    drafts: jax.Array,
    draft_lp: jax.Array | None,
    sampling: SamplingParams,
    counts: jax.Array,
    prompt_mask: jax.Array,
    stop_ids: jax.Array,
    rng: jax.Array,
    last: jax.Array,
) -> tuple[jax.Array, jax.Array]:
    """Accept drafts against the target's logits [B, k+1, V] of the verify rows -> (accepted [B], tokens [B, k+1])
    as `accept_drafts`; the target's distribution of row m counts d_1..d_m as generated (penalties, min_tokens).
    Without draft distributions (`draft_lp` None: an all-greedy batch) the drafts are compared with the
    target's argmax."""
    batch, rows, vocab = logits.shape
    flat_counts = _row_counts(counts, drafts).reshape(batch * rows, vocab)
    flat_params = jax.tree.map(lambda a: jnp.repeat(a, rows, axis=0), sampling)
    flat_mask = jnp.repeat(prompt_mask, rows, axis=0)
    flat_stops = jnp.repeat(stop_ids, rows, axis=0)
    flat_logits = logits.reshape(batch * rows, vocab)
    if draft_lp is None:
        penalized = apply_penalties(flat_logits, flat_params, flat_counts, flat_mask, flat_stops)
        target = jnp.argmax(penalized, axis=-1).astype(jnp.int32).reshape(batch, rows)
        agree = (drafts == target[:, :-1]).astype(jnp.int32)
        return jnp.sum(jnp.cumprod(agree, axis=1), axis=1), target
    target_lp = processed_logprobs(flat_logits, flat_params, flat_counts, flat_mask, flat_stops)
    return accept_drafts(target_lp.reshape(batch, rows, vocab), draft_lp, drafts, rng, last)


def accept_drafts(
    target_lp: jax.Array, draft_lp: jax.Array, drafts: jax.Array, rng: jax.Array, last: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative rejection sampling over one verify.

    target_lp [B, k+1, V], draft_lp [B, k, V] (log-probabilities the drafts were drawn from),
    drafts [B, k] at positions last+2 .. last+k+1. Returns (accepted [B] in 0..k, tokens [B, k+1]):
    tokens[:accepted] are the accepted drafts and tokens[accepted] the corrected or bonus token.
    """
    batch, k = drafts.shape
    p = jnp.exp(jnp.take_along_axis(target_lp[:, :k], drafts[..., None], axis=-1)[..., 0])
    q = jnp.exp(jnp.take_along_axis(draft_lp, drafts[..., None], axis=-1)[..., 0])
    uniform = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))
    coins = jnp.stack([uniform(step_keys(rng, last + 2 + m, COIN_KEY)) for m in range(k)], axis=1)
    ok = coins * q < p  # accept with probability min(1, p/q)
    accepted = jnp.sum(jnp.cumprod(ok.astype(jnp.int32), axis=1), axis=1)

    # Row `accepted`: the residual norm(max(0, p - q)), or p itself after k acceptances.
    p_row = jnp.take_along_axis(target_lp, accepted[:, None, None], axis=1)[:, 0]
    padded_q = jnp.concatenate([draft_lp, jnp.full_like(draft_lp[:, :1], -jnp.inf)], axis=1)
    q_row = jnp.take_along_axis(padded_q, accepted[:, None, None], axis=1)[:, 0]
    residual = jnp.maximum(jnp.exp(p_row) - jnp.exp(q_row), 0.0)
    # p == q up to rounding leaves no residual mass: fall back to p (then acceptance was ~certain anyway)
    scores = jnp.where(jnp.sum(residual, axis=-1, keepdims=True) > 0, jnp.log(residual), p_row)
    correction = draw(scores, step_keys(rng, last + 2 + accepted, CORRECTION_KEY))

    idx = jnp.arange(k + 1, dtype=jnp.int32)[None, :]
    padded_drafts = jnp.concatenate([drafts, jnp.zeros((batch, 1), jnp.int32)], axis=1)
    tokens = jnp.where(idx < accepted[:, None], padded_drafts, correction[:, None])
    return accepted, tokens


def decode_speculative(
    model: MiMoModel, cache: list[LayerKV], state: SlotState, *, max_context: int, num_top: int, greedy: bool
) -> tuple[list[LayerKV], SlotState, IterationOutput]:
    """One MTP draft-verify-accept round for every active slot: `draft_chain`, the target's verify forward,
    `verify`, then the emitted run cut at the first stop token or limit, and the slot state moved on.

    `greedy` (static): every running slot is greedy, so no distribution is formed or sampled from.
    Returns the cache (target layers, then MTP layers), the state and what the round emitted.
    """
    num_layers = len(model.layers)
    target_cache, mtp_cache = cache[:num_layers], cache[num_layers:]
    k = len(mtp_cache)
    active = state.active
    batch = jnp.arange(active.shape[0])
    last = jnp.where(active, state.positions - 1, -1)  # P: the newest target hidden state
    drafts, draft_lp, mtp_cache = draft_chain(
        model,
        mtp_cache,
        state.recent_hidden,
        state.recent_tokens,
        last,
        state.sampling,
        state.counts,
        state.prompt_mask,
        state.stop_ids,
        state.rng,
        greedy,
    )

    # verify: the target reads the last token and the drafts at positions P+1 .. P+k+1
    steps = jnp.arange(k + 1, dtype=jnp.int32)
    inputs = jnp.concatenate([state.tokens[:, None], drafts], axis=1)
    positions = jnp.where(active[:, None], state.positions[:, None] + steps, -1)
    hidden, target_cache = model.hidden_states(inputs, positions, target_cache)
    logits = model.logits(hidden)  # [B, k+1, V]
    accepted, candidates = verify(
        logits, drafts, draft_lp, state.sampling, state.counts, state.prompt_mask, state.stop_ids, state.rng, last
    )

    # emit the accepted run and the corrected/bonus token, cut at the first stop token or limit
    reasons = _finish_reason(
        candidates,
        state.positions[:, None] + 1 + steps,
        state.num_generated[:, None] + 1 + steps,
        state.max_new_tokens[:, None],
        state.stop_ids,
        max_context,
    )
    first_stop = jnp.min(jnp.where(reasons != RUNNING, steps, k + 1), axis=1)
    count = jnp.minimum(accepted, first_stop) + 1
    newest = count - 1
    pick = lambda x: jnp.take_along_axis(x, newest.reshape((-1,) + (1,) * (x.ndim - 1)), axis=1)[:, 0]
    reason = pick(reasons)
    emitted = (steps[None, :] < count[:, None]) & active[:, None]
    # the recent window moves by `count`: append this verify's hidden states and tokens, keep the last K
    hist = state.recent_hidden.shape[1]
    shift = lambda old, new: jax.vmap(lambda row, c: jax.lax.dynamic_slice_in_dim(row, c, hist, axis=0))(
        jnp.concatenate([old, new.astype(old.dtype)], axis=1), count
    )
    keep = lambda new, old: jnp.where(active.reshape(active.shape + (1,) * (new.ndim - 1)), new, old)
    state = dataclasses.replace(
        state,
        tokens=keep(pick(candidates), state.tokens),
        positions=keep(state.positions + count, state.positions),
        hidden=keep(pick(hidden).astype(state.hidden.dtype), state.hidden),
        active=active & (reason == RUNNING),
        finish_reason=keep(reason, state.finish_reason),
        num_generated=keep(state.num_generated + count, state.num_generated),
        counts=state.counts.at[batch[:, None], candidates].add(emitted.astype(jnp.int32)),
        recent_hidden=keep(shift(state.recent_hidden, hidden), state.recent_hidden),
        recent_tokens=keep(shift(state.recent_tokens, candidates), state.recent_tokens),
    )

    model_lp = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(model_lp, candidates[..., None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(model_lp, num_top)
    out = IterationOutput(
        tokens=candidates,
        logprobs=chosen,
        top_ids=top_ids.astype(jnp.int32),
        top_logprobs=top_lp,
        count=jnp.where(active, count, 0),
        accepted=jnp.where(active, accepted, -1),
        drafts=drafts,
    )
    return target_cache + mtp_cache, state, out
