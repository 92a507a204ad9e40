"""Prometheus metrics. One registry per gateway, so tests can run several in one process.

Labels are bounded: route names, methods, status codes, outcomes and reasons — never a run id
or a raw path.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

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

from gateway.model import RunStatus
from gateway.retry import Outcome

CONTENT_TYPE = CONTENT_TYPE_LATEST

# 0.5 ms to 60 s: a pass-through answers in about a millisecond, a held run in up to `hold`.
_LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
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
        self._children: dict[tuple[object, tuple[str, ...]], Any] = {}
        self._hooks: dict[str, Callable[[Outcome, str | None], None]] = {}
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.requests = Counter(
            "stepgate_requests",
            "Client requests answered, by route, method and status code.",
            ["route", "method", "code"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "stepgate_request_duration_seconds",
            "Time to answer a client request.",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.upstream_attempts = Counter(
            "stepgate_upstream_attempts",
            "Invocations of an upstream, by outcome (response, connect, timeout).",
            ["route", "outcome"],
            registry=registry,
        )
        self.retries = Counter(
            "stepgate_retries",
            "Retries scheduled, by reason.",
            ["route", "reason"],
            registry=registry,
        )
        self.runs = Gauge(
            "stepgate_runs",
            "Runs in the store, by state.",
            ["state"],
            registry=registry,
        )
        self.steps = Counter(
            "stepgate_steps",
            "Step records written through the callback API, by status.",
            ["route", "status"],
            registry=registry,
        )
        self.checkpoint_duration = Histogram(
            "stepgate_checkpoint_duration_seconds",
            "Time to answer a step callback, commit included.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )
        self.store_write_duration = Histogram(
            "stepgate_store_write_duration_seconds",
            "Time from a store write being queued to its commit.",
            buckets=_FAST_BUCKETS,
            registry=registry,
        )

        self.queued = Gauge(
            "stepgate_queued",
            "Runs waiting in a route's flow-control queue.",
            ["route"],
            registry=registry,
        )
        self.flow_rejections = Counter(
            "stepgate_flow_rejected",
            "Requests refused by flow control, by reason (rate_limit, queue_full).",
            ["route", "reason"],
            registry=registry,
        )
        self.replica = Gauge(
            "stepgate_replica",
            "This gateway among the replicas of its store (always 1): its "
            "replica id and the store's dialect.",
            ["replica", "dialect"],
            registry=registry,
        )
        self.taken_over = Counter(
            "stepgate_runs_taken_over",
            "Running runs of replicas whose lease expired that this replica fenced, to be resumed.",
            registry=registry,
        )

    def _child(self, metric: Counter | Histogram, *labels: str) -> Any:
        """A labelled child, remembered: prometheus-client's own `labels()` validates and
        locks on every call, and these are on every request's path."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def request(self, route: str, method: str, code: int, seconds: float) -> None:
        # Any token is a valid method; keep the label set bounded.
        label = method if method in _METHODS else "other"
        self._child(self.requests, route, label, str(code)).inc()
        self._child(self.request_duration, route).observe(seconds)

    def upstream_attempt(self, route: str, outcome: str) -> None:
        self._child(self.upstream_attempts, route, outcome).inc()

    def plain_attempt(self, route: str) -> Callable[[Outcome, str | None], None]:
        """A plain route's per-attempt hook for gateway.proxy.proxy_plain (one per route)."""
        hook = self._hooks.get(route)
        if hook is None:

            def hook(outcome: Outcome, retry_reason: str | None) -> None:
                self.upstream_attempt(route, outcome.label)
                if retry_reason is not None:
                    self.retry(route, retry_reason)

            self._hooks[route] = hook
        return hook

    def retry(self, route: str, reason: str) -> None:
        self._child(self.retries, route, reason).inc()

    def step(self, route: str, status: str) -> None:
        self._child(self.steps, route, status).inc()

    def set_run_counts(self, counts: dict[str, int]) -> None:
        for state in RunStatus:
            self.runs.labels(state).set(counts.get(state, 0))

    def set_queued(self, counts: dict[str, int], routes: Iterable[str]) -> None:
        """The queues' lengths: 0 for a flow-controlled route with none queued; a route that is
        gone is shown no longer once its queue is empty."""
        self.queued.clear()
        for route in routes:
            self.queued.labels(route).set(0)
        for route, count in counts.items():
            self.queued.labels(route).set(count)

    def flow_rejected(self, route: str, reason: str) -> None:
        self._child(self.flow_rejections, route, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
