"""Malformed requests are answered with problem+json and logged as one structured line each,
throttled: an unauthenticated client must not be able to flood the log (issue 10 found 65
multi-line tracebacks at ERROR for as many requests). Against a real `stepgate serve`."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from gateway.logging import Throttle
from tests.gateway.procs import GatewayProcess
from tests.hostile.conftest import Recorder, send, statuses

MALFORMED = [
    b"GET /x HTTP/1.1 extra\r\nHost: h\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n",
    b"POST /x HTTP/1.1\r\nHost: h\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\nabcde",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\r\n b\r\n\r\n",
    b"GET /x HTTP/1.1\nHost: h\n\n",
    b"GET /x HTTP/1.1\r\nHost: h\r\nX-A: a\x00b\r\n\r\n",
    b"G\x01T /x HTTP/1.1\r\nHost: h\r\n\r\n",
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(32),  # TLS on the plain port
    b"GET /x HTTP/1.1\r\n\r\n",  # no Host
]


@pytest.fixture
async def served(
    tmp_path: Path, recorder: tuple[Recorder, str]
) -> AsyncIterator[tuple[GatewayProcess, Recorder]]:
    seen, base = recorder
    process = GatewayProcess(tmp_path, [{"name": "all", "path": "/*", "upstream": base}])
    await process.start()
    try:
        yield process, seen
    finally:
        process.stop()


def log_lines(process: GatewayProcess) -> list[dict[str, object]]:
    lines = process.log.read_text().splitlines()
    parsed = []
    for line in lines:
        parsed.append(json.loads(line))  # every line is one JSON object: no tracebacks
    return parsed


async def test_each_malformed_request_is_a_problem_and_one_info_line(
    served: tuple[GatewayProcess, Recorder],
) -> None:
    process, seen = served
    for request in MALFORMED:
        answer = await send(process.public, request, timeout=5)
        assert statuses(answer) == [400], request
        head, _, body = answer.partition(b"\r\n\r\n")
        assert b"Content-Type: application/problem+json" in head
        assert json.loads(body)["status"] == 400
    assert seen.requests == []
    process.stop()
    bad = [line for line in log_lines(process) if line["event"] == "http.bad_request"]
    assert len(bad) == len(MALFORMED)
    for line in bad:
        assert line["level"] == "info"
        assert line["peer"] == "127.0.0.1"
        assert line["status"] == 400
        reason = line["reason"]
        assert isinstance(reason, str) and reason and "\n" not in reason


async def test_a_request_in_a_version_not_spoken_is_a_505_logged_like_the_others(
    served: tuple[GatewayProcess, Recorder],
) -> None:
    """HTTP/2.0 in a request line was logged at ERROR as a gateway failure, unthrottled."""
    process, _ = served
    for _ in range(60):
        answer = await send(process.public, b"GET /x HTTP/2.0\r\nHost: h\r\n\r\n", timeout=5)
        assert statuses(answer) == [505]
    process.stop()
    lines = log_lines(process)
    assert not [line for line in lines if line["level"] == "error"]
    refused = [line for line in lines if line["event"] == "http.bad_request"]
    assert 0 < len(refused) < 60
    assert {line["status"] for line in refused} == {505}


async def test_a_flood_of_malformed_requests_is_throttled_and_counted(
    served: tuple[GatewayProcess, Recorder],
) -> None:
    process, _ = served
    sent = 0
    for _ in range(3):  # in batches at once: faster than the bucket refills, however busy
        await asyncio.gather(*(send(process.public, MALFORMED[0], timeout=5) for _ in range(50)))
        sent += 50
    await asyncio.sleep(1.2)  # the bucket refills: the next line carries the count
    await send(process.public, MALFORMED[1], timeout=5)
    sent += 1
    process.stop()
    bad = [line for line in log_lines(process) if line["event"] == "http.bad_request"]
    suppressed = [line["suppressed"] for line in bad]
    assert len(bad) < sent / 2
    assert sum(int(str(count)) for count in suppressed) + len(bad) == sent
    assert int(str(suppressed[-1])) > 0


def test_the_throttle_admits_a_burst_then_a_rate_and_counts_the_rest() -> None:
    now = [0.0]
    throttle = Throttle(rate=2.0, burst=3, clock=lambda: now[0])
    assert [throttle.admit() for _ in range(5)] == [0, 0, 0, None, None]
    now[0] += 0.5  # one token back
    assert throttle.admit() == 2
    assert throttle.admit() is None
    now[0] += 10.0  # refills to the burst, no more
    assert [throttle.admit() for _ in range(4)] == [1, 0, 0, None]
