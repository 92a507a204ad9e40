"""Request smuggling, framing and path cases, sent over raw sockets to a real gateway.

Each case is the exact bytes a client sends, the exact statuses it gets back (in order, one per
answer on the connection), and what the upstream saw: the (method, target, body) of every
request that reached it. A smuggled request must never reach the upstream inside another one,
and nothing the gateway refuses reaches it at all. The gateway re-frames every request it
forwards (aiohttp's parser on one side, its client on the other), so the upstream's parser
never sees the client's framing; these cases pin that the gateway's own reading is strict.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from tests.conftest import GatewayFactory
from tests.hostile.conftest import Recorder, send, statuses

H = b"Host: shop\r\n"
CLOSE = b"Connection: close\r\n"
WS = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
)
SMUGGLED = b"GET /pub/smuggled HTTP/1.1\r\n" + H + CLOSE + b"\r\n"


@dataclass(frozen=True)
class Case:
    id: str
    request: bytes
    statuses: list[int]
    upstream: list[tuple[str, str, bytes]] = field(default_factory=list)


def get(target: bytes, *extra: bytes) -> bytes:
    return b"GET " + target + b" HTTP/1.1\r\n" + H + b"".join(extra) + CLOSE + b"\r\n"


CASES = [
    # --- framing: Content-Length and Transfer-Encoding -------------------------------------
    Case(
        "cl-and-te",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        [400],
    ),
    Case(
        "te-and-cl",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Content-Length: 4\r\n\r\n0\r\n\r\n" + SMUGGLED,
        [400],
    ),
    Case(
        "duplicate-cl-same",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 4\r\nContent-Length: 4\r\n\r\nabcd",
        [400],
    ),
    Case(
        "duplicate-cl-different",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n"
        b"Content-Length: 40\r\n\r\nabcd" + SMUGGLED,
        [400],
    ),
    Case("cl-list", b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 4, 4\r\n\r\nabcd", [400]),
    Case("cl-plus", b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: +4\r\n\r\nabcd", [400]),
    Case("cl-negative", b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n", [400]),
    Case(
        "cl-overflow",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 99999999999999999999\r\n\r\n",
        [400],
    ),
    Case(
        "te-not-chunked-last",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        [400],
    ),
    Case(
        "te-unknown",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n"
        b"\r\n0\r\n\r\n" + SMUGGLED,
        [400],
    ),
    Case(
        "te-twice",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        [400],
    ),
    Case(
        "te-space-before-colon",
        b"POST /pub/x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding : chunked\r\n\r\n0\r\n\r\n"
        + SMUGGLED,
        [400],
    ),
    Case(
        "te-in-http-1.0",
        b"POST /pub/x HTTP/1.0\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"\r\n3\r\nabc\r\n0\r\n\r\n",
        [400],
    ),  # RFC 9112 §6.1: faulty framing
    Case(
        "te-tab-and-case",
        b"POST /pub/x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding:\tCHUNKED\r\n"
        + CLOSE
        + b"\r\n3\r\nabc\r\n0\r\n\r\n",
        [200],
        [("POST", "/pub/x", b"abc")],
    ),
    Case(
        "chunk-size-0x",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"\r\n0x3\r\nabc\r\n0\r\n\r\n",
        [400],
    ),
    Case(
        "chunk-size-overflow",
        b"POST /pub/x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n\r\nffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
        [400],
    ),
    Case(
        "chunk-bare-lf",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n3\nabc\n0\n\n",
        [400],
    ),
    Case(
        "chunk-extension",
        b"POST /pub/x HTTP/1.1\r\n"
        + H
        + b"Transfer-Encoding: chunked\r\n"
        + CLOSE
        + b"\r\n3;name=value\r\nabc\r\n0\r\n\r\n",
        [200],
        [("POST", "/pub/x", b"abc")],
    ),
    Case(
        "trailer-with-cl",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n"
        b"\r\n0\r\nContent-Length: 50\r\n\r\n" + SMUGGLED,
        [400],
    ),
    # What follows a body's end is the next request, framed and answered on its own.
    Case(
        "after-chunked-end",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n" + SMUGGLED,
        [200, 200],
        [("POST", "/pub/x", b""), ("GET", "/pub/smuggled", b"")],
    ),
    Case(
        "after-content-length",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 4\r\n\r\nabcd" + SMUGGLED,
        [200, 200],
        [("POST", "/pub/x", b"abcd"), ("GET", "/pub/smuggled", b"")],
    ),
    Case(
        "behind-a-websocket-handshake",
        b"GET /pub/ws HTTP/1.1\r\n" + H + WS + b"\r\n" + SMUGGLED,
        [200],
        [("GET", "/pub/ws", b"")],
    ),  # declined upgrade: closed after
    Case(
        "behind-an-h2c-upgrade",
        b"GET /pub/x HTTP/1.1\r\n" + H + b"Upgrade: h2c\r\n"
        b"Connection: Upgrade, HTTP2-Settings\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n"
        b"\r\n" + SMUGGLED,
        [200],
        [("GET", "/pub/x", b"")],
    ),
    # --- the head's syntax ---------------------------------------------------------------
    Case("obs-fold", get(b"/pub/x", b"X-A: a\r\n b\r\n"), [400]),
    Case("bare-lf", b"GET /pub/x HTTP/1.1\nHost: shop\nConnection: close\n\n", [400]),
    Case("bare-cr-in-value", get(b"/pub/x", b"X-A: a\rb\r\n"), [400]),
    Case("nul-in-value", get(b"/pub/x", b"X-A: a\x00b\r\n"), [400]),
    Case("control-in-value", get(b"/pub/x", b"X-A: a\x01b\r\n"), [400]),
    Case("space-in-name", get(b"/pub/x", b"X A: 1\r\n"), [400]),
    Case("empty-name", get(b"/pub/x", b": 1\r\n"), [400]),
    Case("no-host", b"GET /pub/x HTTP/1.1\r\n" + CLOSE + b"\r\n", [400]),
    Case(
        "two-hosts",
        b"GET /pub/x HTTP/1.1\r\n" + H + b"Host: evil.example\r\n" + CLOSE + b"\r\n",
        [400],
    ),
    Case("host-with-space", b"GET /pub/x HTTP/1.1\r\nHost: shop evil\r\n" + CLOSE + b"\r\n", [400]),
    Case("host-with-path", b"GET /pub/x HTTP/1.1\r\nHost: shop/x\r\n" + CLOSE + b"\r\n", [400]),
    Case("lower-case-method", b"get /pub/x HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [400]),
    Case("control-in-method", b"G\x01T /pub/x HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [400]),
    Case("http-0.9", b"GET /pub/x\r\n\r\n", [400]),
    Case("http-1.2", b"GET /pub/x HTTP/1.2\r\n" + H + CLOSE + b"\r\n", [400]),
    Case("http-2.0-line", b"GET /pub/x HTTP/2.0\r\n" + H + CLOSE + b"\r\n", [505]),
    Case("h2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", [400]),
    Case("tls-on-plain-port", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32), [400]),
    Case(
        "oversize-fields",
        get(b"/pub/x", *(b"X-%d: %s\r\n" % (i, b"a" * 8000) for i in range(120))),
        [431],
    ),
    Case("oversize-target", get(b"/pub/" + b"a" * 70_000), [414]),
    # --- targets ---------------------------------------------------------------------------
    Case("dot-segments", get(b"/pub/../admin"), [400]),
    Case("encoded-dots", get(b"/admin/%2e%2e/pub/x"), [400]),
    Case("encoded-dots-upper", get(b"/admin/%2E%2E/pub/x"), [400]),
    Case("dots-and-encoded-slash", get(b"/admin/..%2f..%2fpub/x"), [400]),
    Case("dots-and-encoded-slash-upper", get(b"/admin/..%2F..%2Fpub/x"), [400]),
    Case("encoded-slash-then-dots", get(b"/pub/x%2F..%2F..%2Fadmin"), [400]),
    Case("backslash-dots", get(b"/pub/..%5cadmin"), [400]),
    Case("path-parameter-dots", get(b"/pub/..;/admin"), [400]),
    Case("encoded-nul", get(b"/pub/x%00.txt"), [400]),
    Case("bad-escape", get(b"/pub/x%zz"), [400]),
    Case("nul-in-target", b"GET /pub/a\x00b HTTP/1.1\r\n" + H + b"\r\n", [400]),
    Case("space-in-target", b"GET /pub/a b HTTP/1.1\r\n" + H + b"\r\n", [400]),
    Case("fragment", get(b"/pub/x#frag"), [400]),
    Case("encoded-slash-is-one-segment", get(b"/pub%2Fx"), [404]),
    Case("absolute-form-elsewhere", get(b"http://evil.example/pub/x"), [400]),
    Case(
        "absolute-form-elsewhere-to-a-poll-url",
        get(b"http://evil.example/_stepgate/runs/x?token=y"),
        [400],
    ),
    Case(
        "absolute-form-this-host",
        get(b"http://shop/pub/x?q=%2F"),
        [200],
        [("GET", "/pub/x?q=%2F", b"")],
    ),
    Case(
        "authority-form",
        b"CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\n" + CLOSE + b"\r\n",
        [400],
    ),
    Case("asterisk-form", b"OPTIONS * HTTP/1.1\r\n" + H + CLOSE + b"\r\n", [200]),
    Case("asterisk-form-get", get(b"*"), [400]),
    Case("unrouted", get(b"/admin/x"), [404]),
    Case("fine", get(b"/pub/x"), [200], [("GET", "/pub/x", b"")]),
    Case(
        "pipelined",
        b"GET /pub/a HTTP/1.1\r\n" + H + b"\r\n" + get(b"/pub/b"),
        [200, 200],
        [("GET", "/pub/a", b""), ("GET", "/pub/b", b"")],
    ),
    # --- expectations ----------------------------------------------------------------------
    Case(
        "unknown-expectation",
        b"POST /pub/x HTTP/1.1\r\n" + H + b"Content-Length: 0\r\n"
        b"Expect: 100-continue, teapot\r\n" + CLOSE + b"\r\n",
        [417],
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_raw_request(
    gateway: GatewayFactory, recorder: tuple[Recorder, str], case: Case
) -> None:
    seen, base = recorder
    gw = await gateway(
        [
            {"name": "pub", "path": "/pub/*", "upstream": base},
            {"name": "durable", "path": "/runs/*", "upstream": base, "durable": True},
        ]
    )
    answer = await send(gw.gateway.public_port, case.request, timeout=5)
    assert statuses(answer) == case.statuses
    for status in case.statuses:
        if status >= 400:
            assert b"application/problem+json" in answer
    assert [(method, target, body) for method, target, _, body in seen.requests] == case.upstream
    assert b"Server:" not in answer and b"Python/" not in answer


@pytest.mark.parametrize(
    "case",
    [
        case
        for case in CASES
        if 400 <= case.statuses[0] < 500 and case.request.startswith(b"POST /pub/")
    ],
    ids=lambda case: case.id,
)
async def test_refused_framing_makes_no_durable_run(
    gateway: GatewayFactory, recorder: tuple[Recorder, str], case: Case
) -> None:
    seen, base = recorder
    gw = await gateway([{"name": "durable", "path": "/*", "upstream": base, "durable": True}])
    request = case.request.replace(b"/pub/", b"/runs/")
    answer = await send(gw.gateway.public_port, request, timeout=5)
    assert statuses(answer) == case.statuses
    assert seen.requests == []
    assert sum((await gw.store.count_by_status()).values()) == 0
