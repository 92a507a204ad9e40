"""Attempt fencing (protocol v1.1): a callback answered 409 "superseded" stops the handler.

Through the step API (async and sync) and through every adapter: the step whose callback was
refused raises Superseded, no later step runs or calls back, `except Exception` cannot swallow
it, and the adapter answers 409 problem+json with the superseded type.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterable
from typing import Any

import pytest
import stepgate.aiohttp
import stepgate.asgi
import stepgate.wsgi
from aiohttp import web
from stepgate import CallbackError, Superseded, Suspend, _transport, step
from stepgate.sync import step as sync_step

from tests.sdk.fakes import (
    RUN_ID,
    SUPERSEDED,
    FakeAsyncTransport,
    FakeGateway,
    FakeSyncTransport,
    active,
)

AiohttpClient = Callable[[web.Application], Any]


def test_superseded_is_a_control_signal_not_an_error() -> None:
    assert issubclass(Superseded, BaseException)
    assert not issubclass(Superseded, Exception)
    assert "Superseded" in stepgate.__all__
    signal = Superseded(run_id="r", attempt=1, current_attempt=2, run_status="running")
    assert (signal.run_id, signal.attempt, signal.current_attempt) == ("r", 1, 2)


# --- the async step API --------------------------------------------------------------------


async def test_a_refused_output_stops_the_handler(fake_gateway: FakeGateway) -> None:
    fake_gateway.fence_at = "PUT second"
    ran: list[str] = []
    caught: list[BaseException] = []

    def work(name: str) -> str:
        ran.append(name)
        return name

    async def handler() -> None:
        try:
            await step.run("first", work, "first")
            await step.run("second", work, "second")
            await step.run("third", work, "third")
        except Exception as exc:  # a handler's ordinary error handling
            caught.append(exc)

    with active(fake_gateway.invocation(steps=0)), pytest.raises(Superseded) as raised:
        await handler()
    assert ran == ["first", "second"]
    assert caught == []
    assert fake_gateway.log == ["PUT first", "PUT second"]  # nothing after the refusal
    assert raised.value.run_id == RUN_ID
    assert (raised.value.attempt, raised.value.current_attempt) == (1, 2)
    assert raised.value.run_status == "running"
    assert raised.value.step_id == "second"


async def test_after_the_refusal_every_step_call_raises_without_calling_back(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.fence_at = "PUT first"
    ran: list[str] = []
    inv = fake_gateway.invocation(steps=0)
    with active(inv):
        with pytest.raises(Superseded) as first:
            await step.run("first", ran.append, "first")
        # A handler that catches BaseException and goes on gets the same signal again.
        with pytest.raises(Superseded) as again:
            await step.run("later", ran.append, "later")
        with pytest.raises(Superseded):
            await step.sleep("nap", 60)
        with pytest.raises(Superseded):
            await step.wait_for_event("paid", event="order.paid")
    assert again.value is first.value is inv.superseded
    assert ran == ["first"]
    assert fake_gateway.log == ["PUT first"]


async def test_a_refused_step_list_runs_nothing(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("first", 0, output="recorded")
    fake_gateway.fence_at = "GET steps"
    ran: list[str] = []
    with active(fake_gateway.invocation()), pytest.raises(Superseded):
        await step.run("first", ran.append, "first")
    assert ran == []
    assert fake_gateway.log == ["GET steps"]


async def test_a_refused_failure_record_raises_the_signal_not_the_step_error(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.fence_at = "PUT flaky"

    def flaky() -> None:
        raise ConnectionError("down")

    with active(fake_gateway.invocation(steps=0)), pytest.raises(Superseded) as raised:
        await step.run("flaky", flaky)
    assert isinstance(raised.value.__context__, ConnectionError)
    assert fake_gateway.log == ["PUT flaky"]


async def test_a_refused_sleep_does_not_suspend(fake_gateway: FakeGateway) -> None:
    fake_gateway.fence_at = "PUT nap"
    inv = fake_gateway.invocation(steps=0)
    with active(inv), pytest.raises(Superseded):
        await step.sleep("nap", 60)
    assert not inv.suspended


async def test_other_conflicts_stay_callback_errors(fake_gateway: FakeGateway) -> None:
    fake_gateway.fail_next = _transport.Reply(
        409,
        json.dumps(
            {
                "type": "about:blank",
                "title": "Conflict",
                "status": 409,
                "detail": "step 'first' is recorded as a sleep",
            }
        ).encode(),
    )
    inv = fake_gateway.invocation(steps=0)
    with active(inv), pytest.raises(CallbackError) as raised:
        await step.run("first", lambda: 1)
    assert raised.value.status == 409
    assert inv.superseded is None


async def test_parallel_steps_the_first_refusal_wins_and_no_new_step_starts(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.fence_at = "PUT fast"
    slow_started, slow_may_finish = asyncio.Event(), asyncio.Event()
    ran: list[str] = []

    async def slow() -> str:
        ran.append("slow")
        slow_started.set()
        await slow_may_finish.wait()
        return "slow"

    async def fast() -> str:
        ran.append("fast")
        return "fast"

    inv = fake_gateway.invocation(steps=0)
    with active(inv):
        slow_task = asyncio.ensure_future(step.run("slow", slow))
        await slow_started.wait()
        with pytest.raises(Superseded) as raised:
            await step.run("fast", fast)
        slow_may_finish.set()
        # The slow step's function was already running: it finishes, but nothing is sent.
        with pytest.raises(Superseded) as slow_raised:
            await slow_task
        with pytest.raises(Superseded):
            await step.run("after", ran.append, "after")
    assert slow_raised.value is raised.value
    assert ran == ["slow", "fast"]
    assert fake_gateway.log == ["PUT fast"]


async def test_gather_of_steps_refused_together_raises_one_signal(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.fence_at = "PUT a"
    inv = fake_gateway.invocation(steps=0)
    with active(inv):
        results = await asyncio.gather(
            step.run("a", lambda: 1), step.run("b", lambda: 2), return_exceptions=True
        )
    assert all(result is inv.superseded for result in results)
    assert fake_gateway.log == ["PUT a"]  # b had not reached its PUT: it never sends one


# --- the sync step API ---------------------------------------------------------------------


def test_sync_a_refused_output_stops_the_handler(fake_gateway: FakeGateway) -> None:
    fake_gateway.fence_at = "PUT second"
    ran: list[str] = []
    caught: list[BaseException] = []

    def work(name: str) -> str:
        ran.append(name)
        return name

    def handler() -> None:
        try:
            sync_step.run("first", work, "first")
            sync_step.run("second", work, "second")
            sync_step.run("third", work, "third")
        except Exception as exc:
            caught.append(exc)

    inv = fake_gateway.invocation(steps=0)
    with active(inv), pytest.raises(Superseded):
        handler()
    assert (ran, caught) == (["first", "second"], [])
    assert fake_gateway.log == ["PUT first", "PUT second"]
    with active(inv), pytest.raises(Superseded):
        sync_step.sleep("nap", 60)
    assert fake_gateway.log == ["PUT first", "PUT second"]


def test_sync_threads_sharing_an_invocation_stop_together(fake_gateway: FakeGateway) -> None:
    fake_gateway.fence_at = "PUT a"
    inv = fake_gateway.invocation(steps=0)
    ran: list[str] = []
    outcomes: dict[str, BaseException | None] = {}

    def worker(name: str) -> None:
        with active(inv):
            try:
                sync_step.run(name, ran.append, name)
                outcomes[name] = None
            except BaseException as exc:
                outcomes[name] = exc

    first = threading.Thread(target=worker, args=("a",))
    first.start()
    first.join()
    second = threading.Thread(target=worker, args=("b",))
    second.start()
    second.join()
    assert outcomes["a"] is outcomes["b"] is inv.superseded
    assert ran == ["a"]
    assert fake_gateway.log == ["PUT a"]


# --- the adapters --------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _fake_transports(monkeypatch: pytest.MonkeyPatch, fake_gateway: FakeGateway) -> None:
    monkeypatch.setattr(_transport, "default_async", FakeAsyncTransport(fake_gateway))
    monkeypatch.setattr(_transport, "default_sync", FakeSyncTransport(fake_gateway))


def _assert_superseded_problem(status: int, content_type: str | None, body: bytes) -> None:
    assert status == 409
    assert content_type == "application/problem+json"
    problem = json.loads(body)
    assert problem["type"] == SUPERSEDED
    assert problem["status"] == 409
    assert (problem["run_id"], problem["attempt"]) == (RUN_ID, 1)


class Booking:
    """Three steps; the handler catches Exception (or, with ?swallow, BaseException)."""

    def __init__(self) -> None:
        self.ran: list[str] = []
        self.caught: list[BaseException] = []

    def work(self, name: str) -> str:
        self.ran.append(name)
        return name

    async def run_async(self, swallow: bool) -> None:
        try:
            for name in ("first", "second", "third"):
                await step.run(name, self.work, name)
        except Exception as exc:
            self.caught.append(exc)
        except BaseException:
            if not swallow:
                raise

    def run_sync(self) -> None:
        try:
            for name in ("first", "second", "third"):
                sync_step.run(name, self.work, name)
        except Exception as exc:
            self.caught.append(exc)


@pytest.mark.parametrize("swallow", [False, True])
async def test_aiohttp_answers_409_and_stops(
    aiohttp_client: AiohttpClient, fake_gateway: FakeGateway, swallow: bool
) -> None:
    booking = Booking()

    async def book(request: web.Request) -> web.Response:
        await booking.run_async(swallow)
        return web.json_response({"booked": True})

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/book", book)
    client = await aiohttp_client(app)
    fake_gateway.fence_at = "PUT second"
    resp = await client.post("/book", headers=fake_gateway.headers(steps=0))
    _assert_superseded_problem(resp.status, resp.headers.get("Content-Type"), await resp.read())
    assert "Stepgate-No-Retry" not in resp.headers
    assert (booking.ran, booking.caught) == (["first", "second"], [])
    assert fake_gateway.log == ["PUT first", "PUT second"]


async def test_asgi_answers_409_and_stops(fake_gateway: FakeGateway) -> None:
    booking = Booking()

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        try:
            await booking.run_async(swallow=False)
        except BaseException:
            # like Starlette's ServerErrorMiddleware: a 500 page, then re-raise
            await send({"type": "http.response.start", "status": 500, "headers": []})
            await send({"type": "http.response.body", "body": b"Internal Server Error"})
            raise
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"booked"})

    fake_gateway.fence_at = "PUT second"
    sent: list[dict[str, Any]] = []

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b""}

    scope = {
        "type": "http",
        "query_string": b"",
        "headers": [
            (k.lower().encode(), v.encode()) for k, v in fake_gateway.headers(steps=0).items()
        ],
    }
    await stepgate.asgi.StepgateMiddleware(app)(scope, receive, send)
    assert [m["type"] for m in sent] == ["http.response.start", "http.response.body"]
    headers = dict(sent[0]["headers"])
    _assert_superseded_problem(
        sent[0]["status"], headers[b"content-type"].decode(), sent[1]["body"]
    )
    assert (booking.ran, booking.caught) == (["first", "second"], [])
    assert fake_gateway.log == ["PUT first", "PUT second"]


@pytest.mark.parametrize("framework_renders_errors", [False, True])
def test_wsgi_answers_409_and_stops(
    fake_gateway: FakeGateway, framework_renders_errors: bool
) -> None:
    booking = Booking()

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            booking.run_sync()
        except BaseException:
            if not framework_renders_errors:
                raise
            # like Flask without PROPAGATE_EXCEPTIONS: its own 500 page, nothing raised
            start_response("500 INTERNAL SERVER ERROR", [("Content-Type", "text/html")])
            return [b"<h1>Internal Server Error</h1>"]
        start_response("200 OK", [])
        return [b"booked"]

    fake_gateway.fence_at = "PUT second"
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": "/book", "QUERY_STRING": ""}
    for name, value in fake_gateway.headers(steps=0).items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started["status"], started["headers"] = status, dict(headers)

    body = b"".join(stepgate.wsgi.StepgateMiddleware(app)(environ, start_response))
    assert started["status"] == "409 Conflict"
    _assert_superseded_problem(409, started["headers"]["Content-Type"], body)
    assert (booking.ran, booking.caught) == (["first", "second"], [])
    assert fake_gateway.log == ["PUT first", "PUT second"]


async def test_a_fenced_suspend_is_not_answered_202(fake_gateway: FakeGateway) -> None:
    from stepgate._responses import reply_for

    inv = fake_gateway.invocation(steps=0)
    fake_gateway.fence_at = "PUT b"
    with active(inv):
        results = await asyncio.gather(
            step.sleep("a", 60), step.run("b", lambda: 1), return_exceptions=True
        )
    assert isinstance(results[0], Suspend) and results[1] is inv.superseded
    reply = reply_for(results[0], inv)
    assert reply is not None and reply.status == 409
