"""Server metrics in the Prometheus text format (version 0.0.4), written by hand: no client library.

Counters and histograms are updated from the scheduler thread and read by `/metrics` in the
HTTP thread; one lock keeps each exposition consistent.
"""

from __future__ import annotations

import bisect
import collections
import threading
import time

PREFIX = "mimo_jax_"
# Latency buckets in seconds (TTFT spans prefill of long prompts; ITL is per generated token).
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5)
E2E_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
THROUGHPUT_WINDOW_S = 10.0


class Histogram:
    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float, times: int = 1) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += times
        self.sum += value * times
        self.count += times

    def lines(self, name: str) -> list[str]:
        out, cumulative = [], 0
        for bound, n in zip((*self.buckets, float("inf")), self.counts, strict=True):
            cumulative += n
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {cumulative}')
        out.append(f"{name}_sum {self.sum!r}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Everything `/metrics` reports. Gauges about the batch are set by the scheduler each round."""

    def __init__(self, model_name: str, max_batch: int, max_context: int):
        self.lock = threading.Lock()
        self.model_name = model_name
        self.max_batch = max_batch
        self.max_context = max_context
        self.running = 0
        self.waiting = 0
        self.kv_tokens_used = 0
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.requests_finished: collections.Counter[str] = collections.Counter()
        self.requests_rejected: collections.Counter[str] = collections.Counter()
        self.requests_cancelled = 0  # stopped early (running or still waiting): client gone, stop string, timeout
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.spec_draft_tokens = 0
        self.spec_accepted_tokens = 0
        self.spec_target_forwards = 0
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) for tokens/s

    # -------------------------------------------------------------- updates (scheduler thread)
    def set_batch(self, running: int, waiting: int, kv_tokens_used: int) -> None:
        with self.lock:
            self.running, self.waiting, self.kv_tokens_used = running, waiting, kv_tokens_used

    def on_tokens(self, count: int, now: float) -> None:
        with self.lock:
            self.generation_tokens += count
            self._recent.append((now, count))

    def on_first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def on_inter_token(self, seconds_per_token: float, tokens: int) -> None:
        with self.lock:
            self.itl.observe(seconds_per_token, tokens)

    def on_prompt(self, tokens: int) -> None:
        with self.lock:
            self.prompt_tokens += tokens

    def on_finish(self, reason: str, seconds: float) -> None:
        with self.lock:
            self.requests_finished[reason] += 1
            self.e2e.observe(seconds)

    def on_cancel(self, count: int) -> None:
        with self.lock:
            self.requests_cancelled += count

    def on_reject(self, reason: str) -> None:
        with self.lock:
            self.requests_rejected[reason] += 1

    def on_speculation(self, drafted: int, accepted: int, target_forwards: int) -> None:
        with self.lock:
            self.spec_draft_tokens += drafted
            self.spec_accepted_tokens += accepted
            self.spec_target_forwards += target_forwards

    # -------------------------------------------------------------- reading
    def tokens_per_second(self, now: float | None = None) -> float:
        now = time.monotonic() if now is None else now
        with self.lock:
            while self._recent and self._recent[0][0] < now - THROUGHPUT_WINDOW_S:
                self._recent.popleft()
            return sum(n for _, n in self._recent) / THROUGHPUT_WINDOW_S

    def render(self) -> str:
        tps = self.tokens_per_second()
        with self.lock:
            lines: list[str] = []

            def metric(name: str, kind: str, help_text: str, samples: list[str]) -> None:
                lines.append(f"# HELP {PREFIX}{name} {help_text}")
                lines.append(f"# TYPE {PREFIX}{name} {kind}")
                lines.extend(f"{PREFIX}{s}" for s in samples)

            def scalar(name: str, kind: str, help_text: str, value: float) -> None:
                metric(name, kind, help_text, [f"{name} {value!r}"])

            def labelled(name: str, help_text: str, label: str, counts: collections.Counter, default: str) -> None:
                items = sorted(counts.items()) or [(default, 0)]
                metric(name, "counter", help_text, [f'{name}{{{label}="{k}"}} {v}' for k, v in items])

            capacity = self.max_batch * self.max_context
            forwards = self.spec_target_forwards
            accept_length = (self.spec_accepted_tokens + forwards) / forwards if forwards else 0.0
            scalar("num_requests_running", "gauge", "Requests in batch slots.", self.running)
            scalar("num_requests_waiting", "gauge", "Requests queued for a slot.", self.waiting)
            scalar("max_batch", "gauge", "Batch slots.", self.max_batch)
            scalar(
                "kv_cache_usage_ratio",
                "gauge",
                "Fraction of the KV cache's token positions in use (running requests' lengths / slots x context).",
                self.kv_tokens_used / capacity if capacity else 0.0,
            )
            scalar("kv_cache_tokens_used", "gauge", "Token positions held by running requests.", self.kv_tokens_used)
            scalar("prompt_tokens_total", "counter", "Prompt tokens admitted.", self.prompt_tokens)
            scalar("generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
            scalar(
                "generation_tokens_per_second",
                "gauge",
                f"Generated tokens/s over the last {THROUGHPUT_WINDOW_S:g} s.",
                tps,
            )
            labelled(
                "request_success_total",
                "Finished requests by finish reason.",
                "finish_reason",
                self.requests_finished,
                "stop",
            )
            labelled(
                "request_rejected_total",
                "Requests refused before running (queue full, timeout).",
                "reason",
                self.requests_rejected,
                "queue_full",
            )
            scalar(
                "request_cancelled_total",
                "counter",
                "Sequences stopped before the engine finished them, running or still waiting "
                "(client gone, stop string, timeout).",
                self.requests_cancelled,
            )
            metric(
                "time_to_first_token_seconds",
                "histogram",
                "Time from arrival to the first generated token.",
                self.ttft.lines("time_to_first_token_seconds"),
            )
            metric(
                "inter_token_latency_seconds",
                "histogram",
                "Time between generated tokens of one request (a round's tokens share its time).",
                self.itl.lines("inter_token_latency_seconds"),
            )
            metric(
                "e2e_request_latency_seconds",
                "histogram",
                "Time from arrival to the last token.",
                self.e2e.lines("e2e_request_latency_seconds"),
            )
            scalar("spec_decode_draft_tokens_total", "counter", "MTP draft tokens proposed.", self.spec_draft_tokens)
            scalar(
                "spec_decode_accepted_tokens_total", "counter", "MTP draft tokens accepted.", self.spec_accepted_tokens
            )
            scalar(
                "spec_decode_mean_accept_length",
                "gauge",
                "Tokens emitted per target forward with speculation (accepted drafts + the bonus token); 0 when off.",
                accept_length,
            )
            return "\n".join(lines) + "\n"
