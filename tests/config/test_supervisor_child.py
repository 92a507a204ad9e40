"""gateway.supervisor.ChildProcess with real child processes."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from gateway.supervisor import (
    ChildExitedError,
    ChildNotReadyError,
    ChildProcess,
    ChildStartError,
    upstream_addresses,
)

Start = Callable[..., Awaitable[ChildProcess]]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def listener(port: int, *, delay: float = 0.0, setup: str = "") -> list[str]:
    """A child that (after `setup` and `delay`) listens on 127.0.0.1:port until killed."""
    return python(
        "import signal, socket, time\n"
        f"{setup}\n"
        f"time.sleep({delay})\n"
        "s = socket.socket()\n"
        f"s.bind(('127.0.0.1', {port}))\n"
        "s.listen()\n"
        "while True: time.sleep(1)\n"
    )


@pytest.fixture
async def start() -> AsyncIterator[Start]:
    """Start children; any still running at the end are killed so none outlive the test."""
    children: list[ChildProcess] = []

    async def run(argv: list[str]) -> ChildProcess:
        child = await ChildProcess.start(argv)
        children.append(child)
        return child

    yield run
    for child in children:
        await child.terminate(grace=0.0)


async def test_wait_ready_returns_once_the_port_accepts(start: Start) -> None:
    port = free_port()
    child = await start(listener(port, delay=0.3))

    began = time.monotonic()
    await child.wait_ready([("127.0.0.1", port)], timeout=20)

    assert time.monotonic() - began >= 0.25
    assert child.returncode is None
    assert await child.terminate(grace=5) == -signal.SIGTERM
    assert child.returncode == -signal.SIGTERM


async def test_wildcard_addresses_are_probed_on_loopback(start: Start) -> None:
    port = free_port()
    child = await start(listener(port))
    await child.wait_ready([("0.0.0.0", port)], timeout=20)


async def test_every_address_must_accept(start: Start) -> None:
    port, never = free_port(), free_port()
    child = await start(listener(port))

    with pytest.raises(ChildNotReadyError) as caught:
        await child.wait_ready([("127.0.0.1", port), ("127.0.0.1", never)], timeout=0.5)

    assert caught.value.pending == [("127.0.0.1", never)]
    assert f"127.0.0.1:{never} within 0.5s" in str(caught.value)
    assert child.returncode is None  # the caller decides what happens to the child


async def test_early_exit_is_reported_at_once(start: Start) -> None:
    child = await start(python("import sys; sys.exit(3)"))

    began = time.monotonic()
    with pytest.raises(ChildExitedError) as caught:
        await child.wait_ready([("127.0.0.1", free_port())], timeout=30)

    assert time.monotonic() - began < 10
    assert caught.value.returncode == 3
    assert "exited with code 3 before it was ready" in str(caught.value)
    assert await child.wait() == 3


async def test_sigkill_after_the_grace_period(start: Start) -> None:
    port = free_port()
    stubborn = "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    child = await start(listener(port, setup=stubborn))
    await child.wait_ready([("127.0.0.1", port)], timeout=20)

    began = time.monotonic()
    code = await child.terminate(grace=0.5)

    assert code == -signal.SIGKILL
    assert time.monotonic() - began >= 0.45


async def test_send_signal_reaches_the_child(start: Start) -> None:
    port = free_port()
    on_usr1 = "signal.signal(signal.SIGUSR1, lambda *_: exit(7))"
    child = await start(listener(port, setup=on_usr1))
    await child.wait_ready([("127.0.0.1", port)], timeout=20)

    child.send_signal(signal.SIGUSR1)

    assert await asyncio.wait_for(child.wait(), 20) == 7
    child.send_signal(signal.SIGUSR1)  # after exit: a no-op, not an error
    assert await child.terminate(grace=1) == 7


async def test_terminate_reaches_grandchildren(start: Start, tmp_path: Path) -> None:
    """A shell wrapper must not leave its own child running (and holding the port)."""
    pid_file = tmp_path / "pid"
    child = await start(["sh", "-c", f"sleep 60 & echo $! > {pid_file}; wait"])
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text().strip():
            break
        await asyncio.sleep(0.02)
    grandchild = int(pid_file.read_text())

    await child.terminate(grace=5)

    for _ in range(200):
        if not alive(grandchild):
            break
        await asyncio.sleep(0.02)
    assert not alive(grandchild)


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"  # a zombie has exited; only its parent's reaping is pending


async def test_missing_command() -> None:
    with pytest.raises(ChildStartError, match="cannot start 'no-such-command-xyz'"):
        await ChildProcess.start(["no-such-command-xyz"])


async def test_empty_command() -> None:
    with pytest.raises(ValueError, match="no command"):
        await ChildProcess.start([])


def test_upstream_addresses() -> None:
    assert upstream_addresses(
        [
            "http://127.0.0.1:3000",
            "http://127.0.0.1:3000",
            "https://api.internal",
            "http://[::1]:8000",
            "http://svc",
        ]
    ) == [("127.0.0.1", 3000), ("api.internal", 443), ("::1", 8000), ("svc", 80)]
