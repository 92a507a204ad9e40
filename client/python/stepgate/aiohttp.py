"""aiohttp adapter: `web.Application(middlewares=[stepgate.aiohttp.middleware])`.

Per request it reads the `Stepgate-*` headers into the step context, runs the handler, and
answers a suspend with 202 + `Stepgate-Suspend: true`, a NonRetriableError with its status as
problem+json + `Stepgate-No-Retry: true`, a replay mismatch with 500 + `Stepgate-No-Retry`, and
a fenced attempt (Superseded) with 409 problem+json.

Under the gateway any other error answers a retriable 500 problem+json. A step's failure has
already been logged in one line by the SDK, so it is not logged again (its traceback is on the
`stepgate` logger at DEBUG); any other error is logged the way aiohttp logs an unhandled one,
"Error handling request" with its traceback on the `aiohttp.server` logger.
"""

# This module is named like the library it adapts; absolute imports (the default) and
# postponed annotations keep `aiohttp` below the real package.
from __future__ import annotations

import logging

from aiohttp import web
from aiohttp.typedefs import Handler

from stepgate._context import current, from_headers
from stepgate._responses import Reply, failure, reply_for

log = logging.getLogger("stepgate")
server_log = logging.getLogger("aiohttp.server")

__all__ = ["middleware"]


def _response(reply: Reply) -> web.Response:
    return web.Response(status=reply.status, headers=dict(reply.headers), body=reply.body)


@web.middleware
async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    inv = from_headers(request.headers.get)
    token = current.set(inv)
    try:
        try:
            response = await handler(request)
        except BaseException as exc:
            if inv is not None:
                await inv.settle()
            reply = reply_for(exc, inv)
            if (
                reply is None
                and inv is not None
                and isinstance(exc, Exception)
                and not isinstance(exc, web.HTTPException)
            ):
                # Under the gateway an unexpected error answers as problem+json, retriable.
                if inv.recorded_failure(exc):
                    log.debug("handler.failed run_id=%s step failure", inv.run_id, exc_info=exc)
                else:
                    server_log.error("Error handling request", exc_info=exc)
                reply = failure(exc)
            if reply is None:
                raise
            return _response(reply)
        if inv is not None:
            await inv.settle()
        if inv is not None and not response.prepared:
            reply = reply_for(None, inv)  # the handler swallowed a suspend or a mismatch
            if reply is not None:
                return _response(reply)
        return response
    finally:
        current.reset(token)
