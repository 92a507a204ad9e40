"""The client's poll URL: GET /_stepgate/runs/{id}?token=…[&wait=S] on the public listener."""

from __future__ import annotations

import math
import time

from aiohttp import web

from gateway.auth import same_secret
from gateway.engine import ENGINE
from gateway.engine.answers import final_response, pending_body, retry_after_seconds
from gateway.errors import StoreError
from gateway.problem import problem

DEFAULT_WAIT = 20.0
MAX_WAIT = 60.0
NO_STORE = {"Cache-Control": "no-store"}


def _wait(request: web.Request) -> float | web.Response:
    raw = request.query.get("wait")
    if raw is None:
        return DEFAULT_WAIT
    try:
        wait = float(raw)
    except ValueError:
        wait = math.nan
    if not math.isfinite(wait) or wait < 0:
        return problem(400, detail="wait must be a number of seconds (0 to 60)", headers=NO_STORE)
    return min(wait, MAX_WAIT)


async def poll(request: web.Request) -> web.StreamResponse:
    engine = request.app[ENGINE]
    wait = _wait(request)
    if isinstance(wait, web.Response):
        return wait
    try:
        run = await engine.lookup(request.match_info["run_id"])
        token = request.query.get("token", "")
        # An unknown run and a wrong token look the same, so ids can't be probed.
        if run is None or not same_secret(token, run.poll_token):
            return problem(404, detail="no such run, or a wrong token", headers=NO_STORE)
        if not run.ended:
            run = await engine.wait_end(run, wait)
    except StoreError:
        return problem(
            503,
            detail="the run store is not available; poll again",
            headers={"Retry-After": "1", **NO_STORE},
        )
    if run.ended:
        response = final_response(run)
        response.headers.update(NO_STORE)
        return response
    return web.json_response(
        pending_body(run, with_attempt=True),
        status=202,
        headers={
            "Retry-After": str(retry_after_seconds(run, time.time())),
            "Stepgate-Run-Id": run.id,
            **NO_STORE,
        },
    )
