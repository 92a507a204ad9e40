"""Child runs through the raw protocol: an invoke step starts a run of another durable route,
once, parks its parent until the child ends, and hands the parent the child's answer."""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps, Suspend, raw_sleep, suspended

BOTH_DIALECTS = True


class Trip:
    """/trip invokes /hotel as the step `book-hotel`; /hotel answers as `hotel_answer` says."""

    def __init__(self, hotel_answer: str = "ok", *, puts: int = 1) -> None:
        self.hotel_answer = hotel_answer
        self.puts = puts  # how often /trip sends its invoke PUT per invocation
        self.answers: list[tuple[int, Any]] = []
        self.hotel_bodies: list[Any] = []
        self.ran: Counter[str] = Counter()
        self.release = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/trip", self.trip)
        app.router.add_post("/hotel", self.hotel)
        app.router.add_post("/plain", self.hotel)
        return app

    async def trip(self, request: web.Request) -> web.Response:
        self.ran["trip"] += 1
        steps = RawSteps(request)
        recorded = (await steps.steps()).get("book-hotel")
        # A failed record that is not final (an admin retry made it so) starts a new child.
        if (
            recorded is None
            or recorded["status"] == "waiting"
            or (recorded["status"] == "failed" and not recorded.get("final"))
        ):
            for _ in range(self.puts):
                status, answer = await steps.put(
                    "book-hotel", {"invoke": {"route": "hotel", "body": {"nights": 2}}}
                )
                steps._seq -= 1  # the same step again
                self.answers.append((status, answer))
            steps._seq += 1
            recorded = self.answers[-1][1]
            if recorded.get("status") == "waiting":
                return suspended()
        if recorded["status"] == "failed":
            return web.json_response({"hotel_failed": recorded["error"]}, status=502)
        return web.json_response({"hotel": recorded["output"]})

    async def hotel(self, request: web.Request) -> web.Response:
        self.ran["hotel"] += 1
        self.hotel_bodies.append(await request.json())
        steps = RawSteps(request)
        if self.hotel_answer == "hold":
            await self.release.wait()
        if self.hotel_answer == "sleep":
            try:
                await raw_sleep(steps, "nap", 1.0)
            except Suspend:
                return suspended()
        if self.hotel_answer == "fail":
            return web.json_response(
                {"error": "no rooms"}, status=503, headers={"Stepgate-No-Retry": "true"}
            )
        if self.hotel_answer == "text":
            return web.Response(text="room 12")
        return web.json_response({"room": 12, "run": request.headers["Stepgate-Run-Id"]})


def routes(base: str) -> list[dict[str, Any]]:
    return [
        {"name": "trip", "path": "/trip", "upstream": base, "durable": True, "hold": "50ms"},
        {"name": "hotel", "path": "/hotel", "upstream": base, "durable": True, "max_body": "4KiB"},
        {"name": "plain", "path": "/plain", "upstream": base},
    ]


async def book(gw: Running) -> tuple[str, str]:
    """POST /trip, answered at once; (poll location, run id)."""
    async with gw.session.post(
        gw.url + "/trip", json={}, headers={"Prefer": "respond-async"}, allow_redirects=False
    ) as resp:
        assert resp.status == 202, await resp.text()
        location, run_id = resp.headers["Location"], resp.headers["Stepgate-Run-Id"]
    for _ in range(200):  # until it has started its child
        if (await admin(gw, run_id))["children"]:
            break
        await asyncio.sleep(0.02)
    return location, run_id


async def admin(gw: Running, run_id: str) -> dict[str, Any]:
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        assert resp.status == 200
        return dict(await resp.json())


async def test_the_childs_answer_is_the_steps_output(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip("hold", puts=2)  # the invoke PUT twice: one child all the same
    gw = await gateway(routes(await upstream(trip.app())))
    location, parent_id = await book(gw)
    trip.release.set()
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        answer = await resp.json()
    child_id = answer["hotel"]["run"]
    assert answer == {"hotel": {"room": 12, "run": child_id}}
    first, again = trip.answers[:2]
    assert first == again == (200, {"status": "waiting", "run_id": child_id})
    assert trip.ran == {"trip": 2, "hotel": 1} and trip.hotel_bodies == [{"nights": 2}]

    parent = await admin(gw, parent_id)
    assert parent["children"] == [
        {"id": child_id, "step": "book-hotel", "route": "hotel", "status": "completed"}
    ]
    assert parent["parent_id"] is None
    (step,) = parent["steps"]
    assert step["kind"] == "invoke" and step["status"] == "completed"
    assert step["run_id"] == child_id and step["output"] == answer["hotel"]
    child = await admin(gw, child_id)
    assert (child["parent_id"], child["parent_step"]) == (parent_id, "book-hotel")
    assert child["method"] == "POST" and child["target"] == "/hotel"
    assert child["children"] == []


async def test_a_text_answer_is_the_output_as_text(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip("text")
    gw = await gateway(routes(await upstream(trip.app())))
    location, _ = await book(gw)
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert await resp.json() == {"hotel": "room 12"}


async def test_a_failed_child_fails_the_step_for_good(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip("fail")
    gw = await gateway(routes(await upstream(trip.app())))
    location, parent_id = await book(gw)
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 502
        failed = (await resp.json())["hotel_failed"]
    assert failed["status"] == 503 and failed["type"] == "ChildRunFailed"
    (step,) = (await admin(gw, parent_id))["steps"]
    assert step["status"] == "failed" and step["final"] is True
    assert step["error"]["run_id"] == step["run_id"]
    assert trip.ran["hotel"] == 1  # not started again


async def test_an_admin_retry_of_the_parent_starts_a_new_child(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip("fail")
    gw = await gateway(routes(await upstream(trip.app())))
    location, parent_id = await book(gw)
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 502  # its attempts spent on the failed child: the run failed
    (failed,) = (await admin(gw, parent_id))["children"]
    trip.hotel_answer = "ok"
    async with gw.session.post(f"{gw.internal}/v1/runs/{parent_id}/retry") as resp:
        assert resp.status == 202
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        child_id = (await resp.json())["hotel"]["run"]
    assert child_id != failed["id"]
    assert [c["id"] for c in (await admin(gw, parent_id))["children"]] == [child_id]
    assert trip.ran["hotel"] == 2


async def test_cancelling_the_parent_cancels_the_child(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    trip = Trip("hold")
    gw = await gateway(routes(await upstream(trip.app())))
    try:
        _, parent_id = await book(gw)
        (link,) = (await admin(gw, parent_id))["children"]
        async with gw.session.post(f"{gw.internal}/v1/runs/{parent_id}/cancel") as resp:
            assert resp.status == 200
        assert (await admin(gw, link["id"]))["status"] == "cancelled"
        assert (await admin(gw, parent_id))["status"] == "cancelled"
    finally:
        trip.release.set()


async def test_an_unknown_or_plain_route_and_bad_bodies_are_refused(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    answers: list[tuple[int, str]] = []

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        for body in (
            {"invoke": {"route": "nowhere"}},
            {"invoke": {"route": "plain"}},
            {"invoke": {"route": ""}},
            {"invoke": {"route": "hotel", "headers": {}}},
            {"invoke": "hotel"},
            {"invoke": {"route": "hotel", "body": "x" * 5000}},
        ):
            status, answer = await steps.put("i", body)
            answers.append((status, answer["detail"]))
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/trip", handler)
    base = await upstream(app)
    gw = await gateway(routes(base))
    async with gw.session.post(gw.url + "/trip", json={}, allow_redirects=False) as resp:
        assert resp.status == 200
    assert [status for status, _ in answers] == [422, 422, 400, 400, 400, 413]
    assert "no route is named 'nowhere'" in answers[0][1]
    assert "not durable" in answers[1][1]
    async with gw.session.get(gw.internal + "/v1/runs?route=hotel") as resp:
        assert (await resp.json())["runs"] == []


async def test_a_child_that_sleeps_across_a_restart_still_wakes_its_parent(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    trip = Trip("sleep")
    gw = GatewayProcess(tmp_path, routes(await upstream(trip.app())))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(gw.url + "/trip", json={}, allow_redirects=False) as resp:
                assert resp.status == 303
                location = resp.headers["Location"]
            assert trip.ran == {"trip": 1, "hotel": 1}  # the child is asleep, its parent parked
            gw.kill()
            await asyncio.sleep(1.2)  # the child's sleep falls due while nothing runs
            await gw.start()
            async with client.get(gw.url + location + "&wait=10") as resp:
                assert resp.status == 200
                assert (await resp.json())["hotel"]["room"] == 12
    finally:
        gw.stop()
    assert trip.ran["hotel"] == 2  # before and after its sleep: started once


async def test_a_route_that_invokes_itself_stops_at_the_depth_bound(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    refused: list[tuple[int, Any]] = []

    async def again(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        recorded = (await steps.steps()).get("again")
        if recorded is not None and recorded["status"] != "waiting":
            return web.json_response({"below": recorded.get("output")})
        status, answer = await steps.put("again", {"invoke": {"route": "loop"}})
        if status != 200:
            refused.append((status, answer))
            return web.json_response({"depth": "max"})
        return suspended()

    app = web.Application()
    app.router.add_post("/loop", again)
    base = await upstream(app)
    gw = await gateway([{"name": "loop", "path": "/loop", "upstream": base, "durable": True}])
    async with gw.session.post(gw.url + "/loop", json={}, allow_redirects=False) as resp:
        location = resp.headers["Location"] if resp.status == 303 else None
    if location is not None:
        async with gw.session.get(gw.url + location + "&wait=30") as resp:
            assert resp.status == 200
    ((status, problem),) = refused
    assert status == 422 and "at most 16 deep" in problem["detail"]
    async with gw.session.get(gw.internal + "/v1/runs?route=loop&limit=100") as resp:
        assert len((await resp.json())["runs"]) == 17  # the first run and 16 below it
