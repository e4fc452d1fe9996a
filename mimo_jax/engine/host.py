"""The engine's host side: a fixed set of batch slots over one KV cache, a prefill queue, and `Engine.step`,
which launches the device steps (`mimo_jax.engine.steps`) and collects their tokens.

Continuous batching by design: requests take free slots between decode rounds and leave when they
finish or are cancelled; a round runs over the running slots only (a bucket of rows: one compile each), and
the full layers' KV lives in pages (`KVPages`: admission by free pages, preemption by recompute, the prefix
cache with ring snapshots). On a mesh whose slots split over (data, expert) the pages split the same way
(`ShardedKVPages`): each slot's pages come from its shard, admission, preemption and the prefix cache work per
shard, and a new prompt takes a slot on the shard holding its longest cached prefix (else the one with most free
pages).

Constrained requests (`SamplingOptions.constraint`, built by the engine's `constraint_factory`, see
`mimo_jax.engine.constraints`): while any runs, each step splits its round in two launches: one iteration over
the constrained rows (each mask filled from its constraint before it, the token accepted after, read
synchronously also with `overlap` on) together with the other rows (every token allowed), then the round's
other iterations over the other rows alone, continuing on the device; otherwise the decode step gets a cached
all-ones mask. With speculation the constrained rows' launch is the plain one-token loop over them alone (no
drafts, so the masks hold) and the others keep their whole speculative round.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
from collections import deque
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from mimo_jax.engine.constraints import ConstraintFactory, TokenConstraint, allows_any, bitmask_words
from mimo_jax.engine.pages import PrefixHit, ShardedKVPages
from mimo_jax.engine.sampling import SamplingOptions, SamplingParams, request_key
from mimo_jax.engine.state import DEFAULT_PAGE_SIZE, FINISH_REASONS, MAX_LOGIT_BIAS, MAX_STOP_IDS, RUNNING, SlotRequest
from mimo_jax.engine.steps import build_steps, shardings
from mimo_jax.lm import LanguageModel
from mimo_jax.model.cache import kv_plan, page_bytes
from mimo_jax.model.mimo import MiMoModel
from mimo_jax.sharding import axes_size, batch_axes

KV_CACHE_DTYPES = (None, "auto", "fp8_e4m3")  # of the full layers' pages: the model's dtype (None, "auto") or FP8


def kv_cache_pages(
    lm: LanguageModel,
    memory_gb: float | None,
    memory_fraction: float,
    max_batch: int,
    context: int,
    page_size: int = DEFAULT_PAGE_SIZE,
    kv_cache_dtype: str | None = None,
) -> int:
    """Pages for the full layers' KV pools (`Engine(num_pages=...)`), from a byte budget for all devices together:
    `memory_gb` when given; else, on a device that reports its memory, what `memory_fraction` of it leaves after
    what is in use (the weights) and the slots' rings and their snapshots; else (CPU) room for `max_batch`
    sequences of `context` tokens, and with the pool split over D page shards (the slots' data x expert shards),
    at least one whole sequence per shard (a sequence's pages lie on its slot's shard)."""
    cfg = lm.config
    mesh = lm.mesh
    page_shards = axes_size(mesh, batch_axes(mesh, max_batch))
    dtype_bytes = jnp.dtype(lm.dtype).itemsize
    page = page_bytes(cfg, page_size, dtype_bytes, fp8=kv_cache_dtype == "fp8_e4m3")
    if memory_gb is not None:
        return max(1, int(memory_gb * 1e9) // page)
    try:
        stats = jax.local_devices()[0].memory_stats() or {}
    except Exception:  # not every backend reports memory
        stats = {}
    if "bytes_limit" not in stats:
        pages = max(1, -(-max_batch * context // page_size))
        return pages if page_shards == 1 else max(pages, page_shards * -(-(context + 1) // page_size))
    free = memory_fraction * stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    shards = mesh.shape.get("tensor", 1) if mesh is not None else 1  # pools split their kv heads over it
    shards *= page_shards  # and their pages over the slots' (data, expert) shards
    rings = 3 * max_batch * kv_plan(cfg, context, dtype_bytes).swa_bytes  # the slots' rings, twice as many snapshots
    return max(1, (int(free * shards) - rings) // page, -(-cfg.window_keys // page_size))


class EngineFull(RuntimeError):
    """No free slot: wait for a request to finish (see `Engine.free_slots`)."""


@dataclasses.dataclass
class StepOutput:
    """New tokens of one request from one `Engine.step`."""

    request_id: Any
    token_ids: list[int]
    logprobs: list[float] | None  # chosen-token model logprobs, when the request asked for logprobs
    top_logprobs: list[list[tuple[int, float]]] | None  # per token: the model's top-N (id, logprob)
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "cancelled" when finished
    # speculation, per target forward (verify) that produced these tokens: drafts accepted, drafts proposed
    accepted: list[int] = dataclasses.field(default_factory=list)
    drafts: list[list[int]] = dataclasses.field(default_factory=list)
    # requests with `prompt_logprobs`, in their first output: per prompt token, its model logprob given the
    # tokens before it, its rank in that distribution, and the top-N (id, logprob); None for the first token
    prompt_logprobs: list[float | None] | None = None
    prompt_ranks: list[int | None] | None = None
    prompt_top_logprobs: list[list[tuple[int, float]] | None] | None = None
    cached_tokens: int | None = None  # in a request's first output: prompt tokens the prefix cache served


@dataclasses.dataclass
class _Request:
    request_id: Any
    prompt: np.ndarray  # what is prefilled: the prompt, and after a preemption the tokens generated before it
    options: SamplingOptions
    seed: int
    order: int  # admission order: preemption takes the newest first
    prompt_len: int  # the request's own prompt (`prompt` may be longer after a preemption)
    generated: list[int] = dataclasses.field(default_factory=list)  # tokens emitted so far (collected)
    prefilled: int = 0  # prompt tokens already in the cache
    started: bool = False  # the prompt's prefix was looked up and its first pages taken
    pages: list[int] = dataclasses.field(default_factory=list)  # the page table: position p in pages[p // size]
    cached: int = 0  # prompt tokens served by the prefix cache
    snapshot_at: int | None = None  # the page boundary where the prefix cache takes a ring snapshot
    history: jax.Array | None = None  # the prompt's last hidden states so far (prefill_fn's `history`)
    decoding: bool = False
    constraint: TokenConstraint | None = None  # built from options.constraint by the engine's factory
    scores: list = dataclasses.field(default_factory=list)  # prompt_logprobs: (chunk length, PromptScores) per chunk

    @property
    def resumed(self) -> bool:
        """Preempted before: its prompt ends with generated tokens (nothing about the prompt is reported again)."""
        return self.prompt.size > self.prompt_len


@dataclasses.dataclass
class _Launched:
    """One step's work on the device, not yet read: admissions' first tokens (slot, first, reason, prompt
    scores; first and reason None for a prefill-only request), the decode round, and the slots' requests when
    it was launched (to drop what was cancelled or replaced before it is read)."""

    admitted: list
    round_out: Any
    finish_reason: jax.Array
    slots: list
    rows: Sequence[int] = ()  # the slot of each row of round_out
    speculated: bool = True  # round_out came from the speculative loop (when the engine speculates)


@dataclasses.dataclass
class SpeculationStats:
    """Engine-wide MTP counters since the engine was built (what a server exports as metrics)."""

    draft_steps: int  # k: drafts proposed per target forward
    target_forwards: int = 0  # verify forwards (one per running slot per round iteration)
    draft_tokens: int = 0  # drafts proposed (k per forward)
    accepted_tokens: int = 0  # drafts accepted
    emitted_tokens: int = 0  # tokens the verifies emitted (accepted drafts + corrected/bonus, after stops)
    accepted_at: list[int] = dataclasses.field(default_factory=list)  # [k]: forwards that accepted draft j

    @property
    def mean_accept_length(self) -> float:
        """Tokens per target forward, bonus included: (accepted drafts + forwards) / forwards (0 before any)."""
        return (self.accepted_tokens + self.target_forwards) / self.target_forwards if self.target_forwards else 0.0

    @property
    def acceptance_rates(self) -> list[float]:
        """Per draft position j: the fraction of target forwards that accepted draft j (0 before any)."""
        f = self.target_forwards
        return [a / f if f else 0.0 for a in self.accepted_at]

    def add(self, accepted: np.ndarray, emitted: int) -> None:
        """Count one round's verifies: `accepted` holds each running forward's accepted-draft count."""
        accepted = accepted[accepted >= 0]
        self.target_forwards += int(accepted.size)
        self.draft_tokens += int(accepted.size) * self.draft_steps
        self.accepted_tokens += int(accepted.sum())
        self.emitted_tokens += emitted
        for j in range(self.draft_steps):
            self.accepted_at[j] += int((accepted > j).sum())


class Engine:
    """Fixed `max_batch` slots over a KV cache of `max_context` positions per slot.

    `add` puts a request into a free slot (its prompt is prefilled during the following `step`s),
    `step` runs pending prefill chunks then one decode round, `cancel` frees a slot.

    `max_stop_ids`, `max_logit_bias`: stop tokens and logit_bias entries a request may have (slots hold
    that many). `constraint_factory` builds a request's `TokenConstraint` from its
    `SamplingOptions.constraint` spec (constrained decoding).
    """

    overlap = False  # see `step`: the server turns it on, offline generation leaves it off
    _pending: _Launched | None = None  # with overlap: the last step's work, read by the next step

    def __init__(
        self,
        model: LanguageModel | MiMoModel,
        *,
        max_batch: int = 8,
        max_context: int = 4096,
        prefill_chunk: int = 512,
        max_round_tokens: int = 32,
        max_stop_ids: int = MAX_STOP_IDS,
        max_top_logprobs: int = 0,
        extra_ring_slots: int = 0,
        cache_dtype: Any = None,
        speculative_steps: int = 0,
        max_logit_bias: int = MAX_LOGIT_BIAS,
        constraint_factory: ConstraintFactory | None = None,
        num_pages: int | None = None,
        page_size: int = DEFAULT_PAGE_SIZE,
        prefix_cache: bool = False,
        num_snapshots: int | None = None,
        kv_cache_dtype: str | None = None,
    ):
        lm = model if isinstance(model, LanguageModel) else LanguageModel(model)
        if max_batch < 1 or max_context < 2 or prefill_chunk < 1 or max_round_tokens < 1:
            raise ValueError(
                f"max_batch={max_batch}, max_context={max_context}, prefill_chunk={prefill_chunk}, "
                f"max_round_tokens={max_round_tokens}: expected max_context >= 2 and the others >= 1"
            )
        k = speculative_steps
        num_mtp = len(lm.model.mtp)
        if not 0 <= k <= num_mtp:
            raise ValueError(
                f"speculative_steps={k}: expected 0 (off) to the model's {num_mtp} MTP layers"
                + ("" if num_mtp else " (load the checkpoint with load_model(..., mtp=True))")
            )
        cfg = lm.config
        if kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={kv_cache_dtype!r}: expected one of {KV_CACHE_DTYPES}")
        has_rings = any(s.sliding for s in cfg.layers) or k > 0
        if num_snapshots is None:
            num_snapshots = 2 * max_batch if prefix_cache and has_rings else 0  # each running conversation: the
            # snapshot it resumed from and the one it leaves
        steps = build_steps(
            lm.graphdef,
            lm.params,
            cfg,
            mesh=lm.mesh,
            max_batch=max_batch,
            max_context=max_context,
            prefill_chunk=prefill_chunk,
            max_round_tokens=max_round_tokens,
            state_dtype=lm.dtype,
            cache_dtype=cache_dtype,
            max_stop_ids=max_stop_ids,
            max_top_logprobs=max_top_logprobs,
            speculative_steps=k,
            extra_ring_slots=extra_ring_slots,
            max_logit_bias=max_logit_bias,
            num_pages=num_pages,
            page_size=page_size,
            num_snapshots=num_snapshots,
            kv_fp8=kv_cache_dtype == "fp8_e4m3",
            decode_compiler_options=lm.options.decode_compiler_options,
        )
        self.steps = steps
        # host bookkeeping of the pools' pages and the prefix cache (per page shard); the page table row of each slot
        self.pages = ShardedKVPages(
            steps.num_pages,
            steps.page_size,
            steps.num_snapshots,
            steps.num_page_shards,
            prefix_cache=prefix_cache,
            needs_snapshot=has_rings,
        )
        self.page_size = steps.page_size
        self.page_table = np.full((max_batch, steps.max_pages), -1, np.int32)
        self._lookahead: dict[int, tuple[int, ...]] = {}  # snapshot -> the prompt tokens its MTP rings read past it
        self.num_preemptions = 0
        self._admissions = itertools.count()
        self.speculative_steps = k
        # the k MTP layers' stats (None without speculation); see SpeculationStats
        self.speculation = SpeculationStats(k, accepted_at=[0] * k) if k else None
        self.lm = lm
        self.config = cfg
        self.max_batch = max_batch
        self.max_context = max_context
        self.prefill_chunk = prefill_chunk
        self.buckets = steps.buckets
        self.max_round_tokens = max_round_tokens
        self.max_stop_ids = max_stop_ids
        self.max_logit_bias = max_logit_bias
        self.max_top_logprobs = max_top_logprobs
        self.constraint_factory = constraint_factory
        self.params = lm.params
        self.history = steps.history_len
        self._replicated = steps.replicated
        # made on the devices, laid out as the steps return them (so their first call compiles the only time)
        self.cache = jax.jit(steps.make_cache, out_shardings=shardings(steps.cache))()
        self.snapshots = jax.jit(steps.make_snapshots, out_shardings=shardings(steps.snapshots))()
        self.state = jax.jit(steps.make_state, out_shardings=shardings(steps.state))()
        self.prefill_fn = steps.prefill
        self.prefill_logprobs_fn = steps.prefill_logprobs  # requests with prompt_logprobs
        self.admit_fn = steps.admit
        self.decode_fn = steps.decode
        self.greedy_decode_fn = steps.greedy_decode
        self.constrained_decode_fn = steps.constrained_decode  # constrained rows: one token, no speculation
        self.release_fn = steps.release
        self.save_snapshot_fn = steps.save_snapshot
        self.restore_snapshot_fn = steps.restore_snapshot
        # the steps' token masks when nothing is constrained, on the devices once per size (no transfer per step)
        self._allow_all: dict[int, jax.Array] = {}  # decode's [b, W] per round size b
        self._allow_all_row = jax.device_put(steps.allow_all(), self._replicated)  # admit's [W]
        self._ended: list[StepOutput] = []  # requests ended on the host (a mask allowing nothing), to report

        self._slots: list[_Request | None] = [None] * max_batch
        self._prefill_queue: deque[int] = deque()
        self._by_id: dict[Any, int] = {}
        self._seeds = itertools.count(np.random.SeedSequence().entropy % (2**31))

    # ---------------------------------------------------------------- the steps' arguments
    def abstract_prefill_args(self, chunk: int) -> tuple:
        """Abstract arguments of `prefill_fn` for a chunk of `chunk` tokens: `prefill_fn.lower(*args)`."""
        return self.steps.prefill_args(chunk)

    def abstract_admit_args(self) -> tuple:
        return self.steps.admit_args()

    def abstract_decode_args(self, bucket: int | None = None) -> tuple:
        return self.steps.decode_args(bucket)

    def allow_all(self, rows: int) -> jax.Array:
        """`decode_fn`'s `allowed` for a round of `rows` rows without constraints (on the devices, made once)."""
        if rows not in self._allow_all:
            self._allow_all[rows] = jax.device_put(self.steps.allow_all(rows), self._replicated)
        return self._allow_all[rows]

    def empty_history(self) -> np.ndarray:
        """prefill_fn's `history` before a prompt's first chunk: the last max(K, 1) hidden states."""
        return self.steps.empty_history()

    def prefill_tokens(self, prompt: np.ndarray, start: int, length: int, bucket: int) -> np.ndarray:
        """prefill_fn's `tokens` for prompt[start : start+length] padded to `bucket` (and the k tokens after)."""
        return self.steps.prefill_tokens(prompt, start, length, bucket)

    # ---------------------------------------------------------------- requests
    @property
    def free_slots(self) -> int:
        return sum(r is None for r in self._slots)

    @property
    def num_requests(self) -> int:
        return self.max_batch - self.free_slots

    def has_work(self) -> bool:
        """Requests in slots, or (with overlap) a step's work not yet read."""
        return self.num_requests > 0 or self._pending is not None

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
        need = self.pages.pages_for(self._last_position(prompt.size, sampling) + 1)
        if need > self.pages.pages_per_shard:
            pool = f"the whole pool of {self.pages.num_pages}"
            if self.pages.num_shards > 1:
                pool = f"a page shard's {self.pages.pages_per_shard} (a sequence's pages lie on its slot's shard)"
            raise ValueError(
                f"request {request_id!r}: {prompt.size} prompt tokens and up to {sampling.max_new_tokens} new ones "
                f"need {need} KV pages of {self.page_size} tokens, more than {pool}"
            )
        if len(sampling.stop_token_ids) > self.max_stop_ids:
            raise ValueError(
                f"request {request_id!r}: {len(sampling.stop_token_ids)} stop tokens, "
                f"more than the engine's max_stop_ids={self.max_stop_ids}"
            )
        for name in ("logprobs", "prompt_logprobs"):
            if (getattr(sampling, name) or 0) > self.max_top_logprobs:
                raise ValueError(
                    f"request {request_id!r}: {name}={getattr(sampling, name)} exceeds "
                    f"the engine's max_top_logprobs={self.max_top_logprobs}"
                )
        bias = sampling.logit_bias or {}
        if len(bias) > self.max_logit_bias:
            raise ValueError(
                f"request {request_id!r}: {len(bias)} logit_bias entries, "
                f"more than the engine's max_logit_bias={self.max_logit_bias}"
            )
        if bias and max(bias) >= self.config.vocab_size:
            raise ValueError(
                f"request {request_id!r}: logit_bias token {max(bias)} is not in the vocabulary "
                f"[0, {self.config.vocab_size})"
            )
        if sampling.constraint is not None and self.constraint_factory is None:
            raise ValueError(
                f"request {request_id!r}: a constraint was given, but the engine has no constraint_factory"
            )
        return prompt.astype(np.int32)

    def add(self, request_id: Any, prompt_ids: Sequence[int], sampling: SamplingOptions | None = None) -> int:
        """Reserve a slot for a request; its prompt is prefilled by the next `step`s. Returns the slot."""
        sampling = sampling or SamplingOptions()
        if request_id in self._by_id:
            raise ValueError(f"request id {request_id!r} is already running")
        prompt = self.check_request(request_id, prompt_ids, sampling)
        slot = self._pick_slot(prompt)
        constraint = None
        if sampling.constraint is not None:
            try:
                constraint = self.constraint_factory(sampling.constraint)
            except Exception as e:
                raise ValueError(f"request {request_id!r}: its constraint could not be built: {e}") from e
        seed = next(self._seeds) if sampling.seed is None else sampling.seed
        order = next(self._admissions)
        self._slots[slot] = _Request(request_id, prompt, sampling, seed, order, prompt.size, constraint=constraint)
        self._by_id[request_id] = slot
        self._prefill_queue.append(slot)
        return slot

    def _pick_slot(self, prompt: np.ndarray) -> int:
        """A free slot for a new prompt: the first one with one page shard; else one on the shard holding the
        longest prefix-cache hit of `prompt` (a hit reuses only its own shard's pages), failing one the shard with
        the most available pages, then the most free slots, then the lowest (deterministic on every host)."""
        free = [slot for slot, req in enumerate(self._slots) if req is None]
        if not free:
            raise EngineFull(f"all {self.max_batch} slots are busy")
        if self.pages.num_shards == 1:
            return free[0]
        free_on = collections.Counter(self._shard(slot) for slot in free)
        caching = self.pages.prefix_cache
        min_tail = max(self.speculative_steps, 1)

        def preference(shard: int) -> tuple:
            hit = self.pages.lookup(prompt, min_tail, shard) if caching and prompt.size > min_tail else 0
            return hit, self.pages.available(shard), free_on[shard], -shard

        best = max(free_on, key=preference)
        return next(slot for slot in free if self._shard(slot) == best)

    def _shard(self, slot: int) -> int:
        """The page shard of slot `slot` (its rings and pages live there)."""
        return self.steps.shard_of_slot(slot)

    def cancel(self, request_id: Any) -> bool:
        """Stop a request and free its slot; False when it is unknown (or already finished)."""
        slot = self._by_id.get(request_id)
        if slot is None:
            return False
        self._free_slot(slot)
        return True

    def _free_slot(self, slot: int, stop: bool = True) -> _Request:
        """Take a request out of its slot (cancelled or finished): its device slot stops (unless it stopped by
        itself: `stop` False), its pages go back."""
        req = self._slots[slot]
        if req.decoding and stop:
            self.state = self.release_fn(self.state, jnp.int32(slot))
        if slot in self._prefill_queue:
            self._prefill_queue.remove(slot)
        self._release_pages(slot, req)
        del self._by_id[req.request_id]
        self._slots[slot] = None
        return req

    def _release_pages(self, slot: int, req: _Request) -> None:
        self.pages.release(req.pages)
        req.pages = []
        self.page_table[slot] = -1

    def _last_position(self, prompt_len: int, options: SamplingOptions) -> int:
        """The last position a request may write: its prompt and every new token it may make (within the context),
        and the k drafts a verify writes past the last accepted one."""
        return min(prompt_len + options.max_new_tokens, self.max_context) + self.speculative_steps

    def slot_request(
        self, prompt: np.ndarray, options: SamplingOptions, seed: int, prompt_len: int | None = None
    ) -> SlotRequest:
        """`admit_fn`'s request for a prompt whose prefill is done; `prompt[prompt_len:]` (a request resumed after
        a preemption) are the tokens it had generated."""
        prompt_len = prompt.size if prompt_len is None else prompt_len
        stop = np.full((self.max_stop_ids,), -1, np.int32)
        stop[: len(options.stop_token_ids)] = options.stop_token_ids
        mask = np.zeros((self.config.vocab_size,), bool)
        mask[prompt[:prompt_len]] = True
        counts = np.bincount(prompt[prompt_len:], minlength=self.config.vocab_size).astype(np.int32)
        recent = np.zeros((self.history,), np.int32)
        tail = prompt[-self.history :] if self.history else prompt[:0]
        recent[self.history - tail.size :] = tail
        return SlotRequest(
            prompt_len=jnp.int32(prompt.size),
            max_new_tokens=jnp.int32(options.max_new_tokens),
            stop_ids=jnp.asarray(stop),
            sampling=SamplingParams.make(1, max_logit_bias=self.max_logit_bias, **options.params()),
            rng=jnp.asarray(request_key(seed)),
            prompt_mask=jnp.asarray(mask),
            recent_tokens=jnp.asarray(recent),
            generated=jnp.int32(prompt.size - prompt_len),
            counts=jnp.asarray(counts),
        )

    # ---------------------------------------------------------------- running
    def _prefill_some(self, token_budget: int) -> list[tuple[int, Any, Any, Any]]:
        """Run queued prefill chunks (at least one) up to `token_budget` tokens; admit finished prompts.

        A prompt's first chunk looks up the prefix cache (`_start_prompt`). Each chunk takes the pages it
        writes; when the pool cannot give them (even after evicting unreferenced cached pages), prefilling
        waits for pages that running requests release (admission by free pages, first come first served, per page
        shard: a prompt waiting on a full shard does not hold up those of other shards).
        Requests with `prompt_logprobs` run the scoring prefill; those with max_new_tokens=0 are not admitted
        (prefill only: `_collect` finishes them with "length"); a constrained request whose constraint allows
        no first token ends instead (`_ended`)."""
        admitted = []
        spent = 0
        blocked: set[int] = set()  # page shards whose next prompt waits for pages
        while spent == 0 or spent < token_budget:
            slot = next((s for s in self._prefill_queue if self._shard(s) not in blocked), None)
            if slot is None:
                break
            req = self._slots[slot]
            if not req.started:
                self._start_prompt(slot, req)
            start = req.prefilled
            end = min(start + self.prefill_chunk, req.prompt.size)
            crosses = req.snapshot_at is not None and start < req.snapshot_at <= end
            mark = req.snapshot_at if crosses else -1  # the chunk also returns the slot as of its snapshot boundary
            if not self._grow(slot, req, end):
                shard = [r for r in self._requests_on(self._shard(slot)) if r is not req]
                waiting = [r for r in shard if r.pages and not r.decoding]
                if not waiting or any(r.decoding for r in shard):
                    blocked.add(self._shard(slot))  # running requests of its shard will release pages
                    continue
                for other in waiting:  # queued behind this one: they start again later
                    self._preempt(self._by_id[other.request_id])
                continue
            length = end - start
            bucket = next(b for b in self.buckets if b >= length)
            tokens = self.prefill_tokens(req.prompt, start, length, bucket)
            if req.history is None:
                req.history = jax.device_put(self.empty_history(), self._replicated)
            pages = jnp.asarray(self.page_table[slot])
            args = (self.params, self.cache, jnp.int32(slot), pages, jnp.asarray(tokens))
            args += (jnp.int32(start), jnp.int32(length), req.history, jnp.int32(mark))
            if req.options.prompt_logprobs is None or req.resumed:
                self.cache, req.history, at_mark = self.prefill_fn(*args)
            else:
                targets = self.steps.prompt_targets(req.prompt, start, length, bucket)
                self.cache, req.history, at_mark, scores = self.prefill_logprobs_fn(*args, jnp.asarray(targets))
                req.scores.append((length, scores))
            req.prefilled += length
            spent += length
            if crosses:
                self._save_snapshot(slot, req, at_mark)
            if req.prefilled == req.prompt.size:
                self._prefill_queue.remove(slot)
                scores, req.scores = (req.scores if req.options.prompt_logprobs is not None else None), []
                if req.resumed:
                    scores = None  # reported with the request's first output, before its preemption
                first = reason = None
                if req.options.max_new_tokens > 0:
                    allowed = self._allow_all_row
                    if req.constraint is not None:
                        row = self._constraint_mask(req)
                        if row is None:
                            self._ended.append(self._end(slot, "stop"))
                            continue
                        allowed = jax.device_put(row, self._replicated)
                    request = self.slot_request(req.prompt, req.options, req.seed, req.prompt_len)
                    self.state, first, reason = self.admit_fn(
                        self.params, self.state, jnp.int32(slot), req.history, request, allowed
                    )
                    req.decoding = True
                req.history = None
                admitted.append((slot, first, reason, scores))
        return admitted

    def _start_prompt(self, slot: int, req: _Request) -> None:
        """Before a prompt's first chunk: reuse the longest cached prefix (its pages, and the ring snapshot at its
        end), and plan the snapshot this prompt leaves for later ones.

        A snapshot is taken at the last page boundary that leaves max(k, 1) prompt tokens after it: the first
        token is sampled from the last prefilled position, and the MTP layers' ring entries before the
        boundary read the k prompt tokens after it (a later prompt must agree on those to reuse them)."""
        req.started = True
        k = self.speculative_steps
        scoring = req.options.prompt_logprobs is not None and not req.resumed  # every position must be scored
        if self.pages.prefix_cache and not scoring:
            hit = self.pages.match(req.prompt, min_tail=max(k, 1), shard=self._shard(slot))
            if hit.snapshot is not None:
                after = tuple(int(t) for t in req.prompt[hit.num_tokens : hit.num_tokens + k])
                if self._lookahead.get(hit.snapshot) != after:  # the snapshot's MTP entries read other tokens
                    self.pages.undo_match(hit)
                    hit = PrefixHit()
            if hit.num_tokens:
                req.pages = list(hit.pages)
                self.page_table[slot, : len(req.pages)] = req.pages
                req.prefilled = req.cached = hit.num_tokens
                if hit.snapshot is not None:
                    self.cache, req.history = self.restore_snapshot_fn(
                        self.cache, self.snapshots, jnp.int32(hit.snapshot), jnp.int32(slot)
                    )
                    self.pages.unpin_snapshot(hit.snapshot)
        boundary = (req.prompt.size - max(k, 1)) // self.page_size * self.page_size
        req.snapshot_at = boundary if self.pages.prefix_cache and boundary > req.prefilled else None

    def _save_snapshot(self, slot: int, req: _Request, at_mark: Any) -> None:
        """After the chunk that crossed the snapshot boundary: index the prompt's pages up to it, and store the
        slot's rings and history as of the boundary (`at_mark`, the chunk's snapshot row) for later prompts."""
        boundary = req.snapshot_at
        self.pages.publish(req.prompt[:boundary], req.pages[: boundary // self.page_size])
        snapshot = self.pages.snapshot_slot(req.prompt, boundary, self._shard(slot))
        if snapshot is not None:
            self.snapshots = self.save_snapshot_fn(self.snapshots, at_mark, jnp.int32(snapshot))
            self._lookahead[snapshot] = tuple(int(t) for t in req.prompt[boundary : boundary + self.speculative_steps])

    def reserve(self, request_id: Any, positions: int) -> bool:
        """Give a running request the pages of its first `positions` positions now (benchmarks that run the decode
        step directly, outside `step`); False when the pool has too few."""
        slot = self._by_id[request_id]
        return self._grow(slot, self._slots[slot], min(positions, self.steps.max_pages * self.page_size))

    def _grow(self, slot: int, req: _Request, positions: int) -> bool:
        """Give a request the pages that hold its first `positions` positions; False when the pool has too few."""
        missing = self.pages.pages_for(positions) - len(req.pages)
        if missing <= 0:
            return True
        new = self.pages.allocate(missing, self._shard(slot))
        if new is None:
            return False
        self.page_table[slot, len(req.pages) : len(req.pages) + missing] = new
        req.pages += new
        return True

    def _reserve_round(self, num_steps: int) -> None:
        """Before a decode round: every decoding request gets the pages the round (and, with overlap, the round
        still in flight) may write, oldest request first. When its page shard runs out, the newest request of that
        shard holding pages is preempted (its pages freed, its prompt and generated tokens queued first for prefill
        again: recomputed, it goes on exactly where it stopped)."""
        k = self.speculative_steps
        ahead = (num_steps + (self.max_round_tokens if self.overlap else 0)) * (k + 1) + k + 1
        decoding = sorted((r for r in self._slots if r is not None and r.decoding), key=lambda r: r.order)
        for req in decoding:
            slot = self._by_id[req.request_id]
            if self._slots[slot] is not req:  # preempted for an older request in this loop
                continue
            known = req.prompt_len + len(req.generated)
            need = min(known + ahead, self._last_position(req.prompt_len, req.options) + 1)
            while not self._grow(slot, req, need):
                holders = [r for r in self._requests_on(self._shard(slot)) if r.pages]
                victim = max(holders, key=lambda r: r.order)
                self._preempt(self._by_id[victim.request_id])
                if victim is req:
                    break

    def _requests_on(self, shard: int) -> list[_Request]:
        """The requests in the slots of page shard `shard`."""
        return [r for slot, r in enumerate(self._slots) if r is not None and self._shard(slot) == shard]

    def _preempt(self, slot: int) -> None:
        """Free a request's pages and put it first in the prefill queue, to be recomputed from its prompt and the
        tokens it had generated (a new request object: outputs of a round in flight for the old one are dropped)."""
        req = self._slots[slot]
        if req.decoding:
            self.state = self.release_fn(self.state, jnp.int32(slot))
        self._release_pages(slot, req)
        prompt = np.concatenate([req.prompt[: req.prompt_len], np.asarray(req.generated, np.int32)])
        resumed = dataclasses.replace(
            req,
            prompt=prompt,
            prefilled=0,
            started=False,
            cached=0,
            snapshot_at=None,
            history=None,
            decoding=False,
            scores=[],
            pages=[],
            generated=list(req.generated),
        )
        self._slots[slot] = resumed
        if req.decoding:  # first in line; a request still prefilling keeps its place
            self._prefill_queue.appendleft(slot)
        self.num_preemptions += 1

    def _constraint_mask(self, req: _Request) -> np.ndarray | None:
        """The bitmask [W] of the tokens a constrained request may emit next; None when it is finished or
        its constraint allows nothing."""
        if req.constraint.is_finished():
            return None
        row = np.zeros((bitmask_words(self.config.vocab_size),), np.int32)
        req.constraint.fill_allowed(row)
        return row if allows_any(row, self.config.vocab_size) else None

    def _end(self, slot: int, reason: str) -> StepOutput:
        """End a slot's request on the host (its device slot stopped): its last, empty, output."""
        req = self._free_slot(slot)
        want_lp = req.options.logprobs is not None
        return StepOutput(req.request_id, [], [] if want_lp else None, [] if want_lp else None, True, reason)

    def step(self, max_tokens_per_round: int | None = None, prefill_tokens: int | None = None) -> list[StepOutput]:
        """Prefill up to `prefill_tokens` queued prompt tokens (default one chunk), then decode up to
        `max_tokens_per_round` tokens (default and cap: `max_round_tokens`) for every running request.
        Returns at most one `StepOutput` per request.

        With speculation, `max_tokens_per_round` counts target forwards (draft-verify-accept
        iterations), each of which emits 1 to k+1 tokens per request.

        With `overlap` on, the step returns the outputs of the previous step's decode round, read from
        the device while this step's work runs (the host's bookkeeping hides behind the device), and the
        first tokens of the requests this step admitted; a step with nothing to launch only collects.
        A request's end is then seen one step later, and a slot freed by it is reused from the step
        after that.

        While a constrained request runs, its round is one token whatever `max_tokens_per_round` says, read
        synchronously even with `overlap` on; the other requests join that token's iteration and run the rest
        of their round on their own (see `_step_constrained`).
        """
        n = self.max_round_tokens if max_tokens_per_round is None else max_tokens_per_round
        if not 1 <= n <= self.max_round_tokens:
            raise ValueError(f"max_tokens_per_round={n}: expected 1..{self.max_round_tokens}")
        admitted = self._prefill_some(self.prefill_chunk if prefill_tokens is None else prefill_tokens)
        ended, self._ended = self._ended, []
        running = [r for r in self._slots if r is not None and r.decoding]
        if any(r.constraint is not None for r in running):
            return _merge(ended + self._step_constrained(admitted, n))
        # with overlap the admissions are read before the round: their reasons as admitted (a copy, as the
        # round donates `state`)
        admit_reasons = jnp.copy(self.state.finish_reason) if admitted and self.overlap else None
        round_out, rows = None, ()
        # the requests as admitted: one that the reservation preempts gets nothing of this step (its first token is
        # sampled again after its recompute)
        slots = list(self._slots)
        if running:
            self._reserve_round(n)
            running = [r for r in self._slots if r is not None and r.decoding]
        if running:
            rows, round_out = self._decode(running, n)
        if not self.overlap:
            if not admitted and round_out is None:
                return ended
            return ended + self._collect(_Launched(admitted, round_out, self.state.finish_reason, slots, rows))
        # The round is read one step later, but the first tokens of the requests admitted now are read now:
        # their prefill and sampling precede the round on the device, so time to first token does not wait
        # for a round. (A copy of the reasons: the next step donates `state` before this round is read.)
        reasons = jnp.copy(self.state.finish_reason)
        launched = None if round_out is None else _Launched([], round_out, reasons, slots, rows)
        previous, self._pending = self._pending, launched
        outputs = self._collect(previous) if previous is not None else []
        if admitted:
            outputs += self._collect(_Launched(admitted, None, admit_reasons, slots))
        return ended + outputs

    def _decode(self, running: list[_Request], num_steps: int, masks: dict[int, np.ndarray] | None = None) -> tuple:
        """Launch a decode round over the running requests' slots (the smallest bucket of rows that holds them):
        the greedy loop when every running request is greedy, the plain one-token loop
        (`constrained_decode_fn`, even in a speculative engine) when any is constrained. `masks` (the launches
        of `_step_constrained`): allowed-token rows of constrained slots (running requests without one
        allow every token); the bucket's filler rows get all-zero rows, so they sit the round out (another
        launch of the step decodes them, if running). Returns (the slot of each row, the round's output)."""
        running_slots = [self._by_id[r.request_id] for r in running]
        rows = self.steps.round_rows(running_slots)
        if masks is not None:
            mask = self.steps.allow_all(rows.size)
            for i, slot in enumerate(rows):
                if int(slot) not in running_slots:
                    mask[i] = 0
                elif int(slot) in masks:
                    mask[i] = masks[int(slot)]
            allowed = jax.device_put(mask, self._replicated)
        else:
            allowed = self.allow_all(rows.size)
        greedy = all(r.options.temperature <= 0 for r in running)
        if any(r.constraint is not None for r in running):
            decode = self.constrained_decode_fn
        else:
            decode = self.greedy_decode_fn if greedy else self.decode_fn
        tables = jnp.asarray(self.page_table[rows])
        args = (self.params, self.cache, self.state, jnp.asarray(rows), tables, jnp.int32(num_steps), allowed)
        self.cache, self.state, round_out = decode(*args)
        return [int(r) for r in rows], round_out

    def _step_constrained(self, admitted: list, num_steps: int) -> list[StepOutput]:
        """A step while a constrained request runs: the constrained requests decode one token, the others
        `num_steps` as in any step, in two launches: (1) one iteration over the constrained rows (masked) and the
        others together, (2) the others' other `num_steps` - 1 iterations over their rows alone, continuing on
        the device from (1). A bandwidth-bound device reads the weights once per iteration for all rows, so the
        constrained rows cost the others (nearly) nothing, and their tokens are ready after (1): the host makes
        the next masks while (2) runs.

        Every constraint has already accepted its request's tokens ((1) is read in the step that launches it),
        so the masks are made first, while the device still runs the previous step's (2) (overlap); then (1) and
        (2) are launched (one page reservation covers both: no row runs more than `num_steps` iterations), (2)
        left in flight with `overlap`, as `step` leaves its round; only then is the previous (2) read, then the
        first tokens admitted now, then (1) (the others' first token of this step among them: a row that ends
        there sits (2) out, whose output for it is then dropped).
        A constrained request admitted now must accept its first token before its first mask: such a step
        reads the previous round and the first tokens before it makes the masks (once per request).
        A request whose constraint is finished, or allows nothing, stops.
        In a speculative engine an iteration of the others is a draft-verify-accept round, not the constrained
        rows' plain one token (masks cannot constrain drafts): (1) is the plain one-token loop over the
        constrained rows alone, not counted in the speculation stats, and (2) the others' whole round.
        """
        outputs = []
        if any(first is not None and self._slots[slot].constraint is not None for slot, first, _, _ in admitted):
            if self._pending is not None:
                previous, self._pending = self._pending, None
                outputs += self._collect(previous)
            outputs += self._collect(_Launched(admitted, None, self.state.finish_reason, list(self._slots)))
            admitted = []
        # with overlap the round still in flight is read after this step's launches, and the admissions'
        # reasons as admitted (a copy, as the launches donate `state`)
        admit_reasons = jnp.copy(self.state.finish_reason) if admitted else None
        masks = {}
        for slot, req in enumerate(self._slots):
            if req is None or not req.decoding or req.constraint is None:
                continue
            row = self._constraint_mask(req)
            if row is None:
                outputs.append(self._end(slot, "stop"))
                continue
            masks[slot] = row
        slots = list(self._slots)  # before the reservation: see `step`
        self._reserve_round(num_steps)
        running = [r for r in self._slots if r is not None and r.decoding]
        constrained = [r for r in running if r.constraint is not None]
        free = [r for r in running if r.constraint is None]
        joined = free if constrained and not self.speculative_steps else []  # the others in launch (1)
        first = rest = None
        if constrained:
            rows, round_out = self._decode(constrained + joined, 1, masks)
            first = _Launched([], round_out, jnp.copy(self.state.finish_reason), slots, rows, speculated=False)
        rest_steps = num_steps - 1 if joined else num_steps
        if free and rest_steps:
            rows, round_out = self._decode(free, rest_steps, {})
            rest = _Launched([], round_out, jnp.copy(self.state.finish_reason), slots, rows)
        if self.overlap:
            previous, self._pending = self._pending, rest
            rest = None
            if previous is not None:
                outputs += self._collect(previous)
        if admitted:
            outputs += self._collect(_Launched(admitted, None, admit_reasons, slots))
        for work in (first, rest):
            if work is not None:
                outputs += self._collect(work)
        return outputs

    def _collect(self, launched: _Launched) -> list[StepOutput]:
        """Read one step's tokens on the host; finished requests free their slots. Requests cancelled (or
        replaced in their slot) since the step was launched get nothing. Constrained requests' constraints
        accept their tokens; one that is then finished ends its request ("stop")."""
        host_admitted, host_round, reasons = to_host((launched.admitted, launched.round_out, launched.finish_reason))
        live = [r if r is not None and self._slots[slot] is r else None for slot, r in enumerate(launched.slots)]
        results: dict[int, StepOutput] = {}
        speculated = self.speculation is not None and launched.speculated  # not constrained rows' plain rounds
        prefilled_only = set()  # slots of requests with max_new_tokens=0, done with their prompt

        def new_output(slot):
            req = live[slot]
            want_lp = req.options.logprobs is not None
            return StepOutput(req.request_id, [], [] if want_lp else None, [] if want_lp else None, False, None)

        def emit(slot, tokens, logprobs, top_ids, top_logprobs):
            req = live[slot]
            out = results.get(slot)
            if out is None:
                out = results[slot] = new_output(slot)
            out.token_ids.extend(int(t) for t in tokens)
            if out.logprobs is not None:
                k = req.options.logprobs
                out.logprobs.extend(float(x) for x in logprobs)
                out.top_logprobs.extend(
                    [(int(i), float(x)) for i, x in zip(ids[:k], lps[:k], strict=True)]
                    for ids, lps in zip(top_ids, top_logprobs, strict=True)
                )

        for slot, first, _, scores in host_admitted:
            if live[slot] is None:
                continue
            if first is None:
                results[slot] = new_output(slot)
                prefilled_only.add(slot)
            else:
                emit(slot, first.tokens, first.logprobs, first.top_ids, first.top_logprobs)
            if scores is not None:
                _add_prompt_scores(results[slot], scores, live[slot].options.prompt_logprobs)
            if not live[slot].resumed:
                results[slot].cached_tokens = live[slot].cached
        if host_round is not None:
            for i, slot in enumerate(launched.rows):
                c = int(host_round.count[i])
                if c and live[slot] is not None:
                    emit(
                        slot,
                        host_round.tokens[i, :c],
                        host_round.logprobs[i, :c],
                        host_round.top_ids[i, :c],
                        host_round.top_logprobs[i, :c],
                    )
                    if speculated:
                        ran = host_round.accepted[i] >= 0
                        results[slot].accepted.extend(int(a) for a in host_round.accepted[i][ran])
                        results[slot].drafts.extend([int(t) for t in d] for d in host_round.drafts[i][ran])
            if speculated:
                self.speculation.add(host_round.accepted, int(host_round.count.sum()))
        for slot, out in results.items():
            live[slot].generated += out.token_ids
            constraint = live[slot].constraint
            if constraint is not None:
                for token in out.token_ids:
                    constraint.accept(token)
            stopped_itself = True
            if slot in prefilled_only:
                out.finish_reason = "length"
            elif reasons[slot] != RUNNING:
                out.finish_reason = FINISH_REASONS[int(reasons[slot])]
            elif constraint is not None and constraint.is_finished():
                out.finish_reason, stopped_itself = "stop", False
            else:
                continue
            out.finished = True
            self._free_slot(slot, stop=not stopped_itself)
        return list(results.values())


def _merge(outputs: list[StepOutput]) -> list[StepOutput]:
    """One StepOutput per request, its parts in order (a constrained step reads first tokens and a round apart);
    the first part keeps the prompt's scores."""
    merged: dict[Any, StepOutput] = {}
    for out in outputs:
        into = merged.setdefault(out.request_id, out)
        if into is out:
            continue
        into.token_ids += out.token_ids
        if into.logprobs is not None:
            into.logprobs += out.logprobs
            into.top_logprobs += out.top_logprobs
        into.accepted += out.accepted
        into.drafts += out.drafts
        into.finished, into.finish_reason = out.finished, out.finish_reason
    return list(merged.values())


def _add_prompt_scores(out: StepOutput, chunks: list, num_top: int) -> None:
    """A request's prompt scores (host copies of its chunks' PromptScores, in order) into its first output:
    position i of the prompt scored the token at i + 1; the first token has no score (None)."""
    logprobs, ranks, tops = [None], [None], [None]
    for length, scores in chunks:
        logprobs.extend(float(x) for x in scores.logprobs[:length])
        ranks.extend(int(r) for r in scores.ranks[:length])
        tops.extend(
            [(int(i), float(x)) for i, x in zip(ids[:num_top], lps[:num_top], strict=True)]
            for ids, lps in zip(scores.top_ids[:length], scores.top_logprobs[:length], strict=True)
        )
    # the prompt's last position scored the first generated token (targets -1): not a prompt token's score
    out.prompt_logprobs, out.prompt_ranks, out.prompt_top_logprobs = logprobs[:-1], ranks[:-1], tops[:-1]


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
