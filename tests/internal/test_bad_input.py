"""Bad input on the internal listener is a specific 4xx problem, never a 500, and nothing a
caller sends can make a later read of the run fail (issue 10). Each case here was a 500 or a
503, or was accepted and then broke `GET /v1/runs/{id}`."""

from __future__ import annotations

import json
import sqlite3
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from tests.hostile.conftest import responses, send
from tests.internal.conftest import HeldRun, assert_refused

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

# The documented limits (docs/protocol.md, "Limits").
MAX_DEPTH = 128
MAX_INT_DIGITS = 4300
LONE = "\ud800"  # sent as the JSON escape "\ud800", which is how it reaches a gateway

SURROGATE_BODIES: dict[str, Any] = {
    "output": {"output": LONE},
    "output key": {"output": {LONE: 1}},
    "nested output": {"output": [{"a": ["x", LONE + "y"]}]},
    "error message": {"error": {"message": LONE}},
    "error type": {"error": {"message": "m", "type": LONE}},
    "error extra": {"error": {"message": "m", "detail": {"k": LONE}}},
    "wait event": {"wait": {"event": LONE}},
    "wait match key": {"wait": {"event": "e", "match": {LONE: 1}}},
    "wait match value": {"wait": {"event": "e", "match": {"data.k": LONE}}},
    "wait timeout": {"wait": {"event": "e", "timeout": LONE}},
    "sleep until": {"sleep": {"until": LONE}},
    "unknown member": {"output": 1, LONE: 2},
}


@pytest.mark.parametrize("body", SURROGATE_BODIES.values(), ids=SURROGATE_BODIES.keys())
async def test_a_lone_surrogate_in_a_step_body_is_a_400(held: HeldRun, body: Any) -> None:
    assert_refused(await held.put("s", body))
    await held.assert_readable()


async def test_a_surrogate_pair_is_text_and_is_kept(held: HeldRun) -> None:
    answer = await held.put("s", {"output": "\U0001f600 \ud83d\ude00"})
    assert answer.status == 201, answer
    assert answer.json()["output"] == "\U0001f600 \U0001f600"
    await held.assert_readable()


@pytest.mark.parametrize(
    "raw",
    [
        b'{"output": "\xff"}',  # not UTF-8
        b'{"output": "\xed\xa0\x80"}',  # a surrogate in CESU-8 bytes
        '{"output": 1}'.encode("utf-16"),  # json.loads(bytes) would sniff UTF-16 and take it
        b'\xef\xbb\xbf{"output": 1}',  # a BOM
    ],
    ids=["0xff", "cesu-8", "utf-16", "bom"],
)
async def test_a_body_that_is_not_utf8_is_a_400(held: HeldRun, raw: bytes) -> None:
    assert_refused(await held.put("s", raw))
    await held.assert_readable()


async def test_a_body_over_16_mib_is_a_413(held: HeldRun) -> None:
    big = b'{"output":"' + b"x" * (16 * 1024 * 1024) + b'"}'
    assert_refused(await held.put("s", big), 413)
    assert_refused(
        await held.event(b'{"name":"e","data":"' + b"x" * (16 * 1024 * 1024) + b'"}'), 413
    )
    await held.assert_readable()


def nested(depth: int) -> bytes:
    """`{"output": <depth - 1 nested arrays>}`: `depth` levels in all."""
    return b'{"output":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"


@pytest.mark.parametrize("depth", [MAX_DEPTH + 1, 2_000, 100_000])
async def test_json_nested_deeper_than_the_bound_is_a_400(held: HeldRun, depth: int) -> None:
    answer = await held.put("s", nested(depth))
    assert_refused(answer)
    assert str(MAX_DEPTH) in answer.json()["detail"]
    assert_refused(
        await held.event(b'{"name":"e","data":' + b'{"a":' * depth + b"1" + b"}" * depth + b"}")
    )
    await held.assert_readable()


async def test_json_nested_to_the_bound_is_kept_and_read_back(held: HeldRun) -> None:
    assert (await held.put("s", nested(MAX_DEPTH))).status == 201
    await held.assert_readable()
    [step] = (await held.show()).json()["steps"]
    depth, value = 1, step["output"]
    while value:
        depth, value = depth + 1, value[0]
    assert depth == MAX_DEPTH - 1


@pytest.mark.parametrize("seq", [2**31, 2**63, 2**64, 10**30, -1, 1.5, True, "1"])
async def test_seq_out_of_range_is_a_400(held: HeldRun, seq: object) -> None:
    assert_refused(await held.put("s", {"output": 1, "seq": seq}))
    await held.assert_readable()


async def test_the_largest_seq_is_kept(held: HeldRun) -> None:
    assert (await held.put("s", {"output": 1, "seq": 2**31 - 1})).status == 201
    [step] = (await held.steps()).json()["steps"]
    assert step["seq"] == 2**31 - 1


async def test_an_integer_longer_than_the_bound_is_a_400(held: HeldRun) -> None:
    digits = b"9" * (MAX_INT_DIGITS + 1)
    assert_refused(await held.put("s", b'{"output":' + digits + b"}"))
    assert_refused(await held.put("s", b'{"output":-' + digits + b"}"))
    assert_refused(await held.event(b'{"name":"e","data":' + digits + b"}"))
    await held.assert_readable()


async def test_a_large_integer_output_is_kept_exactly(held: HeldRun) -> None:
    big = int("9" * MAX_INT_DIGITS)
    answer = await held.put("s", b'{"output":[' + str(big).encode() + b", 18446744073709551617]}")
    assert answer.status == 201, answer
    assert answer.json()["output"] == [big, 2**64 + 1]
    await held.assert_readable()
    [step] = (await held.steps()).json()["steps"]
    assert step["output"] == [big, 2**64 + 1]
    [shown] = (await held.show()).json()["steps"]
    assert shown["output"] == [big, 2**64 + 1]


@pytest.mark.parametrize("raw", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400"])
async def test_numbers_that_are_not_finite_doubles_are_a_400(held: HeldRun, raw: bytes) -> None:
    assert_refused(await held.put("s", b'{"output":' + raw + b"}"))
    await held.assert_readable()


@pytest.mark.parametrize(
    "timeout",
    [
        b"1" + b"0" * 400,  # an integer too large for a float
        b"1e308",
        b"1e300",
        b"31622401",
        b'"367d"',
        b'"1e400s"',
        b'"99999999999999999999999d"',
        b"-1",
        b'"-1s"',
    ],
)
async def test_a_wait_timeout_out_of_range_is_a_400(held: HeldRun, timeout: bytes) -> None:
    body = b'{"wait":{"event":"e","timeout":' + timeout + b"}}"
    assert_refused(await held.put("w", body))
    await held.assert_readable()


@pytest.mark.parametrize("timeout", ["366d", 366 * 86400, 0, "0s", "1.5m"])
async def test_a_wait_timeout_within_range_is_taken(held: HeldRun, timeout: object) -> None:
    answer = await held.put("w", {"wait": {"event": "e", "timeout": timeout}})
    assert answer.status == 200, answer
    await held.assert_readable()


@pytest.mark.parametrize(
    "until",
    [
        "9999-12-31T23:59:59Z",
        "9999-12-31T23:59:59-23:59",
        "3000-01-01T00:00:00Z",
        "0001-01-01T00:00:00Z",
        "0001-01-01T00:00:00+01:00",
        "1969-12-31T23:59:59Z",
    ],
)
async def test_a_sleep_out_of_range_is_a_400(held: HeldRun, until: str) -> None:
    assert_refused(await held.put("nap", {"sleep": {"until": until}}))
    await held.assert_readable()


async def test_a_sleep_within_range_is_taken(held: HeldRun) -> None:
    soon = datetime.now(UTC) + timedelta(days=365)
    assert (await held.put("nap", {"sleep": {"until": soon.isoformat()}})).json() == {
        "status": "sleeping"
    }
    past = {"sleep": {"until": "1970-01-01T00:00:00Z"}}
    assert (await held.put("past", past)).json()["status"] == "completed"
    await held.assert_readable()


async def test_a_run_page_renders_stored_times_out_of_range(held: HeldRun) -> None:
    """Rows written before these bounds (a wait due in 1e308 s, a sleep due in year 9999) must
    not make the run's page answer 500 forever: such a time is shown as null."""
    if held.gw.gateway.settings.postgres:
        pytest.skip("edits the SQLite file behind the gateway's back")
    assert (await held.put("w", {"wait": {"event": "e", "timeout": "1h"}})).status == 200
    db = held.gw.gateway.settings.store_path
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute(
            "UPDATE steps SET wake_at = 1e308, updated_at = 1e308 WHERE run_id = ?", (held.run_id,)
        )
        conn.execute("UPDATE runs SET due_at = -1e308 WHERE id = ?", (held.run_id,))
    answer = await held.show()
    assert answer.status == 200, answer
    run = answer.json()
    assert run["due_at"] is None
    [step] = run["steps"]
    assert step["wake_at"] is None and step["updated_at"] is None
    assert step["duration_ms"] is None
    await held.assert_readable()


@pytest.mark.parametrize(
    "body",
    [
        {"name": LONE},
        {"name": "e", "id": LONE},
        {"name": "e", "data": LONE},
        {"name": "e", "data": {LONE: 1}},
        {"name": "e", "data": [[["x" + LONE]]]},
    ],
)
async def test_a_lone_surrogate_in_an_event_is_a_400(held: HeldRun, body: Any) -> None:
    assert (await held.put("w", {"wait": {"event": "e"}})).status == 200
    assert_refused(await held.event(body))
    await held.assert_readable()
    # The events table holds nothing that a later wait's look-back would trip over.
    assert (await held.put("w2", {"wait": {"event": "e"}})).status == 200
    await held.assert_readable()


@pytest.mark.parametrize(
    "body", [{"name": "x" * 257}, {"wait": {"event": "x" * 257}}], ids=["event", "wait"]
)
async def test_an_event_name_longer_than_256_characters_is_a_400(held: HeldRun, body: Any) -> None:
    answer = await (held.event(body) if "name" in body else held.put("w", body))
    assert_refused(answer)


# -- Authorization with bytes that are not text -------------------------------------------------


async def _raw_get(held: HeldRun, path: bytes, authorization: bytes) -> int:
    answer = await send(
        held.gw.gateway.internal_port,
        b"GET "
        + path
        + b" HTTP/1.1\r\nHost: x\r\nAuthorization: "
        + authorization
        + b"\r\nConnection: close\r\n\r\n",
    )
    [(status, head, body)] = responses(answer)
    assert b"application/problem+json" in head.lower(), head
    assert json.loads(body)["status"] == status
    return status


@pytest.mark.parametrize(
    "authorization",
    [
        b"Bearer \xff",
        b"Bearer 1.\xff\xfe",
        b"Bearer \xed\xa0\x80",
        b"\xff \xff",
        b"Bearer \x80a",
    ],
)
async def test_an_authorization_that_is_not_text_is_a_401(
    held: HeldRun, authorization: bytes
) -> None:
    cb = held.cb_path.encode()
    assert await _raw_get(held, cb + b"/steps", authorization) == 401
    assert await _raw_get(held, cb, authorization) == 401
    assert await _raw_get(held, b"/v1/runs", authorization) == 401
    await held.assert_readable()


# -- GET /v1/runs query -------------------------------------------------------------------------


def _cursor(text: str) -> str:
    import base64

    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.mark.parametrize(
    "query",
    [
        "limit=%C2%B2",
        "limit=%D9%A1",
        "limit=0",
        "limit=501",
        "limit=-1",
        "limit=1.0",
        "limit=" + "0" * 5000 + "1",
        "limit=",
        "since=nan",
        "since=inf",
        "since=-inf",
        "since=1e400",
        "since=%D9%A1%D9%A2",
        "since=x",
        "until=nan",
        "until=Infinity",
        "until=1" + "0" * 5000,
        "since=2024-01-01T00:00:00",
        "since=9999-99-99T00:00:00Z",
        "cursor=" + _cursor("nan~abc"),
        "cursor=" + _cursor("inf~abc"),
        "cursor=%FF%FE",
        "cursor=" + _cursor("1e400~abc"),
        "cursor=!!!",
        "status=%ED%A0%80",
    ],
)
async def test_a_bad_runs_query_is_a_400(held: HeldRun, query: str) -> None:
    assert_refused(await held.request("GET", "/v1/runs?" + query, headers=held.admin))


@pytest.mark.parametrize(
    "query",
    [
        "limit=1",
        "limit=500",
        "since=0",
        "since=1700000000.5",
        "until=2999-01-01T00:00:00Z",
        "route=%ED%A0%80",
        "route=%FF",
        "since=2024-01-01T00:00:00%2B01:00",
    ],
)
async def test_a_good_runs_query_is_answered(held: HeldRun, query: str) -> None:
    answer = await held.request("GET", "/v1/runs?" + query, headers=held.admin)
    assert answer.status == 200, answer


async def test_a_cursor_given_out_is_taken_back(held: HeldRun) -> None:
    for _ in range(2):
        async with held.gw.session.post(
            held.gw.url + "/held", headers={"Prefer": "respond-async"}
        ) as resp:
            assert resp.status == 202
    first = (await held.request("GET", "/v1/runs?limit=1", headers=held.admin)).json()
    assert first["next_cursor"]
    answer = await held.request(
        "GET", f"/v1/runs?limit=5&cursor={first['next_cursor']}", headers=held.admin
    )
    assert answer.status == 200 and len(answer.json()["runs"]) == 2


@pytest.mark.parametrize(
    "raw",
    [b"not json", b'{"output":' + b"[" * 5_000, b"x" * (17 << 20)],
    ids=["garbage", "deep", "over-16-mib"],
)
async def test_a_caller_without_the_run_token_is_refused_before_its_body_is_read(
    held: HeldRun, raw: bytes
) -> None:
    """Authentication comes first: a caller with a wrong token, or for a run that does not
    exist, learns nothing about the body rules and cannot make the gateway parse its bytes."""
    forged = {"Authorization": "Bearer 1.AAAAAAAAAAAAAAAAAAAAAAAA"}
    path = f"{held.cb_path}/steps/s"
    assert_refused(await held.request("PUT", path, raw, forged), 401)
    assert_refused(await held.request("PUT", "/v1/runs/no-such-run/steps/s", raw, held.auth), 404)
    # The run's own token still gets the body judged.
    assert (await held.put("s", raw)).status in (400, 413)
    # The same for an event the run sends (protocol v1.1).
    events = f"{held.cb_path}/events"
    assert_refused(await held.request("POST", events, raw, forged), 401)
    assert_refused(await held.request("POST", "/v1/runs/no-such-run/events", raw, held.auth), 404)
    assert (await held.request("POST", events, raw, held.auth)).status in (400, 413)
    await held.assert_readable()
