"""Prometheus metrics of one server (its own registry, so apps never share counters).

With `--api-server-count N > 1` every process writes its samples to files in
`PROMETHEUS_MULTIPROC_DIR` (prometheus_client's multiprocess mode, switched on by that
variable before the library is imported): the API processes count HTTP requests, tokens and
entities, the engine process its batches and queue depth, and `/metrics` in any API process
adds them all up.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.multiprocess import MultiProcessCollector

from tagserve.engine.async_engine import AsyncEngine
from tagserve.engine.request import Request

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                    30.0, 60.0)
_POWERS_OF_TWO = tuple(float(2**i) for i in range(18))


def multiprocess_dir() -> str | None:
    """Where the processes of a multi-process server write their samples, if that is what
    this process is part of."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


class EngineMetrics:
    """Queue depth and batch sizes, recorded where the engine runs."""

    def __init__(self, engine: AsyncEngine, registry: CollectorRegistry | None) -> None:
        self.engine = engine
        self.queue_depth = Gauge("tagserve_queue_depth", "Sequences waiting for a forward pass",
                                 registry=registry, multiprocess_mode="livesum")
        self.shared = multiprocess_dir() is not None
        if not self.shared:  # read when scraped; in multiprocess mode, set after every batch
            self.queue_depth.set_function(lambda: engine.num_waiting)
        self.batch_tokens = Histogram("tagserve_batch_tokens", "Tokens per forward pass",
                                      buckets=_POWERS_OF_TWO, registry=registry)
        self.batch_sequences = Histogram("tagserve_batch_sequences",
                                         "Sequences per forward pass",
                                         buckets=_POWERS_OF_TWO[:12], registry=registry)
        engine.add_batch_listener(self.observe_batch)

    def observe_batch(self, batch: list[Request]) -> None:
        """Called from the engine thread after each forward pass."""
        self.batch_sequences.observe(len(batch))
        self.batch_tokens.observe(sum(r.num_tokens for r in batch))
        if self.shared:
            self.queue_depth.set(self.engine.num_waiting)


class ServerMetrics:
    """HTTP requests, latency, tokens and entities; and the engine's metrics when the engine
    runs in this process."""

    def __init__(self, engine: object) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("tagserve_http_requests", "HTTP requests by route and status",
                                ["route", "method", "status"], registry=self.registry)
        self.latency = Histogram("tagserve_http_request_duration_seconds",
                                 "Time from request to response, by route", ["route"],
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.prompt_tokens = Counter("tagserve_prompt_tokens",
                                     "Prompt tokens of successful requests (every window "
                                     "of /v1/ner and /v1/redact)", registry=self.registry)
        self.entities = Counter("tagserve_entities", "Entities found, by route", ["route"],
                                registry=self.registry)
        self.engine = EngineMetrics(engine, self.registry) \
            if isinstance(engine, AsyncEngine) else None

    def observe_request(self, route: str, method: str, status: int, seconds: float) -> None:
        self.requests.labels(route, method, str(status)).inc()
        self.latency.labels(route).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type (of every process of the server)."""
        shared = multiprocess_dir()
        if shared is None:
            return generate_latest(self.registry), CONTENT_TYPE_LATEST
        registry = CollectorRegistry()
        MultiProcessCollector(registry, shared)
        return generate_latest(registry), CONTENT_TYPE_LATEST
