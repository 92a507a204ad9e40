"""Step policies and step.send_event through the Python SDK (async and sync) and a real gateway:
retries on the step's own budget, StepFailed on the attempt that spends it and on every replay,
a compensation, time-outs, and an event sent once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from typing import Any
from wsgiref.simple_server import make_server

import pytest
import stepgate.aiohttp
import stepgate.wsgi
from aiohttp import web
from stepgate import Backoff, StepFailed, StepgateError, StepTimeoutError, step
from stepgate.sync import step as sync_step

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.sdk.test_flask_with_gateway import _QuietHandler, _ThreadingWSGIServer

FAST = Backoff(initial=timedelta(milliseconds=20), max=0.05)


def route(base: str, **extra: Any) -> dict[str, Any]:
    # The route allows 2 attempts; the steps below ask for more of their own.
    return {
        "name": "trip",
        "path": "/trip",
        "upstream": base,
        "durable": True,
        "hold": "10s",
        "retry": {"attempts": 2, "initial": "20ms"},
        **extra,
    }


async def timeline(gw: Running, run_id: str) -> dict[str, Any]:
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        return await resp.json()


class Trip:
    """The hotel fails `fails` times under a policy of 3 attempts; when it fails for good the
    flight is refunded. `confirm_fails` makes the step after the compensation fail once, so the
    run is replayed past the final step."""

    def __init__(self, fails: int, confirm_fails: int = 0) -> None:
        self.fails = fails
        self.confirm_fails = confirm_fails
        self.ran: Counter[str] = Counter()
        self.caught: list[StepFailed] = []

    def hotel(self) -> str:
        self.ran["hotel"] += 1
        if self.ran["hotel"] <= self.fails:
            raise ConnectionError("the hotel is down")
        return "HT-1"

    def counted(self, name: str, value: Any) -> Any:
        self.ran[name] += 1
        if name == "confirm" and self.ran[name] <= self.confirm_fails:
            raise RuntimeError("mail server down")
        return value

    async def book(self, request: web.Request) -> web.Response:
        flight = await step.run("flight", self.counted, "flight", "FL-1")
        try:
            hotel = await step.run("hotel", self.hotel, retries=2, backoff=FAST)
        except StepFailed as failed:
            self.caught.append(failed)
            refund = await step.run("refund", self.counted, "refund", f"refund of {flight}")
            await step.run("confirm", self.counted, "confirm", "sorry")
            return web.json_response({"refund": refund}, status=409)
        return web.json_response({"flight": flight, "hotel": hotel})

    def book_sync(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        flight = sync_step.run("flight", self.counted, "flight", "FL-1")
        try:
            hotel = sync_step.run("hotel", self.hotel, retries=2, backoff=FAST)
        except StepFailed as failed:
            self.caught.append(failed)
            refund = sync_step.run("refund", self.counted, "refund", f"refund of {flight}")
            sync_step.run("confirm", self.counted, "confirm", "sorry")
            start_response("409 Conflict", [("Content-Type", "application/json")])
            return [f'{{"refund": "{refund}"}}'.encode()]
        start_response("200 OK", [("Content-Type", "application/json")])
        return [f'{{"flight": "{flight}", "hotel": "{hotel}"}}'.encode()]


def aiohttp_app(handler: Callable[[web.Request], Any], path: str = "/trip") -> web.Application:
    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post(path, handler)
    return app


@pytest.fixture
async def wsgi() -> AsyncIterator[Callable[[Any], str]]:
    """Serve a WSGI app behind stepgate.wsgi on a threaded server; returns its base URL."""
    servers: list[Any] = []

    def serve(app: Any) -> str:
        server = make_server(
            "127.0.0.1",
            0,
            stepgate.wsgi.StepgateMiddleware(app),
            server_class=_ThreadingWSGIServer,
            handler_class=_QuietHandler,
        )
        thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
        thread.start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield serve
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_step_is_retried_on_its_own_budget(
    flavour: str,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    wsgi: Callable[[Any], str],
) -> None:
    trip = Trip(fails=2)
    base = await upstream(aiohttp_app(trip.book)) if flavour == "async" else wsgi(trip.book_sync)
    gw = await gateway([route(base)])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"flight": "FL-1", "hotel": "HT-1"}
        run = await timeline(gw, resp.headers["Stepgate-Run-Id"])
    assert trip.ran == {"flight": 1, "hotel": 3}  # the route alone would have allowed 2
    assert run["failures"] == 0
    hotel = next(s for s in run["steps"] if s["id"] == "hotel")
    assert hotel["policy"] == {"attempts": 3, "initial": "20ms", "max": "50ms", "multiplier": 2.0}
    assert hotel["status"] == "completed"


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_a_final_failure_is_raised_now_and_on_every_replay_and_compensated(
    flavour: str,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    wsgi: Callable[[Any], str],
) -> None:
    trip = Trip(fails=99, confirm_fails=1)
    base = await upstream(aiohttp_app(trip.book)) if flavour == "async" else wsgi(trip.book_sync)
    gw = await gateway([route(base)])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 409, await resp.text()
        assert await resp.json() == {"refund": "refund of FL-1"}
        run = await timeline(gw, resp.headers["Stepgate-Run-Id"])
    # Attempt 3 spent the hotel's attempts and compensated, but "confirm" failed; attempt 4
    # replayed: StepFailed again without running the hotel, the refund from the record.
    assert trip.ran == {"flight": 1, "hotel": 3, "refund": 1, "confirm": 2}
    assert [a["n"] for a in run["attempts"]] == [1, 2, 3, 4]
    assert len(trip.caught) == 2
    first, replayed = trip.caught
    for failed in trip.caught:
        assert failed.step_id == "hotel"
        assert failed.attempts == 3
        assert failed.error is not None and failed.error["message"] == "the hotel is down"
        assert str(failed) == "step 'hotel' failed for good after 3 attempts: the hotel is down"
    assert isinstance(first.__cause__, ConnectionError)  # raised from the step's own error
    assert replayed.__cause__ is None
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["hotel"]["final"] is True
    assert steps["hotel"]["error"]["type"] == "ConnectionError"


async def test_an_uncaught_final_failure_ends_the_run_at_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    ran: Counter[str] = Counter()

    async def handler(request: web.Request) -> web.Response:
        def charge() -> None:
            ran["charge"] += 1
            raise ValueError("declined, card 4242")

        await step.run("charge", charge, retries=0)
        return web.Response(text="unreachable")

    gw = await gateway([route(await upstream(aiohttp_app(handler)))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 500
        problem = await resp.json(content_type="application/problem+json")
        run = await timeline(gw, resp.headers["Stepgate-Run-Id"])
    assert problem["detail"] == "step 'charge' failed for good"  # not the card number
    assert ran == {"charge": 1}  # retries=0: final at the first failure, and no retry
    assert run["status"] == "failed"
    assert len(run["attempts"]) == 1


@pytest.mark.parametrize("flavour", ["async", "plain", "sync"])
async def test_a_step_past_its_timeout_is_cut_off_and_retried(
    flavour: str,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    wsgi: Callable[[Any], str],
) -> None:
    ran: Counter[str] = Counter()
    errors: list[BaseException] = []

    async def slow_async() -> str:
        ran["slow"] += 1
        if ran["slow"] == 1:
            await asyncio.sleep(5)
        return "done"

    def slow_plain() -> str:
        ran["slow"] += 1
        if ran["slow"] == 1:
            time.sleep(1.5)  # a thread that cannot be stopped; its result is dropped
        return "done"

    async def handler(request: web.Request) -> web.Response:
        fn = slow_async if flavour == "async" else slow_plain
        try:
            out = await step.run("slow", fn, retries=1, backoff=FAST, timeout=0.2)
        except StepTimeoutError as exc:
            errors.append(exc)
            raise
        return web.json_response(out)

    def handler_sync(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        try:
            out = sync_step.run("slow", slow_plain, retries=1, backoff=FAST, timeout=0.2)
        except StepTimeoutError as exc:
            errors.append(exc)
            raise
        start_response("200 OK", [("Content-Type", "application/json")])
        return [f'"{out}"'.encode()]

    base = wsgi(handler_sync) if flavour == "sync" else await upstream(aiohttp_app(handler))
    gw = await gateway([route(base)])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == "done"
        run = await timeline(gw, resp.headers["Stepgate-Run-Id"])
    assert ran["slow"] == 2
    assert len(errors) == 1
    assert isinstance(errors[0], StepTimeoutError)
    assert errors[0].timeout == 0.2
    slow = next(s for s in run["steps"] if s["id"] == "slow")
    assert slow["attempts"] == 2
    assert slow["error"]["type"] == "stepgate.errors.StepTimeoutError"
    assert slow["error"]["message"] == "step 'slow' took longer than its timeout of 0.2s"


@pytest.mark.parametrize("flavour", ["async", "sync"])
async def test_send_event_sends_once_and_returns_the_id(
    flavour: str,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    wsgi: Callable[[Any], str],
) -> None:
    ids: list[str] = []
    attempts: Counter[str] = Counter()

    async def announce(request: web.Request) -> web.Response:
        ids.append(await step.send_event("trip.booked", {"trip": "t-9"}))
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("a later step failed")
        return web.json_response(ids[-1])

    def announce_sync(environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        ids.append(sync_step.send_event("trip.booked", {"trip": "t-9"}))
        attempts["n"] += 1
        if attempts["n"] == 1:
            raise RuntimeError("a later step failed")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [f'"{ids[-1]}"'.encode()]

    async def watch(request: web.Request) -> web.Response:
        event = await step.wait_for_event(
            "booked", event="trip.booked", match={"data.trip": "t-9"}, timeout=30
        )
        return web.json_response(event)

    watcher = await upstream(aiohttp_app(watch, "/watch"))
    base = await upstream(aiohttp_app(announce)) if flavour == "async" else wsgi(announce_sync)
    gw = await gateway([route(base), route(watcher, name="watch", path="/watch", hold="100ms")])
    async with gw.session.post(gw.url + "/watch", allow_redirects=False) as resp:
        assert resp.status == 303
        poll = resp.headers["Location"]
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 200, await resp.text()
        event_id = await resp.json()
    assert ids == [event_id, event_id]  # the replay got the recorded id
    async with gw.session.get(gw.url + poll + "&wait=10") as resp:
        woken = await resp.json()
    assert woken["id"] == event_id
    assert woken["data"] == {"trip": "t-9"}


async def test_bad_step_options_are_refused_at_the_call() -> None:
    with pytest.raises(ValueError, match="retries must be from 0 to 999"):
        step.run("x", lambda: 1, retries=-1)
    with pytest.raises(TypeError, match="retries is a whole number"):
        step.run("x", lambda: 1, retries=True)
    with pytest.raises(ValueError, match="backoff needs retries"):
        step.run("x", lambda: 1, backoff=1.0)
    with pytest.raises(TypeError, match=r"stepgate\.Backoff or a duration"):
        step.run("x", lambda: 1, retries=1, backoff="1s")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="longer than 0"):
        step.run("x", lambda: 1, timeout=0)
    with pytest.raises(ValueError, match="longer than max"):
        Backoff(initial=120, max=60)
    with pytest.raises(ValueError, match="multiplier must be from 1 to 100"):
        Backoff(multiplier=0.5)
    with pytest.raises(ValueError, match="at most 1 day"):
        Backoff(max=timedelta(days=2))
    with pytest.raises(ValueError, match="retries must be"):
        sync_step.run("x", lambda: 1, retries=1000)
    with pytest.raises(StepgateError, match="send_event 'x' needs the Stepgate gateway"):
        step.send_event("x", {})
    with pytest.raises(StepgateError, match="send_event 'x' needs the Stepgate gateway"):
        await asyncio.to_thread(sync_step.send_event, "x", {})


async def test_outside_the_gateway_a_timeout_still_cuts_a_step_off() -> None:
    async def slow() -> None:
        await asyncio.sleep(5)

    with pytest.raises(StepTimeoutError):
        await step.run("slow", slow, timeout=0.05)
    assert await step.run("quick", lambda n: n + 1, 1, timeout=1) == 2
    with pytest.raises(StepTimeoutError):
        await asyncio.to_thread(sync_step.run, "slow", time.sleep, 1, timeout=0.05)
