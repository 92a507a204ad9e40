"""Durable routes end to end: a real upstream, the real gateway, a fresh SQLite file."""

from __future__ import annotations

import asyncio
import io
import json
from collections import Counter
from typing import Any

from aiohttp import web

from tests.conftest import GatewayFactory, UpstreamFactory
from tests.gateway.rawsteps import RawSteps

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True

FAST_RETRY = {"attempts": 3, "initial": "20ms", "max": "50ms"}


def durable(base: str, **extra: Any) -> dict[str, Any]:
    route = {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": FAST_RETRY,
    }
    route.update(extra)
    return route


class Flaky:
    """An upstream whose step `charge` fails on the first `fail_times` invocations."""

    def __init__(self, fail_times: int = 1, final_status: int = 200) -> None:
        self.fail_times = fail_times
        self.final_status = final_status
        self.executed: Counter[str] = Counter()
        self.invocations = 0
        self.bodies: list[bytes] = []
        self.headers: list[dict[str, str]] = []

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("*", "/work", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        self.invocations += 1
        self.bodies.append(await request.read())
        self.headers.append(dict(request.headers))
        steps = RawSteps(request)

        async def reserve() -> str:
            self.executed["reserve"] += 1
            return "seat-7"

        async def charge() -> dict[str, int]:
            self.executed["charge"] += 1
            if self.executed["charge"] <= self.fail_times:
                raise RuntimeError("card declined")
            return {"amount": 42}

        seat = await steps.run("reserve", reserve)
        try:
            paid = await steps.run("charge", charge)
        except RuntimeError:
            return web.Response(status=503, text="try later")
        return web.json_response({"seat": seat, "paid": paid}, status=self.final_status)


async def test_failed_step_retries_and_earlier_steps_run_once(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    gw = await gateway([durable(await upstream(flaky.app()))])
    async with gw.session.post(gw.url + "/work", data=b"{}") as resp:
        assert resp.status == 200
        assert await resp.json() == {"seat": "seat-7", "paid": {"amount": 42}}
    assert flaky.executed == {"reserve": 1, "charge": 2}
    assert [h["Stepgate-Attempt"] for h in flaky.headers] == ["1", "2"]
    assert [h["Stepgate-Steps"] for h in flaky.headers] == ["0", "2"]


async def test_post_body_is_replayed_byte_for_byte(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=2)
    gw = await gateway([durable(await upstream(flaky.app()))])
    body = bytes(range(256)) * 100
    async with gw.session.post(
        gw.url + "/work", data=body, headers={"Content-Type": "application/octet-stream"}
    ) as resp:
        assert resp.status == 200
    assert flaky.bodies == [body, body, body]
    assert {h["Content-Type"] for h in flaky.headers} == {"application/octet-stream"}


async def test_attempts_exhausted_returns_last_upstream_response(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=10)
    gw = await gateway([durable(await upstream(flaky.app()))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 503
        assert await resp.text() == "try later"
        run_id = resp.headers["Stepgate-Run-Id"]
    assert flaky.invocations == 3
    run = await gw.store.get_run(run_id)
    assert run.status == "failed" and run.failures == 3


async def test_no_retry_header_ends_the_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    calls = 0

    async def handler(request: web.Request) -> web.Response:
        nonlocal calls
        calls += 1
        return web.Response(
            status=500, text="broken for good", headers={"Stepgate-No-Retry": "true"}
        )

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 500
        assert await resp.text() == "broken for good"
        assert "Stepgate-No-Retry" not in resp.headers
    assert calls == 1


async def test_long_retry_redirects_and_poll_yields_the_final_response(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1, final_status=201)
    base = await upstream(flaky.app())
    gw = await gateway(
        [durable(base, hold="100ms", retry={"attempts": 3, "initial": "400ms", "max": "400ms"})]
    )
    async with gw.session.post(gw.url + "/work", allow_redirects=False) as resp:
        assert resp.status == 303
        location = resp.headers["Location"]
        assert location.startswith("/_stepgate/runs/")
        assert int(resp.headers["Retry-After"]) >= 1
        body = await resp.json()
        assert body["status"] == "retrying" and body["poll_url"] == location
        run_id = resp.headers["Stepgate-Run-Id"]
        assert body["run_id"] == run_id
    async with gw.session.get(gw.url + location + "&wait=0") as resp:
        assert resp.status == 202
        assert resp.headers["Cache-Control"] == "no-store"
        assert (await resp.json())["attempt"] == 1
    async with gw.session.get(gw.url + location + "&wait=5") as resp:
        assert resp.status == 201
        assert await resp.json() == {"seat": "seat-7", "paid": {"amount": 42}}
        assert resp.headers["Cache-Control"] == "no-store"
        assert resp.headers["Stepgate-Run-Id"] == run_id
    # A wrong token looks exactly like an unknown run.
    async with gw.session.get(gw.url + f"/_stepgate/runs/{run_id}?token=nope") as resp:
        assert resp.status == 404
        assert resp.headers["Content-Type"] == "application/problem+json"


async def test_redirect_is_followed_by_a_plain_client(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    base = await upstream(flaky.app())
    gw = await gateway(
        [durable(base, hold="50ms", retry={"attempts": 3, "initial": "200ms", "max": "200ms"})]
    )
    # A 303 turns the POST into a GET of the poll URL, which long-polls to the end.
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
        assert await resp.json() == {"seat": "seat-7", "paid": {"amount": 42}}
        assert len(resp.history) == 1 and resp.history[0].status == 303


async def test_short_retry_inside_hold_answers_directly(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=2)
    gw = await gateway([durable(await upstream(flaky.app()), hold="5s")])
    async with gw.session.post(gw.url + "/work", allow_redirects=False) as resp:
        assert resp.status == 200
        assert resp.history == ()
    assert flaky.invocations == 3


async def test_prefer_wait_shortens_the_hold(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    base = await upstream(flaky.app())
    gw = await gateway(
        [durable(base, hold="10s", retry={"attempts": 3, "initial": "1s", "max": "1s"})]
    )
    async with gw.session.post(
        gw.url + "/work", allow_redirects=False, headers={"Prefer": "wait=0"}
    ) as resp:
        assert resp.status == 303


async def test_prefer_respond_async(gateway: GatewayFactory, upstream: UpstreamFactory) -> None:
    release = asyncio.Event()

    async def handler(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done later")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(
        gw.url + "/work", allow_redirects=False, headers={"Prefer": "respond-async"}
    ) as resp:
        assert resp.status == 202
        assert resp.headers["Preference-Applied"] == "respond-async"
        location = resp.headers["Location"]
        assert (await resp.json())["status"] == "running"
    release.set()
    async with gw.session.get(gw.url + location + "&wait=5") as resp:
        assert resp.status == 200
        assert await resp.text() == "done later"


async def test_client_stepgate_headers_never_reach_the_upstream(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = await gateway([durable(await upstream(flaky.app()))])
    forged = {
        "Stepgate-Token": "forged",
        "Stepgate-Callback": "http://evil.example/",
        "Stepgate-Suspend": "true",
        "stepgate-custom": "x",
    }
    async with gw.session.post(gw.url + "/work", headers=forged) as resp:
        assert resp.status == 200
    seen = flaky.headers[0]
    assert seen["Stepgate-Token"] != "forged"
    assert seen["Stepgate-Callback"].startswith(gw.internal)
    assert "stepgate-custom" not in {k.lower() for k in seen}
    assert "Stepgate-Suspend" not in seen


async def test_oversized_body_is_413_and_creates_no_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = await gateway([durable(await upstream(flaky.app()), max_body="1KiB")])
    async with gw.session.post(gw.url + "/work", data=b"x" * 1025) as resp:
        assert resp.status == 413
        assert resp.headers["Content-Type"] == "application/problem+json"

    async def chunks() -> Any:  # no Content-Length: the limit holds while streaming
        for _ in range(4):
            yield b"y" * 512

    async with gw.session.post(gw.url + "/work", data=chunks()) as resp:
        assert resp.status == 413
    async with gw.session.post(gw.url + "/work", data=b"x" * 1024) as resp:
        assert resp.status == 200
    assert flaky.invocations == 1
    page = await gw.store.list_runs()
    assert len(page.runs) == 1


async def test_idempotency_key_attaches_and_rejects_a_different_request(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = await gateway([durable(await upstream(flaky.app()))])
    key = {"Idempotency-Key": "order-1"}
    async with gw.session.post(gw.url + "/work", data=b"a", headers=key) as first:
        assert first.status == 200
        body = await first.read()
        run_id = first.headers["Stepgate-Run-Id"]
    async with gw.session.post(gw.url + "/work", data=b"a", headers=key) as again:
        assert again.status == 200
        assert await again.read() == body
        assert again.headers["Stepgate-Run-Id"] == run_id
    async with gw.session.post(gw.url + "/work", data=b"b", headers=key) as other:
        assert other.status == 422
        assert other.headers["Content-Type"] == "application/problem+json"
    assert flaky.invocations == 1
    assert flaky.headers[0]["Idempotency-Key"] == "order-1"


async def test_idempotency_attach_to_a_pending_run_waits_for_it(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    base = await upstream(flaky.app())
    gw = await gateway([durable(base, retry={"attempts": 3, "initial": "300ms", "max": "300ms"})])
    key = {"Idempotency-Key": "k"}
    first, second = await asyncio.gather(
        gw.session.post(gw.url + "/work", data=b"z", headers=key),
        gw.session.post(gw.url + "/work", data=b"z", headers=key),
    )
    assert first.status == second.status == 200
    assert await first.read() == await second.read()
    assert first.headers["Stepgate-Run-Id"] == second.headers["Stepgate-Run-Id"]
    first.release()
    second.release()
    assert flaky.executed == {"reserve": 1, "charge": 2}


async def test_callbacks_need_the_runs_own_token(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    answers: list[tuple[int, str]] = []

    async def handler(request: web.Request) -> web.Response:
        import aiohttp

        cb = request.headers["Stepgate-Callback"]
        token = request.headers["Stepgate-Token"]
        async with aiohttp.ClientSession() as s:
            for headers in (
                {},
                {"Authorization": "Bearer wrong"},
                {"Authorization": f"Basic {token}"},
                {"Authorization": f"Bearer {token}"},
            ):
                async with s.put(cb + "/steps/a", json={"output": 1}, headers=headers) as r:
                    answers.append((r.status, r.content_type))
            async with s.get(
                cb.rsplit("/", 1)[0] + "/nope/steps", headers={"Authorization": f"Bearer {token}"}
            ) as r:
                answers.append((r.status, r.headers["Content-Type"]))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
    problem = "application/problem+json"
    assert answers == [
        (401, problem),
        (401, problem),
        (401, problem),
        (201, "application/json"),
        (404, problem),
    ]


async def test_step_protocol_first_write_wins_and_rejects_bad_bodies(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    results: dict[str, Any] = {}

    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        results["first"] = await steps.put("pay#2", {"output": {"n": 1}})
        results["second"] = await steps.put("pay#2", {"output": {"n": 2}})
        results["both"] = await steps.put("x", {"output": 1, "error": {"message": "m"}})
        results["neither"] = await steps.put("x", {})
        results["long"] = await steps.put("x" * 257, {"output": 1})
        results["error"] = await steps.put("flaky", {"error": {"message": "boom"}})
        results["error2"] = await steps.put("flaky", {"error": {"message": "boom"}})
        results["slash"] = await steps.put("a/b ü", {"output": None})
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
        run_id = resp.headers["Stepgate-Run-Id"]
    assert results["first"] == (201, {"status": "completed", "output": {"n": 1}})
    assert results["second"] == (200, {"status": "completed", "output": {"n": 1}})
    assert results["both"][0] == 400 and results["neither"][0] == 400
    assert results["long"][0] == 400
    assert results["error"] == (200, {"status": "failed", "attempts": 1})
    assert results["error2"] == (200, {"status": "failed", "attempts": 2})
    assert results["slash"][0] == 201
    steps = {s.id: s for s in await gw.store.steps(run_id)}
    assert set(steps) == {"pay#2", "flaky", "a/b ü"}
    assert json.loads(steps["pay#2"].output) == {"n": 1}


async def test_writes_to_an_ended_run_are_409(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    captured: dict[str, str] = {}

    async def handler(request: web.Request) -> web.Response:
        captured["cb"] = request.headers["Stepgate-Callback"]
        captured["token"] = request.headers["Stepgate-Token"]
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
    async with gw.session.put(
        captured["cb"] + "/steps/late",
        json={"output": 1},
        headers={"Authorization": f"Bearer {captured['token']}"},
    ) as r:
        assert r.status == 409


async def test_callbacks_refuse_non_json_numbers_and_answer_problems(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    answers: list[tuple[int, str]] = []

    async def handler(request: web.Request) -> web.Response:
        import aiohttp

        cb = request.headers["Stepgate-Callback"]
        auth = {
            "Authorization": f"Bearer {request.headers['Stepgate-Token']}",
            "Content-Type": "application/json",
        }
        async with aiohttp.ClientSession() as s:
            for body in (b'{"output": NaN}', b'{"output": 1e400}', b'{"output": -Infinity}'):
                async with s.put(cb + "/steps/n", data=body, headers=auth) as r:
                    answers.append((r.status, r.content_type))
            async with s.post(cb + "/steps", headers=auth) as r:  # wrong method
                answers.append((r.status, r.content_type))
            async with s.get(cb + "/nowhere", headers=auth) as r:
                answers.append((r.status, r.content_type))
            big = io.BytesIO(b'{"output": "' + b"x" * (17 << 20) + b'"}')
            async with s.put(cb + "/steps/big", data=big, headers=auth) as r:
                answers.append((r.status, r.content_type))
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_post("/work", handler)
    gw = await gateway([durable(await upstream(app))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
    problem = "application/problem+json"
    assert answers == [(400, problem)] * 3 + [(405, problem), (404, problem), (413, problem)]
