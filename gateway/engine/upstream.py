"""The seam between the invocation loop and the service: one call, one `Outcome`.

`Transport` is what the loop needs; `AiohttpTransport` is the real one. Tests of the loop pass
their own (a function from request to reply), so its decisions are tested without sockets.

An answer is kept whole (it is recorded for replay), so it is read with a bound, the route's
`max_response`: a Content-Length over it fails the attempt before any of the body is read, and
a body without one is counted as it arrives and cut at the bound. Either way the connection is
closed, nothing of the answer is kept, and the outcome is `too_large`, which the run's policy
treats as a 502 (`gateway.retry.is_retriable`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Final, Protocol

import aiohttp
from multidict import CIMultiDict
from yarl import URL

from gateway.config import DEFAULT_MAX_RESPONSE
from gateway.model import Headers, Outcome, UpstreamReply
from gateway.proxy import forward_response_headers, header_true

# Recomputed from the recorded body when it is replayed (a HEAD answer keeps the upstream's).
_STRIP_ON_RECORD: Final = frozenset({"content-length"})


@dataclass(frozen=True, slots=True)
class Invocation:
    """One request to the service, as the loop wants it sent."""

    attempt: int
    method: str
    url: str  # upstream base + stored target, already encoded
    headers: Headers
    body: bytes
    timeout: float
    max_response: int = DEFAULT_MAX_RESPONSE  # bytes of the answer's body that may be kept


class _TooLarge(Exception):
    pass


def too_large_error(limit: int) -> str:
    return f"the upstream's answer is larger than max_response ({limit} bytes)"


def _bodiless(method: str, status: int) -> bool:
    """An answer whose Content-Length does not announce a body that follows (RFC 9110 §8.6)."""
    return method == "HEAD" or status in (204, 304) or 100 <= status < 200


async def _read_bounded(upstream: aiohttp.ClientResponse, method: str, limit: int) -> bytes:
    declared = upstream.content_length
    if declared is not None and declared > limit and not _bodiless(method, upstream.status):
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in upstream.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


class Transport(Protocol):
    async def send(self, call: Invocation) -> Outcome: ...


def reply_from(
    status: int, reason: str | None, raw: list[tuple[str, str]], body: bytes, method: str
) -> UpstreamReply:
    """The reply as the gateway keeps it: headers filtered for the client, names as sent."""
    received: CIMultiDict[str] = CIMultiDict(raw)
    strip = frozenset() if method == "HEAD" else _STRIP_ON_RECORD
    kept = [
        (name, value)
        for name, value in forward_response_headers(received).items()
        if name.lower() not in strip
    ]
    return UpstreamReply(
        status=status,
        reason=reason,
        headers=kept,
        body=body,
        suspend=status == 202 and header_true(received.get("Stepgate-Suspend")),
        no_retry=header_true(received.get("Stepgate-No-Retry")),
        retry_after=received.get("Retry-After"),
    )


class AiohttpTransport:
    """Sends an invocation with the gateway's shared client session."""

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    async def send(self, call: Invocation) -> Outcome:
        started = time.time()
        try:
            async with self._session.request(
                call.method,
                URL(call.url, encoded=True),
                headers=CIMultiDict(call.headers),
                data=call.body or None,
                timeout=aiohttp.ClientTimeout(total=call.timeout),
                allow_redirects=False,
            ) as upstream:
                try:
                    body = await _read_bounded(upstream, call.method, call.max_response)
                except _TooLarge:
                    upstream.close()  # the rest is not wanted: drop the connection, unread
                    return Outcome(
                        call.attempt,
                        started,
                        time.time(),
                        None,
                        "too_large",
                        too_large_error(call.max_response),
                    )
                # raw_headers keep the names as the service wrote them (ETag, not Etag); values
                # are read as aiohttp reads them (bytes that are not UTF-8 kept as surrogate
                # escapes), so that the recorded answer is written back with the same bytes.
                raw = [
                    (name.decode("latin-1"), value.decode("utf-8", "surrogateescape"))
                    for name, value in upstream.raw_headers
                ]
                reply = reply_from(upstream.status, upstream.reason, raw, body, call.method)
                return Outcome(call.attempt, started, time.time(), reply, None)
        except TimeoutError:
            return Outcome(call.attempt, started, time.time(), None, "timeout")
        except (aiohttp.ClientError, OSError):
            return Outcome(call.attempt, started, time.time(), None, "connect")
