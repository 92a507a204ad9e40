"""The Python example service: plainly, against the fake gateway, and behind the real one."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from aiohttp import web
from stepgate import _transport

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.sdk.fakes import FakeAsyncTransport, FakeGateway

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "python" / "trip_service.py"
TRIP = {"traveller": "ada@example.com", "flight": "LH 400", "hotel": "Hotel Adlon"}
AiohttpClient = Callable[[web.Application], Any]


@pytest.fixture
def trips() -> Iterator[ModuleType]:
    """A fresh copy of the example module (its counters are module state)."""
    spec = importlib.util.spec_from_file_location("trip_service_under_test", EXAMPLE)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


async def test_books_a_trip_without_the_gateway(
    trips: ModuleType, aiohttp_client: AiohttpClient
) -> None:
    client = await aiohttp_client(trips.make_app())
    resp = await client.post("/trips", json=TRIP)
    assert resp.status == 200
    booked = await resp.json()
    assert booked["charge"]["amount_cents"] == 42_000
    assert booked["flight"]["reference"].startswith("FL-")
    assert booked["flight"]["reference"] in booked["confirmation"]["text"]
    assert await (await client.get("/stats")).json() == {
        **dict.fromkeys(trips.STEPS, 1),
        "refund-flight": 0,  # only a hotel that fails for good is compensated
    }


@pytest.mark.parametrize(
    ("query", "body", "detail"),
    [
        ("", {"traveller": "ada"}, '"flight" must be a non-empty string'),
        ("?fail=bogus", TRIP, "fail=bogus: expected STEP"),
        ("?cooloff=soon", TRIP, "cooloff=soon"),
    ],
)
async def test_bad_requests_end_the_run(
    trips: ModuleType, aiohttp_client: AiohttpClient, query: str, body: Any, detail: str
) -> None:
    client = await aiohttp_client(trips.make_app())
    resp = await client.post("/trips" + query, json=body)
    assert resp.status == 400
    assert resp.headers["Stepgate-No-Retry"] == "true"
    assert detail in (await resp.json(content_type="application/problem+json"))["detail"]


async def test_a_retried_run_replays_finished_steps(
    trips: ModuleType,
    aiohttp_client: AiohttpClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    fake = FakeGateway()
    monkeypatch.setattr(_transport, "default_async", FakeAsyncTransport(fake))
    client = await aiohttp_client(trips.make_app())

    first = await client.post("/trips?fail=charge-card", json=TRIP, headers=fake.headers())
    assert first.status == 500
    assert fake.steps["charge-card"]["status"] == "failed"
    second = await client.post("/trips?fail=charge-card", json=TRIP, headers=fake.headers())
    assert second.status == 200
    booked = await second.json()
    assert booked["flight"] == fake.steps["reserve-flight"]["output"]  # replayed, not redone
    assert dict(trips.executions) == {
        "reserve-flight": 1,
        "reserve-hotel": 1,
        "charge-card": 2,
        "send-confirmation": 1,
        "refund-flight": 0,
    }


async def test_behind_the_real_gateway(
    trips: ModuleType, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    base = await upstream(trips.make_app())
    gw = await gateway(
        [
            {
                "name": "trips",
                "path": "/trips",
                "upstream": base,
                "durable": True,
                "hold": "10s",
                "retry": {"attempts": 3, "initial": "20ms"},
            }
        ]
    )
    async with gw.session.post(gw.url + "/trips?fail=charge-card&cooloff=0.2", json=TRIP) as resp:
        assert resp.status == 200, await resp.text()
        booked = await resp.json()
    assert booked["traveller"] == TRIP["traveller"]
    assert dict(trips.executions) == {
        "reserve-flight": 1,
        "reserve-hotel": 1,
        "charge-card": 2,
        "send-confirmation": 1,
        "refund-flight": 0,
    }
    async with gw.session.post(gw.url + "/trips", json={"traveller": "x"}) as resp:
        assert resp.status == 400
        assert "Stepgate-No-Retry" not in resp.headers  # the gateway strips its signals


async def test_a_hotel_that_fails_for_good_is_compensated_behind_the_real_gateway(
    trips: ModuleType, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    base = await upstream(trips.make_app())
    route = {"name": "trips", "path": "/trips", "upstream": base, "durable": True, "hold": "10s"}
    gw = await gateway([route])
    async with gw.session.post(gw.url + "/trips?fail=reserve-hotel:always", json=TRIP) as resp:
        assert resp.status == 409, await resp.text()
        answer = await resp.json()
        run_id = resp.headers["Stepgate-Run-Id"]
    assert answer["error"] == "no hotel: reserve-hotel failed (fail=reserve-hotel:always)"
    assert answer["refund"]["refund"].startswith("RF-")
    assert dict(trips.executions) == {
        "reserve-flight": 1,
        "reserve-hotel": 3,  # its own policy: two retries
        "charge-card": 0,
        "send-confirmation": 0,
        "refund-flight": 1,
    }
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["reserve-hotel"]["final"] is True
    assert (
        steps["refund-flight"]["output"]["flight"] == steps["reserve-flight"]["output"]["reference"]
    )


async def test_an_approval_link_and_insurance_behind_the_real_gateway(
    trips: ModuleType,
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    capsys: pytest.CaptureFixture[str],
) -> None:
    base = await upstream(trips.make_app())
    gw = await gateway(
        [
            {"name": "trips", "path": "/trips", "upstream": base, "durable": True, "hold": "0s"},
            {"name": "insurance", "path": "/insurance", "upstream": base, "durable": True},
        ]
    )
    async with gw.session.post(
        gw.url + "/trips?approval=60&insure=1", json=TRIP, allow_redirects=False
    ) as resp:
        assert resp.status == 303, await resp.text()
        location = resp.headers["Location"]
    # The link the service "mailed", as the README's walk-through reads it from its output.
    (line,) = [x for x in capsys.readouterr().out.splitlines() if "approval needed" in x]
    url = line.split("POST ", 1)[1]
    async with gw.session.post(gw.url + url, json={"approved": True}) as resp:
        assert resp.status == 202
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200, await resp.text()
        booked = await resp.json()
    assert booked["approval"] == {"url": url, "decision": {"approved": True}}
    assert booked["insurance"]["policy"].startswith("IN-")
    assert trips.executions["charge-card"] == 1
