"""Step policies and step.send_event across a SIGKILLed gateway, through both SDKs: the trip
example (Python and JavaScript, the services of test_conformance) behind a real gateway process
that is killed mid-run and started again on the same file.

- The hotel fails on every attempt while the flight takes 2 s the first time: the gateway is
  killed inside that attempt, after the hotel's first failure is recorded. The restarted gateway
  resumes the run; the hotel's count goes on from the record (three attempts in all, not four),
  it fails for good, and the handler refunds the flight.
- The run sends trip.booked, then its confirmation takes 2 s the first time: the gateway is
  killed inside it. The replay returns the recorded event id and sends nothing again.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp

from tests.conformance.test_conformance import STEPS, Service, service  # noqa: F401
from tests.gateway.procs import GatewayProcess
from tests.gateway.test_crash import procs, wait_for_status  # noqa: F401 - fixtures

TRIP = {"traveller": "ada@example.com", "flight": "LH 400", "hotel": "Hotel Adlon"}


async def counts(session: aiohttp.ClientSession, svc: Service) -> dict[str, int]:
    async with session.get(svc.url + "/stats") as resp:
        stats = await resp.json()
    return {name: stats[name] for name in STEPS}


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    for _ in range(500):
        if await check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def kill_mid_run(
    tmp_path: Path,
    svc: Service,
    procs: list[GatewayProcess],  # noqa: F811
    query: str,
    ready: Callable[[dict[str, Any]], bool],
    ends: str,
) -> tuple[dict[str, Any], dict[str, int], Any]:
    """Start the run (respond-async), kill the gateway once `ready(run)` holds, start it
    again; return the run once it `ends` so, how often each step ran meanwhile, and the
    client's answer (by the poll URL)."""
    route = {
        "name": "trips",
        "path": "/trips",
        "upstream": svc.url,
        "durable": True,
        "retry": {"attempts": 3, "initial": "50ms"},
    }
    gw = GatewayProcess(tmp_path, [route])
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as session:
        before = await counts(session, svc)
        async with session.post(
            f"{gw.url}/trips?{query}", json=TRIP, headers={"Prefer": "respond-async"}
        ) as resp:
            assert resp.status == 202
            run_id = resp.headers["Stepgate-Run-Id"]
            poll = resp.headers["Location"]

        async def is_ready() -> bool:
            async with session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
                return ready(await resp.json())

        await until(is_ready, "the run reached the point to kill the gateway at")
        gw.kill()
        await gw.start()
        run = await wait_for_status(gw.internal, run_id, ends, timeout=30)
        async with session.get(gw.url + poll) as resp:
            answer = await resp.json()
        await asyncio.sleep(2.2)  # attempt 1's stalled step returns (and is refused) meanwhile
        after = await counts(session, svc)
    return run, {name: after[name] - before[name] for name in STEPS}, answer


def hotel_failed_once(run: dict[str, Any]) -> bool:
    return any(s["id"] == "reserve-hotel" and s["attempts"] == 1 for s in run["steps"])


def event_sent(run: dict[str, Any]) -> bool:
    return any(s["id"] == "trip.booked" and s["status"] == "completed" for s in run["steps"])


async def test_a_final_failure_is_counted_across_a_killed_gateway(
    tmp_path: Path,
    service: Service,  # noqa: F811
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    run, ran, answer = await kill_mid_run(
        tmp_path,
        service,
        procs,
        "fail=reserve-hotel:always&stall=reserve-flight:2",
        hotel_failed_once,
        "failed",
    )
    # Attempt 1 was cut short (its flight never recorded): the flight ran twice, the hotel
    # three times in all, counted on from the record, then the refund once.
    assert ran == {
        "reserve-flight": 2,
        "reserve-hotel": 3,
        "charge-card": 0,
        "send-confirmation": 0,
        "refund-flight": 1,
    }, run
    assert run["response_status"] == 409
    assert run["attempts"][0]["outcome"] == "interrupted"
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["reserve-hotel"]["final"] is True
    assert steps["reserve-hotel"]["attempts"] == 3
    assert answer["refund"] == steps["refund-flight"]["output"]


async def test_an_event_sent_before_a_killed_gateway_is_not_sent_again(
    tmp_path: Path,
    service: Service,  # noqa: F811
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    run, ran, answer = await kill_mid_run(
        tmp_path, service, procs, "announce=1&stall=send-confirmation:2", event_sent, "completed"
    )
    assert ran == {
        "reserve-flight": 1,
        "reserve-hotel": 1,
        "charge-card": 1,
        "send-confirmation": 2,  # attempt 1's never got recorded
        "refund-flight": 0,
    }, run
    steps = {s["id"]: s for s in run["steps"]}
    event = steps["trip.booked"]
    assert event["kind"] == "event"
    assert event["created_at"] == event["updated_at"]  # written once, by attempt 1
    assert answer["announced"] == event["output"]["id"]  # the replay got the recorded id
    assert [a["outcome"] for a in run["attempts"]] == ["interrupted", "response"]
