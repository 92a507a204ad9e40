"""A real OTLP/HTTP receiver on loopback, as a collector would be: `POST /v1/traces` with a
protobuf ExportTraceServiceRequest, decoded with the official generated classes."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status


@dataclass
class Received:
    """One span as the receiver decoded it, ids in lower-case hex as in a traceparent."""

    name: str
    trace_id: str
    span_id: str
    parent_span_id: str
    kind: int
    start: int  # ns
    end: int
    attributes: dict[str, Any]
    error: str | None  # the status description when the status code is ERROR
    resource: dict[str, Any]

    @property
    def kind_name(self) -> str:
        return str(Span.SpanKind.Name(self.kind))  # type: ignore[arg-type]


def _value(any_value: Any) -> Any:
    return getattr(any_value, any_value.WhichOneof("value"))


@dataclass
class OtlpReceiver:
    url: str = ""
    spans: list[Received] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)  # of each export request
    arrived: asyncio.Event = field(default_factory=asyncio.Event)

    async def traces(self, request: web.Request) -> web.Response:
        assert request.content_type == "application/x-protobuf"
        export = ExportTraceServiceRequest()
        export.ParseFromString(await request.read())
        self.headers.append({name.lower(): value for name, value in request.headers.items()})
        for resource_spans in export.resource_spans:
            resource = {a.key: _value(a.value) for a in resource_spans.resource.attributes}
            for scope_spans in resource_spans.scope_spans:
                for span in scope_spans.spans:
                    self.spans.append(
                        Received(
                            name=span.name,
                            trace_id=span.trace_id.hex(),
                            span_id=span.span_id.hex(),
                            parent_span_id=span.parent_span_id.hex(),
                            kind=span.kind,
                            start=span.start_time_unix_nano,
                            end=span.end_time_unix_nano,
                            attributes={a.key: _value(a.value) for a in span.attributes},
                            error=span.status.message
                            if span.status.code == Status.STATUS_CODE_ERROR
                            else None,
                            resource=resource,
                        )
                    )
        self.arrived.set()
        return web.Response(
            body=ExportTraceServiceResponse().SerializeToString(),
            content_type="application/x-protobuf",
        )

    async def until(self, count: int, timeout: float = 15.0) -> list[Received]:
        """The spans received once there are at least `count` of them."""
        async with asyncio.timeout(timeout):
            while len(self.spans) < count:
                self.arrived.clear()
                await self.arrived.wait()
        return self.spans

    def named(self, name: str) -> list[Received]:
        return [span for span in self.spans if span.name == name]

    def one(self, name: str) -> Received:
        found = self.named(name)
        assert len(found) == 1, [span.name for span in self.spans]
        return found[0]


async def start_receiver() -> tuple[OtlpReceiver, TestServer]:
    receiver = OtlpReceiver()
    app = web.Application()
    app.router.add_post("/v1/traces", receiver.traces)
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    receiver.url = f"http://127.0.0.1:{server.port}"
    return receiver, server
