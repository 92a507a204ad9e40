"""WebSocket upgrades on plain routes: the handshake is relayed, then the bytes, both ways.

A sidecar carries all of a service's traffic, WebSockets included. Like Go's ReverseProxy, the
gateway does not speak WebSocket itself: it forwards the client's handshake (with the usual
header hygiene, plus `Connection: Upgrade` and `Upgrade`), and if the service answers
`101 Switching Protocols` it relays that answer and then copies bytes in both directions until
either side closes. Subprotocols, extensions and frames are the two ends' business.

- Connecting and the handshake answer are bounded by the route's `timeout` (502 when the
  service cannot be reached or answers garbage, 504 when it does not answer in time).
- A service that declines (any status but 101) is relayed like any plain answer, and the
  client's connection is closed after it (it asked to leave HTTP behind).
- Once switched there is no idle time-out, as with Go's: a WebSocket may rightly be quiet for
  long. TCP keep-alive finds dead peers; `limits.max_connections` bounds how many there are.

The upstream side is a plain TCP (or TLS) stream of its own, never a pooled connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from typing import TYPE_CHECKING, Final, cast

from aiohttp import StreamReader, hdrs, web
from aiohttp.http import HttpVersion11
from multidict import CIMultiDict
from yarl import URL

from gateway.problem import problem
from gateway.proxy import (
    AttemptHook,
    RelayedResponse,
    forward_request_headers,
    forward_response_headers,
)
from gateway.retry import Outcome

if TYPE_CHECKING:
    from aiohttp.http_websocket import WebSocketReader

    from gateway.config import Route

_MAX_HEAD: Final = 64 * 1024  # the upstream's handshake answer
_MAX_DECLINE_BODY: Final = 1024 * 1024  # a refusal's body, read whole to be relayed
_CHUNK: Final = 64 * 1024
_CLOSE_GRACE: Final = 10.0  # for the other direction to finish once one has ended
_TOKEN: Final = re.compile(rb"[!#$%&'*+.^_`|~0-9A-Za-z-]+")  # RFC 9110 §5.1 field name
_CONTROL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")


class _BadAnswer(Exception):
    """The upstream's handshake answer is not HTTP the gateway can relay."""


def wants_websocket(request: web.BaseRequest) -> bool:
    """The request asks to switch to WebSocket (RFC 6455 §4.1: a GET with `Upgrade:
    websocket` and `Connection: upgrade`), and aiohttp's parser has held the connection's
    further bytes back for it. Only then may they be tunnelled: had the parser read them as
    HTTP, a request hidden behind the handshake would already have been served."""
    return (
        request._message.upgrade  # what aiohttp's own WebSocketResponse checks
        and request.method == hdrs.METH_GET
        and request.version == HttpVersion11
        and request.headers.get(hdrs.UPGRADE, "").lower() == "websocket"
    )


async def relay_upgrade(
    request: web.Request, route: Route, *, on_attempt: AttemptHook | None = None
) -> web.StreamResponse:
    """Forward the handshake `request` to `route.upstream`; see the module docstring. Returns
    once the tunnel has closed (or at once, when the service declined)."""
    headers, _trace_id = forward_request_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        host=request.headers.get(hdrs.HOST),
    )
    headers[hdrs.CONNECTION] = "Upgrade"
    headers[hdrs.UPGRADE] = request.headers[hdrs.UPGRADE]
    try:
        async with asyncio.timeout(route.timeout):
            reader, writer = await _connect(URL(route.upstream))
            try:
                writer.write(_request_head(request.method, request.raw_path, headers))
                status, reason, answer = await _read_head(reader)
            except BaseException:
                writer.close()
                raise
    except TimeoutError:
        _report(on_attempt, Outcome(None, "timeout"))
        return problem(504, detail=f"upstream of route {route.name!r} did not answer in time")
    except (OSError, _BadAnswer, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
        _report(on_attempt, Outcome(None, "connect"))
        return problem(
            502,
            detail=f"upstream of route {route.name!r} could not be reached or "
            "did not answer the WebSocket handshake in HTTP",
        )
    _report(on_attempt, Outcome(status))

    response = RelayedResponse(status=status, reason=reason)
    response.headers.extend(forward_response_headers(answer))
    response.force_close()
    if status != 101:
        try:
            body = await asyncio.wait_for(_read_body(reader, answer), route.timeout)
        except (OSError, TimeoutError, _BadAnswer, asyncio.IncompleteReadError):
            return problem(502, detail="the upstream broke off its answer to the handshake")
        finally:
            writer.close()
        response.content_length = len(body)  # read whole, so no longer chunked if it was
        await response.prepare(request)
        await response.write_eof(body)
        return response

    response.headers[hdrs.CONNECTION] = "Upgrade"
    response.headers[hdrs.UPGRADE] = answer.get(hdrs.UPGRADE, "websocket")
    try:
        await response.prepare(request)
        await response.write(b"")  # the head leaves now: nothing follows until a peer speaks
    except (ConnectionError, ValueError):
        writer.close()
        return response
    await _splice(request, response, reader, writer)
    return response


def _report(on_attempt: AttemptHook | None, outcome: Outcome) -> None:
    if on_attempt is not None:
        on_attempt(outcome, None)


async def _connect(url: URL) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    secure = url.scheme == "https"
    context = ssl.create_default_context() if secure else None
    return await asyncio.open_connection(
        url.host,
        url.port,
        ssl=context,
        server_hostname=url.host if secure else None,
        limit=_MAX_HEAD,
    )


def _request_head(method: str, target: str, headers: CIMultiDict[str]) -> bytes:
    lines = [f"{method} {target} HTTP/1.1".encode()]
    lines += [
        f"{name}: {value}".encode("utf-8", "surrogateescape") for name, value in headers.items()
    ]
    return b"\r\n".join([*lines, b"", b""])


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, CIMultiDict[str]]:
    """The status, reason phrase and fields of the upstream's answer, strictly parsed: a field
    that aiohttp's writer would refuse (a control character) is a bad answer here already."""
    raw = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = raw[:-4].split(b"\r\n")
    version, _, rest = status_line.partition(b" ")
    code, _, reason = rest.partition(b" ")
    if version not in (b"HTTP/1.1", b"HTTP/1.0") or len(code) != 3 or not code.isdigit():
        raise _BadAnswer(status_line[:100])
    fields: CIMultiDict[str] = CIMultiDict()
    for line in lines:
        name, colon, value = line.partition(b":")
        # Refused: obs-fold, a space before the colon, a bare CR or LF, any other control.
        if not colon or not _TOKEN.fullmatch(name) or _CONTROL.search(value):
            raise _BadAnswer(line[:100])
        fields.add(name.decode("ascii"), value.strip(b" \t").decode("utf-8", "surrogateescape"))
    return int(code), reason.decode("utf-8", "surrogateescape"), fields


async def _read_body(reader: asyncio.StreamReader, fields: CIMultiDict[str]) -> bytes:
    """A declined handshake's body (Content-Length, chunked, or up to the close)."""
    if "chunked" in fields.get(hdrs.TRANSFER_ENCODING, "").lower():
        parts: list[bytes] = []
        size = 0
        while True:
            line = await reader.readuntil(b"\r\n")
            try:
                length = int(line.split(b";", 1)[0].strip(), 16)
            except ValueError:
                raise _BadAnswer(line[:100]) from None
            if length == 0:
                while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers: dropped
                    pass
                return b"".join(parts)
            size += length
            if size > _MAX_DECLINE_BODY:
                raise _BadAnswer(b"body too large")
            parts.append(await reader.readexactly(length))
            await reader.readexactly(2)
    length_text = fields.get(hdrs.CONTENT_LENGTH)
    if length_text is not None:
        if not length_text.isdigit() or int(length_text) > _MAX_DECLINE_BODY:
            raise _BadAnswer(length_text.encode()[:100])
        return await reader.readexactly(int(length_text))
    body = await reader.read(_MAX_DECLINE_BODY + 1)
    if len(body) > _MAX_DECLINE_BODY:
        raise _BadAnswer(b"body too large")
    return body


class _Feed:
    """What aiohttp's server protocol feeds an upgraded connection's bytes to (the interface
    of its WebSocketReader), here into a flow-controlled stream."""

    def __init__(self, stream: StreamReader) -> None:
        self._stream = stream

    def feed_data(self, data: bytes) -> tuple[bool, bytes]:
        self._stream.feed_data(data)
        return False, b""

    def feed_eof(self) -> None:
        self._stream.feed_eof()


async def _splice(
    request: web.Request,
    response: web.StreamResponse,
    upstream_reader: asyncio.StreamReader,
    upstream_writer: asyncio.StreamWriter,
) -> None:
    protocol = request.protocol
    from_client = StreamReader(protocol, _CHUNK, loop=asyncio.get_running_loop())
    # The bytes the client sent after its handshake, and all that follow, land in from_client;
    # reading pauses while it holds more than twice _CHUNK.
    protocol.set_parser(cast("WebSocketReader", _Feed(from_client)))
    protocol.keep_alive(False)

    async def client_to_upstream() -> None:
        while data := await from_client.readany():
            upstream_writer.write(data)
            await upstream_writer.drain()
        if upstream_writer.can_write_eof():
            upstream_writer.write_eof()  # the client is done; the service may still answer

    async def upstream_to_client() -> None:
        while data := await upstream_reader.read(_CHUNK):
            await response.write(data)

    tasks = [
        asyncio.create_task(client_to_upstream(), name="stepgate-tunnel-up"),
        asyncio.create_task(upstream_to_client(), name="stepgate-tunnel-down"),
    ]
    try:
        done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        if pending and tasks[1] in done:
            pending.clear()  # the service has closed: nothing more will reach the client
        elif pending:
            # The client has closed its side; let the service finish what it is saying.
            _, pending = await asyncio.wait(pending, timeout=_CLOSE_GRACE)
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, OSError, ConnectionError):
                await task
        upstream_writer.close()
        transport = request.transport
        if transport is not None:
            transport.close()
