"""OpenTelemetry (issue 14): a real gateway process with `otel.endpoint` set sends each ended
run's spans to a real OTLP/HTTP receiver, under the client's traceparent; without `otel` no
OpenTelemetry module is even imported."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.conftest import DIALECTS, ROOT, UpstreamFactory, empty_pg
from tests.gateway.otlp import OtlpReceiver, Received, start_receiver
from tests.gateway.procs import GatewayProcess, free_port
from tests.gateway.rawsteps import RawSteps, Suspend, raw_sleep, suspended
from tests.gateway.test_crash import wait_for_status
from tests.gateway.test_reload import events, rewrite, until_logged


@pytest.fixture
async def receiver() -> AsyncIterator[OtlpReceiver]:
    found, server = await start_receiver()
    yield found
    await server.close()


@pytest.fixture
async def procs() -> AsyncIterator[list[GatewayProcess]]:
    started: list[GatewayProcess] = []
    yield started
    for proc in started:
        proc.stop()


@pytest.fixture
def quick_batches(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's batch processor waits 5 s before it sends; the gateway processes started
    after this send every 50 ms (the standard OTEL_BSP_SCHEDULE_DELAY, in ms)."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")


def route(base: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "retry": {"attempts": 3, "initial": "50ms"},
        **extra,
    }


async def gateway_process(
    tmp_path: Path, procs: list[GatewayProcess], routes: list[dict[str, Any]], **extra: Any
) -> GatewayProcess:
    process = GatewayProcess(tmp_path, routes, **extra)
    procs.append(process)
    await process.start()
    return process


def in_order(*moments: int) -> bool:
    return list(moments) == sorted(moments)


@pytest.mark.parametrize("dialect", DIALECTS)
async def test_a_retried_run_is_a_trace_under_the_clients_span(
    dialect: str,
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    quick_batches: None,
    request: pytest.FixtureRequest,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        charge = await steps.run("charge", lambda: asyncio.sleep(0, {"charge_id": "ch_1"}))
        if steps.attempt == 1:
            return web.Response(status=500, text="ledger down")
        await steps.run("ship", lambda: asyncio.sleep(0, "shipped"))
        return web.json_response(charge)

    app = web.Application()
    app.router.add_post("/work", handler)
    store = {}
    if dialect == "postgres":
        store["store"] = await empty_pg(request.getfixturevalue("pg_database"))
    process = await gateway_process(
        tmp_path,
        procs,
        [route(await upstream(app))],
        otel={
            "endpoint": receiver.url,
            "service_name": "shop-gateway",
            "headers": {"X-Collector-Key": "k-123"},
        },
        **store,
    )
    trace_id, client_span = secrets.token_hex(16), secrets.token_hex(8)
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            process.url + "/work", headers={"traceparent": f"00-{trace_id}-{client_span}-01"}
        ) as resp,
    ):
        assert resp.status == 200, await resp.text()
        run_id = resp.headers["Stepgate-Run-Id"]

    await receiver.until(5)
    run = receiver.one("run work")
    first, second = receiver.one("attempt 1"), receiver.one("attempt 2")
    charge, ship = receiver.one("step charge"), receiver.one("step ship")
    assert len(receiver.spans) == 5
    assert {span.trace_id for span in receiver.spans} == {trace_id}
    # The run hangs under the client's span; attempts under the run; steps under the attempt
    # that recorded them (`charge` was replayed by the second attempt, not recorded again).
    assert run.parent_span_id == client_span
    assert first.parent_span_id == second.parent_span_id == run.span_id
    assert charge.parent_span_id == first.span_id
    assert ship.parent_span_id == second.span_id
    assert (run.kind_name, first.kind_name, charge.kind_name) == (
        "SPAN_KIND_SERVER",
        "SPAN_KIND_CLIENT",
        "SPAN_KIND_INTERNAL",
    )
    assert run.attributes == {
        "stepgate.run_id": run_id,
        "stepgate.route": "work",
        "stepgate.run.status": "completed",
        "stepgate.run.attempts": 2,
        "stepgate.run.steps": 2,
        "http.request.method": "POST",
        "http.response.status_code": 200,
    }
    assert run.error is None
    assert first.attributes == {
        "stepgate.run_id": run_id,
        "stepgate.attempt": 1,
        "stepgate.attempt.outcome": "response",
        "http.response.status_code": 500,
    }
    assert (first.error, second.error) == ("HTTP 500", None)
    assert second.attributes["stepgate.attempt"] == 2
    assert charge.attributes == {
        "stepgate.run_id": run_id,
        "stepgate.step.id": "charge",
        "stepgate.step.kind": "run",
        "stepgate.step.status": "completed",
        "stepgate.step.attempts": 1,
        "stepgate.step.seq": 0,
    }
    assert ship.attributes["stepgate.step.seq"] == 1
    # The times are the record's: each span inside its parent, the attempts one after another.
    assert in_order(run.start, first.start, charge.start, charge.end, first.end)
    assert in_order(first.end, second.start, ship.start, ship.end, second.end, run.end)
    assert run.resource["service.name"] == "shop-gateway"
    assert run.resource["service.instance.id"]
    assert all(sent["x-collector-key"] == "k-123" for sent in receiver.headers)


async def test_a_failed_run_after_a_sleep_without_a_traceparent(
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    quick_batches: None,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        if steps.attempt == 1:
            await steps.run("reserve", lambda: asyncio.sleep(0, "seat 4A"))
            try:
                await raw_sleep(steps, "cool-off", 0.3)
            except Suspend:
                return suspended()
        status, _ = await steps.put(
            "charge", {"error": {"message": "card declined", "retriable": False}}
        )
        assert status == 200
        return web.Response(status=402, text="declined")

    app = web.Application()
    app.router.add_post("/work", handler)
    process = await gateway_process(
        tmp_path, procs, [route(await upstream(app))], otel={"endpoint": receiver.url}
    )
    async with (
        aiohttp.ClientSession() as client,
        client.post(
            process.url + "/work", headers={"Prefer": "respond-async"}, allow_redirects=False
        ) as resp,
    ):
        assert resp.status == 202
        run_id = resp.headers["Stepgate-Run-Id"]
    record = await wait_for_status(process.internal, run_id, "failed")

    await receiver.until(6)
    run = receiver.one("run work")
    first, second = receiver.one("attempt 1"), receiver.one("attempt 2")
    reserve, nap, charge = (receiver.one(f"step {n}") for n in ("reserve", "cool-off", "charge"))
    assert len(receiver.spans) == 6
    # No traceparent came: the run is in the trace the gateway started for it (and forwarded
    # upstream), the one the admin API shows.
    assert {span.trace_id for span in receiver.spans} == {record["trace_id"]}
    assert record["error"] is None  # a 4xx answer is a failed run, of itself
    assert run.error == "HTTP 402"
    assert run.attributes["stepgate.run.status"] == "failed"
    assert run.attributes["http.response.status_code"] == 402
    assert first.attributes["stepgate.attempt.outcome"] == "suspended"
    assert (first.error, second.error) == (None, "HTTP 402")
    assert reserve.parent_span_id == nap.parent_span_id == first.span_id
    assert charge.parent_span_id == second.span_id
    # The sleep outlives the attempt that recorded it: it ends when it woke the run.
    assert nap.attributes["stepgate.step.kind"] == "sleep"
    assert nap.attributes["stepgate.step.status"] == "completed"
    assert in_order(first.start, reserve.end, nap.start, first.end, nap.end, second.end)
    assert charge.error == "card declined"
    assert charge.attributes["stepgate.step.status"] == "failed"
    assert run.resource["service.name"] == "stepgate"


async def test_a_client_that_does_not_sample_gets_no_spans(
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    quick_batches: None,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        await RawSteps(request).run("only", lambda: asyncio.sleep(0, 1))
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    process = await gateway_process(
        tmp_path, procs, [route(await upstream(app))], otel={"endpoint": receiver.url}
    )
    unsampled, sampled = secrets.token_hex(16), secrets.token_hex(16)
    async with aiohttp.ClientSession() as client:
        for trace_id, flags in ((unsampled, "00"), (sampled, "01")):
            traceparent = f"00-{trace_id}-{secrets.token_hex(8)}-{flags}"
            async with client.post(
                process.url + "/work", headers={"traceparent": traceparent}
            ) as resp:
                assert resp.status == 200
            await until_logged(process, "run.completed", count=1 if flags == "00" else 2)
    # The runs end one after the other and their spans are sent in that order: once the
    # second run's are in, the first's would have been.
    spans = await receiver.until(3)
    await asyncio.sleep(0.2)
    assert {span.trace_id for span in spans} == {sampled}
    assert len(receiver.spans) == 3


async def test_the_replica_that_ended_a_run_sends_its_spans(
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    quick_batches: None,
    pg_url: str,
) -> None:
    """Two replicas on one PostgreSQL database, both tracing: each run's spans come once,
    from the replica that ended it, whichever replica the client polls."""

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    routes = [route(await upstream(app))]
    replicas = []
    for name in ("east", "west"):
        (tmp_path / name).mkdir()
        replicas.append(
            await gateway_process(
                tmp_path / name,
                procs,
                routes,
                store=pg_url,
                replica_id=name,
                otel={"endpoint": receiver.url},
            )
        )
    east, west = replicas
    async with aiohttp.ClientSession() as client:
        for process in (east, east, west):
            async with client.post(process.url + "/work") as resp:
                assert resp.status == 200
    await receiver.until(6)
    await asyncio.sleep(0.3)  # two more batch periods: nothing else is coming
    runs = receiver.named("run work")
    assert len(runs) == 3 and len(receiver.spans) == 6
    assert len({span.attributes["stepgate.run_id"] for span in runs}) == 3
    assert sorted(span.resource["service.instance.id"] for span in runs) == [
        "east",
        "east",
        "west",
    ]


async def test_spans_left_in_the_batch_are_sent_when_the_gateway_stops(
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With batches sent only every minute (the default is 5 s), a SIGTERM right after a run
    ends still delivers its spans before the process exits."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "60000")

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    process = await gateway_process(
        tmp_path, procs, [route(await upstream(app))], otel={"endpoint": receiver.url}
    )
    async with aiohttp.ClientSession() as client, client.post(process.url + "/work") as resp:
        assert resp.status == 200
        run_id = resp.headers["Stepgate-Run-Id"]
    await until_logged(process, "run.completed")
    assert receiver.spans == []

    assert await asyncio.to_thread(process.stop) == 0
    assert [span.name for span in receiver.spans] == ["attempt 1", "run work"]
    assert receiver.one("run work").attributes["stepgate.run_id"] == run_id
    assert any(line["event"] == "otel.stopped" for line in events(process))


async def test_a_collector_that_is_down_costs_the_runs_nothing(
    tmp_path: Path, upstream: UpstreamFactory, procs: list[GatewayProcess], quick_batches: None
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    nobody = f"http://127.0.0.1:{free_port()}"
    process = await gateway_process(
        tmp_path, procs, [route(await upstream(app))], otel={"endpoint": nobody, "timeout": "1s"}
    )
    async with aiohttp.ClientSession() as client:
        for _ in range(3):
            async with client.post(process.url + "/work") as resp:
                assert resp.status == 200
                assert await resp.text() == "done"
    # The exporter's failure is one of our JSON log lines, not a traceback on stderr.
    complaint = await until_logged(process, "otel.sdk")
    assert complaint["level"] == "warning"
    assert complaint["logger"].startswith("opentelemetry")
    assert await asyncio.to_thread(process.stop) == 0
    assert "Traceback" not in process.log.read_text()


async def test_otel_is_not_reloaded(
    tmp_path: Path,
    upstream: UpstreamFactory,
    receiver: OtlpReceiver,
    procs: list[GatewayProcess],
    quick_batches: None,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", handler)
    process = await gateway_process(
        tmp_path, procs, [route(await upstream(app))], otel={"endpoint": receiver.url}
    )
    rewrite(process, lambda config: config["otel"].update(service_name="renamed"))
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    kept = await until_logged(process, "config.reload_kept")
    assert kept["keys"] == ["otel"]
    async with aiohttp.ClientSession() as client, client.post(process.url + "/work") as resp:
        assert resp.status == 200
    spans: list[Received] = await receiver.until(2)
    assert {span.resource["service.name"] for span in spans} == {"stepgate"}


# A real process that serves one durable request through an in-process gateway, then says
# which tracing modules it has loaded.
_MODULES_AFTER_A_RUN = """
import asyncio, json, sys
from aiohttp import ClientSession, web
from gateway.app import Gateway
from gateway.config import parse_settings

async def main(db, otel):
    async def ok(request):
        return web.Response(text="ok")
    app = web.Application()
    app.router.add_post("/work", ok)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    upstream = "http://127.0.0.1:%d" % runner.addresses[0][1]
    data = {
        "listen": "127.0.0.1:0", "internal_listen": "127.0.0.1:0", "store": "sqlite:///" + db,
        "routes": [{"name": "work", "path": "/work", "upstream": upstream, "durable": True}],
    }
    if otel:
        data["otel"] = json.loads(otel)
    gateway = Gateway(parse_settings(data, source="test"))
    await gateway.start()
    async with ClientSession() as session:
        async with session.post("http://127.0.0.1:%d/work" % gateway.public_port) as resp:
            assert resp.status == 200
    await gateway.stop()
    await runner.cleanup()
    names = ("opentelemetry", "gateway.tracing", "gateway.spans", "google.protobuf")
    print(json.dumps(sorted(m for m in sys.modules if m.startswith(names))))

asyncio.run(main(sys.argv[1], sys.argv[2] if len(sys.argv) > 2 else ""))
"""


def modules_after_a_run(tmp_path: Path, *otel: str) -> list[str]:
    done = subprocess.run(
        [sys.executable, "-c", _MODULES_AFTER_A_RUN, str(tmp_path / "stepgate.db"), *otel],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout.splitlines()[-1]))


def test_without_otel_no_opentelemetry_module_is_imported(tmp_path: Path) -> None:
    assert modules_after_a_run(tmp_path) == []
    # The same process with `otel` does load them: the check above can tell.
    nobody = json.dumps({"endpoint": f"http://127.0.0.1:{free_port()}", "timeout": "1s"})
    loaded = modules_after_a_run(tmp_path, nobody)
    assert {"gateway.tracing", "opentelemetry.sdk.trace"} <= set(loaded)
