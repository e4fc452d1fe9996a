"""THE sampling function: one pure, jittable step from logits to tokens, with per-request parameters.

Every array has a leading batch axis [B]; each row has its own temperature, filters, penalties
and random key, so one batch mixes greedy and sampled requests. Definitions (the tests check them
against a numpy reference):

- penalties (on the raw logits): `presence` subtracts once for each token generated so far,
  `frequency` subtracts per occurrence; `repetition` (HF / vLLM rule) divides positive and
  multiplies negative logits of every token seen in the prompt or the output.
- temperature 0 = greedy (argmax of the penalized logits); else logits / temperature, then
- top-k keeps the k largest (ties at the k-th value kept); 0 = off,
- top-p keeps the smallest prefix of the descending order whose probability reaches top_p
  (probabilities of the top-k-filtered distribution); 1 = off,
- min-p keeps tokens with probability >= min_p * (largest probability); 0 = off.
- `logprobs` of the chosen token and the top-N are those of the model (log-softmax of the raw
  logits), as vLLM and the OpenAI API report them; `processed_logprobs` gives the distribution
  actually sampled from (what speculative rejection sampling needs).
- Random keys: a request's key folded with the position of the token being sampled, so the
  draw does not depend on which slot or batch the request is in (speculative decoding folds in
  a purpose too: draft, acceptance coin, correction; see `step_keys`).
- Draws are Gumbel-max over log-probabilities (`draw`), the same for a first token, a plain
  decode step, an MTP draft and a speculative correction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SamplingParams:
    """Per-row sampling parameters, each an array [B]."""

    temperature: jax.Array  # float32; 0 = greedy
    top_k: jax.Array  # int32; 0 = off
    top_p: jax.Array  # float32; 1 = off
    min_p: jax.Array  # float32; 0 = off
    presence_penalty: jax.Array  # float32
    frequency_penalty: jax.Array  # float32
    repetition_penalty: jax.Array  # float32; 1 = off

    @classmethod
    def make(cls, batch: int, **values: Any) -> SamplingParams:
        """Broadcast scalars or length-B sequences to arrays [B] (defaults: greedy, no filters)."""
        defaults = dict(
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
        )
        unknown = set(values) - set(defaults)
        if unknown:
            raise TypeError(f"unknown sampling parameters {sorted(unknown)}")
        out = {}
        for name, default in defaults.items():
            dtype = np.int32 if name == "top_k" else np.float32
            out[name] = jnp.asarray(np.broadcast_to(np.asarray(values.get(name, default), dtype), (batch,)))
        return cls(**out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, model log-probability of the chosen token
    top_ids: jax.Array  # [B, N] int32, the model's N most likely tokens
    top_logprobs: jax.Array  # [B, N] float32


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
    """One request's sampling settings as a caller gives them (host side, validated)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None  # None: the engine picks one
    max_new_tokens: int = 16
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None  # None: no logprobs; N >= 0: chosen-token logprob and the top-N
    constraint: dict | None = None  # JSON-able grammar spec (mimo_jax.grammar); None: unconstrained

    def __post_init__(self) -> None:
        checks = (
            ("temperature", self.temperature >= 0, ">= 0"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int | np.integer) and self.top_k >= 0, "an integer >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int | np.integer) and self.max_new_tokens >= 1, ">= 1"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "None or >= 0"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {want}")

    def params(self) -> dict[str, float | int]:
        """The SamplingParams fields of this request."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingParams)}


def request_key(seed: int) -> np.ndarray:
    """Raw key data (uint32 [2]) of a request's random stream."""
    return np.asarray(jax.random.key_data(jax.random.key(seed)), np.uint32)


def step_keys(key_data: jax.Array, positions: jax.Array, purpose: int = 0) -> jax.Array:
    """Typed keys [B] for sampling the token at `positions` [B] of each request.

    `purpose` > 0 gives an independent stream for the same position (speculative decoding's
    draft, acceptance coin and correction draws); 0 is the plain sampling stream.
    """
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data), positions)
    if purpose:
        keys = jax.vmap(lambda k: jax.random.fold_in(k, purpose))(keys)
    return keys


def draw(scores: jax.Array, keys: jax.Array) -> jax.Array:
    """One token per row [B] from unnormalized log-probabilities [B, V] (-inf = never), Gumbel-max."""
    gumbel = jax.vmap(lambda k: jax.random.gumbel(k, scores.shape[-1:], jnp.float32))(keys)
    return jnp.argmax(scores + gumbel, axis=-1).astype(jnp.int32)


def apply_penalties(
    logits: jax.Array, params: SamplingParams, counts: jax.Array | None, prompt_mask: jax.Array | None
) -> jax.Array:
    """Presence/frequency penalties from generated-token `counts` [B, V]; repetition over prompt and output."""
    if counts is None and prompt_mask is None:
        return logits
    seen = jnp.zeros(logits.shape, bool)
    if counts is not None:
        c = counts.astype(jnp.float32)
        logits = logits - params.frequency_penalty[:, None] * c
        logits = logits - params.presence_penalty[:, None] * (c > 0)
        seen = counts > 0
    if prompt_mask is not None:
        seen = seen | prompt_mask
    rep = params.repetition_penalty[:, None]
    penalized = jnp.where(logits > 0, logits / rep, logits * rep)
    return jnp.where(seen, penalized, logits)


def _filter(scaled: jax.Array, params: SamplingParams, sort: bool) -> jax.Array:
    """Tempered logits with tokens outside top-k / top-p / min-p set to -inf."""
    vocab = scaled.shape[-1]
    row_max = scaled.max(axis=-1, keepdims=True)
    # min-p compares probabilities, i.e. logits against max + log(min_p).
    keep = scaled >= row_max + jnp.log(params.min_p)[:, None]
    if sort:
        desc = -jnp.sort(-scaled, axis=-1)
        k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, vocab), vocab)
        kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
        keep &= scaled >= kth
        in_top_k = jnp.arange(vocab)[None, :] < k[:, None]
        probs = jax.nn.softmax(jnp.where(in_top_k, desc, -jnp.inf), axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        n_keep = jnp.maximum(jnp.sum(in_top_k & (mass_before < params.top_p[:, None]), axis=-1), 1)
        pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
        keep &= (scaled >= pth) | (params.top_p[:, None] >= 1.0)
    return jnp.where(keep, scaled, -jnp.inf)


def _filtered_logits(penalized: jax.Array, params: SamplingParams) -> jax.Array:
    safe_t = jnp.where(params.temperature > 0, params.temperature, 1.0)
    scaled = penalized / safe_t[:, None]
    # Sorting the vocabulary is the costly part; skip it when no row asks for top-k/top-p.
    needs_sort = jnp.any((params.top_k > 0) | (params.top_p < 1.0))
    return jax.lax.cond(needs_sort, lambda s: _filter(s, params, True), lambda s: _filter(s, params, False), scaled)


def processed_logprobs(
    logits: jax.Array,
    params: SamplingParams,
    counts: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
) -> jax.Array:
    """Log-probabilities [B, V] of the distribution `sample` draws from (-inf = excluded).

    Greedy rows (temperature 0) are one-hot at the argmax of the penalized logits.
    """
    penalized = apply_penalties(logits.astype(jnp.float32), params, counts, prompt_mask)
    sampled = jax.nn.log_softmax(_filtered_logits(penalized, params), axis=-1)
    greedy = jnp.argmax(penalized, axis=-1)
    one_hot = jnp.where(jnp.arange(logits.shape[-1])[None, :] == greedy[:, None], 0.0, -jnp.inf)
    return jnp.where((params.temperature > 0)[:, None], sampled, one_hot)


def sample(
    logits: jax.Array,
    params: SamplingParams,
    keys: jax.Array,
    counts: jax.Array | None = None,
    prompt_mask: jax.Array | None = None,
    num_top: int = 0,
) -> SampleOutput:
    """logits [B, V], params [B], typed keys [B], generated-token counts [B, V], prompt tokens [B, V] bool.

    Returns the chosen tokens, their model logprobs and the model's top-`num_top` (a static int).
    """
    logits = logits.astype(jnp.float32)
    penalized = apply_penalties(logits, params, counts, prompt_mask)
    greedy_tokens = jnp.argmax(penalized, axis=-1).astype(jnp.int32)

    is_greedy = params.temperature <= 0
    drawn = jax.lax.cond(
        jnp.all(is_greedy), lambda p: greedy_tokens, lambda p: draw(_filtered_logits(p, params), keys), penalized
    )
    tokens = jnp.where(is_greedy, greedy_tokens, drawn)
    model_logprobs = jax.nn.log_softmax(logits, axis=-1)
    chosen = jnp.take_along_axis(model_logprobs, tokens[:, None], axis=-1)[:, 0]
    if num_top:
        top_logprobs, top_ids = jax.lax.top_k(model_logprobs, num_top)
    else:  # no top-k over the vocabulary when nobody asked for it
        top_logprobs, top_ids = jnp.zeros((logits.shape[0], 0), jnp.float32), jnp.zeros((logits.shape[0], 0), jnp.int32)
    return SampleOutput(tokens, chosen, top_ids.astype(jnp.int32), top_logprobs)
