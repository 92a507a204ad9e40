"""HTTP errors the gateway itself produces, as application/problem+json (RFC 9457)."""

from __future__ import annotations

import json
from collections.abc import Mapping
from http import HTTPStatus
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Handler

from gateway.errors import GatewayError, StoreError

log = structlog.get_logger("stepgate")

CONTENT_TYPE: Final = "application/problem+json"

# Compact separators: these bodies are machine-read, and smaller is cheaper on the error path too.
_dumps: Final = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


def reason_phrase(status: int) -> str:
    """The registered reason phrase for `status`, or "Unknown" for an unregistered code."""
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def problem(
    status: int,
    title: str | None = None,
    detail: str | None = None,
    *,
    headers: Mapping[str, str] | None = None,
    **extra: object,
) -> web.Response:
    """A problem details response.

    `type` is "about:blank" unless given in `extra`; with about:blank the title is, as RFC 9457
    §4.2.1 asks, the status code's reason phrase unless a more specific one is given. Further
    keyword arguments become extension members and must be JSON-serialisable.
    """
    body: dict[str, object] = {"type": "about:blank"}
    body["title"] = reason_phrase(status) if title is None else title
    body["status"] = status
    if detail is not None:
        body["detail"] = detail
    body.update(extra)
    return web.Response(
        status=status,
        body=_dumps(body).encode(),
        content_type=CONTENT_TYPE,
        headers=headers,
    )


class Problem(GatewayError):
    """An HTTP error the gateway answers itself: raise it from a handler, and the `problems`
    middleware renders it as problem+json."""

    def __init__(
        self,
        status: int,
        detail: str | None = None,
        *,
        title: str | None = None,
        headers: Mapping[str, str] | None = None,
        **extra: object,
    ) -> None:
        super().__init__(detail or reason_phrase(status))
        self.status = status
        self.detail = detail
        self.title = title
        self.headers = headers
        self.extra = extra

    def response(self) -> web.Response:
        return problem(self.status, self.title, self.detail, headers=self.headers, **self.extra)


@web.middleware
async def problems(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error answer as problem+json: our own `Problem`s, a store that refuses a write
    (503, try again), and aiohttp's 404s and 405s."""
    try:
        return await handler(request)
    except Problem as exc:
        return exc.response()
    except StoreError as exc:
        log.warning("store.unavailable", path=request.path, error=str(exc))
        return problem(
            503,
            detail="the run store is not available; nothing was recorded, try again",
            headers={"Retry-After": "1"},
        )
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        return problem(exc.status, detail=exc.reason, headers=headers)
