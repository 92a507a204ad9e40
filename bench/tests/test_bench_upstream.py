"""The bench upstream: plain answers, the raw step protocol, the gate."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
import upstream
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer


async def test_plain_answers_small_json(aiohttp_client: Any) -> None:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())
    resp = await client.post("/plain", data=b'{"bench": true}')
    assert resp.status == 200
    assert (await resp.json())["ok"] is True


async def test_raw_without_gateway_headers_runs_steps_in_process(aiohttp_client: Any) -> None:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())
    resp = await client.post("/raw/3", data=b"{}")
    assert await resp.json() == {"steps": 3, "total": 1 + 2 + 3}


@pytest.mark.parametrize("path", ["/raw/3", "/min/3"])
async def test_raw_checkpoints_each_step_and_replays_recorded_ones(
    path: str, aiohttp_client: Any, aiohttp_server: Any
) -> None:
    puts: list[tuple[str, Any, str]] = []

    async def list_steps(request: web.Request) -> web.Response:
        # s0 was recorded by an earlier attempt with a different output: it must be reused.
        return web.json_response(
            {"steps": [{"id": "s0", "seq": 0, "status": "completed", "output": 100}]}
        )

    async def put_step(request: web.Request) -> web.Response:
        body = await request.json()
        puts.append((request.match_info["step"], body, request.headers["Authorization"]))
        return web.json_response({"status": "completed", "output": body["output"]}, status=201)

    gateway = web.Application()
    gateway.router.add_get("/v1/runs/r1/steps", list_steps)
    gateway.router.add_put("/v1/runs/r1/steps/{step}", put_step)
    server: TestServer = await aiohttp_server(gateway)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())

    resp = await client.post(
        path,
        data=b"{}",
        headers={
            "Stepgate-Callback": str(server.make_url("/v1/runs/r1")),
            "Stepgate-Token": "tok",
            "Stepgate-Steps": "1",
        },
    )
    assert await resp.json() == {"steps": 3, "total": 100 + 2 + 3}
    assert puts == [
        ("s1", {"output": 2, "seq": 1}, "Bearer tok"),
        ("s2", {"output": 3, "seq": 2}, "Bearer tok"),
    ]


async def test_min_client_reuses_a_connection_and_replaces_one_closed_meanwhile() -> None:
    connections = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Answers one request per connection, then closes it without saying so.
        nonlocal connections
        connections += 1
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        writer.write(b"HTTP/1.1 201 Created\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = upstream.MinClient()
    try:
        url = f"http://127.0.0.1:{port}/v1/runs/r1/steps/s0"
        assert await client("PUT", url, "tok", b'{"output":1}') == (201, b'{"output":1}')
        assert len(client.idle[f"127.0.0.1:{port}"]) == 1  # kept: the answer did not say close
        await asyncio.sleep(0.05)  # the server has closed it by now
        assert await client("PUT", url, "tok", b'{"output":2}') == (201, b'{"output":2}')
        assert connections == 2
    finally:
        client.close()
        server.close()
        await server.wait_closed()


async def test_gate_holds_until_opened_and_counts_runs_after(aiohttp_client: Any) -> None:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())
    await client.post("/_bench/gate?open=0")
    held = asyncio.ensure_future(client.post("/gate", headers={"Stepgate-Run-Id": "a"}))
    for _ in range(100):
        if (await (await client.get("/_bench/stats")).json())["gate_held"] == 1:
            break
        await asyncio.sleep(0.01)
    assert not held.done()
    await client.post("/_bench/gate?open=1")
    assert (await held).status == 200
    await client.post("/gate", headers={"Stepgate-Run-Id": "b"})
    await client.post("/gate", headers={"Stepgate-Run-Id": "b"})
    stats = await (await client.get("/_bench/stats")).json()
    # "a" arrived while closed; "b" twice is one run.
    assert stats["gate_runs_since_open"] == 1


async def test_sdk_route_runs_steps_in_process_outside_the_gateway(aiohttp_client: Any) -> None:
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())
    resp = await client.post("/steps/3", data=b"{}")
    assert resp.status == 200, await resp.text()
    assert await resp.json() == {"steps": 3, "total": 6}


async def test_hold_records_steps_and_blocks_s1_while_held(
    aiohttp_client: Any, aiohttp_server: Any
) -> None:
    steps: dict[str, Any] = {}

    async def list_steps(request: web.Request) -> web.Response:
        listed = [{"id": k, "status": "completed", "output": v} for k, v in steps.items()]
        return web.json_response({"steps": listed})

    async def put_step(request: web.Request) -> web.Response:
        body = await request.json()
        steps[request.match_info["step"]] = body["output"]
        return web.json_response({"status": "completed", "output": body["output"]}, status=201)

    gateway = web.Application()
    gateway.router.add_get("/v1/runs/r1/steps", list_steps)
    gateway.router.add_put("/v1/runs/r1/steps/{step}", put_step)
    server: TestServer = await aiohttp_server(gateway)
    client: TestClient[web.Request, web.Application] = await aiohttp_client(upstream.make_app())
    headers = {
        "Stepgate-Callback": str(server.make_url("/v1/runs/r1")),
        "Stepgate-Token": "tok",
        "Stepgate-Run-Id": "r1",
    }

    await client.post("/_bench/hold?on=1")
    blocked = asyncio.ensure_future(client.post("/hold/3", data=b"{}", headers=headers))
    for _ in range(100):
        if (await (await client.get("/_bench/hold")).json())["blocked"] == 1:
            break
        await asyncio.sleep(0.01)
    assert not blocked.done()
    assert steps == {"s0": 1}  # s0 acknowledged, s1 started and blocked

    # Another attempt, not held, replays s0 and runs s1 and s2.
    await client.post("/_bench/hold?on=0")
    assert (await blocked).status == 503
    resp = await client.post("/hold/3", data=b"{}", headers={**headers, "Stepgate-Steps": "1"})
    assert await resp.json() == {"steps": 3, "total": 1 + 2 + 3}
    ledger = await (await client.get("/_bench/hold?full=1")).json()
    assert len(ledger["invoked"]["r1"]) == 2
    assert {k: len(v) for k, v in ledger["executed"]["r1"].items()} == {"s0": 1, "s1": 2, "s2": 1}
    assert set(ledger["acked"]["r1"]) == {"s0", "s1", "s2"}
