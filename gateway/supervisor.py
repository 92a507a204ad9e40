"""Run the upstream service as a child of the gateway: ``stepgate serve --config F -- CMD ARGS``.

The child inherits stdout/stderr (its logs interleave with the gateway's) and runs in its own
session and process group, so a Ctrl-C in a terminal reaches only the gateway, which then shuts
the child down in order: stop taking requests, drain, SIGTERM the child, SIGKILL it after the
grace period. Signals go to the whole group so a shell wrapper (``sh -c "npm start"``) cannot leave
a grandchild holding the port.

Use in ``gateway.app.serve``::

    child_proc = await ChildProcess.start(child)            # child: Sequence[str]
    try:
        await child_proc.wait_ready(upstream_addresses(r.upstream for r in settings.routes),
                                    timeout=30.0)
        ...  # serve; also watch `child_proc.wait()` - the gateway exits when the child does
        exit_code = ...
    finally:
        await child_proc.terminate(settings.shutdown_grace)

Errors::

    SupervisorError        root
    ├── ChildStartError    the command could not be started (not found, not executable)
    ├── ChildExitedError   the child exited before it was ready (field: returncode)
    └── ChildNotReadyError the child did not accept connections in time (field: pending)
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import urllib.parse
from collections.abc import Iterable, Mapping, Sequence

__all__ = [
    "ChildExitedError",
    "ChildNotReadyError",
    "ChildProcess",
    "ChildStartError",
    "SupervisorError",
    "upstream_addresses",
]

# Where to knock when the child listens on a wildcard address.
_WILDCARDS = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}


class SupervisorError(Exception):
    """Root of the supervisor's errors."""


class ChildStartError(SupervisorError):
    def __init__(self, argv: Sequence[str], reason: str) -> None:
        super().__init__(f"cannot start {argv[0]!r}: {reason}")
        self.argv = list(argv)
        self.reason = reason


class ChildExitedError(SupervisorError):
    def __init__(self, argv: Sequence[str], returncode: int) -> None:
        super().__init__(f"{argv[0]!r} exited with code {returncode} before it was ready")
        self.argv = list(argv)
        self.returncode = returncode


class ChildNotReadyError(SupervisorError):
    def __init__(self, argv: Sequence[str], pending: list[tuple[str, int]], timeout: float) -> None:
        where = ", ".join(_format_address(address) for address in pending)
        super().__init__(f"{argv[0]!r} did not accept connections on {where} within {timeout:g}s")
        self.argv = list(argv)
        self.pending = pending


def _format_address(address: tuple[str, int]) -> str:
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def upstream_addresses(urls: Iterable[str]) -> list[tuple[str, int]]:
    """The distinct (host, port) pairs behind upstream URLs, in first-seen order."""
    seen: dict[tuple[str, int], None] = {}
    for url in urls:
        parts = urllib.parse.urlsplit(url)
        if parts.hostname is None:
            raise ValueError(f"upstream URL {url!r} has no host")
        port = parts.port or (443 if parts.scheme.lower() == "https" else 80)
        seen.setdefault((parts.hostname, port), None)
    return list(seen)


class ChildProcess:
    """A started child command. Create it with :meth:`start`."""

    def __init__(self, argv: Sequence[str], process: asyncio.subprocess.Process) -> None:
        self.argv = list(argv)
        self._process = process
        # One waiter for the child's whole life: wait(), wait_ready() and terminate() share it,
        # so the exit is observed as soon as it happens whoever is asking.
        self._exited: asyncio.Task[int] = asyncio.get_running_loop().create_task(
            process.wait(), name=f"stepgate-child-{process.pid}-wait"
        )

    @classmethod
    async def start(
        cls, argv: Sequence[str], *, env: Mapping[str, str] | None = None
    ) -> ChildProcess:
        """Start ``argv`` (no shell) with the gateway's stdin, stdout and stderr."""
        if not argv:
            raise ValueError("no command given")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                env=dict(env) if env is not None else None,
                # Own session, hence own process group: terminal signals reach the gateway
                # only, which stops the child in the right order (see the module docstring).
                # (Not process_group=0: uvloop's subprocess_exec does not accept it.)
                start_new_session=True,
            )
        except OSError as exc:
            raise ChildStartError(argv, exc.strerror or str(exc)) from exc
        return cls(argv, process)

    @property
    def pid(self) -> int:
        return self._process.pid

    @property
    def returncode(self) -> int | None:
        """The exit code once the child has exited (negative: killed by that signal)."""
        return self._exited.result() if self._exited.done() else None

    async def wait(self) -> int:
        """Wait for the child to exit; returns its exit code. Safe to call many times."""
        return await asyncio.shield(self._exited)

    async def wait_ready(
        self,
        addresses: Iterable[tuple[str, int]],
        timeout: float,
        *,
        interval: float = 0.05,
    ) -> None:
        """Return once every address accepts a TCP connection.

        Raises ChildExitedError as soon as the child exits, ChildNotReadyError after
        ``timeout`` seconds (the child keeps running: the caller decides what to do).
        """
        pending = [(_WILDCARDS.get(host, host), port) for host, port in addresses]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            if self._exited.done():
                raise ChildExitedError(self.argv, self._exited.result())
            still = [address for address in pending if not await self._accepts(address)]
            if not still:
                return
            pending = still
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise ChildNotReadyError(self.argv, pending, timeout)
            # Sleeps until the next probe, but wakes at once if the child exits meanwhile.
            await asyncio.wait([self._exited], timeout=min(interval, remaining))

    @staticmethod
    async def _accepts(address: tuple[str, int]) -> bool:
        try:
            _, writer = await asyncio.wait_for(asyncio.open_connection(*address), timeout=1.0)
        except (OSError, TimeoutError):
            return False
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    def send_signal(self, sig: signal.Signals | int) -> None:
        """Send ``sig`` to the child's process group; a no-op once the child has exited."""
        if self._exited.done():
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self._process.pid, sig)

    async def terminate(self, grace: float) -> int:
        """SIGTERM, then SIGKILL if the child is still running after ``grace`` seconds.

        Returns the exit code; safe to call when the child has already exited.
        """
        if not self._exited.done():
            self.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(asyncio.shield(self._exited), timeout=grace)
            except TimeoutError:
                self.send_signal(signal.SIGKILL)
        return await self.wait()
