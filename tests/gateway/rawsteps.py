"""A handler-side step helper that speaks the callback protocol directly over aiohttp, without
the SDK: the tests of the gateway use it so they test the protocol, not our own client."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import quote

import aiohttp
from aiohttp import web


class RawSteps:
    def __init__(self, request: web.Request) -> None:
        self.callback = request.headers.get("Stepgate-Callback")
        self.token = request.headers.get("Stepgate-Token")
        self.recorded = int(request.headers.get("Stepgate-Steps", "0"))
        self.attempt = int(request.headers.get("Stepgate-Attempt", "0"))
        self.run_id = request.headers.get("Stepgate-Run-Id")
        self._cache: dict[str, dict[str, Any]] | None = None
        self._seq = 0

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    async def steps(self) -> dict[str, dict[str, Any]]:
        if self._cache is None:
            self._cache = {}
            if self.recorded:
                async with aiohttp.ClientSession() as s, s.get(
                    f"{self.callback}/steps", headers=self._auth()
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    self._cache = {st["id"]: st for st in (await resp.json())["steps"]}
        return self._cache

    async def put(self, step_id: str, body: dict[str, Any]) -> tuple[int, Any]:
        body = {**body, "seq": self._seq}
        self._seq += 1
        async with aiohttp.ClientSession() as s, s.put(
            f"{self.callback}/steps/{quote(step_id, safe='')}", json=body, headers=self._auth()
        ) as resp:
            return resp.status, await resp.json(content_type=None)

    async def run(self, name: str, fn: Callable[[], Awaitable[Any]]) -> Any:
        recorded = (await self.steps()).get(name)
        if recorded is not None and recorded["status"] == "completed":
            self._seq += 1
            return recorded["output"]
        try:
            output = await fn()
        except Exception as exc:
            await self.put(name, {"error": {"message": str(exc), "type": type(exc).__name__}})
            raise
        status, answer = await self.put(name, {"output": output})
        assert status in (200, 201), answer
        return answer["output"]
