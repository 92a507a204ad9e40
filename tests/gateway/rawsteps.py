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
                async with (
                    aiohttp.ClientSession() as s,
                    s.get(f"{self.callback}/steps", headers=self._auth()) as resp,
                ):
                    assert resp.status == 200, await resp.text()
                    self._cache = {st["id"]: st for st in (await resp.json())["steps"]}
        return self._cache

    async def put(self, step_id: str, body: dict[str, Any]) -> tuple[int, Any]:
        body = {**body, "seq": self._seq}
        self._seq += 1
        async with (
            aiohttp.ClientSession() as s,
            s.put(
                f"{self.callback}/steps/{quote(step_id, safe='')}", json=body, headers=self._auth()
            ) as resp,
        ):
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


class Suspend(Exception):
    """The handler must answer 202 with Stepgate-Suspend: true."""


SUSPEND_RESPONSE_HEADERS = {"Stepgate-Suspend": "true"}


def suspended() -> web.Response:
    return web.Response(status=202, headers=SUSPEND_RESPONSE_HEADERS)


async def _parked_step(steps: RawSteps, name: str, body: dict[str, Any]) -> Any:
    recorded = (await steps.steps()).get(name)
    if recorded is not None:
        steps._seq += 1
        if recorded["status"] == "completed":
            return recorded.get("output")
        raise Suspend(name)
    status, answer = await steps.put(name, body)
    assert status == 200, answer
    if answer["status"] == "completed":
        return answer.get("output")
    raise Suspend(name)


async def raw_sleep(steps: RawSteps, name: str, seconds: float) -> None:
    from datetime import UTC, datetime, timedelta

    until = (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat()
    await _parked_step(steps, name, {"sleep": {"until": until}})


async def raw_wait(
    steps: RawSteps, name: str, event: str, match: dict[str, Any], timeout: str
) -> Any:
    return await _parked_step(
        steps, name, {"wait": {"event": event, "match": match, "timeout": timeout}}
    )
