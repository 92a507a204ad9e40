"""Step policies and events sent by a run (protocol v1.1), through the raw protocol: a failed
attempt's own retry policy, the final failure a handler compensates, `POST {cb}/events`, and
all of it across a SIGKILLed gateway."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps, Suspend, raw_wait, suspended
from tests.gateway.test_crash import procs, wait_for_status  # noqa: F401 - a fixture

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

POLICY = {"attempts": 3, "initial": "20ms", "max": "40ms", "multiplier": 2}


def route(base: str, **extra: Any) -> dict[str, Any]:
    # The route's own budget is smaller than the step's: a policy retry must not spend it.
    return {
        "name": "trip",
        "path": "/trip",
        "upstream": base,
        "durable": True,
        "hold": "10s",
        "retry": {"attempts": 2, "initial": "20ms"},
        **extra,
    }


async def put(
    session: aiohttp.ClientSession, callback: str, token: str, step_id: str, body: dict[str, Any]
) -> tuple[int, Any]:
    async with session.put(
        f"{callback}/steps/{quote(step_id, safe='')}",
        json=body,
        headers={"Authorization": f"Bearer {token}"},
    ) as resp:
        return resp.status, await resp.json(content_type=None)


async def send_event(
    session: aiohttp.ClientSession, callback: str, token: str, body: Any
) -> tuple[int, Any]:
    async with session.post(
        f"{callback}/events", json=body, headers={"Authorization": f"Bearer {token}"}
    ) as resp:
        return resp.status, await resp.json(content_type=None)


class Hotel:
    """A handler that reserves a hotel under a step policy and refunds the flight when the
    hotel fails for good; `fails` says how many attempts of the hotel step fail."""

    def __init__(self, fails: int, *, catch: bool = True, policy: dict[str, Any] = POLICY) -> None:
        self.fails = fails
        self.catch = catch
        self.policy = policy
        self.ran: Counter[str] = Counter()
        self.answers: list[Any] = []  # what each failed-attempt PUT was answered
        self.attempts: list[str] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/trip", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.attempts.append(request.headers["Stepgate-Attempt"])
        steps = RawSteps(request)

        async def flight() -> str:
            self.ran["flight"] += 1
            return "FL-1"

        await steps.run("flight", flight)
        recorded = (await steps.steps()).get("hotel")
        if recorded is not None and recorded.get("final"):
            steps._seq += 1
            return await self.compensate(steps, recorded)
        if recorded is None or recorded["status"] != "completed":
            self.ran["hotel"] += 1
            if self.ran["hotel"] <= self.fails:
                error = {"message": "the hotel is down", "type": "HotelDown"}
                status, answer = await steps.put("hotel", {"error": error, "policy": self.policy})
                assert status == 200, answer
                self.answers.append(answer)
                if answer.get("final") and self.catch:
                    return await self.compensate(steps, answer)
                return web.json_response({"error": "hotel"}, status=500)
            await steps.put("hotel", {"output": "HT-1"})
        else:
            steps._seq += 1
        return web.json_response({"flight": "FL-1", "hotel": "HT-1"})

    async def compensate(self, steps: RawSteps, final: dict[str, Any]) -> web.Response:
        if not self.catch:
            return web.json_response({"error": "hotel, for good"}, status=500)

        async def refund() -> str:
            self.ran["refund"] += 1
            return "RF-1"

        refund_id = await steps.run("refund", refund)
        return web.json_response({"refund": refund_id}, status=409)


class Held:
    """A run whose first invocation waits until `done` is set; `seen` has its callback URL and
    token, for a test to call back with by hand."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.called = asyncio.Event()
        self.done = asyncio.Event()

    @classmethod
    async def start(cls, gateway: GatewayFactory, upstream: UpstreamFactory, **extra: Any) -> Held:
        held = cls()
        app = web.Application()
        app.router.add_post("/trip", held.handle)
        held.gw = await gateway([route(await upstream(app))], **extra)
        held.pending = asyncio.ensure_future(held.gw.session.post(held.gw.url + "/trip"))
        await asyncio.wait_for(held.called.wait(), 10)
        return held

    async def handle(self, request: web.Request) -> web.Response:
        self.seen.update(callback=request.headers["Stepgate-Callback"])
        self.seen.update(token=request.headers["Stepgate-Token"])
        self.called.set()
        await self.done.wait()
        return web.Response(text="ok")

    gw: Running
    pending: asyncio.Future[aiohttp.ClientResponse]


async def run_of(gw: Running, run_id: str) -> dict[str, Any]:
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        assert resp.status == 200
        return await resp.json()


async def test_a_step_policy_retries_the_step_on_its_own_budget(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    hotel = Hotel(fails=2)
    gw = await gateway([route(await upstream(hotel.app()))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"flight": "FL-1", "hotel": "HT-1"}
        run = await run_of(gw, resp.headers["Stepgate-Run-Id"])
    # Three invocations, though the route allows two: the step's policy allows three attempts.
    assert hotel.attempts == ["1", "2", "3"]
    assert hotel.answers == [
        {"status": "failed", "attempts": 1},
        {"status": "failed", "attempts": 2},
    ]
    assert run["status"] == "completed"
    assert run["failures"] == 0  # nothing of the route's retry budget was spent
    assert hotel.ran == {"flight": 1, "hotel": 3}
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["hotel"]["status"] == "completed"
    assert steps["hotel"]["attempts"] == 3
    assert steps["hotel"]["final"] is False
    assert steps["hotel"]["policy"] == {
        "attempts": 3,
        "initial": "20ms",
        "max": "40ms",
        "multiplier": 2.0,
    }


async def test_spent_attempts_make_the_step_final_and_the_handler_compensates(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    hotel = Hotel(fails=10)
    gw = await gateway([route(await upstream(hotel.app()))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 409, await resp.text()
        assert await resp.json() == {"refund": "RF-1"}
        run_id = resp.headers["Stepgate-Run-Id"]
    assert hotel.answers[-1] == {"status": "failed", "attempts": 3, "final": True}
    assert hotel.ran == {"flight": 1, "hotel": 3, "refund": 1}
    run = await run_of(gw, run_id)
    assert run["status"] == "failed"  # the 409 is the run's answer
    assert run["attempt"] == 3
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["hotel"]["status"] == "failed"
    assert steps["hotel"]["final"] is True
    assert steps["hotel"]["error"]["message"] == "the hotel is down"
    assert steps["refund"]["status"] == "completed"


async def test_a_final_step_takes_no_further_write(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    held = await Held.start(gateway, upstream)
    seen, done, pending, gw = held.seen, held.done, held.pending, held.gw
    callback, token, s = seen["callback"], seen["token"], gw.session
    one = {"attempts": 1}
    error = {"message": "no"}
    assert await put(s, callback, token, "x", {"error": error, "policy": one}) == (
        200,
        {"status": "failed", "attempts": 1, "final": True},
    )
    # First write wins: neither an output nor another error changes a final step.
    for body in ({"output": 1}, {"error": error}, {"error": error, "policy": {"attempts": 5}}):
        assert await put(s, callback, token, "x", body) == (
            200,
            {"status": "failed", "attempts": 1, "final": True},
        )
    async with s.get(f"{callback}/steps", headers={"Authorization": f"Bearer {token}"}) as resp:
        listed = (await resp.json())["steps"]
    assert listed == [
        {
            "id": "x",
            "seq": None,
            "kind": "run",
            "status": "failed",
            "attempts": 1,
            "error": {"message": "no"},
            "final": True,
        }
    ]
    done.set()
    async with await pending as resp:
        assert resp.status == 200


async def test_a_final_failure_the_handler_does_not_answer_is_retried_at_once_then_by_the_route(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    hotel = Hotel(fails=10, catch=False)
    gw = await gateway([route(await upstream(hotel.app()))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 500
        run = await run_of(gw, resp.headers["Stepgate-Run-Id"])
    # 3 attempts of the step, then the route's 2: the invocation after the final failure
    # (which the handler might have caught) and one retry of it.
    assert hotel.attempts == ["1", "2", "3", "4", "5"]
    assert hotel.ran == {"flight": 1, "hotel": 3}
    assert run["status"] == "failed"
    assert run["failures"] == 2
    assert [s["id"] for s in run["steps"] if s["final"]] == ["hotel"]


async def test_an_admin_retry_gives_a_final_step_its_attempts_again(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    hotel = Hotel(fails=3)
    gw = await gateway([route(await upstream(hotel.app()))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 409
        run_id = resp.headers["Stepgate-Run-Id"]
    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/retry") as resp:
        assert resp.status == 202
    run = await wait_for_status(gw.internal, run_id, "completed")
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["hotel"]["status"] == "completed"
    assert steps["hotel"]["final"] is False
    assert hotel.ran["hotel"] == 4


async def test_bad_policies_are_refused_with_a_clear_problem(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    held = await Held.start(gateway, upstream)
    seen, done, pending, gw = held.seen, held.done, held.pending, held.gw
    error = {"message": "no"}
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"error": error, "policy": 3}, 400, "policy must be an object"),
        ({"error": error, "policy": {}}, 400, "policy.attempts must be a whole number"),
        ({"error": error, "policy": {"attempts": True}}, 400, "whole number"),
        ({"error": error, "policy": {"attempts": 2.5}}, 400, "whole number"),
        ({"error": error, "policy": {"attempts": 0}}, 400, "from 1 to 1000"),
        ({"error": error, "policy": {"attempts": 10**30}}, 400, "from 1 to 1000"),
        ({"error": error, "policy": {"attempts": 2, "initial": 1}}, 400, "a duration text"),
        ({"error": error, "policy": {"attempts": 2, "initial": "1x"}}, 400, "unknown duration"),
        ({"error": error, "policy": {"attempts": 2, "initial": "5"}}, 400, "needs a unit"),
        ({"error": error, "policy": {"attempts": 2, "max": "2d"}}, 400, "at most 1d"),
        ({"error": error, "policy": {"attempts": 2, "max": "0s"}}, 400, "longer than 0"),
        ({"error": error, "policy": {"attempts": 2, "max": "9" * 80 + "s"}}, 400, "duration"),
        ({"error": error, "policy": {"attempts": 2, "multiplier": 0.5}}, 400, "from 1 to 100"),
        ({"error": error, "policy": {"attempts": 2, "multiplier": "2"}}, 400, "a number"),
        ({"error": error, "policy": {"attempts": 2, "jitter": 1}}, 400, "policy.jitter"),
        ({"output": 1, "policy": {"attempts": 2}}, 400, "only with an error"),
        (
            {"error": error, "policy": {"attempts": 2, "initial": "2m", "max": "1m"}},
            422,
            "longer than policy.max",
        ),
    ]
    for body, status, detail in cases:
        async with gw.session.put(
            f"{seen['callback']}/steps/s",
            json=body,
            headers={"Authorization": f"Bearer {seen['token']}"},
        ) as resp:
            assert resp.status == status, (body, await resp.text())
            assert resp.content_type == "application/problem+json"
            assert detail in (await resp.json())["detail"], body
    # Nothing of that was recorded.
    async with gw.session.get(
        f"{seen['callback']}/steps", headers={"Authorization": f"Bearer {seen['token']}"}
    ) as resp:
        assert (await resp.json())["steps"] == []
    done.set()
    async with await pending as resp:
        assert resp.status == 200


class Announcer:
    """Run A sends `trip.booked` as a step, then its `confirm` step fails once; run B waits
    for the event."""

    def __init__(self) -> None:
        self.sent: list[tuple[int, Any]] = []
        self.confirmed = 0
        self.woke: list[Any] = []
        self.sending = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/trip", self.book)
        app.router.add_post("/watch", self.watch)
        return app

    async def book(self, request: web.Request) -> web.Response:
        steps = RawSteps(request)
        await steps.steps()
        body = {"name": "trip.booked", "data": {"trip": "t-1"}, "step": "announce", "seq": 0}
        async with aiohttp.ClientSession() as session:
            sent = await send_event(session, steps.callback or "", steps.token or "", body)
        self.sent.append(sent)
        steps._seq = 1

        async def confirm() -> str:
            self.confirmed += 1
            if self.confirmed == 1:
                raise RuntimeError("mail server down")
            return "sent"

        await steps.run("confirm", confirm)
        return web.json_response({"event": sent[1]["id"]})

    async def watch(self, request: web.Request) -> web.Response:
        steps = RawSteps(request)
        try:
            event = await raw_wait(steps, "booked", "trip.booked", {"data.trip": "t-1"}, "30s")
        except Suspend:
            return suspended()
        self.woke.append(event)
        return web.json_response(event)


async def test_an_event_sent_as_a_step_is_sent_once_and_returns_its_id(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    announcer = Announcer()
    base = await upstream(announcer.app())
    gw = await gateway([route(base), route(base, name="watch", path="/watch", hold="100ms")])
    async with gw.session.post(gw.url + "/watch", allow_redirects=False) as resp:
        assert resp.status == 303
        watch_poll = resp.headers["Location"]
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 200, await resp.text()
        event_id = (await resp.json())["event"]
        run = await run_of(gw, resp.headers["Stepgate-Run-Id"])
    # Attempt 1 sent it and woke the watcher; attempt 2 asked again and got the same id back.
    assert announcer.sent == [(201, {"id": event_id, "woke": 1}), (200, {"id": event_id})]
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["announce"]["kind"] == "event"
    assert steps["announce"]["status"] == "completed"
    assert steps["announce"]["output"] == {"id": event_id, "name": "trip.booked"}
    async with gw.session.get(gw.url + watch_poll + "&wait=10") as resp:
        assert resp.status == 200
        assert (await resp.json())["id"] == event_id
    assert len(announcer.woke) == 1


async def test_bad_event_sends_are_refused_with_a_clear_problem(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    held = await Held.start(gateway, upstream)
    seen, done, pending, gw = held.seen, held.done, held.pending, held.gw
    callback, token, s = seen["callback"], seen["token"], gw.session
    cases: list[tuple[Any, int, str]] = [
        ([], 400, "object"),
        ({"name": "a"}, 400, "step must be the step id"),
        ({"step": "a"}, 400, "name must be a string"),
        ({"name": "", "step": "a"}, 400, "name must be a string"),
        ({"name": "a", "step": "x" * 257}, 400, "step must be the step id"),
        ({"name": "a", "step": "a", "seq": -1}, 400, "seq must be"),
        ({"name": "a", "step": "a", "id": "mine"}, 400, "unknown field 'id'"),
    ]
    for body, status, detail in cases:
        answer = await send_event(s, callback, token, body)
        assert answer[0] == status, (body, answer)
        assert detail in answer[1]["detail"], (body, answer)
    async with s.post(f"{callback}/events", json={"name": "a", "step": "a"}) as resp:
        assert resp.status == 401
    wrong = token[:-2] + ("AA" if not token.endswith("AA") else "BB")
    assert (await send_event(s, callback, wrong, {"name": "a", "step": "a"}))[0] == 401
    # A step id recorded as another kind of step is refused before anything is sent.
    assert (await put(s, callback, token, "r", {"output": 1}))[0] == 201
    status, answer = await send_event(s, callback, token, {"name": "a", "step": "r"})
    assert status == 409, answer
    done.set()
    async with await pending as resp:
        assert resp.status == 200
    # The run has ended: its attempt may send nothing any more.
    status, answer = await send_event(s, callback, token, {"name": "a", "step": "late"})
    assert status == 409
    assert answer["type"] == "https://stepgate.dev/problems/superseded"


async def test_policies_and_sent_events_hold_across_a_killed_gateway(
    tmp_path: Path,
    upstream: UpstreamFactory,
    procs: list[GatewayProcess],  # noqa: F811 - the fixture
) -> None:
    """The step's attempt count and its final failure are in the store: a gateway killed while
    the run waits for the step's back-off resumes it, finishes the count and lets the handler
    compensate; the event the run sent is not sent again by the replays."""
    # The hotel's back-off is long enough to kill the gateway within it.
    hotel = Hotel(fails=10, policy={"attempts": 3, "initial": "1s", "max": "1s", "multiplier": 1})
    sends: list[tuple[int, Any]] = []
    waiting = asyncio.Event()

    async def handle(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        await steps.steps()
        async with aiohttp.ClientSession() as session:
            body = {"name": "trip.started", "data": None, "step": "started"}
            sends.append(await send_event(session, steps.callback or "", steps.token or "", body))
        if request.headers["Stepgate-Attempt"] == "1":
            waiting.set()
        return await hotel.handle(request)

    app = web.Application()
    app.router.add_post("/trip", handle)
    gw = GatewayProcess(tmp_path, [route(await upstream(app))])
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as client:
        async with client.post(
            gw.url + "/trip", headers={"Prefer": "respond-async"}, allow_redirects=False
        ) as resp:
            assert resp.status == 202
            run_id = resp.headers["Stepgate-Run-Id"]
        await asyncio.wait_for(waiting.wait(), 10)
        await wait_for_status(gw.internal, run_id, "retrying")
        gw.kill()
    await gw.start()
    run = await wait_for_status(gw.internal, run_id, "failed", timeout=30)
    assert hotel.ran == {"flight": 1, "hotel": 3, "refund": 1}
    assert run["response_status"] == 409
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["hotel"]["final"] is True
    assert steps["hotel"]["attempts"] == 3
    assert sends[0][0] == 201
    assert all(answer == (200, {"id": sends[0][1]["id"]}) for answer in sends[1:])
    assert len(sends) == 3  # every invocation asked; only the first sent


async def test_a_send_cut_short_before_its_record_is_delivered_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """A crash between the delivery and the record leaves the event delivered and the step
    unrecorded; the replay sends it again with the same id, and the event is not delivered a
    second time (no wait is completed twice), while the step is recorded now."""
    from gateway.auth import sent_event_id

    held = await Held.start(gateway, upstream)
    callback, tok, s = held.seen["callback"], held.seen["token"], held.gw.session
    run_id = callback.rsplit("/", 1)[1]
    run = await held.gw.store.get_run(run_id)
    event_id = sent_event_id(run.token, "booked")
    # What the first send did before the crash: the event is in, the step is not.
    assert await held.gw.store.deliver_event(event_id, "trip.booked", "{}", time.time()) == []
    # A wait registered now is completed by it once, from the look-back.
    status, waited = await put(
        s, callback, tok, "w", {"wait": {"event": "trip.booked", "timeout": "30s"}}
    )
    assert (status, waited["status"], waited["output"]["id"]) == (200, "completed", event_id)
    status, sent = await send_event(s, callback, tok, {"name": "trip.booked", "step": "booked"})
    assert (status, sent) == (201, {"id": event_id, "woke": 0})
    status, waited = await put(
        s, callback, tok, "w2", {"wait": {"event": "trip.booked", "timeout": "30s"}}
    )
    assert (status, waited["status"]) == (200, "waiting")  # the one event is taken
    held.done.set()
    async with await held.pending as resp:
        assert resp.status == 200


async def test_a_run_sends_events_with_its_own_token_when_the_admin_api_needs_one(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    held = await Held.start(gateway, upstream, admin_token="admin-secret-1234567890")
    callback, tok, s = held.seen["callback"], held.seen["token"], held.gw.session
    status, sent = await send_event(s, callback, tok, {"name": "e", "step": "e"})
    assert status == 201, sent
    async with s.post(held.gw.internal + "/v1/events", json={"name": "e"}) as resp:
        assert resp.status == 401  # the admin API still wants the admin token
    held.done.set()
    async with await held.pending as resp:
        assert resp.status == 200
