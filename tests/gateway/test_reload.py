"""SIGHUP reloads the config (issue 14): routes, retry policies and the log level change without
dropping a connection or a run; a config that does not load is refused in the log and the
running one stays; what needs a restart (listeners, the store) is kept, and logged."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import UpstreamFactory
from tests.gateway.procs import GatewayProcess


class Service:
    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.arrived = asyncio.Event()

    def app(self) -> web.Application:
        async def slow(request: web.Request) -> web.Response:
            self.arrived.set()
            await self.release.wait()
            return web.Response(text="slow done")

        async def any_path(request: web.Request) -> web.Response:
            return web.Response(text=f"served {request.path}")

        app = web.Application()
        app.router.add_get("/a/slow", slow)
        app.router.add_route("*", "/{tail:.*}", any_path)
        return app


@pytest.fixture
async def served(
    tmp_path: Path, upstream: UpstreamFactory
) -> AsyncIterator[tuple[GatewayProcess, Service, str]]:
    service = Service()
    base = await upstream(service.app())
    process = GatewayProcess(
        tmp_path, [{"name": "a", "path": "/a/*", "upstream": base}], log_level="info"
    )
    await process.start()
    try:
        yield process, service, base
    finally:
        service.release.set()
        process.stop()


def rewrite(process: GatewayProcess, change: Callable[[dict[str, Any]], None]) -> None:
    config = yaml.safe_load(process.config.read_text())
    change(config)
    process.config.write_text(yaml.safe_dump(config))


def events(process: GatewayProcess) -> list[dict[str, Any]]:
    return [json.loads(line) for line in process.log.read_text().splitlines()]


async def until_logged(process: GatewayProcess, event: str, count: int = 1) -> dict[str, Any]:
    async with asyncio.timeout(10):
        while True:
            found = [line for line in events(process) if line["event"] == event]
            if len(found) >= count:
                return found[count - 1]
            await asyncio.sleep(0.05)


async def status(session: aiohttp.ClientSession, url: str) -> int:
    async with session.get(url) as resp:
        await resp.read()
        return resp.status


async def test_sighup_swaps_the_routes_without_dropping_a_request_in_flight(
    served: tuple[GatewayProcess, Service, str],
) -> None:
    process, service, base = served
    async with aiohttp.ClientSession() as session:
        assert await status(session, process.url + "/a/x") == 200
        assert await status(session, process.url + "/b/x") == 404
        in_flight = asyncio.create_task(session.get(process.url + "/a/slow"))
        await asyncio.wait_for(service.arrived.wait(), 10)

        rewrite(
            process,
            lambda c: c["routes"].append(
                {"name": "b", "path": "/b/*", "upstream": base, "durable": True}
            ),
        )
        assert process.proc is not None
        process.proc.send_signal(signal.SIGHUP)
        reloaded = await until_logged(process, "config.reloaded")
        assert reloaded["routes"] == 2 and reloaded["changed"] == ["routes"]

        async with session.post(process.url + "/b/x") as resp:
            assert resp.status == 200 and await resp.text() == "served /b/x"
            assert "Stepgate-Run-Id" in resp.headers  # the new route is durable
        service.release.set()
        resp = await asyncio.wait_for(in_flight, 10)
        assert resp.status == 200 and await resp.text() == "slow done"
        resp.release()
    assert process.proc.poll() is None  # the same process, never restarted


async def test_a_bad_config_is_refused_and_the_running_one_stays(
    served: tuple[GatewayProcess, Service, str],
) -> None:
    process, _, _ = served
    good = process.config.read_text()
    process.config.write_text(good.replace("routes:", "routes:\n- {name: x, timeout: 30}\n"))
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    refused = await until_logged(process, "config.reload_refused")
    assert refused["level"] == "error"
    assert "routes[0]" in refused["error"] and "\n" not in refused["error"]
    async with aiohttp.ClientSession() as session:
        assert await status(session, process.url + "/a/x") == 200


async def test_listeners_are_kept_and_the_log_level_changes(
    served: tuple[GatewayProcess, Service, str],
) -> None:
    process, _, base = served

    def change(config: dict[str, Any]) -> None:
        config["listen"] = "127.0.0.1:1"  # needs a restart: kept, and logged
        config["log_level"] = "debug"
        config["routes"] = [{"name": "a", "path": "/a/*", "upstream": base, "durable": True}]

    rewrite(process, change)
    assert process.proc is not None
    process.proc.send_signal(signal.SIGHUP)
    kept = await until_logged(process, "config.reload_kept")
    assert kept["keys"] == ["listen"]
    async with aiohttp.ClientSession() as session:
        async with session.get(process.url + "/a/x") as resp:  # still on the old port
            assert resp.status == 200
            run_id = resp.headers["Stepgate-Run-Id"]
    started = await until_logged(process, "run.started")  # a debug line: the level took
    assert started["run_id"] == run_id


def reload_cli(process: GatewayProcess, *where: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", "reload", *(where or ("--config", str(process.config)))],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


async def test_stepgate_reload_does_what_a_sighup_does_and_says_what_changed(
    served: tuple[GatewayProcess, Service, str],
) -> None:
    process, _, base = served
    rewrite(process, lambda c: c["routes"].append({"name": "b", "path": "/b/*", "upstream": base}))
    done = await asyncio.to_thread(reload_cli, process)
    assert (done.returncode, done.stderr) == (0, "")
    assert done.stdout.strip() == "reloaded: routes changed"
    async with aiohttp.ClientSession() as session:
        assert await status(session, process.url + "/b/x") == 200
    # A config that does not load: refused, exit 1 with the reason, the running one stays.
    # (--url: with --config the command itself would refuse to read it, exit 2.)
    process.config.write_text(process.config.read_text().replace("routes:", "routes: 7\nx:"))
    done = await asyncio.to_thread(reload_cli, process, "--url", process.internal)
    assert done.returncode == 1 and "was not reloaded" in done.stderr
    assert done.stderr.count("\n") == 1
    async with aiohttp.ClientSession() as session:
        assert await status(session, process.url + "/b/x") == 200
