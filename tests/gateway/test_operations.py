"""What an operator sees: metrics, health, the admin API, the CLI, logs, access control."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from pathlib import Path

import aiohttp

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess, free_port
from tests.gateway.test_durable import Flaky, durable

# Each test that starts a gateway runs on an SQLite file, then on PostgreSQL (tests/conftest.py).
BOTH_DIALECTS = True


def metric(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        series, value = line.rsplit(" ", 1)
        metric_name, _, rest = series.partition("{")
        if metric_name != name:
            continue
        found = dict(part.split("=", 1) for part in rest.rstrip("}").split(",") if part)
        if all(found.get(k) == f'"{v}"' for k, v in labels.items()):
            return float(value)
    return None


async def scrape(gw: Running, base: str | None = None) -> str:
    async with gw.session.get((base or gw.internal) + "/metrics") as resp:
        assert resp.status == 200
        assert resp.content_type == "text/plain"
        return await resp.text()


async def test_metrics_follow_a_retried_run(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    metrics_port = free_port()
    gw = await gateway(
        [durable(await upstream(flaky.app()))], metrics_listen=f"127.0.0.1:{metrics_port}"
    )
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200
    async with gw.session.get(gw.url + "/nothing-here") as resp:
        assert resp.status == 404
    text = await scrape(gw)
    assert metric(text, "stepgate_requests_total", route="work", method="POST", code="200") == 1
    assert metric(text, "stepgate_requests_total", route="none", code="404") == 1
    assert metric(text, "stepgate_upstream_attempts_total", route="work", outcome="5xx") == 1
    assert metric(text, "stepgate_upstream_attempts_total", route="work", outcome="2xx") == 1
    assert metric(text, "stepgate_retries_total", route="work", reason="5xx") == 1
    assert metric(text, "stepgate_runs", state="completed") == 1
    assert metric(text, "stepgate_runs", state="failed") == 0
    assert metric(text, "stepgate_steps_total", route="work", status="completed") == 2
    assert metric(text, "stepgate_steps_total", route="work", status="failed") == 1
    assert metric(text, "stepgate_request_duration_seconds_count", route="work") == 1
    assert (metric(text, "stepgate_checkpoint_duration_seconds_count") or 0) >= 3
    assert (metric(text, "stepgate_store_write_duration_seconds_count") or 0) >= 4
    assert metric(text, "process_resident_memory_bytes") is not None
    dialect = "postgresql" if gw.gateway.settings.postgres else "sqlite"
    assert metric(text, "stepgate_replica", replica=gw.store.replica_id, dialect=dialect) == 1
    assert metric(text, "stepgate_runs_taken_over_total") == 0
    assert "run_id" not in text and "/work" not in text  # bounded labels only
    # The scrape listener serves /metrics and the probes, and nothing else.
    scrape_base = f"http://127.0.0.1:{metrics_port}"
    assert "stepgate_requests_total" in await scrape(gw, scrape_base)
    for probe in ("/healthz", "/readyz"):
        async with gw.session.get(scrape_base + probe) as resp:
            assert resp.status == 200
    async with gw.session.get(scrape_base + "/v1/runs") as resp:
        assert resp.status == 404


async def test_run_gauge_is_right_after_a_restart(
    gateway: GatewayFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    flaky = Flaky(fail_times=10)
    base = await upstream(flaky.app())
    db = tmp_path / "shared.db"
    first = await gateway([durable(base)], db=db)
    for _ in range(2):
        async with first.session.post(first.url + "/work") as resp:
            assert resp.status == 503
    await first.gateway.stop()
    second = await gateway([durable(base)], db=db)
    assert metric(await scrape(second), "stepgate_runs", state="failed") == 2


async def test_health_and_readiness(gateway: GatewayFactory) -> None:
    gw = await gateway([])
    for path in ("/healthz", "/readyz"):
        async with gw.session.get(gw.internal + path) as resp:
            assert resp.status == 200


async def test_internal_endpoints_are_not_on_the_public_listener(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = await gateway([durable(await upstream(flaky.app()))])
    async with gw.session.post(gw.url + "/work") as resp:
        run_id = resp.headers["Stepgate-Run-Id"]
    for method, path in (
        ("GET", "/metrics"),
        ("GET", "/v1/runs"),
        ("GET", f"/v1/runs/{run_id}"),
        ("POST", "/v1/events"),
        ("GET", "/ui"),
        ("GET", "/healthz"),
        ("GET", f"/v1/runs/{run_id}/steps"),
    ):
        async with gw.session.request(method, gw.url + path) as resp:
            assert resp.status == 404, path
            assert resp.content_type == "application/problem+json"


async def make_runs(gw: Running, n: int) -> list[str]:
    ids = []
    for i in range(n):
        async with gw.session.post(gw.url + "/work", data=str(i).encode()) as resp:
            ids.append(resp.headers["Stepgate-Run-Id"])
    return ids


async def test_admin_list_filters_and_pages(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = await gateway([durable(await upstream(flaky.app()))])
    ids = await make_runs(gw, 5)
    seen: list[str] = []
    cursor = None
    while True:
        query = "?limit=2" + (f"&cursor={cursor}" if cursor else "")
        async with gw.session.get(gw.internal + "/v1/runs" + query) as resp:
            page = await resp.json()
        assert len(page["runs"]) <= 2
        seen += [run["id"] for run in page["runs"]]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert seen == list(reversed(ids))  # newest first, each exactly once
    run = page["runs"][-1]
    assert set(run) == {"id", "route", "status", "attempt", "created_at", "updated_at"}
    for query, count in (
        ("?status=completed", 5),
        ("?status=failed", 0),
        ("?route=work", 5),
        ("?route=other", 0),
        ("?since=2099-01-01T00:00:00Z", 0),
    ):
        async with gw.session.get(gw.internal + "/v1/runs" + query) as resp:
            assert len((await resp.json())["runs"]) == count, query
    for bad in ("?status=weird", "?limit=0", "?limit=501", "?cursor=%%%", "?since=yesterday"):
        async with gw.session.get(gw.internal + "/v1/runs" + bad) as resp:
            assert resp.status == 400, bad
            assert resp.content_type == "application/problem+json"


async def test_admin_retry_reruns_a_failed_run_from_its_failed_step(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=3)  # every attempt of the first request fails
    gw = await gateway([durable(await upstream(flaky.app()))])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 503
        run_id = resp.headers["Stepgate-Run-Id"]
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    assert run["status"] == "failed"
    assert [a["status"] for a in run["attempts"]] == [503, 503, 503]
    steps = {s["id"]: s for s in run["steps"]}
    assert steps["reserve"]["status"] == "completed"
    assert steps["charge"]["status"] == "failed" and steps["charge"]["attempts"] == 3
    assert steps["charge"]["error"]["message"] == "card declined"

    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/retry") as resp:
        assert resp.status == 202
    for _ in range(100):
        run = await gw.store.get_run(run_id)
        if run.status == "completed":
            break
        await asyncio.sleep(0.02)
    assert run.status == "completed" and run.attempt == 4
    assert flaky.executed == {"reserve": 1, "charge": 4}
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        charge = {s["id"]: s for s in (await resp.json())["steps"]}["charge"]
    assert charge["status"] == "completed" and charge["attempts"] == 4
    assert charge["error"]["message"] == "card declined"  # the last failure stays visible
    async with gw.session.post(f"{gw.internal}/v1/runs/{run_id}/retry") as resp:
        assert resp.status == 202  # a completed run may be run again too
    async with gw.session.post(f"{gw.internal}/v1/runs/nope/retry") as resp:
        assert resp.status == 404


async def test_bulk_retry_and_cancel_act_on_what_the_filters_select(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    """POST /v1/runs/retry and /v1/runs/cancel take GET /v1/runs's filters and say how many
    runs they acted on; a run that does not qualify (not ended, ended) is passed over."""
    flaky = Flaky(fail_times=6)  # the first two requests fail every attempt
    failing = Flaky(fail_times=10**6)
    slow_app = failing.app()
    slow_app.router.add_route("*", "/slow", failing.handle)
    gw = await gateway(
        [
            durable(await upstream(flaky.app())),
            durable(
                await upstream(slow_app),
                name="slow",
                path="/slow",
                retry={"attempts": 5, "initial": "1h", "max": "1h"},
                hold="0s",
            ),
        ]
    )
    failed = []
    for _ in range(2):
        async with gw.session.post(gw.url + "/work") as resp:
            assert resp.status == 503
            failed.append(resp.headers["Stepgate-Run-Id"])
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200  # completed: not selected by status=failed
    parked = []
    for _ in range(3):
        async with gw.session.post(gw.url + "/slow", allow_redirects=False) as resp:
            assert resp.status == 303  # retrying, in an hour
            parked.append(resp.headers["Stepgate-Run-Id"])

    async def bulk(query: str) -> dict[str, object]:
        async with gw.session.post(gw.internal + query) as resp:
            assert resp.status == 200, await resp.text()
            return dict(await resp.json())

    # A dry run counts and changes nothing; a limit bounds a call and says more remain.
    assert await bulk("/v1/runs/retry?status=failed&dry_run=true") == {
        "count": 2,
        "more": False,
        "dry_run": True,
    }
    assert {(await gw.store.get_run(r)).status for r in failed} == {"failed"}
    assert await bulk("/v1/runs/retry?status=failed&limit=1") == {
        "count": 1,
        "more": True,
        "dry_run": False,
    }
    assert await bulk("/v1/runs/retry?status=failed") == {
        "count": 1,
        "more": False,
        "dry_run": False,
    }
    for run_id in failed:
        poll_token = (await gw.store.get_run(run_id)).poll_token
        url = f"{gw.url}/_stepgate/runs/{run_id}?token={poll_token}&wait=10"
        async with gw.session.get(url) as resp:
            assert resp.status == 200
    assert (await bulk("/v1/runs/cancel?route=slow"))["count"] == 3
    assert {(await gw.store.get_run(r)).status for r in parked} == {"cancelled"}
    assert (await bulk("/v1/runs/cancel?route=slow"))["count"] == 0  # safe to repeat
    for bad in (
        "",
        "?status=weird",
        "?limit=0",
        "?route=x&limit=100001",
        "?since=yesterday",
        "?route=x&dry_run=maybe",
        "?route=x&page=2",
    ):
        async with gw.session.post(gw.internal + "/v1/runs/retry" + bad) as resp:
            assert resp.status == 400, bad
            assert resp.content_type == "application/problem+json"


async def test_admin_token_guards_admin_and_events_but_not_callbacks(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    gw = await gateway([durable(await upstream(flaky.app()))], admin_token="s3cret")
    async with gw.session.post(gw.url + "/work") as resp:
        assert resp.status == 200  # the handler's callbacks used the run token only
        run_id = resp.headers["Stepgate-Run-Id"]
    for method, path in (
        ("GET", "/v1/runs"),
        ("GET", f"/v1/runs/{run_id}"),
        ("POST", "/v1/events"),
        ("POST", f"/v1/runs/{run_id}/cancel"),
    ):
        async with gw.session.request(method, gw.internal + path, json={"name": "x"}) as resp:
            assert resp.status == 401, path
        async with gw.session.request(
            method, gw.internal + path, json={"name": "x"}, headers={"Authorization": "Bearer nope"}
        ) as resp:
            assert resp.status == 401, path
    async with gw.session.get(
        gw.internal + "/v1/runs", headers={"Authorization": "Bearer s3cret"}
    ) as resp:
        assert resp.status == 200


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args], capture_output=True, text=True, timeout=30
    )


async def test_cli_against_a_real_gateway(
    gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=3)
    gw = await gateway([durable(await upstream(flaky.app()))])
    async with gw.session.post(gw.url + "/work") as resp:
        run_id = resp.headers["Stepgate-Run-Id"]

    def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
        return cli(*args, "--url", gw.internal)

    listing = await asyncio.to_thread(run_cli, "runs", "list")
    assert listing.returncode == 0, listing.stderr
    assert run_id in listing.stdout and "failed" in listing.stdout
    shown = await asyncio.to_thread(run_cli, "runs", "show", run_id, "--json")
    assert json.loads(shown.stdout)["steps"][1]["id"] == "charge"
    retried = await asyncio.to_thread(run_cli, "runs", "retry", run_id)
    assert retried.returncode == 0, retried.stderr
    for _ in range(100):
        if (await gw.store.get_run(run_id)).status == "completed":
            break
        await asyncio.sleep(0.02)
    cancel = await asyncio.to_thread(run_cli, "runs", "cancel", run_id)
    assert cancel.returncode == 1 and len(cancel.stderr.strip().splitlines()) == 1
    sent = await asyncio.to_thread(
        run_cli, "events", "send", "order.paid", "--data", '{"order_id": 1}', "--json"
    )
    assert sent.returncode == 0 and json.loads(sent.stdout)["woke"] == 0


async def test_logs_are_json_lines_with_stable_names_and_the_trace_id(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=1)
    base = await upstream(flaky.app())
    gw = GatewayProcess(tmp_path, [durable(base)], log_level="debug")
    await gw.start()
    trace = "4bf92f3577b34da6a3ce929d0e0e4736"
    try:
        async with (
            aiohttp.ClientSession() as client,
            client.post(
                gw.url + "/work", headers={"traceparent": f"00-{trace}-00f067aa0ba902b7-01"}
            ) as resp,
        ):
            assert resp.status == 200
            run_id = resp.headers["Stepgate-Run-Id"]
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.log.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("run_id") == run_id]
    events = [line["event"] for line in mine]
    for name in (
        "run.started",
        "run.attempt",
        "step.recorded",
        "run.retry_scheduled",
        "run.completed",
    ):
        assert name in events, events
    for line in mine:
        assert line["route"] == "work"
        assert "timestamp" in line and "level" in line
    attempts = [line for line in mine if line["event"] == "run.attempt"]
    assert [line["attempt"] for line in attempts] == [1, 2]
    assert {line["trace_id"] for line in attempts} == {trace}
    assert {line.get("step") for line in mine if line["event"] == "step.recorded"} == {
        "reserve",
        "charge",
    }
    assert flaky.headers[0]["traceparent"].split("-")[1] == trace


async def test_the_success_path_logs_one_line_a_run_at_info(
    tmp_path: Path, upstream: UpstreamFactory
) -> None:
    flaky = Flaky(fail_times=0)
    gw = GatewayProcess(tmp_path, [durable(await upstream(flaky.app()))])
    await gw.start()
    try:
        async with aiohttp.ClientSession() as client, client.post(gw.url + "/work") as resp:
            assert resp.status == 200
            run_id = resp.headers["Stepgate-Run-Id"]
    finally:
        gw.stop()
    lines = [json.loads(line) for line in gw.log.read_text().splitlines() if line.startswith("{")]
    mine = [line for line in lines if line.get("run_id") == run_id]
    assert [line["event"] for line in mine] == ["run.completed"]
    assert mine[0]["status"] == 200 and mine[0]["attempt"] == 1 and "duration_ms" in mine[0]
