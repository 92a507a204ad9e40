"""`step.invoke` behind the real gateway, async (aiohttp) and blocking (WSGI): the child run's
answer is the step's output, once however often the parent is replayed, and a child that ends
failed raises StepFailed with its status, on every replay."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
import stepgate.aiohttp
import stepgate.wsgi
from aiohttp import web
from stepgate import NonRetriableError, StepFailed, StepgateError, step
from stepgate.sync import step as sync_step

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.sdk.test_signals_with_gateway import serve_wsgi  # noqa: F401 (a fixture)

BOTH_DIALECTS = True


class Agency:
    """POST /trips invokes the route `hotels` (POST /hotels) for its room."""

    def __init__(self) -> None:
        self.ran: Counter[str] = Counter()

    def room(self, nights: int) -> dict[str, Any]:
        self.ran["room"] += 1
        if nights > 7:
            raise NonRetriableError("no room for that long", status=409)
        return {"room": 12, "nights": nights}

    def trip_answer(self, outcome: Callable[[], Any]) -> tuple[int, dict[str, Any]]:
        self.ran["trip"] += 1
        try:
            return 200, {"hotel": outcome()}
        except StepFailed as failed:  # the handler answers it: here, as a 409 of its own
            return 409, {"hotel_failed": failed.status, "step": failed.step_id}

    async def trips(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.ran["trip"] += 1
        await step.run("quote", lambda: {"price": 100})
        try:
            hotel = await step.invoke("book-hotel", route="hotels", body=body)
        except StepFailed as failed:
            return web.json_response(
                {"hotel_failed": failed.status, "step": failed.step_id}, status=409
            )
        return web.json_response({"hotel": hotel})

    async def hotels(self, request: web.Request) -> web.Response:
        nights = (await request.json())["nights"]
        return web.json_response(await step.run("room", self.room, nights))

    def wsgi(self, environ: dict[str, Any], start: Callable[..., Any]) -> list[bytes]:
        size = int(environ.get("CONTENT_LENGTH") or 0)
        body = json.loads(environ["wsgi.input"].read(size) or b"{}")
        if environ["PATH_INFO"] == "/hotels":
            status, answer = 200, sync_step.run("room", self.room, body["nights"])
        else:
            sync_step.run("quote", lambda: {"price": 100})
            status, answer = self.trip_answer(
                lambda: sync_step.invoke("book-hotel", route="hotels", body=body)
            )
        start(f"{status} X", [("Content-Type", "application/json")])
        return [json.dumps(answer).encode()]


@pytest.fixture(params=["async", "sync"])
async def agency(
    request: pytest.FixtureRequest,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    serve_wsgi: Callable[[Any], str],  # noqa: F811
) -> AsyncIterator[tuple[Agency, Running]]:
    agency = Agency()
    if request.param == "async":
        app = web.Application(middlewares=[stepgate.aiohttp.middleware])
        app.router.add_post("/trips", agency.trips)
        app.router.add_post("/hotels", agency.hotels)
        base = await upstream(app)
    else:
        base = serve_wsgi(stepgate.wsgi.StepgateMiddleware(agency.wsgi))
    routes = [
        {"name": "trips", "path": "/trips", "upstream": base, "durable": True, "hold": "10s"},
        {"name": "hotels", "path": "/hotels", "upstream": base, "durable": True},
    ]
    yield agency, await gateway(routes)


async def test_the_child_runs_once_and_answers_the_step(agency: tuple[Agency, Running]) -> None:
    desk, gw = agency
    async with gw.session.post(gw.url + "/trips", json={"nights": 2}) as resp:
        assert resp.status == 200, await resp.text()
        assert await resp.json() == {"hotel": {"room": 12, "nights": 2}}
        parent = resp.headers["Stepgate-Run-Id"]
    assert desk.ran == {"trip": 2, "room": 1}  # parked, then woken by the child's end
    async with gw.session.get(f"{gw.internal}/v1/runs/{parent}") as resp:
        (child,) = (await resp.json())["children"]
    assert child["route"] == "hotels" and child["status"] == "completed"


async def test_a_failed_child_raises_step_failed(agency: tuple[Agency, Running]) -> None:
    desk, gw = agency
    async with gw.session.post(gw.url + "/trips", json={"nights": 9}) as resp:
        assert resp.status == 409, await resp.text()
        assert await resp.json() == {"hotel_failed": 409, "step": "book-hotel"}
    assert desk.ran["room"] == 1


def test_invoke_needs_the_gateway_a_route_and_a_json_body() -> None:
    with pytest.raises(StepgateError, match="invoke 'book' needs the Stepgate gateway"):
        step.invoke("book", route="hotels", body={})
    with pytest.raises(StepgateError, match="needs the Stepgate gateway"):
        sync_step.invoke("book", route="hotels")
    with pytest.raises(ValueError, match="needs route="):
        step.invoke("book", route="", body={})
    with pytest.raises(TypeError, match="must be JSON"):
        step.invoke("book", route="hotels", body={1j})
