"""What the figures were measured on: hardware, OS, tool versions, disk fsync cost."""

from __future__ import annotations

import contextlib
import importlib.metadata
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

from .peers import REPO_DIR, nginx_binary, restate_binary


def _first_line(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "unavailable"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unavailable"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_total_bytes() -> int:
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _os_name() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    return platform.system()


def _filesystem(path: Path) -> str:
    """The mount that holds `path` (tmpfs would make fsync free and the figures moot)."""
    best, fstype = "", "unknown"
    with contextlib.suppress(OSError):
        resolved = str(path.resolve())
        for line in Path("/proc/mounts").read_text().splitlines():
            _, mount, kind, *_ = line.split()
            if resolved.startswith(mount) and len(mount) > len(best):
                best, fstype = mount, kind
    return f"{fstype} on {best}" if best else fstype


def fsync_probe(directory: Path, rounds: int = 200) -> dict[str, float]:
    """p50/p99 of write+fsync of 4 KiB: the floor under every durable checkpoint."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "fsync-probe.tmp"
    samples: list[float] = []
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\0" * 4096
        for _ in range(rounds):
            os.write(fd, block)
            started = time.perf_counter()
            os.fsync(fd)
            samples.append((time.perf_counter() - started) * 1000)
    finally:
        os.close(fd)
        path.unlink(missing_ok=True)
    samples.sort()
    return {
        "p50_ms": round(samples[len(samples) // 2], 4),
        "p99_ms": round(samples[int(len(samples) * 0.99) - 1], 4),
    }


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def describe(work_dir: Path) -> dict[str, Any]:
    nginx = nginx_binary()
    restate = restate_binary()
    return {
        "hostname": platform.node(),
        "cpu": _cpu_model(),
        "cpus": os.cpu_count(),
        "memory_bytes": _mem_total_bytes(),
        "os": _os_name(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()),
        "work_dir_fs": _filesystem(work_dir),
        "fsync_4k": fsync_probe(work_dir),
        "git_commit": _first_line(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"]),
        "versions": {
            "wrk": _first_line(["wrk", "--version"]),
            "nginx": _first_line([nginx, "-v"]) if nginx else "not installed",
            "restate-server": _first_line([restate, "--version"]) if restate else "not installed",
            "restate-sdk": _version("restate-sdk"),
            "hypercorn": _version("hypercorn"),
            "aiohttp": _version("aiohttp"),
            "uvloop": _version("uvloop"),
        },
    }


def one_line(info: dict[str, Any]) -> str:
    mem_gib = int(info["memory_bytes"]) / 2**30
    return (
        f"{info['cpus']} x {info['cpu']}, {mem_gib:.0f} GiB RAM, {info['os']} "
        f"(kernel {info['kernel']}), Python {info['python']}, store on "
        f"{info['work_dir_fs']} (fsync 4 KiB p50 {info['fsync_4k']['p50_ms']:.3f} ms)"
    )
