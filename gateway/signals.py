"""A signal's URL: POST /_stepgate/signals/{id}?token=… on the public listener (step.signal).

Whoever holds the URL (a person following an approval link, a third party's webhook) completes
the waiting signal step with the JSON body they POST, once:

    202  delivered: the step is completed with the body and its run woken
    409  too late: delivered before, timed out, or the run has ended
    404  unknown id or wrong token, which look the same so that ids cannot be probed
    400  the body is not JSON (the same parser and bounds as the internal listener's)
    413  the body is larger than MAX_BODY
    405  any other method

The token is checked before the body is read, so a stranger's body is never parsed.
"""

from __future__ import annotations

import time
from typing import Final

import structlog
from aiohttp import web

from gateway import jsonin
from gateway.auth import same_secret
from gateway.engine import ENGINE
from gateway.engine.intake import read_body
from gateway.errors import StoreError
from gateway.problem import problem
from gateway.store import SignalVerdict

# A signal carries a decision or a small webhook payload, not a document; it is stored as the
# step's output, so it is bounded well below the internal listener's 16 MiB.
MAX_BODY: Final = 64 * 1024
NO_STORE: Final = {"Cache-Control": "no-store"}

log = structlog.get_logger("stepgate.signals")


def _unknown() -> web.Response:
    return problem(404, detail="no such signal, or a wrong token", headers=NO_STORE)


def _unavailable() -> web.Response:
    return problem(
        503,
        detail="the run store is not available; nothing was recorded, try again",
        headers={"Retry-After": "1", **NO_STORE},
    )


async def post_signal(request: web.Request) -> web.StreamResponse:
    if request.method != "POST":
        return problem(405, detail="a signal URL takes POST", headers={"Allow": "POST", **NO_STORE})
    engine = request.app[ENGINE]
    signal_id = request.match_info["signal_id"]
    token = request.query.get("token", "")
    try:
        ref = await engine.store.find_signal(signal_id)
    except StoreError:
        return _unavailable()
    if ref is None or not same_secret(token, ref.token):
        return _unknown()
    raw = await read_body(request, MAX_BODY)
    if raw is None:
        return problem(413, detail=f"a signal's body is at most {MAX_BODY} bytes", headers=NO_STORE)
    try:
        value = jsonin.loads(raw)
    except jsonin.BadJSON as exc:
        return problem(400, detail=f"a signal's body must be JSON: {exc}", headers=NO_STORE)
    try:
        verdict = await engine.store.deliver_signal(
            signal_id, token, jsonin.dump(value), time.time()
        )
    except StoreError:
        return _unavailable()
    if verdict is None:  # purged since the look-up
        return _unknown()
    if verdict == SignalVerdict.ENDED:
        return problem(409, detail="the run this signal was for has ended", headers=NO_STORE)
    if verdict == SignalVerdict.DONE:
        return problem(
            409, detail="this signal was delivered before, or has timed out", headers=NO_STORE
        )
    log.info("signal.delivered", run_id=ref.run_id, step=ref.step_id)
    return web.json_response({"status": "delivered"}, status=202, headers=NO_STORE)
