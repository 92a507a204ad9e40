"""Forwarding to upstreams: header hygiene (pure) and the streaming proxy for plain routes.

What crosses the gateway, in both directions (RFC 9110 §7.6.1):

- hop-by-hop fields never do: Connection and every field it names, Proxy-Connection,
  Keep-Alive, TE, Transfer-Encoding, Upgrade, and Trailer (trailers are not relayed, so
  announcing them would be a lie); nor do Proxy-Authorization and Proxy-Authenticate, the
  credentials of the client's hop to a proxy (Go's ReverseProxy drops both the same way);
- every `Stepgate-*` field from the other side is dropped, because only the gateway may speak
  that protocol, and so is anything that reads as one once `_` is taken for `-`;
- request fields whose names contain `_` are dropped, as nginx does by default
  (`underscores_in_headers off`): CGI, WSGI, PHP and Rack turn `-` and `_` into the same
  variable, so `Stepgate_Token` would arrive as `HTTP_STEPGATE_TOKEN`, indistinguishable from
  the gateway's own `Stepgate-Token`;
- requests also lose `Expect`: the gateway answers `100-continue` itself, once it has
  decided to forward the body (`send_continue`), and repeating the expectation upstream
  would only stall it;
- requests gain `X-Forwarded-For` (peer appended), `X-Forwarded-Proto`, `X-Forwarded-Host`
  (the client's Host, replacing any client-sent value), `Via: 1.1 stepgate`, and a W3C
  `traceparent` (kept when valid, otherwise started afresh). `Host` and `Content-Length` pass
  through untouched.
- values keep their bytes. A response value that is not UTF-8 (a latin-1 file name) is
  written as received (`RelayedResponse`); a request value that is not UTF-8 cannot be, since
  aiohttp's client writes values as UTF-8 and drops the rest, so the request is refused with
  400 before it is routed (`undecodable_field`), never forwarded changed.

Time-outs, as nginx's `proxy_read_timeout` works:

- `route.timeout` bounds each attempt's connecting, sending the request (body included) and
  receiving the response head. It is per attempt: with `retry.attempts: 4`, a head that never
  comes holds the client for four time-outs plus the back-off between them (20 s and more for
  a 5 s timeout) before the 504;
- once the head has arrived, the body may stream for as long as it keeps moving; it is cut
  only after `route.timeout` without a byte (aiohttp's `sock_read`), so downloads and event
  streams are not killed by a wall clock. Cut means the client's connection is closed: the
  status line is out, and a clean end would pass for a complete answer;
- a WebSocket, once switched, has no time-out at all (`gateway.upgrade`).
"""

from __future__ import annotations

import asyncio
import functools
import io
import random
import re
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Final, TypeAlias, cast

import aiohttp
from aiohttp import hdrs, web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import HttpVersion, HttpVersion11, StreamWriter
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway.limits import BodyTimeout, body_timeout_problem
from gateway.problem import problem
from gateway.retry import FailureKind, Outcome, is_retriable, method_may_retry, next_delay
from gateway.routing import upstream_target

if TYPE_CHECKING:
    from gateway.config import Route

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "transfer-encoding",
        "upgrade",
        "trailer",
        "proxy-authorization",
        "proxy-authenticate",
    }
)
_REQUEST_DROP: Final = HOP_BY_HOP | {"expect"}
_STEPGATE_PREFIX: Final = "stepgate-"
# Fields the gateway rewrites: collected from the client, then emitted once, at the end.
_REWRITTEN: Final = frozenset(
    {"x-forwarded-for", "x-forwarded-proto", "x-forwarded-host", "via", "traceparent", "tracestate"}
)
_VIA: Final = "1.1 stepgate"
_NO_RETRY: Final = "Stepgate-No-Retry"
_NO_TOKENS: Final[frozenset[str]] = frozenset()

# W3C Trace Context, version 00: lower-case hex only; all-zero ids are invalid.
_TRACEPARENT: Final = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-[0-9a-f]{2}")
_ZERO_TRACE_ID: Final = "0" * 32
_ZERO_PARENT_ID: Final = "0" * 16

# aiohttp would otherwise invent these for the upstream; the client did not send them.
_SKIP_AUTO_HEADERS: Final = frozenset(
    {hdrs.USER_AGENT, hdrs.ACCEPT, hdrs.ACCEPT_ENCODING, hdrs.CONTENT_TYPE}
)
# aiohttp warns (ResourceWarning) when a bytes body exceeds 1 MiB; BytesIO is sent in slices.
_BYTES_BODY_LIMIT: Final = 1 << 20
# Statuses whose responses never carry content (RFC 9110 §6.4.1).
_NO_CONTENT: Final = frozenset({204, 304})

# Trace ids and jitter need no cryptographic strength, only independence between requests.
_rng: Final = random.Random()

AttemptHook: TypeAlias = Callable[[Outcome, str | None], None]
"""Called after every upstream attempt with its outcome and the retry reason (None = final)."""


def _connection_tokens(headers: Mapping[str, str]) -> frozenset[str]:
    """Field names listed in Connection, minus those dropped anyway (the usual keep-alive)."""
    if isinstance(headers, (CIMultiDictProxy, CIMultiDict)):
        values: list[str] = headers.getall(hdrs.CONNECTION, [])
    else:
        values = [v for k, v in headers.items() if k.lower() == "connection"]
    named: set[str] | None = None
    for value in values:
        for raw in value.split(","):
            token = raw.strip().lower()
            if token and token not in HOP_BY_HOP:
                if named is None:
                    named = set()
                named.add(token)
    return _NO_TOKENS if named is None else frozenset(named)


def _new_traceparent() -> tuple[str, str]:
    # getrandbits may return 0; all-zero ids are invalid, so nudge the (2**-128) case.
    trace_id = f"{_rng.getrandbits(128) or 1:032x}"
    return f"00-{trace_id}-{_rng.getrandbits(64) or 1:016x}-01", trace_id


def _is_stepgate(lower: str) -> bool:
    """`lower` (a lower-cased field name) is, or would pass for, one of the protocol's fields."""
    return lower.startswith(_STEPGATE_PREFIX) or (
        "_" in lower and lower.replace("_", "-").startswith(_STEPGATE_PREFIX)
    )


def undecodable_field(headers: Mapping[str, str]) -> str | None:
    """The name of the first field whose value is not UTF-8, or None.

    aiohttp's parser keeps such bytes as surrogate escapes, but its client writes field values
    as UTF-8 and drops what it cannot encode: forwarded, `caf\\xe9` would arrive as `caf`.
    The gateway refuses the request instead (400) of changing it silently."""
    for name, value in headers.items():
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return name
    return None


def expects_continue(request: web.BaseRequest) -> bool:
    """The client waits for `100 Continue` before it sends the body (HTTP/1.1 only)."""
    return (
        request.version == HttpVersion11
        and request.headers.get(hdrs.EXPECT, "").lower() == "100-continue"
    )


async def defer_continue(request: web.Request) -> web.StreamResponse | None:
    """An `expect_handler` for aiohttp's router: check the expectation, but send no `100`.

    aiohttp's default sends `100 Continue` before the handler has looked at the request, so a
    client would upload a body only to be told 404 or 413. Like Go's server, the gateway sends
    it when the body is actually wanted (`send_continue`)."""
    if request.version != HttpVersion11 or expects_continue(request):
        return None
    return problem(417, detail="the only expectation the gateway knows is 100-continue")


async def send_continue(request: web.BaseRequest) -> None:
    """Send `100 Continue` if the client waits for it: the body is wanted now."""
    if expects_continue(request):
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp does: the answer proper has not begun


def header_true(value: str | None) -> bool:
    """A Stepgate flag header (`Stepgate-No-Retry`, `Stepgate-Suspend`) is set: `true`."""
    return value is not None and value.strip().lower() == "true"


def forward_request_headers(
    headers: Mapping[str, str],
    *,
    peer: str | None,
    scheme: str,
    host: str | None,
) -> tuple[CIMultiDict[str], str]:
    """The headers to send upstream for a client request, and the request's trace id.

    `headers` may be a multidict (repeated fields are kept) or a plain mapping; `peer` is the
    client's address, `scheme` how it reached the gateway, `host` its Host header.
    """
    named = _connection_tokens(headers)
    drop = _REQUEST_DROP | named if named else _REQUEST_DROP
    out: CIMultiDict[str] = CIMultiDict()
    forwarded_for: list[str] = []
    via: list[str] = []
    traceparents: list[str] = []
    tracestates: list[str] = []
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or lower.startswith(_STEPGATE_PREFIX) or "_" in lower:
            continue
        if lower in _REWRITTEN:
            if lower == "x-forwarded-for":
                forwarded_for.append(value)
            elif lower == "via":
                via.append(value)
            elif lower == "traceparent":
                traceparents.append(value)
            elif lower == "tracestate":
                tracestates.append(value)
            # X-Forwarded-Proto and -Host from the client are replaced by what the gateway saw.
            continue
        out.add(name, value)

    if peer is not None:
        forwarded_for.append(peer)
    if forwarded_for:
        out["X-Forwarded-For"] = ", ".join(forwarded_for)
    out["X-Forwarded-Proto"] = scheme
    if host is not None:
        out["X-Forwarded-Host"] = host
    via.append(_VIA)
    out["Via"] = ", ".join(via)

    # More than one traceparent field is ambiguous, hence invalid (W3C Trace Context §3.2).
    match = _TRACEPARENT.fullmatch(traceparents[0].strip()) if len(traceparents) == 1 else None
    if match is not None and match.group(1) != _ZERO_TRACE_ID and match.group(2) != _ZERO_PARENT_ID:
        out["traceparent"] = match.group(0)
        trace_id = match.group(1)
        if tracestates:
            out["tracestate"] = ",".join(tracestates)
    else:
        # A tracestate without a valid parent belongs to nobody: start a clean trace.
        out["traceparent"], trace_id = _new_traceparent()
    return out, trace_id


def forward_response_headers(headers: Mapping[str, str]) -> CIMultiDict[str]:
    """The upstream response headers that may reach the client."""
    out: CIMultiDict[str] = CIMultiDict()
    _copy_response_headers(headers, out)
    return out


def _copy_response_headers(headers: Mapping[str, str], out: CIMultiDict[str]) -> None:
    named = _connection_tokens(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    for name, value in headers.items():
        lower = name.lower()
        if lower in drop or _is_stepgate(lower):
            continue
        out.add(name, value)


def _copy_upstream_headers(upstream: aiohttp.ClientResponse, out: CIMultiDict[str]) -> None:
    """`_copy_response_headers`, keeping each name as the upstream spelt it (`etag`, `ETag`):
    aiohttp's parser gives known names its own canonical case."""
    headers = upstream.headers
    named = _connection_tokens(headers)
    drop = HOP_BY_HOP | named if named else HOP_BY_HOP
    # raw_headers and headers come from one parse, field by field, in the same order.
    for (raw_name, _), (name, value) in zip(upstream.raw_headers, headers.items(), strict=True):
        lower = name.lower()
        if lower in drop or _is_stepgate(lower):
            continue
        out.add(raw_name.decode("latin-1"), value)


def create_upstream_session(*, connection_limit: int = 0) -> aiohttp.ClientSession:
    """A client session configured as `proxy_plain` needs it; create it inside the event loop.

    - `auto_decompress=False`: bodies are relayed byte for byte with their Content-Encoding;
    - `DummyCookieJar`: a shared jar would replay one client's cookies to the next;
    - no session timeout: each request sets its own from its route;
    - `connection_limit` 0 = unbounded, since aiohttp's default of 100 would queue a busy proxy.
    """
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=connection_limit),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        timeout=aiohttp.ClientTimeout(total=None),
        skip_auto_headers=_SKIP_AUTO_HEADERS,
    )


@functools.lru_cache(maxsize=128)
def _body_timeout(seconds: float) -> aiohttp.ClientTimeout:
    # One object per distinct route timeout instead of one per request.
    return aiohttp.ClientTimeout(total=None, sock_read=seconds)


def _upstream_url(route: Route, request: web.BaseRequest) -> URL:
    raw = request.raw_path
    if not raw.startswith("/"):
        # Absolute-form or asterisk request targets: aiohttp has already reduced them.
        raw = request.rel_url.raw_path_qs
    # encoded=True: the upstream receives the target exactly as the client wrote it (but for
    # the route's base, where the route strips or rewrites it).
    return URL(route.upstream + upstream_target(route, raw), encoded=True)


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def proxy_plain(
    request: web.Request,
    route: Route,
    session: aiohttp.ClientSession,
    *,
    on_attempt: AttemptHook | None = None,
) -> web.StreamResponse:
    """Forward `request` to `route.upstream` and stream the answer back.

    Retries happen only for methods `method_may_retry` allows and when `route.retry.attempts`
    exceeds 1, and only if the body is absent or declares a length of at most `route.max_body`
    (it is then buffered so it can be sent again); any other request gets one attempt with its
    body streamed. A retriable response whose `Retry-After` asks for more than `retry.max` is
    passed to the client as it is, rather than holding the client that long. So is a retriable
    response once the attempts are spent. No response at all ends in 502 (connect) or 504
    (timeout) problem+json.
    """
    headers, _trace_id = forward_request_headers(
        request.headers,
        peer=request.remote,
        scheme=request.scheme,
        host=request.headers.get(hdrs.HOST),
    )
    url = _upstream_url(route, request)
    policy = route.retry
    method = request.method

    attempts = 1
    body: bytes | aiohttp.StreamReader | None = None
    retry_allowed = policy.attempts > 1 and method_may_retry(method, policy)
    if request.body_exists:
        length = request.content_length
        if retry_allowed and length is not None and length <= route.max_body:
            # Not request.read(): that enforces the app's client_max_size, not the route's.
            body = await request.content.read()
            attempts = policy.attempts
        else:
            body = request.content
    elif retry_allowed:
        attempts = policy.attempts

    attempt = 0
    while True:
        attempt += 1
        data: bytes | io.BytesIO | aiohttp.StreamReader | None = body
        if isinstance(body, bytes) and len(body) > _BYTES_BODY_LIMIT:
            data = io.BytesIO(body)  # a fresh reader per attempt; the buffer is shared
        upstream: aiohttp.ClientResponse | None = None
        status: int | None = None
        failure: FailureKind | None = None
        try:
            async with asyncio.timeout(route.timeout):
                upstream = await session.request(
                    method,
                    url,
                    headers=headers,
                    data=data,
                    allow_redirects=False,
                    skip_auto_headers=_SKIP_AUTO_HEADERS,
                    auto_decompress=False,
                    timeout=_body_timeout(route.timeout),
                )
            status = upstream.status
        except TimeoutError:
            # Before aiohttp.ClientError: aiohttp's own timeouts are both.
            failure = "timeout"
        except aiohttp.ClientError:
            failure = "connect"

        reason: str | None = None
        delay = 0.0
        if attempt < attempts:
            reason = is_retriable(policy, status, failure)
            if reason is not None:
                retry_after = None
                if upstream is not None:
                    retry_after = upstream.headers.get(hdrs.RETRY_AFTER)
                    # The upstream's explicit "do not retry" (the durable protocol's signal)
                    # is just as true for a plain route.
                    if header_true(upstream.headers.get(_NO_RETRY)):
                        reason = None
                delay = next_delay(policy, attempt, status, retry_after, time.time(), _rng)
                if delay > policy.max or _client_gone(request):
                    reason = None
        if on_attempt is not None:
            on_attempt(Outcome(status, failure), reason)

        if reason is not None:
            if upstream is not None:
                upstream.release()
            await asyncio.sleep(delay)
            continue
        if upstream is not None:
            return await _relay(request, upstream)
        stalled = request.content.exception()
        if isinstance(stalled, BodyTimeout):  # the client's body stopped, not the upstream
            return body_timeout_problem(stalled)
        if failure == "timeout":
            return problem(504, detail=f"upstream of route {route.name!r} did not answer in time")
        return problem(502, detail=f"upstream of route {route.name!r} could not be reached")


class RelayedResponse(web.StreamResponse):
    """An upstream's answer, as the upstream gave it.

    - The head waits for the first piece of body, so that a small answer leaves in one write
      instead of two or three (aiohttp's own `web.Response` does the same); `_relay` writes
      as soon as anything arrives, so the head is never held back longer than the upstream
      holds it back itself.
    - Nothing is invented: aiohttp would add `Content-Type: application/octet-stream` to a
      body that came without one, and its `Server: Python/… aiohttp/…` banner.
    - Field values keep their bytes. aiohttp's parser keeps bytes that are not UTF-8 as
      surrogate escapes, but its writer drops them, so a latin-1 file name in a
      Content-Disposition would lose its letters; such a head is written here instead.
    """

    _send_headers_immediately = False
    _http_version: HttpVersion = HttpVersion11

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        self._http_version = request.version
        return await super().prepare(request)

    async def _prepare_headers(self) -> None:
        headers = self.headers
        invented = [name for name in (hdrs.CONTENT_TYPE, hdrs.SERVER) if name not in headers]
        await super()._prepare_headers()
        for name in invented:
            headers.popall(name, None)

    async def _write_headers(self) -> None:
        await super()._write_headers()  # also the check for control characters (ValueError)
        if all(value.isascii() for value in self.headers.values()):
            return
        version = self._http_version
        status_line = f"HTTP/{version.major}.{version.minor} {self.status} {self.reason}"
        head = _serialize_head(status_line, self.headers)
        if head is not None:
            # aiohttp has serialised the head into its writer without sending it (the head
            # waits for the body, see above); put the byte-exact one in its place.
            writer = cast(StreamWriter, self._payload_writer)
            writer._headers_buf = head


async def no_server_banner(request: web.BaseRequest, response: web.StreamResponse) -> None:
    """An `on_response_prepare` signal: the gateway's own answers carry no `Server` field
    (aiohttp's default names its version); relayed answers keep the upstream's, if any."""
    if not isinstance(response, RelayedResponse):
        response.headers.popall(hdrs.SERVER, None)


def _serialize_head(status_line: str, headers: CIMultiDict[str]) -> bytes | None:
    """The head with every value's original bytes, or None when every value is UTF-8 (and
    aiohttp's serialisation is already exact)."""
    raw = False
    lines = [status_line.encode("utf-8", "surrogateescape")]
    for name, value in headers.items():
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            encoded = value.encode("utf-8", "surrogateescape")
            raw = True
        lines.append(name.encode("latin-1") + b": " + encoded)
    if not raw:
        return None
    lines.append(b"\r\n")
    return b"\r\n".join(lines)


async def _relay(request: web.Request, upstream: aiohttp.ClientResponse) -> web.StreamResponse:
    """Stream `upstream` to the client; the caller must not touch `upstream` afterwards."""
    response = RelayedResponse(status=upstream.status, reason=upstream.reason)
    # Straight into the response's own multidict: no intermediate copy per request.
    _copy_upstream_headers(upstream, response.headers)
    completed = False
    try:
        try:
            await response.prepare(request)  # serialised now; sent with the first write
        except ValueError:
            # A control character in a field or the reason phrase: nginx's "upstream sent
            # invalid header" 502. Nothing has been sent yet.
            return problem(502, detail="the upstream sent a header that cannot be relayed")
        if request.method != hdrs.METH_HEAD and upstream.status not in _NO_CONTENT:
            content = upstream.content
            try:
                first = content.read_nowait()
            except (aiohttp.ClientError, TimeoutError):
                return problem(502, detail="the upstream broke off its answer")
            if content.at_eof():
                await response.write_eof(first)  # complete already: head, body, end at once
            else:
                await response.write(first)  # the head (and what came with it) now
                async for chunk in content.iter_any():
                    await response.write(chunk)
        completed = True
    except (aiohttp.ClientError, OSError, TimeoutError):
        # The upstream broke off mid-body, or the client went away. The status line is out, so
        # the only honest signal left is to cut the client's connection: a clean end of a
        # chunked body (or a short one with a Content-Length) would pass for a complete answer.
        transport = request.transport
        if transport is not None:
            transport.close()
    finally:
        if completed:
            upstream.release()  # fully read: the connection goes back to the pool
        else:
            upstream.close()
    return response
