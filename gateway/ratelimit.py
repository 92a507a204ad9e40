"""`rate_limit`: a request beyond its route's rate is refused with `429` and an honest
`Retry-After`, before anything is recorded or forwarded (gateway.flow has the bucket's rule).

The bucket of a key read from the headers or the query is taken before the body is read (a
`100 Continue` is not sent for a refused request); one read from a JSON body (durable routes
only) once the body is in.
"""

from __future__ import annotations

import math
import time

import structlog
from aiohttp import web

from gateway import flow
from gateway.config import Route
from gateway.errors import StoreError
from gateway.metrics import Metrics
from gateway.problem import problem
from gateway.store import Store

log = structlog.get_logger("stepgate.flow")


def checked_before_body(route: Route) -> bool:
    rate = route.rate_limit
    return rate is not None and (rate.key is None or rate.key.source != "body")


async def refusal(
    store: Store, metrics: Metrics, route: Route, request: web.Request, body: bytes = b""
) -> web.Response | None:
    """The 429 (or, when the store cannot say, 503) for a request beyond the route's rate."""
    rate = route.rate_limit
    if rate is None:
        return None
    key = flow.key_value(rate.key, request.headers, request.query_string, body)
    try:
        wait = await store.rate_limit(flow.bucket("rate", route.name, key), rate, time.time())
    except StoreError as exc:
        log.error("store.write_failed", route=route.name, during="rate_limit", error=str(exc))
        return problem(
            503,
            detail="the store that keeps the rate limits is not available",
            headers={"Retry-After": "1"},
        )
    if wait <= 0:
        return None
    metrics.flow_rejected(route.name, "rate_limit")
    per = f"{rate.per:g}s"
    scope = f" for this {rate.key.text}" if rate.key is not None else ""
    return problem(
        429,
        detail=f"route {route.name!r} takes at most {rate.limit} requests per {per}{scope}; "
        "nothing was recorded or forwarded",
        headers={"Retry-After": str(max(1, math.ceil(wait)))},
    )
