"""Signals through the raw protocol: a step parks on a URL of the public listener, and a JSON
POST to that URL (once) completes it, or its time-out does."""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps, suspended

BOTH_DIALECTS = True


def route(base: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "approve",
        "path": "/approve",
        "upstream": base,
        "durable": True,
        "hold": "50ms",
        "retry": {"attempts": 3, "initial": "20ms"},
        **extra,
    }


class Approver:
    """A handler that asks for one signal, answers with what it carried."""

    def __init__(self, timeout: str = "1h") -> None:
        self.timeout = timeout
        self.answers: list[tuple[int, dict[str, Any]]] = []  # the signal PUTs' answers
        self.listed: list[dict[str, Any]] = []  # the signal's record in GET {cb}/steps

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/approve", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        steps = RawSteps(request)
        recorded = (await steps.steps()).get("approve")
        if recorded is not None:
            self.listed.append(recorded)
        if recorded is not None and recorded["status"] == "completed":
            return web.json_response({"approval": recorded["output"]})
        status, answer = await steps.put("approve", {"signal": {"timeout": self.timeout}})
        self.answers.append((status, answer))
        if answer["status"] == "waiting":
            return suspended()
        return web.json_response({"approval": answer["output"]})

    @property
    def url(self) -> str:
        return str(self.answers[0][1]["url"])


async def start(gw: Running) -> str:
    """Send a request; returns its poll location once the run is parked on its signal."""
    async with gw.session.post(gw.url + "/approve", allow_redirects=False) as resp:
        assert resp.status == 303, await resp.text()
        assert (await resp.json())["status"] == "waiting"
        return resp.headers["Location"]


async def post(session: aiohttp.ClientSession, url: str, **kwargs: Any) -> tuple[int, Any]:
    async with session.post(url, **kwargs) as resp:
        return resp.status, await resp.json(content_type=None)


async def test_a_post_to_the_url_completes_the_signal_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    approver = Approver()
    gw = await gateway([route(await upstream(approver.app()))])
    location = await start(gw)
    assert approver.answers[0][0] == 200
    assert approver.answers[0][1]["status"] == "waiting"
    url = approver.url
    assert url.startswith("/_stepgate/signals/") and "?token=" in url  # relative by default

    status, body = await post(gw.session, gw.url + url, json={"approved": True, "by": "ada"})
    assert (status, body) == (202, {"status": "delivered"})
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert await resp.json() == {"approval": {"approved": True, "by": "ada"}}

    # Single use: the second POST is refused and changes nothing.
    status, body = await post(gw.session, gw.url + url, json={"approved": False})
    assert status == 409 and body["status"] == 409
    run_id = location.split("/")[3].partition("?")[0]
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    (signal,) = run["steps"]
    assert signal["kind"] == "signal" and signal["status"] == "completed"
    assert signal["output"] == {"approved": True, "by": "ada"}
    assert signal["url"] == url
    # The replay saw the record with its URL.
    assert approver.listed[-1]["url"] == url and approver.listed[-1]["kind"] == "signal"


async def test_the_signal_put_is_repeatable_and_keeps_its_url(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    answers: list[dict[str, Any]] = []

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        for _ in range(2):  # the same PUT twice, as after a lost answer
            status, answer = await steps.put("approve", {"signal": {"timeout": "1h"}})
            assert status == 200, answer
            answers.append(answer)
        return suspended()

    app = web.Application()
    app.router.add_post("/approve", handler)
    gw = await gateway([route(await upstream(app))])
    await start(gw)
    await start(gw)  # another run: a signal of its own
    first, again, other, _ = answers
    assert first == again and first["status"] == "waiting"
    assert other["url"] != first["url"]
    assert urlsplit(other["url"]).query != urlsplit(first["url"]).query  # a secret each


async def test_a_signal_that_times_out_completes_with_null(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    approver = Approver(timeout="300ms")
    gw = await gateway([route(await upstream(approver.app()))])
    location = await start(gw)
    async with gw.session.get(gw.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert await resp.json() == {"approval": None}
    status, _ = await post(gw.session, gw.url + approver.url, json={"late": True})
    assert status == 409


async def test_bad_posts_are_refused_and_change_nothing(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    approver = Approver()
    gw = await gateway([route(await upstream(approver.app()))])
    location = await start(gw)
    parts = urlsplit(approver.url)
    path, token = parts.path, parts.query.removeprefix("token=")
    base = gw.url + path
    session = gw.session
    assert (await post(session, base + "?token=" + token[:-2] + "xx", json={}))[0] == 404
    assert (await post(session, base, json={}))[0] == 404  # no token
    assert (await post(session, gw.url + "/_stepgate/signals/nope?token=" + token, json={}))[
        0
    ] == 404
    not_json = await post(session, gw.url + approver.url, data=b"yes please")
    assert not_json[0] == 400 and "JSON" in not_json[1]["detail"]
    assert (await post(session, gw.url + approver.url, data=b""))[0] == 400
    assert (await post(session, gw.url + approver.url, data=b'{"a": NaN}'))[0] == 400
    big = await post(session, gw.url + approver.url, json={"x": "y" * 70_000})
    assert big[0] == 413
    async with session.get(gw.url + approver.url) as resp:
        assert resp.status == 405 and resp.headers["Allow"] == "POST"
    # Nothing of that reached the run: it still waits, and the right POST still works.
    async with session.get(gw.url + location + "&wait=0") as resp:
        assert resp.status == 202 and (await resp.json())["status"] == "waiting"
    assert (await post(session, gw.url + approver.url, json=[1, 2]))[0] == 202
    async with session.get(gw.url + location + "&wait=10") as resp:
        assert await resp.json() == {"approval": [1, 2]}


async def test_bad_signal_puts_are_400(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    answers: list[int] = []

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        for body in (
            {"signal": {"timeout": "soon"}},
            {"signal": {"timeout": "400d"}},
            {"signal": {"timeout": -1}},
            {"signal": {"when": "1h"}},
            {"signal": "1h"},
            {"signal": {}, "wait": {"event": "x"}},
        ):
            status, _ = await steps.put("s", body)
            answers.append(status)
        return web.json_response({})

    app = web.Application()
    app.router.add_post("/approve", handler)
    gw = await gateway([route(await upstream(app), hold="5s")])
    async with gw.session.post(gw.url + "/approve") as resp:
        assert resp.status == 200
    assert answers == [400] * 6


async def test_public_url_makes_the_url_absolute(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    approver = Approver()
    gw = await gateway(
        [route(await upstream(approver.app()))], public_url="https://approvals.example.com/gw/"
    )
    await start(gw)
    url = approver.url
    assert url.startswith("https://approvals.example.com/gw/_stepgate/signals/")
    # Behind that name is this gateway's public listener.
    local = gw.url + url.removeprefix("https://approvals.example.com/gw")
    assert (await post(gw.session, local, json={"ok": 1}))[0] == 202


async def test_a_signal_posted_to_another_replica_wakes_the_run(
    gateway: GatewayFactory, upstream: UpstreamFactory, request: pytest.FixtureRequest
) -> None:
    if getattr(request.node.callspec, "params", {}).get("gateway") != "postgres":
        pytest.skip("replicas share a PostgreSQL store")
    approver = Approver()
    base = await upstream(approver.app())
    first = await gateway([route(base)])
    second = await gateway([route(base)], db=first.gateway.settings.store)
    location = await start(first)
    status, _ = await post(second.session, second.url + approver.url, json={"from": "second"})
    assert status == 202
    async with first.session.get(first.url + location + "&wait=10") as resp:
        assert resp.status == 200
        assert await resp.json() == {"approval": {"from": "second"}}


async def test_a_signal_survives_a_gateway_restart(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    approver = Approver()
    gw = GatewayProcess(tmp_path, [route(await upstream(approver.app()))])
    await gw.start()
    try:
        async with aiohttp.ClientSession() as client:
            async with client.post(gw.url + "/approve", allow_redirects=False) as resp:
                assert resp.status == 303
                location = resp.headers["Location"]
            gw.kill()
            await gw.start()
            status, _ = await post(client, gw.url + approver.url, json={"after": "restart"})
            assert status == 202
            async with client.get(gw.url + location + "&wait=10") as resp:
                assert resp.status == 200
                assert await resp.json() == {"approval": {"after": "restart"}}
    finally:
        gw.stop()


async def test_a_catch_all_route_does_not_shadow_signal_urls(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    approver = Approver()
    proxied: list[str] = []

    async def everything(request: web.Request) -> web.Response:
        proxied.append(request.path)
        return web.Response(text="the upstream")

    app = approver.app()
    app.router.add_route("*", "/{tail:.*}", everything)
    base = await upstream(app)
    catch_all = {"name": "all", "path": "/*", "upstream": base}
    gw = await gateway([route(base), catch_all])
    await start(gw)
    assert (await post(gw.session, gw.url + approver.url, json={"ok": True}))[0] == 202
    assert (await post(gw.session, gw.url + "/_stepgate/signals/x?token=y", json={}))[0] == 404
    assert proxied == []
