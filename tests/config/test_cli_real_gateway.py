"""`stepgate runs ...` against the real gateway on loopback, with a real upstream behind it that
speaks the callback protocol directly (no SDK)."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory

from .conftest import Outcome, run_process

FAST_RETRY = {"attempts": 3, "initial": "10ms", "max": "20ms"}


class Charge:
    """An upstream whose step `charge` fails on the first invocation and succeeds on the next."""

    def __init__(self) -> None:
        self.invocations = 0

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/pay", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.invocations += 1
        callback = request.headers["Stepgate-Callback"]
        auth = {"Authorization": f"Bearer {request.headers['Stepgate-Token']}"}
        if self.invocations == 1:
            body: dict[str, Any] = {"error": {"message": "card declined", "type": "Declined"}}
        else:
            body = {"output": {"amount": 42}}
        async with (
            aiohttp.ClientSession() as session,
            session.put(
                f"{callback}/steps/{quote('charge', safe='')}",
                json={**body, "seq": 0},
                headers=auth,
            ) as resp,
        ):
            assert resp.status in (200, 201), await resp.text()
        if "error" in body:
            return web.Response(status=503, text="try later")
        return web.json_response({"paid": 42})


async def pay_once(gateway: GatewayFactory, upstream: UpstreamFactory) -> tuple[Running, str]:
    """One run through the flaky `charge` step; returns the gateway and the run's id."""
    base = await upstream(Charge().app())
    route = {"name": "pay", "path": "/pay", "upstream": base, "durable": True, "retry": FAST_RETRY}
    gw = await gateway([route])
    async with gw.session.post(gw.url + "/pay", data=b"{}") as resp:
        assert resp.status == 200, await resp.text()
        return gw, resp.headers["Stepgate-Run-Id"]


@pytest.fixture
def run_cli() -> Callable[..., Any]:
    """`python -m gateway ARGS` as a real process (the gateway in this one logs to stdout)."""

    async def run(*args: str) -> Outcome:
        return await asyncio.to_thread(run_process, *args)

    return run


async def test_runs_show_prints_the_output_of_a_step_that_failed_before(
    gateway: GatewayFactory, upstream: UpstreamFactory, run_cli: Callable[..., Any]
) -> None:
    gw, run_id = await pay_once(gateway, upstream)

    outcome = await run_cli("runs", "show", run_id, "--url", gw.internal)

    assert (outcome.code, outcome.err) == (0, "")
    (row,) = [line for line in outcome.out.splitlines() if " charge " in line]
    assert "completed" in row
    assert 'output: {"amount": 42}' in row
    assert not row.split("output:")[0].rstrip().endswith("error:")
    # the failure on the way stays visible, after the output and marked as earlier
    assert row.index("output:") < row.index("earlier error: card declined")


async def test_runs_show_json_still_has_the_gateways_answer_as_is(
    gateway: GatewayFactory, upstream: UpstreamFactory, run_cli: Callable[..., Any]
) -> None:
    gw, run_id = await pay_once(gateway, upstream)

    outcome = await run_cli("runs", "show", run_id, "--url", gw.internal, "--json")

    assert outcome.code == 0, outcome.err
    (step,) = json.loads(outcome.out)["steps"]
    assert (step["status"], step["output"]) == ("completed", {"amount": 42})


async def test_a_run_whose_id_starts_with_a_dash_can_be_shown_and_retried(
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    run_cli: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = secrets.token_urlsafe

    def dash_first(nbytes: int | None = None) -> str:
        return "-" + real(nbytes)[1:]

    monkeypatch.setattr(secrets, "token_urlsafe", dash_first)
    gw, run_id = await pay_once(gateway, upstream)
    monkeypatch.setattr(secrets, "token_urlsafe", real)
    assert run_id.startswith("-")

    shown = await run_cli("runs", "show", run_id, "--url", gw.internal)
    after_dashes = await run_cli("runs", "show", "--url", gw.internal, "--", run_id)
    retried = await run_cli("runs", "retry", run_id, "--url", gw.internal)

    assert (shown.code, shown.err) == (0, "")
    assert shown.out.splitlines()[0] == f"run      {run_id}"
    assert (after_dashes.code, after_dashes.out) == (0, shown.out)
    assert (retried.code, retried.err) == (0, "")
    assert retried.out.startswith(f"run {run_id}: retry requested")


@pytest.mark.parametrize("command", [["runs", "list"], ["events", "send", "x"]])
async def test_pointing_at_the_public_listener_says_so(
    command: list[str],
    gateway: GatewayFactory,
    upstream: UpstreamFactory,
    run_cli: Callable[..., Any],
) -> None:
    gw, _ = await pay_once(gateway, upstream)

    outcome = await run_cli(*command, "--url", gw.url)

    assert outcome.code == 1
    assert len(outcome.err_lines) == 1, outcome.err
    assert "404 Not Found" in outcome.err
    assert outcome.err.rstrip().endswith(
        f"(is {gw.url} the gateway's internal URL? the admin API is served on internal_listen)"
    )


async def test_runs_show_links_a_parent_and_its_child_and_shows_what_they_wait_for(
    gateway: GatewayFactory, upstream: UpstreamFactory, run_cli: Callable[..., Any]
) -> None:
    from tests.gateway.test_invoke import Trip, routes

    trip = Trip("hold")  # the child holds: the parent waits for it
    gw = await gateway(routes(await upstream(trip.app())))
    try:
        async with gw.session.post(
            gw.url + "/trip", json={}, headers={"Prefer": "respond-async"}
        ) as resp:
            parent = resp.headers["Stepgate-Run-Id"]
        for _ in range(200):
            async with gw.session.get(f"{gw.internal}/v1/runs/{parent}") as resp:
                run = await resp.json()
            if run["status"] == "waiting":
                break
            await asyncio.sleep(0.02)
        (child,) = run["children"]

        shown = await run_cli("runs", "show", parent, "--url", gw.internal)
        assert shown.code == 0, shown.err
        assert f"children {child['id']} (running)" in shown.out
        (row,) = [line for line in shown.out.splitlines() if " book-hotel " in line]
        assert f"child run {child['id']}" in row
        shown = await run_cli("runs", "show", child["id"], "--url", gw.internal)
        assert f"parent   {parent} (step book-hotel)" in shown.out
    finally:
        trip.release.set()
