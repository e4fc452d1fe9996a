"""THE sampling function: one pure, jittable step from logits to tokens, with per-request parameters.

Every array has a leading batch axis [B]; each row has its own temperature, filters, penalties
and random key, so one batch mixes greedy and sampled requests. Definitions (the tests check them
against a numpy reference):

- before everything else, in this order: a constrained request's `allowed` bitmask (-inf for every
  token whose bit is 0: bit t % 32 of word t // 32), `logit_bias` (OpenAI: added to the logits of
  its token ids) and `min_tokens` (the row's stop tokens at -inf while fewer than min_tokens tokens
  were generated, unless nothing else is left). The speculative drafts and verify go through the
  same `apply_penalties`, so all of it stays lossless there.
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
from collections.abc import Mapping, Sequence
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
    min_tokens: jax.Array  # int32: stop tokens banned while fewer were generated; 0 = off
    bias_ids: jax.Array  # [B, L] int32, logit_bias token ids (-1 = unused pair)
    bias_values: jax.Array  # [B, L] float32, added to the logits of bias_ids

    @classmethod
    def make(
        cls,
        batch: int,
        logit_bias: Mapping[int, float] | Sequence[Mapping[int, float] | None] | None = None,
        max_logit_bias: int | None = None,
        **values: Any,
    ) -> SamplingParams:
        """Broadcast scalars or length-B sequences to arrays [B] (defaults: greedy, no filters, no bias).

        `logit_bias`: one {token id: value} for every row, or one per row (None = none), held in
        `max_logit_bias` pairs per row (default: as many as the longest needs).
        """
        defaults = dict(
            temperature=0.0,
            top_k=0,
            top_p=1.0,
            min_p=0.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            repetition_penalty=1.0,
            min_tokens=0,
        )
        unknown = set(values) - set(defaults)
        if unknown:
            raise TypeError(f"unknown sampling parameters {sorted(unknown)}")
        out = {}
        for name, default in defaults.items():
            dtype = np.int32 if name in ("top_k", "min_tokens") else np.float32
            out[name] = jnp.asarray(np.broadcast_to(np.asarray(values.get(name, default), dtype), (batch,)))
        rows = [logit_bias] * batch if logit_bias is None or isinstance(logit_bias, Mapping) else list(logit_bias)
        if len(rows) != batch:
            raise ValueError(f"{len(rows)} logit_bias rows for a batch of {batch}")
        rows = [dict(r or {}) for r in rows]
        width = max((len(r) for r in rows), default=0) if max_logit_bias is None else max_logit_bias
        ids = np.full((batch, width), -1, np.int32)
        bias = np.zeros((batch, width), np.float32)
        for i, r in enumerate(rows):
            if len(r) > width:
                raise ValueError(f"{len(r)} logit_bias entries, more than max_logit_bias={width}")
            ids[i, : len(r)] = list(r)
            bias[i, : len(r)] = list(r.values())
        return cls(**out, bias_ids=jnp.asarray(ids), bias_values=jnp.asarray(bias))


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class SampleOutput:
    tokens: jax.Array  # [B] int32
    logprobs: jax.Array  # [B] float32, model log-probability of the chosen token
    top_ids: jax.Array  # [B, N] int32, the model's N most likely tokens
    top_logprobs: jax.Array  # [B, N] float32


MAX_TEMPERATURE = 100.0  # above it sampling is uniform to float32 precision; 1e308 would overflow to inf


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
    seed: int | None = None  # None: the engine picks one; else any signed 64-bit integer (`check_seed`)
    max_new_tokens: int = 16  # 0: prefill only (e.g. to score the prompt), then finish with "length"
    stop_token_ids: Sequence[int] = ()
    logprobs: int | None = None  # None: no logprobs; N >= 0: chosen-token logprob and the top-N
    prompt_logprobs: int | None = None  # None: off; N >= 0: each prompt token's logprob (and rank) and the top-N
    min_tokens: int = 0  # stop_token_ids are banned until this many tokens were generated
    logit_bias: dict[int, float] | None = None  # {token id: value in [-100, 100]} added to the logits
    constraint: dict | None = None  # JSON-able spec for the engine's constraint_factory (constraints.py)

    def __post_init__(self) -> None:
        if self.logit_bias is not None:  # JSON keys are strings: {"50256": -100} is token 50256
            try:
                bias = {_token_id(k): float(v) for k, v in dict(self.logit_bias).items()}
            except (TypeError, ValueError):
                raise ValueError(f"logit_bias={self.logit_bias!r}: expected {{token id: value}}") from None
            bad = {k: v for k, v in bias.items() if not -100 <= v <= 100}
            if bad:
                raise ValueError(f"logit_bias={bad!r}: values must lie in [-100, 100]")
            object.__setattr__(self, "logit_bias", bias)
        if self.constraint is not None and not isinstance(self.constraint, dict):
            raise ValueError(f"constraint={self.constraint!r}: expected a JSON-able dict or None")
        checks = (
            ("temperature", 0 <= self.temperature <= MAX_TEMPERATURE, f"in [0, {MAX_TEMPERATURE:g}]"),
            ("top_p", 0 < self.top_p <= 1, "in (0, 1]"),
            ("top_k", isinstance(self.top_k, int | np.integer) and self.top_k >= 0, "an integer >= 0"),
            ("min_p", 0 <= self.min_p <= 1, "in [0, 1]"),
            ("presence_penalty", -2 <= self.presence_penalty <= 2, "in [-2, 2]"),
            ("frequency_penalty", -2 <= self.frequency_penalty <= 2, "in [-2, 2]"),
            ("repetition_penalty", self.repetition_penalty > 0, "> 0"),
            ("max_new_tokens", isinstance(self.max_new_tokens, int | np.integer) and self.max_new_tokens >= 0, ">= 0"),
            ("logprobs", self.logprobs is None or self.logprobs >= 0, "None or >= 0"),
            (
                "min_tokens",
                isinstance(self.min_tokens, int | np.integer) and 0 <= self.min_tokens <= self.max_new_tokens,
                f"an integer in [0, max_new_tokens={self.max_new_tokens}]",
            ),
            ("prompt_logprobs", self.prompt_logprobs is None or self.prompt_logprobs >= 0, "None or >= 0"),
        )
        for name, ok, want in checks:
            if not ok:
                raise ValueError(f"{name}={getattr(self, name)!r}: expected {want}")
        if self.seed is not None:
            check_seed(self.seed)

    def params(self) -> dict[str, Any]:
        """This request's `SamplingParams.make` arguments (scalars and its logit_bias)."""
        names = [f.name for f in dataclasses.fields(SamplingParams) if f.name not in ("bias_ids", "bias_values")]
        return {**{name: getattr(self, name) for name in names}, "logit_bias": self.logit_bias}


def _token_id(key: Any) -> int:
    """A logit_bias key as a token id: an int, or its decimal string (JSON object keys)."""
    if isinstance(key, str) and key.strip().lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, bool) or not isinstance(key, int | np.integer) or key < 0:
        raise ValueError(f"logit_bias key {key!r}: expected a token id >= 0")
    return int(key)


SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit integer, as vLLM (and OpenAI's API) take a seed


def check_seed(seed: Any) -> None:
    """The one rule for a seed, wherever one comes in (server, batch, `generate`): a signed 64-bit integer,
    all of whose bits choose the stream (`request_key`). ValueError with the same message everywhere."""
    if isinstance(seed, bool) or not isinstance(seed, int | np.integer) or not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"seed must be an integer in [-2**63, 2**63) (a signed 64-bit integer), got {seed}")


def derived_seed(seed: int, index: int) -> int:
    """Seed of stream `index` of a request seeded `seed` (prompt i of `generate`, choice i of a server request):
    seed * 1_000_003 + index, wrapped to 64 bits. The factor is odd, so for each index distinct seeds stay distinct."""
    check_seed(seed)
    bits = (int(seed) * 1_000_003 + index) % 2**64
    return bits - 2**64 if bits > SEED_MAX else bits


def request_key(seed: int) -> np.ndarray:
    """Raw threefry key data (uint32 [2]) of a request's random stream: the seed's 64 bits (two's complement),
    high word first. For seeds in [0, 2**32) this is the key `jax.random.key(seed)` makes."""
    check_seed(seed)
    bits = int(seed) % 2**64
    return np.array([bits >> 32, bits & 0xFFFFFFFF], np.uint32)


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


def unpack_bitmask(bitmask: jax.Array, vocab: int) -> jax.Array:
    """bool [B, vocab] from int32 bitmasks [B, ceil(vocab / 32)]: bit t % 32 of word t // 32 = token t."""
    t = jnp.arange(vocab, dtype=jnp.int32)
    return (jnp.right_shift(bitmask[:, t // 32], t % 32) & 1).astype(bool)


def restrict(
    logits: jax.Array,
    params: SamplingParams,
    counts: jax.Array | None,
    stop_ids: jax.Array | None,
    allowed: jax.Array | None,
) -> jax.Array:
    """What comes before the penalties: the `allowed` bitmask [B, W] (-inf where a bit is 0), logit_bias, and
    the min_tokens ban of `stop_ids` [B, S] (-1 = unused) while `counts` [B, V] sum to fewer than min_tokens."""
    rows, vocab = logits.shape
    batch = jnp.arange(rows)[:, None]
    if allowed is not None:
        logits = jnp.where(unpack_bitmask(allowed, vocab), logits, -jnp.inf)
    if params.bias_ids.shape[-1]:
        ids = jnp.where(params.bias_ids >= 0, params.bias_ids, vocab)  # unused pairs land out of range: dropped
        logits = logits.at[batch, ids].add(params.bias_values, mode="drop")
    if stop_ids is not None and stop_ids.shape[-1]:
        generated = jnp.zeros((rows,), jnp.int32) if counts is None else counts.sum(axis=-1)
        ids = jnp.where(stop_ids >= 0, stop_ids, vocab)
        is_stop = jnp.zeros(logits.shape, bool).at[batch, ids].set(True, mode="drop")
        ban = is_stop & (generated < params.min_tokens)[:, None]
        # a mask that leaves only stop tokens wins over min_tokens: never a row with nothing to sample
        ban &= jnp.any((logits > -jnp.inf) & ~ban, axis=-1, keepdims=True)
        logits = jnp.where(ban, -jnp.inf, logits)
    return logits


def apply_penalties(
    logits: jax.Array,
    params: SamplingParams,
    counts: jax.Array | None,
    prompt_mask: jax.Array | None,
    stop_ids: jax.Array | None = None,
    allowed: jax.Array | None = None,
) -> jax.Array:
    """The logits a row's temperature and filters start from (float32 [B, V]).

    First `restrict`: the `allowed` bitmask [B, W] int32 (None = all), logit_bias, and min_tokens over
    `stop_ids` [B, S] (None = no ban) counting the generated tokens in `counts`; then presence/frequency
    penalties from generated-token `counts` [B, V] and repetition over prompt and output.
    """
    logits = restrict(logits.astype(jnp.float32), params, counts, stop_ids, allowed)
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
    stop_ids: jax.Array | None = None,
    allowed: jax.Array | None = None,
) -> jax.Array:
    """Log-probabilities [B, V] of the distribution `sample` draws from (-inf = excluded).

    Greedy rows (temperature 0) are one-hot at the argmax of the penalized logits.
    """
    penalized = apply_penalties(logits, params, counts, prompt_mask, stop_ids, allowed)
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
    stop_ids: jax.Array | None = None,
    allowed: jax.Array | None = None,
) -> SampleOutput:
    """logits [B, V], params [B], typed keys [B], generated-token counts [B, V], prompt tokens [B, V] bool,
    stop tokens [B, S] (min_tokens), allowed-token bitmasks [B, W] int32 (constrained decoding).

    Returns the chosen tokens, their model logprobs and the model's top-`num_top` (a static int): the raw
    model's, whatever the bias, bans and mask did to the sampled distribution.
    """
    logits = logits.astype(jnp.float32)
    penalized = apply_penalties(logits, params, counts, prompt_mask, stop_ids, allowed)
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
