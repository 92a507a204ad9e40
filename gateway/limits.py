"""What a client may hold of a listener: time, connections and header bytes (config `limits`).

aiohttp bounds a request head only field by field (8 KiB a line, 128 fields: about 1 MB), has
no time-out for reading it, no limit on connections, and keeps an idle connection for an hour.
Every listener of the gateway is served by `GuardedHandler`, aiohttp's protocol with the
limits that nginx, Envoy and Go's `http.Server` put there:

    limit            default  when it is reached                       modelled on
    header_timeout   10s      408, then close (close alone if the      nginx client_header_timeout,
                              client has sent nothing at all)          Go ReadHeaderTimeout
    body_timeout     60s      408: a request body that sends nothing   nginx client_body_timeout
                              for this long (between two reads, so a
                              slow but moving upload goes on)
    idle_timeout     75s      close a kept-alive connection that       nginx keepalive_timeout
                              waits this long for its next request
    max_connections  10000    close a new connection at once           Envoy's listener limit
    max_header_size  64KiB    431 (414 when the request line alone     Envoy max_request_headers_kb
                              is that long); the head is not read on
    send_timeout     60s      close a connection whose client takes    nginx send_timeout
                              no byte of an answer for this long
                              (between two reads, so a slow but
                              moving download goes on)

The header time-out runs from a connection's first byte (or its opening) to the end of each
head. The body time-out does not run while the gateway itself holds the client back (reading
paused because the upstream takes the body slowly): only the client's silence counts. The send
time-out runs while the connection's write buffer is full (asyncio paused our writing) and is
renewed whenever the client has taken some of it.

Requests aiohttp's parser refuses (a bad request line, a bad field, `Content-Length` with
`Transfer-Encoding`, …) are answered here with problem+json instead of aiohttp's text, and
logged as one `http.bad_request` line at info, throttled (see gateway.logging.Throttle),
instead of a traceback at ERROR for each: a client must not be able to flood the log.

`raise_open_file_limit` raises the soft RLIMIT_NOFILE to the hard limit at start: every proxied
request holds two descriptors, and the common soft default (1024, or 256 on macOS) would
otherwise let long-polls on the public listener starve the internal one.
"""

from __future__ import annotations

import asyncio
import itertools
import re
import resource
from typing import Final

import structlog
from aiohttp import hdrs, web
from aiohttp.http import HttpVersion10, HttpVersion11
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.http_parser import RawRequestMessage
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestHandler, _ErrInfo
from yarl import URL

from gateway.config import Address, Limits
from gateway.logging import Throttle
from gateway.problem import problem

log = structlog.get_logger("stepgate.http")

# Shared by every listener: what one client can make the gateway write is bounded in total.
_BAD_REQUESTS: Final = Throttle(rate=10.0, burst=20)
_REFUSED_CONNECTIONS: Final = Throttle(rate=1.0, burst=5)
_PRINTABLE: Final = re.compile(r"[^\x20-\x7e]+")
_LINGER: Final = 5.0  # seconds, after an error answer (nginx's lingering_timeout)


class BodyTimeout(TimeoutError):
    """A request body sent nothing for `limits.body_timeout`: raised by reads of the body.

    A TimeoutError, so that aiohttp's own lingering read after the answer swallows it; the
    handler that reads the body answers 408 (gateway.app.dispatch, gateway.proxy)."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body sent nothing for {seconds:g}s")
        self.seconds = seconds


def body_timeout_problem(exc: BodyTimeout) -> web.Response:
    """The 408 for a body that stopped arriving; the connection is closed after it."""
    response = problem(408, detail=str(exc))
    response.force_close()
    return response


class _Refusal(Exception):
    """A limit reached while reading a head; becomes the error answer aiohttp sends."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def raise_open_file_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (before, after)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard
    if hard == resource.RLIM_INFINITY:
        target = 1 << 20  # macOS refuses "unlimited" for the soft limit
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            return soft, soft
        return soft, target
    return soft, soft


class Guard:
    """One listener's limits and its open connections; the protocol factory of its server."""

    def __init__(self, name: str, limits: Limits, server: web.Server) -> None:
        self.name = name
        self.limits = limits
        self.open = 0
        self._server = server

    def __call__(self) -> asyncio.Protocol:
        if self.open >= self.limits.max_connections:
            suppressed = _REFUSED_CONNECTIONS.admit()
            if suppressed is not None:
                log.warning(
                    "http.connection_refused",
                    listener=self.name,
                    max_connections=self.limits.max_connections,
                    suppressed=suppressed,
                )
            return _Refused()
        return GuardedHandler(self._server, guard=self, loop=asyncio.get_running_loop())


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made (as Envoy does)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class GuardedSite(web.BaseSite):
    """aiohttp's TCPSite, serving each connection with a `GuardedHandler`."""

    __slots__ = ("_address", "_limits")

    def __init__(
        self, runner: web.BaseRunner, address: Address, *, limits: Limits, backlog: int = 128
    ) -> None:
        super().__init__(runner, backlog=backlog)
        self._address = address
        self._limits = limits

    @property
    def name(self) -> str:
        return str(URL.build(scheme="http", host=self._address.host, port=self._address.port))

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        address = self._address
        guard = Guard(f"{address.host}:{address.port}", self._limits, server)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            guard, address.host, address.port, backlog=self._backlog
        )
        if address.port == 0 and self._server.sockets:
            guard.name = f"{address.host}:{self._server.sockets[0].getsockname()[1]}"


class _ErrorAnswer(web.Response):
    """An answer made before any application saw the request, so no `on_response_prepare`
    signal strips aiohttp's `Server` banner from it (gateway.proxy.no_server_banner): done
    here instead."""

    async def _prepare_headers(self) -> None:
        await super()._prepare_headers()
        self.headers.popall(hdrs.SERVER, None)


def _head_size(message: RawRequestMessage) -> int:
    """The bytes of a parsed head: request line and fields with their separators."""
    size = len(message.method) + len(message.path) + len("  HTTP/1.1\r\n\r\n")
    for name, value in message.raw_headers:
        size += len(name) + len(value) + 4  # ": " and CRLF
    return size


def _framing(message: RawRequestMessage) -> tuple[int, str] | None:
    """What aiohttp's parser lets through but HTTP/1.1 does not: another HTTP version, and
    Transfer-Encoding in an HTTP/1.0 request (RFC 9112 §6.1: faulty framing, as nginx says)."""
    version = message.version
    if version == HttpVersion11:
        return None
    if version == HttpVersion10:
        if hdrs.TRANSFER_ENCODING in message.headers:
            return 400, "Transfer-Encoding in an HTTP/1.0 request"
        return None
    if version.major >= 2:
        return 505, f"HTTP/{version.major}.{version.minor} is not spoken here: use HTTP/1.1"
    return 400, "HTTP/0.9 requests are not served"


class GuardedHandler(RequestHandler):
    """aiohttp's server protocol with a listener's `Limits`; see the module docstring."""

    __slots__ = (
        "_body",
        "_body_seen",
        "_body_timer",
        "_counted",
        "_gone",
        "_guard",
        "_head_bytes",
        "_head_timer",
        "_held",
        "_lingering",
        "_refused",
        "_send_left",
        "_send_timer",
    )

    def __init__(self, manager: web.Server, *, guard: Guard, loop: asyncio.AbstractEventLoop):
        limits = guard.limits
        super().__init__(
            manager,
            loop=loop,
            keepalive_timeout=limits.idle_timeout,
            access_log=None,  # type: ignore[arg-type]  # aiohttp takes None: no access log
            # The total is checked here; aiohttp's own per-line checks only tell which part
            # of the head overflowed: the request line (414) or a field (431).
            max_line_size=limits.max_header_size,
            max_field_size=limits.max_header_size + 1,
            # A request body is forwarded, and stored, as the client sent it; inflating it
            # here would hand the upstream a body that no longer matches its headers.
            auto_decompress=False,
        )
        self._guard = guard
        self._counted = False
        self._head_bytes = 0  # of a head not parsed yet
        self._head_timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the body being received, if any
        self._body_seen = 0.0
        self._body_timer: asyncio.TimerHandle | None = None
        self._held = False  # reading paused by the gateway, not by the client's silence
        self._refused = False
        self._lingering = False
        self._gone: asyncio.Future[None] | None = None  # set when a lingering client leaves
        self._send_timer: asyncio.TimerHandle | None = None
        self._send_left = 0  # bytes waiting for the client when the send timer was armed

    # -- the connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._guard.open += 1
        self._counted = True
        self._arm_head_timer()  # a client that connects and says nothing is timed too

    def connection_lost(self, exc: BaseException | None) -> None:
        self._client_gone()
        if self._counted:
            self._counted = False
            self._guard.open -= 1
        self._cancel_timers()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_send_timer()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._cancel_send_timer()

    def pause_reading(self) -> None:
        self._held = True
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        self._held = False
        self._body_seen = self._loop.time()
        super().resume_reading(resume_parser)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return  # a refused head is not read on; the answer closes the connection
        if self._payload_parser is not None or self._upgraded:
            super().data_received(data)  # a WebSocket tunnel: not HTTP any more
            return
        body = self._body
        if body is not None and not body.is_eof():
            self._body_seen = self._loop.time()
        elif data:
            self._body = None
            if self._head_timer is None:
                self._arm_head_timer()
        before = len(self._messages)
        super().data_received(data)
        if len(self._messages) > before:
            self._parsed(before)
        elif self._body is None:
            self._head_bytes += len(data)
            if self._head_bytes > self._guard.limits.max_header_size:
                self._refuse(*self._oversize())

    # -- heads ----------------------------------------------------------------------------

    def _parsed(self, before: int) -> None:
        """Messages from `before` on are new: check their heads, time their bodies."""
        limit = self._guard.limits.max_header_size
        new = list(itertools.islice(self._messages, before, None))
        self._head_bytes = 0
        self._cancel_head_timer()
        for index, (message, _) in enumerate(new):
            if isinstance(message, _ErrInfo):
                self._refused = True  # aiohttp's parser cannot go on after an error
                return
            refusal = _framing(message) or (
                self._oversize() if _head_size(message) > limit else None
            )
            if refusal is not None:
                for _ in new[index:]:
                    self._messages.pop()
                self._refuse(*refusal)
                return
        payload = new[-1][1]
        if not payload.is_eof():
            self._body = payload
            self._body_seen = self._loop.time()
            self._arm_body_timer(self._body_seen + self._guard.limits.body_timeout)

    def _oversize(self) -> tuple[int, str]:
        return 431, (
            f"the request's header fields are larger than limits.max_header_size "
            f"({self._guard.limits.max_header_size} bytes)"
        )

    def _refuse(self, status: int, detail: str) -> None:
        """Answer `status` after whatever is being answered now, then close."""
        self._refused = True
        self._cancel_timers()
        self._messages.append(
            (_ErrInfo(status=status, exc=_Refusal(status, detail), message=detail), EMPTY_PAYLOAD)
        )
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(
            self._guard.limits.header_timeout, self._head_timed_out
        )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self._refused or self.transport is None:
            return
        if self._head_bytes == 0 and self._request_count == 0:
            self.force_close()  # never said a word: nobody to answer (nginx does the same)
            return
        self._refuse(
            408,
            f"the request head did not arrive within limits.header_timeout "
            f"({self._guard.limits.header_timeout:g}s)",
        )

    # -- bodies ---------------------------------------------------------------------------

    def _arm_body_timer(self, when: float) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
        self._body_timer = self._loop.call_at(when, self._body_check)

    def _body_check(self) -> None:
        self._body_timer = None
        body = self._body
        if body is None or body.is_eof() or self.transport is None:
            return
        timeout = self._guard.limits.body_timeout
        now = self._loop.time()
        if self._held:
            self._body_seen = now  # we are the slow side: the client is not to blame
        due = self._body_seen + timeout
        if now < due:
            self._arm_body_timer(due)
            return
        self._body = None
        body.set_exception(BodyTimeout(timeout))

    # -- answers a client does not take ------------------------------------------------------

    def _arm_send_timer(self) -> None:
        self._cancel_send_timer()
        if self.transport is not None:
            self._send_left = self.transport.get_write_buffer_size()
            self._send_timer = self._loop.call_later(
                self._guard.limits.send_timeout, self._send_check
            )

    def _send_check(self) -> None:
        self._send_timer = None
        transport = self.transport
        if transport is None:
            return
        if transport.get_write_buffer_size() < self._send_left:
            self._arm_send_timer()  # the client took some: slow, not gone
            return
        suppressed = _BAD_REQUESTS.admit()
        if suppressed is not None:
            log.info(
                "http.send_timeout",
                listener=self._guard.name,
                waiting_bytes=self._send_left,
                seconds=self._guard.limits.send_timeout,
                suppressed=suppressed,
            )
        transport.abort()  # what is buffered cannot be sent; wakes the writer with an error

    def _cancel_send_timer(self) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _cancel_timers(self) -> None:
        self._cancel_head_timer()
        self._cancel_send_timer()
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    # -- answers and logs for what aiohttp refuses -----------------------------------------

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        status, detail = self._classify(request, status, exc)
        # A 5xx of our own choosing (505 for HTTP/2.0) is the client's doing, logged as such;
        # only what went wrong inside the gateway is an error.
        if status >= 500 and not isinstance(exc, _Refusal):
            log.error(
                "http.handler_failed",
                peer=request.remote,
                method=request.method,
                status=status,
                exc_info=exc,
            )
        else:
            suppressed = _BAD_REQUESTS.admit()
            if suppressed is not None:
                log.info(
                    "http.bad_request",
                    listener=self._guard.name,
                    peer=request.remote,
                    status=status,
                    reason=detail,
                    suppressed=suppressed,
                )
        if request.writer.output_size > 0:
            # Part of an answer is out already; the connection is all that can be cut.
            raise ConnectionError("an answer was under way; cannot send an error answer")
        # The connection ends after this answer, but not at once (`finish_response`).
        self._refused = self._lingering = True
        answer = problem(status, detail=detail, headers={"Connection": "close"})
        return _ErrorAnswer(status=status, body=answer.body, headers=answer.headers)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        """After an error answer, a lingering close (nginx's `lingering_close`): the client
        may still be sending the head or body that was refused, and closing a socket with
        unread input sends a reset that can destroy the answer before the client reads it.
        So: send the answer, shut the sending side, drop what comes in until the client
        closes or `_LINGER` has passed; aiohttp closes the connection after that."""
        answered = await super().finish_response(request, resp, start_time)
        transport = self.transport
        if self._lingering and transport is not None and not transport.is_closing():
            gone = self._loop.create_future()
            self._gone = gone
            if transport.can_write_eof():
                transport.write_eof()
            try:
                await asyncio.wait_for(gone, _LINGER)
            except TimeoutError:
                pass
            self.force_close()
        return answered

    def _client_gone(self) -> None:
        gone = self._gone
        if gone is not None and not gone.done():
            gone.set_result(None)

    def eof_received(self) -> None:
        self._client_gone()

    def _classify(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> tuple[int, str]:
        if isinstance(exc, _Refusal):
            return exc.status, exc.detail
        if isinstance(exc, LineTooLong):
            if exc.args[1] == self.max_line_size:
                return 414, (
                    f"the request target is longer than limits.max_header_size "
                    f"({self._guard.limits.max_header_size} bytes)"
                )
            return self._oversize()
        if isinstance(exc, BadHttpMessage):
            if exc.message.startswith("Too many headers"):
                return 431, f"the request has more than {self.max_headers} header fields"
            return status, _reason(exc.message)
        content = request.content
        if status == 504 and isinstance(content.exception(), BodyTimeout):
            return 408, str(content.exception())  # a handler let the body's time-out through
        if status >= 500:
            return status, "the gateway failed to answer this request"
        return status, _reason(str(exc) if exc is not None else "")

    def log_exception(self, *args: object, **kw: object) -> None:
        """aiohttp's own error lines ("Unhandled exception", …) as structured ones."""
        exc_info = kw.get("exc_info")
        log.error(
            "http.server_error",
            message=str(args[0]) if args else None,
            exc_info=exc_info if isinstance(exc_info, BaseException) else True,
        )


def _reason(message: str) -> str:
    """The first line of a parser's message, in printable ASCII: it may quote client bytes."""
    first = message.strip().splitlines()[0] if message.strip() else "malformed request"
    return _PRINTABLE.sub("?", first.rstrip(":")).strip()[:200] or "malformed request"
