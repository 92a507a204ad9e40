"""A store that refuses writes for a while (locked by another process, a full volume, a
read-only file system): every write that could not be made is answered 503 with Retry-After,
every run that was accepted still finishes once the store takes writes again, and no restart
is needed. /readyz says not ready meanwhile. A gateway started on a read-only volume says so
and stops. (A live remount read-only is refused by Linux while the file is open for writing,
so a file system that turns read-only under a running gateway is not reproduced here; a full
one and a lock show the same path: every write refused for a while.)

The volume tests mount a small tmpfs, so they need root; without it they skip."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from tests.conftest import GatewayFactory, Running, UpstreamFactory
from tests.gateway.procs import GatewayProcess
from tests.gateway.rawsteps import RawSteps

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="mounting a small tmpfs needs root (CI runs as root)"
)


class Gate:
    """An upstream whose handler records a step, then waits until the test lets it answer."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.step_answers: list[int] = []
        self.calls = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        steps = RawSteps(request)
        recorded = await steps.steps()
        if "before" not in recorded:
            status, _ = await steps.put("before", {"output": "ok"})
            self.step_answers.append(status)
        self.started.set()
        await self.release.wait()
        return web.Response(text=f"done after {self.calls}")

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/work", self.handle)
        return app


def route(base: str) -> dict[str, Any]:
    return {
        "name": "work",
        "path": "/work",
        "upstream": base,
        "durable": True,
        "timeout": "20s",
        "hold": "1s",
    }


async def ready(gw: Running) -> int:
    async with gw.session.get(gw.internal + "/readyz") as resp:
        return resp.status


async def post(gw: Running, path: str = "/work") -> tuple[int, dict[str, str], bytes]:
    async with gw.session.post(gw.url + path, allow_redirects=False) as resp:
        return resp.status, dict(resp.headers), await resp.read()


async def finishes(gw: Running, location: str) -> tuple[int, bytes]:
    async with gw.session.get(gw.url + location + "&wait=30") as resp:
        return resp.status, await resp.read()


async def the_store_refuses_then_recovers(gw: Running, gate: Gate, refuse: Any, allow: Any) -> None:
    """A run in flight when the store starts refusing, and new work meanwhile."""
    first = asyncio.ensure_future(post(gw))
    await asyncio.wait_for(gate.started.wait(), 10)
    await refuse()
    gate.release.set()  # the attempt ends while its record cannot be written
    status, headers, _ = await asyncio.wait_for(first, 30)
    assert status == 303, "the client is not kept: it gets the poll URL of its run"
    location = headers["Location"]
    status, headers, body = await post(gw)  # a new request while the store refuses
    assert status == 503 and headers["Retry-After"] == "1", body
    assert headers["Content-Type"] == "application/problem+json"
    assert await ready(gw) == 503
    async with gw.session.post(gw.internal + "/v1/events", json={"name": "e"}) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"
    await allow()
    assert await asyncio.wait_for(finishes(gw, location), 30) == (200, b"done after 1")
    assert await ready(gw) == 200
    status, _, body = await post(gw)  # and the gateway takes new runs again, no restart
    assert (status, body) == (200, b"done after 2")


async def test_a_store_locked_by_another_process(
    gateway: GatewayFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    gate = Gate()
    db = tmp_path / "stepgate.db"
    gw = await gateway([route(await upstream(gate.app()))], db=db)
    locked = threading.Event()
    unlock = threading.Event()

    def hold_lock() -> None:  # another process's long write transaction, e.g. a backup tool
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        unlock.wait(120)  # allow() lets go sooner
        conn.execute("ROLLBACK")
        conn.close()

    holder = threading.Thread(target=hold_lock)

    async def refuse() -> None:
        holder.start()
        await asyncio.get_running_loop().run_in_executor(None, locked.wait, 10)

    async def allow() -> None:
        unlock.set()
        await asyncio.get_running_loop().run_in_executor(None, holder.join, 10)

    await the_store_refuses_then_recovers(gw, gate, refuse, allow)
    assert gate.step_answers == [201, 201]


async def test_a_write_waiting_for_another_process_s_lock_leaves_the_loop_free(
    gateway: GatewayFactory, upstream: UpstreamFactory, tmp_path: Path
) -> None:
    # A batch's statements run on the event loop's thread, but never wait there for a lock:
    # the writer thread does the waiting, and the write lands once the lock is let go.
    async def done(request: web.Request) -> web.Response:
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/work", done)
    db = tmp_path / "stepgate.db"
    gw = await gateway([route(await upstream(app))], db=db)
    other = sqlite3.connect(db, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    loop = asyncio.get_running_loop()
    try:
        request = asyncio.ensure_future(post(gw))
        late = 0.0
        for _ in range(15):  # 0.75 s of the writer waiting for the lock
            before = loop.time()
            await asyncio.sleep(0.05)
            late = max(late, loop.time() - before - 0.05)
        assert not request.done()
        assert late < 0.25, f"the event loop stalled {late:.3f} s behind a locked store"
    finally:
        other.execute("ROLLBACK")
        other.close()
    status, _, body = await asyncio.wait_for(request, 10)
    assert (status, body) == (200, b"done")


@pytest.fixture
def small_volume(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "volume"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@needs_root
async def test_a_full_volume(
    gateway: GatewayFactory, upstream: UpstreamFactory, small_volume: Path
) -> None:
    gate = Gate()
    gw = await gateway([route(await upstream(gate.app()))], db=small_volume / "stepgate.db")
    filler = small_volume / "filler"

    async def refuse() -> None:
        fill(filler)

    async def allow() -> None:
        filler.unlink()

    await the_store_refuses_then_recovers(gw, gate, refuse, allow)


def fill(path: Path) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    try:  # fill the volume to the last byte
        for size in (65536, 4096, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


@needs_root
async def test_a_gateway_stopped_on_a_full_volume_starts_again(
    gateway: GatewayFactory, upstream: UpstreamFactory, small_volume: Path
) -> None:
    gate = Gate()
    gate.release.set()
    db = small_volume / "stepgate.db"
    first = await gateway([route(await upstream(gate.app()))], db=db)
    assert (await post(first))[0] == 200
    await first.gateway.stop()
    fill(small_volume / "filler")
    gw = await gateway([route(await upstream(gate.app()))], db=db)  # used to fail to open
    assert await ready(gw) == 200  # the reserve it kept gave SQLite the room it needs
    (small_volume / "filler").unlink()
    status, _, body = await post(gw)
    assert (status, body) == (200, b"done after 2")


@needs_root
async def test_a_gateway_started_on_a_read_only_volume_says_so_and_stops(
    upstream: UpstreamFactory, small_volume: Path, tmp_path: Path
) -> None:
    gate = Gate()
    gw = GatewayProcess(tmp_path, [route(await upstream(gate.app()))])
    config = gw.config.read_text().replace(
        str(tmp_path / "stepgate.db"), str(small_volume / "stepgate.db")
    )
    gw.config.write_text(config)
    await gw.start()  # creates the store
    assert gw.stop() == 0
    await asyncio.to_thread(
        subprocess.run, ["mount", "-o", "remount,ro", str(small_volume)], check=True
    )
    done = await asyncio.get_running_loop().run_in_executor(
        None,
        lambda: subprocess.run(
            [sys.executable, "-m", "gateway", "serve", "--config", str(gw.config)],
            capture_output=True,
            timeout=30,
        ),
    )
    assert done.returncode == 1
    assert str(small_volume / "stepgate.db").encode() in done.stderr
    assert b"Traceback" not in done.stderr
