"""Server metrics through `prometheus_client`, under vLLM's metric names with our prefix (`mimo:` for `vllm:`).

Names follow vLLM's v1 engine (`vllm/v1/metrics/loggers.py` and `vllm/v1/spec_decode/metrics.py`, vLLM >= 0.11,
where `vllm:inter_token_latency_seconds` replaced `vllm:time_per_output_token_seconds`), with its `model_name`
label on every series and its `finished_reason` label on `request_success_total`, so a vLLM dashboard ports by
renaming `vllm:` to `mimo:`. Series vLLM has no equivalent for keep names of our own (README: "Metrics").

Each `Metrics` has its own `CollectorRegistry` (several servers in one process do not share series). Updates come
from the scheduler thread, `/metrics` reads from the HTTP thread; prometheus_client's values are thread-safe.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Sequence

import jax
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from mimo_jax.engine.pages import PageStats

log = logging.getLogger("mimo_jax.serve")

PREFIX = "mimo:"
# Buckets: vLLM's, so quantiles read alike; inter-token latency adds 1-5 ms (a small batch's decode step).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0,
               7.5, 10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_LATENCY_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                           240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip
THROUGHPUT_WINDOW_S = 10.0
FINISH_REASONS = ("stop", "length")  # series present from the start (a dashboard's rate() needs a first sample)
REJECT_REASONS = ("queue_full", "timeout")
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"  # jax's monitoring event for one XLA compilation


def token_buckets(max_value: int) -> list[int]:
    """vLLM's 1-2-5 buckets up to `max_value` (token-count histograms): 1, 2, 5, 10, 20, 50, ..."""
    buckets, scale = [], 1
    while True:
        for mantissa in (1, 2, 5):
            if mantissa * scale > max_value:
                return buckets
            buckets.append(mantissa * scale)
        scale *= 10


class Metrics:
    """Everything `/metrics` reports. Gauges about the batch are set by the scheduler each round; the request
    histograms are observed when a sequence finishes (as vLLM does for finished requests)."""

    def __init__(self, model_name: str, max_batch: int, max_context: int, speculative_steps: int = 0):
        prometheus_client.disable_created_metrics()  # process-wide: no `_created` series per counter (as vLLM)
        self.registry = CollectorRegistry()
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_context = max_context
        self.speculative_steps = speculative_steps
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) for tokens/s
        self._recent_lock = threading.Lock()
        self._compile_listener = None
        self._drafts = self._accepted = 0  # spec_decode_mean_accept_length's inputs (a gauge cannot read counters)

        def make(kind, name: str, doc: str, labels: Sequence[str] = (), **kwargs):
            return kind(PREFIX + name, doc, ["model_name", *labels], registry=self.registry, **kwargs)

        def one(kind, name: str, doc: str, **kwargs):
            return make(kind, name, doc, **kwargs).labels(model_name)

        # ---- vLLM's names
        self.running = one(Gauge, "num_requests_running", "Sequences in batch slots.")
        self.waiting = one(Gauge, "num_requests_waiting", "Sequences queued for a slot.")
        self.prompt_tokens = one(Counter, "prompt_tokens", "Prompt tokens admitted.")
        self.generation_tokens = one(Counter, "generation_tokens", "Tokens generated.")
        success = make(Counter, "request_success", "Finished sequences by finish reason.", ["finished_reason"])
        self.success = {reason: success.labels(model_name, reason) for reason in FINISH_REASONS}
        self._success_family = success
        self.ttft = one(
            Histogram,
            "time_to_first_token_seconds",
            "Time from arrival to the first generated token.",
            buckets=TTFT_BUCKETS,
        )
        self.itl = one(
            Histogram,
            "inter_token_latency_seconds",
            "Time between generated tokens of one sequence (the tokens of a round share its time equally; one "
            "observation per token).",
            buckets=ITL_BUCKETS,
        )
        latency = lambda name, doc: one(Histogram, name, doc, buckets=REQUEST_LATENCY_BUCKETS)
        self.e2e = latency("e2e_request_latency_seconds", "Time from arrival to the last token.")
        self.queue_time = latency("request_queue_time_seconds", "Time from arrival to admission into a slot.")
        self.prefill_time = latency("request_prefill_time_seconds", "Time from admission to the first token.")
        self.decode_time = latency("request_decode_time_seconds", "Time from the first token to the last.")
        self.inference_time = latency("request_inference_time_seconds", "Time from admission to the last token.")
        self.time_per_output_token = one(
            Histogram,
            "request_time_per_output_token_seconds",
            "Per sequence: decode time / (generated tokens - 1).",
            buckets=ITL_BUCKETS,
        )
        tokens = token_buckets(max_context)
        self.request_prompt_tokens = one(
            Histogram, "request_prompt_tokens", "Prompt tokens of finished sequences.", buckets=tokens
        )
        self.request_generation_tokens = one(
            Histogram, "request_generation_tokens", "Generated tokens of finished sequences.", buckets=tokens
        )
        self.spec_drafts = one(
            Counter, "spec_decode_num_drafts", "MTP drafts verified (one per sequence per target forward)."
        )
        self.spec_draft_tokens = one(Counter, "spec_decode_num_draft_tokens", "MTP draft tokens proposed.")
        self.spec_accepted_tokens = one(Counter, "spec_decode_num_accepted_tokens", "MTP draft tokens accepted.")
        per_pos = make(
            Counter,
            "spec_decode_num_accepted_tokens_per_pos",
            "MTP drafts accepted at each draft position (0 = the first draft token).",
            ["position"],
        )
        self.spec_accepted_per_pos = [per_pos.labels(model_name, str(j)) for j in range(speculative_steps)]
        self.kv_usage = one(Gauge, "kv_cache_usage_perc", "Fraction of the full layers' KV pages held by sequences.")
        self.preemptions = one(Counter, "num_preemptions", "Sequences preempted for KV pages (recomputed later).")
        self.prefix_queries = one(Counter, "prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = one(Counter, "prefix_cache_hits", "Prompt tokens served by the prefix cache.")
        self._engine_counts = (0, 0, 0)  # preemptions, prefix queries, prefix hits last seen (counters take deltas)

        # ---- ours (no vLLM equivalent)
        one(Gauge, "max_batch", "Batch slots.").set(max_batch)
        self.kv_tokens = one(Gauge, "kv_cache_tokens_used", "Token positions held by running sequences.")
        self.kv_pages_cached = one(
            Gauge, "kv_cache_pages_cached", "Unreferenced KV pages kept for the prefix cache (evictable)."
        )
        one(
            Gauge, "generation_tokens_per_second", f"Generated tokens/s over the last {THROUGHPUT_WINDOW_S:g} s."
        ).set_function(self.tokens_per_second)
        rejected = make(
            Counter, "request_rejected", "Sequences refused before running (queue full, timeout).", ["reason"]
        )
        self.rejected = {reason: rejected.labels(model_name, reason) for reason in REJECT_REASONS}
        self._rejected_family = rejected
        self.cancelled = one(
            Counter,
            "request_cancelled",
            "Sequences stopped before the engine finished them, running or still waiting "
            "(client gone, stop string, timeout, drain timeout).",
        )
        one(
            Gauge,
            "spec_decode_mean_accept_length",
            "Tokens emitted per target forward with speculation (accepted drafts + the bonus token); 0 when off.",
        ).set_function(self.mean_accept_length)
        self.compilations = one(
            Counter,
            "xla_compilations",
            "XLA programs compiled after warm-up (each one stalls every running sequence; expected 0).",
        )
        self.compile_seconds = one(Counter, "xla_compile_seconds", "Seconds spent compiling after warm-up.")

    # -------------------------------------------------------------- updates (scheduler thread)
    def set_batch(self, running: int, waiting: int, kv_tokens_used: int) -> None:
        self.running.set(running)
        self.waiting.set(waiting)
        self.kv_tokens.set(kv_tokens_used)

    def set_kv(self, stats: PageStats, preemptions: int) -> None:
        """The engine's page pool (`mimo_jax.engine.pages.PageStats`) and preemption count after a round."""
        self.kv_usage.set(stats.usage)
        self.kv_pages_cached.set(stats.cached)
        last = self._engine_counts
        self._engine_counts = (preemptions, stats.queries, stats.hits)
        counters = (self.preemptions, self.prefix_queries, self.prefix_hits)
        for counter, new, old in zip(counters, self._engine_counts, last, strict=True):
            if new > old:
                counter.inc(new - old)

    def on_tokens(self, count: int, now: float) -> None:
        self.generation_tokens.inc(count)
        with self._recent_lock:
            self._recent.append((now, count))

    def on_first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def on_inter_token(self, seconds_per_token: float, tokens: int) -> None:
        for _ in range(tokens):
            self.itl.observe(seconds_per_token)

    def on_prompt(self, tokens: int) -> None:
        self.prompt_tokens.inc(tokens)

    def on_finish(
        self,
        reason: str,
        *,
        now: float,
        arrival: float,
        admitted: float,
        first_token: float | None,
        prompt_tokens: int,
        generation_tokens: int,
    ) -> None:
        """A sequence the engine finished: its reason, and its times (monotonic seconds) and token counts."""
        counter = self.success.get(reason)
        if counter is None:
            counter = self.success[reason] = self._success_family.labels(self.model_name, reason)
        counter.inc()
        self.e2e.observe(now - arrival)
        self.queue_time.observe(admitted - arrival)
        self.inference_time.observe(now - admitted)
        if first_token is not None:
            self.prefill_time.observe(first_token - admitted)
            self.decode_time.observe(now - first_token)
            if generation_tokens > 1:
                self.time_per_output_token.observe((now - first_token) / (generation_tokens - 1))
        self.request_prompt_tokens.observe(prompt_tokens)
        self.request_generation_tokens.observe(generation_tokens)

    def on_cancel(self, count: int) -> None:
        self.cancelled.inc(count)

    def on_reject(self, reason: str) -> None:
        counter = self.rejected.get(reason)
        if counter is None:
            counter = self.rejected[reason] = self._rejected_family.labels(self.model_name, reason)
        counter.inc()

    def on_speculation(self, accepted: Sequence[int]) -> None:
        """One sequence's verifies of a round: the drafts each target forward accepted (0..k)."""
        k = self.speculative_steps
        self._drafts += len(accepted)
        self._accepted += sum(accepted)
        self.spec_drafts.inc(len(accepted))
        self.spec_draft_tokens.inc(len(accepted) * k)
        self.spec_accepted_tokens.inc(sum(accepted))
        for j, counter in enumerate(self.spec_accepted_per_pos):
            counter.inc(sum(a > j for a in accepted))

    def count_compilations(self) -> None:
        """From now on, count (and log) every XLA compilation in this process: after warm-up, each one is a
        shape or loop the warm-up missed, and stalls every running sequence while it compiles."""

        def listener(event: str, seconds: float, **kwargs) -> None:
            if event != COMPILE_EVENT:
                return
            self.compilations.inc()
            self.compile_seconds.inc(seconds)
            log.warning("compiled %s in %.2f s after warm-up", kwargs.get("fun_name", "a program"), seconds)

        self.stop_counting_compilations()
        self._compile_listener = listener
        jax.monitoring.register_event_duration_secs_listener(listener)

    def stop_counting_compilations(self) -> None:
        if self._compile_listener is not None:
            jax.monitoring.unregister_event_duration_listener(self._compile_listener)
            self._compile_listener = None

    # -------------------------------------------------------------- reading
    def value(self, name: str, **labels: str) -> float:
        """One sample's current value by its exposed name without the prefix (e.g. "generation_tokens_total",
        "request_success_total", finished_reason="stop"); 0 for a series not exported (yet)."""
        value = self.registry.get_sample_value(PREFIX + name, {"model_name": self.model_name, **labels})
        return 0.0 if value is None else value

    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self._recent_lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def mean_accept_length(self) -> float:
        drafts, accepted = self._drafts, self._accepted
        return (accepted + drafts) / drafts if drafts else 0.0

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The exposition the `Accept` header asks for (Prometheus text 0.0.4 by default, or OpenMetrics) and
        its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
