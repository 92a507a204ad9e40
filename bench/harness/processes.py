"""Child processes of the benchmark: start, watch, measure and always stop them.

Every child runs in its own session (process group) so that nginx workers or a
server's helpers go with it, and so that a Ctrl-C in the terminal reaches only the
harness, which then stops the children in order instead of leaving them half-dead.
On Linux each child also gets PR_SET_PDEATHSIG, so even a harness killed with
SIGKILL does not leave servers listening behind it.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec; best effort only.
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


@dataclass(slots=True)
class Child:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path | None
    started_at: float  # time.monotonic() just before spawning
    started_wall: float  # time.time() at the same moment, to compare with other processes

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 20) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        data = self.log_path.read_bytes()[-8192:].decode("utf-8", "replace")
        return "\n".join(data.splitlines()[-lines:])


@dataclass(slots=True)
class Processes:
    """Owns every child of the harness; `stop_all` is idempotent."""

    children: list[Child] = field(default_factory=list)
    hurry: bool = False  # set on Ctrl-C: shorten every grace period
    _logs: list[IO[bytes]] = field(default_factory=list)

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | None,
        cwd: Path | None = None,
        env: Mapping[str, str] | None = None,
        capture: bool = False,
    ) -> Child:
        """Spawn `argv`; output goes to `log_path`, or to a pipe when `capture`."""
        out: IO[bytes] | int = subprocess.DEVNULL
        if capture:
            out = subprocess.PIPE
        elif log_path is not None:
            log_path.parent.mkdir(parents=True, exist_ok=True)
            handle = log_path.open("ab")
            self._logs.append(handle)
            out = handle
        started, started_wall = time.monotonic(), time.time()
        popen = subprocess.Popen(
            list(argv),
            cwd=cwd,
            env=dict(env) if env is not None else None,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )
        child = Child(
            name=name,
            popen=popen,
            log_path=log_path,
            started_at=started,
            started_wall=started_wall,
        )
        self.children.append(child)
        return child

    def stop(self, child: Child, *, sig: int = signal.SIGTERM, grace: float = 10.0) -> None:
        """Signal the child's whole process group, then SIGKILL it after `grace`."""
        # The signal goes to the whole group (nginx workers, hypercorn's reloader) while the
        # leader is still unreaped, so its id cannot have been reused by anyone else.
        if self.hurry:
            grace = min(grace, 2.0)
        if child.alive():
            _signal_group(child.pid, sig)
            try:
                child.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                _signal_group(child.pid, signal.SIGKILL)
                child.popen.wait(timeout=5)
        if child in self.children:
            self.children.remove(child)

    def kill(self, child: Child) -> None:
        """SIGKILL, as in a crash: nothing gets to clean up."""
        self.stop(child, sig=signal.SIGKILL, grace=5.0)

    def stop_all(self) -> None:
        # Newest first: load generators before gateways before upstreams.
        for child in reversed(list(self.children)):
            with contextlib.suppress(Exception):
                self.stop(child, grace=5.0)
        for handle in self._logs:
            with contextlib.suppress(OSError):
                handle.close()
        self._logs.clear()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A loopback port that was free a moment ago (the race is acceptable here)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_until(
    check: Callable[[], bool], *, timeout: float, interval: float = 0.05, child: Child | None = None
) -> bool:
    """Poll `check` until it is true; give up early if `child` has exited."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        if child is not None and not child.alive():
            return False
        time.sleep(interval)
    return check()


def http_status(url: str, *, timeout: float = 2.0) -> int | None:
    """Status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status: int = resp.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (urllib.error.URLError, OSError):
        return None


def _descendants(root: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces and parentheses; ppid follows the last ')'.
        fields = stat.rsplit(")", 1)[1].split()
        parents.setdefault(int(fields[1]), []).append(int(entry))
    found: list[int] = []
    stack = [root]
    while stack:
        pid = stack.pop()
        found.append(pid)
        stack.extend(parents.get(pid, []))
    return found


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def rss_bytes(pid: int, *, tree: bool = True) -> int:
    """Resident set size from /proc, summed over the process and its descendants."""
    pids = _descendants(pid) if tree else [pid]
    return sum(_status_kib(p, "VmRSS") for p in pids) * 1024


def peak_rss_bytes(pid: int) -> int:
    """VmHWM of the process itself: its high-water mark since start."""
    return _status_kib(pid, "VmHWM") * 1024


def raise_fd_limit() -> None:
    """Children inherit it; 10,000 held requests need more than the usual 1,024."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


@dataclass(frozen=True, slots=True)
class CpuSnapshot:
    at: float  # time.monotonic()
    busy: int  # clock ticks the whole machine spent busy (steal included)
    ours: int  # clock ticks spent by the harness and every process it started


def cpu_snapshot(also_ours: Sequence[int] = ()) -> CpuSnapshot:
    """Where the CPU went so far: everybody, and the harness's own process tree plus
    `also_ours` (servers the harness uses but did not start: the PostgreSQL store's)."""
    busy = 0
    with contextlib.suppress(OSError):
        first = Path("/proc/stat").read_text().splitlines()[0].split()
        user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in first[1:9])
        busy = user + nice + system + irq + softirq + steal
    ours = 0
    for pid in {*_descendants(os.getpid()), *also_ours}:
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            # utime, stime, cutime, cstime: children reaped by a member count as ours.
            ours += sum(int(v) for v in fields[11:15])
    return CpuSnapshot(at=time.monotonic(), busy=busy, ours=ours)


def foreign_cpu(before: CpuSnapshot, after: CpuSnapshot) -> float:
    """Share of the machine's CPU used by anything but the benchmark between two snapshots.

    Other work on the machine (or a hypervisor stealing time) skews every figure;
    the harness reports it so that a noisy run is recognisable as one.
    """
    elapsed = after.at - before.at
    capacity = elapsed * _CLOCK_TICKS * (os.cpu_count() or 1)
    if capacity <= 0:
        return 0.0
    other = (after.busy - before.busy) - (after.ours - before.ours)
    return max(0.0, min(1.0, other / capacity))
