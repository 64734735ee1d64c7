"""Prometheus metrics for the server (`GET /metrics`, text exposition format, via prometheus_client).

The engine's own counts (`engine.stats()`) are read at scrape time by a collector; the server counts requests
by endpoint and HTTP status, finished choices by reason, and generated tokens, from which it reports tokens/s
over the last `RATE_WINDOW_S` seconds.
"""

from __future__ import annotations

import collections
import threading
import time

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RATE_WINDOW_S = 10
PREFIX = "phi4_serve"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class TokenRate:
    """Tokens per second over the last `window` whole seconds (per-second buckets, so memory is bounded)."""

    def __init__(self, window: int = RATE_WINDOW_S, clock=time.monotonic):
        self.window, self.clock = window, clock
        self.buckets: collections.deque = collections.deque()  # [second, count]
        self.lock = threading.Lock()

    def add(self, n: int = 1) -> None:
        now = int(self.clock())
        with self.lock:
            if self.buckets and self.buckets[-1][0] == now:
                self.buckets[-1][1] += n
            else:
                self.buckets.append([now, n])
            self._trim(now)

    def _trim(self, now: int) -> None:
        while self.buckets and self.buckets[0][0] <= now - self.window:
            self.buckets.popleft()

    def per_second(self) -> float:
        with self.lock:
            self._trim(int(self.clock()))
            return sum(count for _, count in self.buckets) / self.window


class _EngineCollector:
    def __init__(self, engine, rate: TokenRate):
        self.engine, self.rate = engine, rate

    def collect(self):
        stats = self.engine.stats()
        gauges = {"queue_length": "requests waiting for a slot",
                  "running": "requests in the running batch",
                  "pages_in_use": "KV-cache pages in use",
                  "pages_total": "KV-cache pages in all"}
        for key, doc in gauges.items():
            yield GaugeMetricFamily(f"{PREFIX}_{key}", doc, value=float(stats.get(key, 0)))
        yield CounterMetricFamily(f"{PREFIX}_prefix_cache_hits", "prompt prefixes found in the KV cache",
                                  value=float(stats.get("prefix_cache_hits", 0)))
        yield CounterMetricFamily(f"{PREFIX}_preemptions", "running requests requeued for lack of KV pages",
                                  value=float(stats.get("preemptions", 0)))
        yield CounterMetricFamily(f"{PREFIX}_recomputed_tokens", "prompt tokens prefilled again after a preemption",
                                  value=float(stats.get("recomputed_tokens", 0)))
        yield CounterMetricFamily(f"{PREFIX}_held_evictions", "held sequences (idle chat turns) evicted for KV pages",
                                  value=float(stats.get("held_evictions", 0)))
        yield CounterMetricFamily(f"{PREFIX}_engine_tokens_generated", "tokens the engine generated",
                                  value=float(stats.get("tokens_generated", 0)))
        yield GaugeMetricFamily(f"{PREFIX}_tokens_per_second",
                                f"tokens streamed to clients per second over the last {RATE_WINDOW_S} s",
                                value=self.rate.per_second())


class ServerMetrics:
    """The app's registry: engine gauges, requests by endpoint and status, choices by finish reason."""

    def __init__(self, engine):
        self.registry = CollectorRegistry()
        self.rate = TokenRate()
        self.registry.register(_EngineCollector(engine, self.rate))
        self.requests = Counter(f"{PREFIX}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=self.registry)
        self.finished = Counter(f"{PREFIX}_choices_finished", "completed choices by finish reason",
                                ["reason"], registry=self.registry)
        self.completion_tokens = Counter(f"{PREFIX}_completion_tokens", "tokens generated for clients",
                                         registry=self.registry)

    def tokens(self, n: int = 1) -> None:
        self.completion_tokens.inc(n)
        self.rate.add(n)

    def render(self) -> bytes:
        return generate_latest(self.registry)
