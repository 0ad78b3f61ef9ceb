"""Prometheus metrics of a serving engine (prometheus_client, one registry per server)."""

from __future__ import annotations

import collections
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 5 ms (a decode step of a small model) to a minute (a queued long prompt).
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class ServingMetrics:
    """Updated by the engine thread (prometheus_client is thread-safe); read by GET /metrics."""

    def __init__(self, window_s: float = 10.0):
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_length = Gauge("vishwam_queue_length", "Requests waiting for a slot", registry=r)
        self.running = Gauge("vishwam_running_requests", "Requests holding a slot (prefill or decode)", registry=r)
        self.pages_used = Gauge("vishwam_cache_pages_used", "64-token cache pages reserved by requests", registry=r)
        self.pages_total = Gauge("vishwam_cache_pages_total", "64-token cache pages in the pool", registry=r)
        self.tokens_per_second = Gauge(
            "vishwam_generation_tokens_per_second", f"Generated tokens per second over the last {window_s:g} s",
            registry=r,
        )  # fmt: skip
        self.generation_tokens = Counter("vishwam_generation_tokens", "Generated tokens", registry=r)
        self.draft_tokens = Gauge(
            "vishwam_accepted_draft_tokens", "Generated tokens that were accepted MTP drafts (speculative)", registry=r
        )
        self.prompt_tokens = Counter("vishwam_prompt_tokens", "Prompt tokens prefilled", registry=r)
        self.ttft = Histogram(
            "vishwam_time_to_first_token_seconds", "From submission to the first generated token",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inter_token = Histogram(
            "vishwam_inter_token_latency_seconds", "Between consecutive tokens of a request",
            buckets=_LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.finished = Counter("vishwam_requests_finished", "Requests ended, by reason", ["reason"], registry=r)
        self._window_s = window_s
        self._recent: collections.deque[tuple[float, int]] = collections.deque()

    def observe_engine(self, engine, now: float | None = None) -> None:
        """Gauges from the engine's state (called by the engine thread after each step)."""
        now = time.monotonic() if now is None else now
        self.queue_length.set(engine.num_waiting)
        self.running.set(engine.num_running)
        self.pages_used.set(engine.pages_used)
        self.pages_total.set(engine.pages.num_blocks)
        self.draft_tokens.set(engine.drafts_accepted)
        self._recent.append((now, engine.tokens_generated))
        while len(self._recent) > 1 and self._recent[0][0] < now - self._window_s:
            self._recent.popleft()
        (t0, n0), (t1, n1) = self._recent[0], self._recent[-1]
        self.tokens_per_second.set((n1 - n0) / (t1 - t0) if t1 > t0 else 0.0)
