"""Path rewriting per route (issue 14): `strip_prefix: true` or `rewrite: /new/prefix`, so that
`/orders/*` can go to an upstream that serves `/`. Routing, forwarding, the stored target and the
poll path agree: the route matches the client's path, the upstream gets the rewritten one on
every attempt, and the run keeps what the client asked for."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import web

from gateway.config import ConfigError, parse_settings
from gateway.routing import upstream_target
from tests.conftest import GatewayFactory, UpstreamFactory

BOTH_DIALECTS = True


def route(**extra: Any) -> Any:
    data = {"name": "o", "path": "/orders/*", "upstream": "http://127.0.0.1:9", **extra}
    return parse_settings({"routes": [data]}, source="t").routes[0]


@pytest.mark.parametrize(
    ("extra", "raw", "forwarded"),
    [
        ({}, "/orders/42?x=1", "/orders/42?x=1"),
        ({"strip_prefix": True}, "/orders/42?x=1", "/42?x=1"),
        ({"strip_prefix": True}, "/orders", "/"),
        ({"strip_prefix": True}, "/orders?q=1", "/?q=1"),
        ({"strip_prefix": True}, "/orders/a%2Fb/c%20d", "/a%2Fb/c%20d"),  # bytes kept
        ({"rewrite": "/v2/orders"}, "/orders/42", "/v2/orders/42"),
        ({"rewrite": "/v2/orders"}, "/orders", "/v2/orders"),
        ({"rewrite": "/api", "path": "/*"}, "/x/y?z", "/api/x/y?z"),
        ({"strip_prefix": True, "path": "/exact"}, "/exact?a", "/?a"),
    ],
)
def test_the_base_is_stripped_or_replaced_and_the_rest_kept(
    extra: dict[str, Any], raw: str, forwarded: str
) -> None:
    assert upstream_target(route(**extra), raw) == forwarded


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"strip_prefix": True, "rewrite": "/x"}, "not both"),
        ({"rewrite": "v2"}, "is not a path prefix"),
        ({"rewrite": "/v2/"}, "is not a path prefix"),
        ({"rewrite": "/a/../b"}, "is not a path prefix"),
        ({"rewrite": "/a/%2e%2e"}, "is not a path prefix"),
        ({"rewrite": "/a?b"}, "is not a path prefix"),
        ({"strip_prefix": "yes"}, "true or false"),
    ],
)
def test_a_bad_rewrite_names_its_key(extra: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        route(**extra)
    assert caught.value.key in ("routes[0].rewrite", "routes[0].strip_prefix")
    assert message in caught.value.message


def recording() -> tuple[web.Application, list[str]]:
    seen: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.raw_path)
        if len(seen) == 1 and request.method == "POST":
            return web.Response(status=503)  # a durable route tries again
        return web.Response(text=f"served {request.raw_path}")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    return app, seen


async def test_a_plain_route_forwards_the_rewritten_path(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    app, seen = recording()
    base = await upstream(app)
    gw = await gateway(
        [
            {
                "name": "o",
                "path": "/orders/*",
                "upstream": base,
                "strip_prefix": True,
                "methods": ["GET"],
            }
        ]
    )
    async with gw.session.get(gw.url + "/orders/42?x=1") as resp:
        assert resp.status == 200 and await resp.text() == "served /42?x=1"
    async with gw.session.get(gw.url + "/42") as resp:
        assert resp.status == 404  # routing still asks for the client's prefix
    assert seen == ["/42?x=1"]


async def test_a_durable_route_rewrites_on_every_attempt_and_keeps_the_clients_target(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    app, seen = recording()
    base = await upstream(app)
    gw = await gateway(
        [
            {
                "name": "o",
                "path": "/orders/*",
                "upstream": base,
                "durable": True,
                "rewrite": "/v2/orders",
                "retry": {"attempts": 3, "initial": "10ms", "max": "10ms"},
            }
        ]
    )
    async with gw.session.post(gw.url + "/orders/42?x=1") as resp:
        assert resp.status == 200 and await resp.text() == "served /v2/orders/42?x=1"
        run_id = resp.headers["Stepgate-Run-Id"]
    assert seen == ["/v2/orders/42?x=1"] * 2
    run = await gw.store.get_run(run_id)
    assert run.target == "/orders/42?x=1"  # as the client asked; shown so in the admin API
    async with gw.session.get(f"{gw.url}/_stepgate/runs/{run_id}?token={run.poll_token}") as resp:
        assert resp.status == 200 and await resp.text() == "served /v2/orders/42?x=1"
