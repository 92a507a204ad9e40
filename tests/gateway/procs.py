"""Run the real gateway as a separate process (`python -m gateway serve`), for crash tests."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import yaml


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class GatewayProcess:
    def __init__(self, tmp: Path, routes: list[dict[str, Any]], **extra: Any) -> None:
        self.public = free_port()
        self.internal_port = free_port()
        config = {
            "listen": f"127.0.0.1:{self.public}",
            "internal_listen": f"127.0.0.1:{self.internal_port}",
            "store": f"sqlite:///{tmp / 'stepgate.db'}",
            "routes": routes,
            **extra,
        }
        self.config = tmp / "stepgate.yaml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = tmp / "gateway.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.public}"

    @property
    def internal(self) -> str:
        return f"http://127.0.0.1:{self.internal_port}"

    async def start(self) -> None:
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 15
        async with aiohttp.ClientSession() as session:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.log.read_text()
                try:
                    async with session.get(self.internal + "/readyz") as resp:
                        if resp.status == 200:
                            # The public listener opens last.
                            with socket.create_connection(("127.0.0.1", self.public), 1):
                                return
                except (aiohttp.ClientError, OSError):
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("gateway did not start:\n" + self.log.read_text())

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def stop(self) -> int:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.terminate()
        try:
            return self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
