"""`stepgate serve --config FILE -- CMD ARGS…`: the gateway runs the app as its child."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import yaml

from tests.gateway.procs import free_port

APP = """
import sys
from aiohttp import web

async def hello(request):
    return web.Response(text="hello from the child")

async def bye(request):
    import os, threading
    threading.Timer(0.1, lambda: os._exit(7)).start()
    return web.Response(text="bye")

app = web.Application()
app.router.add_get("/hello", hello)
app.router.add_get("/bye", bye)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""


def start(tmp_path: Path) -> tuple[subprocess.Popen[bytes], int]:
    app_port, public, internal = free_port(), free_port(), free_port()
    (tmp_path / "app.py").write_text(APP)
    config = tmp_path / "stepgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{public}",
                "internal_listen": f"127.0.0.1:{internal}",
                "store": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "routes": [
                    {"name": "app", "path": "/*", "upstream": f"http://127.0.0.1:{app_port}"}
                ],
            }
        )
    )
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--",
            sys.executable,
            str(tmp_path / "app.py"),
            str(app_port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    return proc, public


async def get(url: str, deadline: float = 15) -> tuple[int, str]:
    end = time.monotonic() + deadline
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as resp:
                    return resp.status, await resp.text()
            except aiohttp.ClientError:
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.05)


async def test_serve_runs_the_app_and_stops_it_on_sigterm(tmp_path: Path) -> None:
    proc, public = start(tmp_path)
    try:
        assert await get(f"http://127.0.0.1:{public}/hello") == (200, "hello from the child")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()


async def test_a_reload_keeps_the_child_running(tmp_path: Path) -> None:
    """SIGHUP reloads the gateway's config; the child, which has no handler for it (like most
    programs), must not get it, or it would end and take the gateway down with it."""
    proc, public = start(tmp_path)
    try:
        assert await get(f"http://127.0.0.1:{public}/hello") == (200, "hello from the child")
        proc.send_signal(signal.SIGHUP)
        await asyncio.sleep(1.0)
        assert proc.poll() is None
        assert await get(f"http://127.0.0.1:{public}/hello") == (200, "hello from the child")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        proc.kill()
        proc.wait()


async def test_serve_exits_with_the_childs_exit_code(tmp_path: Path) -> None:
    proc, public = start(tmp_path)
    try:
        assert await get(f"http://127.0.0.1:{public}/bye") == (200, "bye")
        assert proc.wait(20) == 7
    finally:
        proc.kill()


def test_serve_reports_a_missing_command_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "stepgate.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "listen": f"127.0.0.1:{free_port()}",
                "internal_listen": f"127.0.0.1:{free_port()}",
                "store": f"sqlite:///{tmp_path / 'db.sqlite'}",
                "routes": [
                    {"name": "app", "path": "/*", "upstream": f"http://127.0.0.1:{free_port()}"}
                ],
            }
        )
    )
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "gateway",
            "serve",
            "--config",
            str(config),
            "--",
            str(tmp_path / "no-such-program"),
        ],
        capture_output=True,
        timeout=30,
    )
    assert done.returncode == 1
    assert b"Traceback" not in done.stderr
    assert b"no-such-program" in done.stderr
