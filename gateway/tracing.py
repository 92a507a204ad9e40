"""OpenTelemetry: each run that ends on this gateway becomes a trace's worth of spans, sent to a
collector over OTLP/HTTP (`otel:` in the config; the `stepgate[otel]` extra).

Imported only when `otel` is configured: without it no OpenTelemetry module is loaded and no
request does any tracing work. The spans are made after the fact, from the store's record
of the run, its attempts and its steps (gateway/spans.py plans them): when the store tells of a
run's end committed here, a worker reads that record, and the SDK's batch processor sends the
spans from its own thread, so neither the store's notification nor an export ever waits on the
collector. A run parked for days has its spans sent when it ends, with their real times.

The run span's parent is the W3C `traceparent` the request came with, as stored with the run
(the gateway makes one up for a request without it, and forwards that one upstream), so the
run's spans sit in the client's trace; a parent that is not sampled gets no spans. Each
replica sends the spans of the runs it ended (`service.instance.id` is its replica id).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Final

import structlog
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.sdk.trace.sampling import Decision
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from gateway.config import Otel
from gateway.errors import StoreError
from gateway.logging import Throttle
from gateway.model import ENDED, Run
from gateway.spans import PlannedSpan, plan_run
from gateway.store import Change, Store

__all__ = ["RunTracer"]

log = structlog.get_logger("stepgate.otel")

# Ended runs waiting for their record to be read; past this (a store far slower than the
# runs ending) a run's spans are dropped and counted rather than held without bound.
QUEUE_SIZE: Final = 10_000
WORKERS: Final = 2
_KINDS: Final = {
    "server": SpanKind.SERVER,
    "client": SpanKind.CLIENT,
    "internal": SpanKind.INTERNAL,
}


def _ns(seconds: float) -> int:
    return int(seconds * 1_000_000_000)


def parent_context(run: Run) -> Context:
    """The client's span, from the traceparent (and tracestate) stored with the run; an empty
    context, so a new trace, when there is none (the request could not be read back)."""
    carrier = {
        name.lower(): value
        for name, value in run.headers
        if name.lower() in ("traceparent", "tracestate")
    }
    return TraceContextTextMapPropagator().extract(carrier)


class _SdkLog(logging.Handler):
    """The SDK's own complaints (a collector that is down or refuses the spans) as our log
    lines, `otel.sdk`, at most one a second once a burst is spent."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self._throttle = Throttle(rate=1.0, burst=5)
        self._guard = threading.Lock()  # records come from the exporter's thread

    def emit(self, record: logging.LogRecord) -> None:
        with self._guard:
            suppressed = self._throttle.admit()
        if suppressed is None:
            return
        log.warning(
            "otel.sdk",
            message=record.getMessage(),
            logger=record.name,
            level=record.levelname.lower(),
            suppressed=suppressed or None,
        )


def _route_sdk_logs() -> None:
    sdk = logging.getLogger("opentelemetry")
    if not any(isinstance(handler, _SdkLog) for handler in sdk.handlers):
        sdk.addHandler(_SdkLog())
        sdk.propagate = False  # else Python's last-resort handler prints them bare on stderr


class RunTracer:
    """Spans for every run that ends on this gateway. `start()`, `changed` as the store's
    listener, then `await close()`, which sends what is left."""

    def __init__(self, otel: Otel, store: Store) -> None:
        self.otel = otel
        self.store = store
        _route_sdk_logs()
        resource = Resource.create(
            {"service.name": otel.service_name, "service.instance.id": store.replica_id}
        )
        # Our own provider, not the global one: nothing else in the process is traced by it.
        self._provider = TracerProvider(resource=resource, shutdown_on_exit=False)
        exporter = OTLPSpanExporter(
            endpoint=f"{otel.endpoint}/v1/traces",
            headers=dict(otel.headers),
            timeout=otel.timeout,
        )
        self._provider.add_span_processor(BatchSpanProcessor(exporter))
        self._tracer = self._provider.get_tracer("stepgate")
        self._ended: asyncio.Queue[Run] = asyncio.Queue(QUEUE_SIZE)
        self._workers: list[asyncio.Task[None]] = []
        self._dropped = Throttle(rate=1.0, burst=5)
        self._closed = False

    def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"stepgate-otel-{index}")
            for index in range(WORKERS)
        ]
        log.info("otel.started", endpoint=self.otel.endpoint, service=self.otel.service_name)

    def changed(self, change: Change) -> None:
        """A store listener: a run's end committed by this gateway is queued for its spans
        (another replica's end comes without the run, and that replica sends its spans)."""
        if self._closed or change.status not in ENDED or change.run is None:
            return
        try:
            self._ended.put_nowait(change.run)
        except asyncio.QueueFull:
            suppressed = self._dropped.admit()
            if suppressed is not None:
                log.warning("otel.run_dropped", run_id=change.run.id, suppressed=suppressed or None)

    async def _work(self) -> None:
        while True:
            run = await self._ended.get()
            try:
                await self._trace(run)
            except StoreError as exc:
                log.warning("otel.run_unread", run_id=run.id, error=str(exc))
            except Exception as exc:  # a span not sent must never stop the next run's
                log.warning("otel.run_not_traced", run_id=run.id, error=repr(exc))
            finally:
                self._ended.task_done()

    async def _trace(self, run: Run) -> None:
        parent = parent_context(run)
        if not self.sampled(parent):
            return  # nothing would be recorded: spare the store the reads
        attempts = await self.store.attempts(run.id)
        steps = await self.store.steps(run.id)
        self.emit(plan_run(run, attempts, steps), parent)

    def sampled(self, parent: Context) -> bool:
        """Whether the sampler keeps a run under `parent`: its spans share the parent's trace
        id, so one answer holds for all of them (a trace-id ratio, the parent's flag)."""
        span_context = trace.get_current_span(parent).get_span_context()
        if not span_context.is_valid:
            return True  # a new trace: its id is drawn when the run span starts
        verdict = self._provider.sampler.should_sample(parent, span_context.trace_id, "run")
        return verdict.decision == Decision.RECORD_AND_SAMPLE  # what gets exported

    def emit(self, plan: list[PlannedSpan], parent: Context) -> None:
        """Hand the planned spans to the batch processor (which sends them from its thread)."""
        spans: list[trace.Span] = []
        for planned in plan:
            context = (
                parent
                if planned.parent is None
                else trace.set_span_in_context(spans[planned.parent])
            )
            span = self._tracer.start_span(
                planned.name,
                context=context,
                kind=_KINDS[planned.kind],
                attributes=dict(planned.attributes),
                start_time=_ns(planned.start),
            )
            if planned.error is not None:
                span.set_status(Status(StatusCode.ERROR, planned.error))
            spans.append(span)
        for span, planned in zip(reversed(spans), reversed(plan), strict=True):
            span.end(end_time=_ns(planned.end))

    async def close(self) -> None:
        """Trace the runs that ended before now, then send every span left, waiting at most
        `otel.timeout` for each of the two (a collector that is down must not hold a stop)."""
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.otel.timeout):
                await self._ended.join()
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        await self._shutdown_provider()

    async def _shutdown_provider(self) -> None:
        # Not in the loop's executor: a thread still exporting past the wait would hold up
        # the loop's own shutdown, and a daemon thread is simply left behind at exit.
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def shut() -> None:
            try:
                self._provider.shutdown()
            finally:
                with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
                    loop.call_soon_threadsafe(_settle, done)

        started = time.monotonic()
        threading.Thread(target=shut, name="stepgate-otel-shutdown", daemon=True).start()
        try:
            await asyncio.wait_for(asyncio.shield(done), self.otel.timeout + 1.0)
        except TimeoutError:
            log.warning("otel.unsent", why="the collector did not take the last spans in time")
        else:
            log.info("otel.stopped", ms=round((time.monotonic() - started) * 1000))


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)
