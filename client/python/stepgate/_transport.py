"""HTTP to the gateway's callback API: the SDK's only I/O, and its one seam for tests.

Every checkpoint is a round trip on the handler's hot path, so this is deliberately small:
HTTP/1.1 over plain http only (the callback API lives on the gateway's internal listener),
keep-alive connections reused per event loop (async) or per thread (blocking), one prebuilt
write per request. A kept-alive connection the gateway has closed in the meantime is retried
once on a fresh connection when nothing of the answer arrived; that is safe because every
callback is idempotent (a repeated output PUT gets the first stored output back).

Tests replace `default_async` / `default_sync` (or pass transports to an `Invocation`) with
objects that have the same `request` method.
"""

from __future__ import annotations

import asyncio
import http.client
import threading
from collections.abc import AsyncGenerator
from typing import NamedTuple, Protocol

from stepgate.errors import CallbackError, GatewayUnavailableError

__all__ = [
    "AsyncTransport",
    "AsyncTransportLike",
    "Reply",
    "SyncTransport",
    "SyncTransportLike",
    "default_async",
    "default_sync",
]

DEFAULT_TIMEOUT = 30.0
_USER_AGENT = "stepgate-python/0.1"


class Reply(NamedTuple):
    status: int
    body: bytes


class AsyncTransportLike(Protocol):
    async def request(
        self, method: str, url: str, token: str, body: bytes | None = None
    ) -> Reply: ...


class SyncTransportLike(Protocol):
    def request(self, method: str, url: str, token: str, body: bytes | None = None) -> Reply: ...


class _Target(NamedTuple):
    host: str
    port: int
    netloc: str  # as written, for the Host header
    path: str


_targets: dict[str, tuple[str, str, int]] = {}  # netloc -> (netloc, host, port); few entries


def _target(url: str) -> _Target:
    """Split a callback URL without urllib on the hot path (netlocs are cached)."""
    if not url.startswith("http://"):
        raise CallbackError(
            f"callback URL {url!r} is not http://: the callback API is served over plain http"
            " on the gateway's internal listener (check the gateway's internal_url)"
        )
    rest = url[7:]
    slash = rest.find("/")
    netloc, path = (rest, "/") if slash < 0 else (rest[:slash], rest[slash:])
    known = _targets.get(netloc)
    if known is None:
        known = _split_netloc(netloc, url)
        if len(_targets) < 64:
            _targets[netloc] = known
    return _Target(known[1], known[2], netloc, path)


def _split_netloc(netloc: str, url: str) -> tuple[str, str, int]:
    host, port_text = netloc, ""
    if netloc.startswith("["):  # [::1]:8081
        end = netloc.find("]")
        host, port_text = netloc[1:end], netloc[end + 2 :]
    elif ":" in netloc:
        host, _, port_text = netloc.rpartition(":")
    try:
        port = int(port_text) if port_text else 80
    except ValueError:
        raise CallbackError(f"callback URL {url!r} has a bad port") from None
    if not host:
        raise CallbackError(f"callback URL {url!r} has no host")
    return netloc, host, port


def _unreachable(target: _Target, exc: BaseException) -> GatewayUnavailableError:
    return GatewayUnavailableError(
        f"the gateway at {target.netloc} is unreachable: {str(exc) or type(exc).__name__}"
    )


# ---------------------------------------------------------------------------------------------
# asyncio


class _NothingReceived(Exception):
    """The connection failed before any byte of the answer: safe to resend on a fresh one."""


class _Connection:
    __slots__ = ("reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer

    def close(self) -> None:
        try:
            self.writer.close()
        except RuntimeError:  # its loop is already closed; nothing left to release
            pass


class _LoopPool:
    """Idle keep-alive connections of one event loop, by (host, port)."""

    __slots__ = ("idle", "keeper")

    def __init__(self) -> None:
        self.idle: dict[tuple[str, int], list[_Connection]] = {}
        self.keeper: AsyncGenerator[None, None] | None = None

    def close(self) -> None:
        for conns in self.idle.values():
            for conn in conns:
                conn.close()
        self.idle.clear()


async def _close_at_loop_shutdown(
    pool: _LoopPool,
    pools: dict[asyncio.AbstractEventLoop, _LoopPool],
    loop: asyncio.AbstractEventLoop,
) -> AsyncGenerator[None, None]:
    # An async generator started on a loop is closed by loop.shutdown_asyncgens(), which
    # asyncio.run(), asyncio.Runner and aiohttp's run_app call before closing the loop: the one
    # hook that lets a library close its sockets without the application wiring a cleanup.
    try:
        yield
    finally:
        pool.close()
        if pools.get(loop) is pool:
            pools.pop(loop, None)


class AsyncTransport:
    """A tiny HTTP/1.1 client over asyncio streams with keep-alive reuse per loop and host."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._pools: dict[asyncio.AbstractEventLoop, _LoopPool] = {}

    async def request(self, method: str, url: str, token: str, body: bytes | None = None) -> Reply:
        target = _target(url)
        data = _request_bytes(method, target, token, body)
        pool = self._pools.get(asyncio.get_running_loop()) or await self._new_pool()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._send(pool, target, data)
        except TimeoutError as exc:  # before OSError: TimeoutError is one
            raise GatewayUnavailableError(
                f"the gateway at {target.netloc} did not answer within {self.timeout:g} s"
            ) from exc
        except OSError as exc:
            raise _unreachable(target, exc) from exc

    async def aclose(self) -> None:
        """Close this loop's idle connections (they are also closed at loop shutdown)."""
        pool = self._pools.get(asyncio.get_running_loop())
        if pool is not None and pool.keeper is not None:
            await pool.keeper.aclose()  # runs its finally: close, forget the pool

    async def _new_pool(self) -> _LoopPool:
        loop = asyncio.get_running_loop()
        # list() first: handlers on loops in other threads may add pools meanwhile.
        for stale in [other for other in list(self._pools) if other.is_closed()]:
            self._pools.pop(stale, None)
        pool = self._pools[loop] = _LoopPool()  # registered before any await: one per loop
        pool.keeper = _close_at_loop_shutdown(pool, self._pools, loop)
        await anext(pool.keeper)
        return pool

    async def _send(self, pool: _LoopPool, target: _Target, data: bytes) -> Reply:
        key = (target.host, target.port)
        idle = pool.idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.writer.is_closing() or conn.reader.at_eof():
                conn.close()  # the gateway closed it while idle, and we noticed
                continue
            try:
                return await _exchange(pool, key, conn, data)
            except _NothingReceived:
                break  # closed meanwhile, unnoticed: one fresh connection instead
        reader, writer = await asyncio.open_connection(target.host, target.port)
        try:
            return await _exchange(pool, key, _Connection(reader, writer), data)
        except _NothingReceived as exc:
            cause = exc.__cause__ or exc
            raise _unreachable(target, cause) from cause


async def _exchange(pool: _LoopPool, key: tuple[str, int], conn: _Connection, data: bytes) -> Reply:
    """One request/answer on `conn`; the connection goes back to the pool only when clean."""
    keep = False
    try:
        try:
            conn.writer.write(data)
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as exc:
            if exc.partial:
                raise CallbackError("the gateway closed the connection mid-answer") from exc
            raise _NothingReceived() from exc
        except (ConnectionResetError, BrokenPipeError) as exc:
            raise _NothingReceived() from exc
        except asyncio.LimitOverrunError as exc:
            raise CallbackError("the gateway's answer headers are too large") from exc
        status, length, chunked, keep_alive = _parse_head(head)
        try:
            if status in (204, 304) or 100 <= status < 200:
                body = b""
            elif length is not None:
                body = await conn.reader.readexactly(length)
            elif chunked:
                body = await _read_chunked(conn.reader)
            else:  # delimited by close
                body, keep_alive = await conn.reader.read(), False
        except asyncio.IncompleteReadError as exc:
            raise CallbackError("the gateway closed the connection mid-answer") from exc
        keep = keep_alive
        return Reply(status, body)
    finally:
        if keep:
            pool.idle.setdefault(key, []).append(conn)
        else:
            conn.close()


def _request_bytes(method: str, target: _Target, token: str, body: bytes | None) -> bytes:
    head = (
        f"{method} {target.path} HTTP/1.1\r\nHost: {target.netloc}\r\n"
        f"User-Agent: {_USER_AGENT}\r\nAuthorization: Bearer {token}\r\n"
        "Accept: application/json\r\n"
    )
    if body is None:
        return (head + "\r\n").encode("latin-1")
    return (head + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode(
        "latin-1"
    ) + body


def _parse_head(head: bytes) -> tuple[int, int | None, bool, bool]:
    """-> (status, content length, chunked, keep-alive) from a response head."""
    lines = head.split(b"\r\n")
    first = lines[0]
    if not first.startswith(b"HTTP/1.") or len(first) < 12 or not first[9:12].isdigit():
        raise CallbackError(f"the gateway did not answer HTTP/1.x: {first[:40]!r}")
    keep = first[7:8] == b"1"  # HTTP/1.1 keeps the connection unless told otherwise
    length: int | None = None
    chunked = False
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        name = name.strip().lower()
        if name == b"content-length":
            try:
                length = int(value)
            except ValueError:
                raise CallbackError("the gateway sent a bad Content-Length") from None
        elif name == b"transfer-encoding":
            chunked = b"chunked" in value.lower()
        elif name == b"connection":
            token = value.strip().lower()
            keep = token != b"close" and (keep or token == b"keep-alive")
    return int(first[9:12]), (None if chunked else length), chunked, keep


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    parts: list[bytes] = []
    while True:
        size_line = await reader.readuntil(b"\r\n")
        try:
            size = int(size_line.split(b";", 1)[0], 16)
        except ValueError:
            raise CallbackError("the gateway sent a bad chunk size") from None
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # skip trailers
                pass
            return b"".join(parts)
        parts.append((await reader.readexactly(size + 2))[:-2])


# ---------------------------------------------------------------------------------------------
# blocking


class _ThreadConnections(dict[tuple[str, int], http.client.HTTPConnection]):
    """One thread's keep-alive connections, closed when the thread ends (no ResourceWarning)."""

    def __del__(self) -> None:
        for conn in self.values():
            conn.close()


class SyncTransport:
    """Blocking callbacks over http.client, one keep-alive connection per thread and host."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        self.timeout = timeout
        self._local = threading.local()

    def request(self, method: str, url: str, token: str, body: bytes | None = None) -> Reply:
        target = _target(url)
        headers = {
            "User-Agent": _USER_AGENT,
            "Authorization": f"Bearer {token}",
            "Accept": "application/json",
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        conns = self._connections()
        key = (target.host, target.port)
        conn = conns.pop(key, None)
        try:
            if conn is not None:
                try:
                    return self._exchange(conns, key, conn, method, target.path, body, headers)
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the gateway closed this kept-alive connection meanwhile
            conn = http.client.HTTPConnection(target.host, target.port, timeout=self.timeout)
            return self._exchange(conns, key, conn, method, target.path, body, headers)
        except TimeoutError as exc:
            raise GatewayUnavailableError(
                f"the gateway at {target.netloc} did not answer within {self.timeout:g} s"
            ) from exc
        except OSError as exc:
            raise _unreachable(target, exc) from exc

    def close(self) -> None:
        """Close the calling thread's connections."""
        conns = self._connections()
        for conn in conns.values():
            conn.close()
        conns.clear()

    def _connections(self) -> _ThreadConnections:
        conns: _ThreadConnections | None = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = _ThreadConnections()
        return conns

    @staticmethod
    def _exchange(
        conns: _ThreadConnections,
        key: tuple[str, int],
        conn: http.client.HTTPConnection,
        method: str,
        path: str,
        body: bytes | None,
        headers: dict[str, str],
    ) -> Reply:
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
        except http.client.HTTPException as exc:
            conn.close()
            if isinstance(exc, ConnectionResetError):  # RemoteDisconnected is both
                raise
            raise CallbackError(f"the gateway sent a malformed answer: {exc!r}") from exc
        except BaseException:
            conn.close()
            raise
        if response.will_close:
            conn.close()
        else:
            conns[key] = conn
        return Reply(response.status, data)


# The transports handlers use; one each per process is enough (pools are per loop / thread).
default_async: AsyncTransportLike = AsyncTransport()
default_sync: SyncTransportLike = SyncTransport()
