"""Prometheus metrics. One registry per gateway, so tests can run several in one process.

Labels are bounded: route names, methods, status codes, outcomes and reasons — never a run id
or a raw path.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from gateway import runs
from gateway.retry import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST

# 0.5 ms to 60 s: a pass-through answers in about a millisecond, a held run in up to `hold`.
_LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
    60.0,
)
_METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)
_FAST_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


# The *_created series double what a scrape returns and say nothing an operator needs.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter(
            "stepgate_requests", "Client requests answered, by route, method and status code.",
            ["route", "method", "code"], registry=registry,
        )
        self.request_duration = Histogram(
            "stepgate_request_duration_seconds", "Time to answer a client request.",
            ["route"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.upstream_attempts = Counter(
            "stepgate_upstream_attempts", "Invocations of an upstream, by outcome "
            "(response, connect, timeout).", ["route", "outcome"], registry=registry,
        )
        self.retries = Counter(
            "stepgate_retries", "Retries scheduled, by reason.", ["route", "reason"],
            registry=registry,
        )
        self.runs = Gauge(
            "stepgate_runs", "Runs in the store, by state.", ["state"], registry=registry,
        )
        self.steps = Counter(
            "stepgate_steps", "Step records written through the callback API, by status.",
            ["route", "status"], registry=registry,
        )
        self.checkpoint_duration = Histogram(
            "stepgate_checkpoint_duration_seconds", "Time to answer a step callback, "
            "commit included.", buckets=_FAST_BUCKETS, registry=registry,
        )
        self.store_write_duration = Histogram(
            "stepgate_store_write_duration_seconds", "Time from a store write being queued to "
            "its commit.", buckets=_FAST_BUCKETS, registry=registry,
        )

    def request(self, route: str, method: str, code: int, seconds: float) -> None:
        # Any token is a valid method; keep the label set bounded.
        label = method if method in _METHODS else "other"
        self.requests.labels(route, label, str(code)).inc()
        self.request_duration.labels(route).observe(seconds)

    def upstream_attempt(self, route: str, outcome: str) -> None:
        self.upstream_attempts.labels(route, outcome).inc()

    def plain_attempt(self, route: str) -> Callable[[Outcome, str | None], None]:
        """A plain route's per-attempt hook for gateway.proxy.proxy_plain."""

        def hook(outcome: Outcome, retry_reason: str | None) -> None:
            self.upstream_attempts.labels(route, outcome.label).inc()
            if retry_reason is not None:
                self.retries.labels(route, retry_reason).inc()

        return hook

    def retry(self, route: str, reason: str) -> None:
        self.retries.labels(route, reason).inc()

    def step(self, route: str, status: str) -> None:
        self.steps.labels(route, status).inc()

    def set_run_counts(self, counts: dict[str, int]) -> None:
        for state in runs.STATES:
            self.runs.labels(state).set(counts.get(state, 0))

    def render(self) -> bytes:
        return generate_latest(self.registry)
