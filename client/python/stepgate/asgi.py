"""ASGI adapter: `app = StepgateMiddleware(app)` (Starlette, FastAPI, any ASGI 3 app).

Requests without the gateway's headers pass straight through (a NonRetriableError raised before
the response starts still becomes its problem answer). Requests from the gateway run with the
step context set, and their response is held until the app returns: a framework's error
middleware may already have "sent" a 500 for an exception it re-raises, and the gateway needs
202 + `Stepgate-Suspend` or the no-retry problem instead. The gateway records durable responses
whole anyway, so holding one costs no streaming the client would have seen. A fenced attempt
(Superseded, protocol v1.1) is answered 409 problem+json, even if the app swallowed the signal.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from stepgate._context import current, from_headers
from stepgate._responses import Reply, reply_for

__all__ = ["StepgateMiddleware", "middleware"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
# Frameworks type their own scopes (TypedDicts, dicts, MutableMappings): accept any of them.
ASGIApp = Callable[[Any, Any, Any], Awaitable[None]]


def _header_getter(scope: Scope) -> Callable[[str], str | None]:
    headers: dict[str, str] = {}
    for name, value in scope.get("headers", ()):
        if name[:9].lower() == b"stepgate-":  # only ours; skip decoding the rest
            headers[name.decode("latin-1").lower()] = value.decode("latin-1")
    return lambda name: headers.get(name.lower())


async def _send_reply(send: Send, reply: Reply) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in reply.headers]
    headers.append((b"content-length", str(len(reply.body)).encode()))
    await send({"type": "http.response.start", "status": reply.status, "headers": headers})
    await send({"type": "http.response.body", "body": reply.body})


class StepgateMiddleware:
    """Wraps an ASGI 3 application with Stepgate's step context and answers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        inv = from_headers(_header_getter(scope))
        if inv is None:
            await self._plain(scope, receive, send)
            return
        held: list[Message] = []

        async def hold(message: Message) -> None:
            held.append(message)

        token = current.set(inv)
        try:
            await self.app(scope, receive, hold)
            await inv.settle()
        except BaseException as exc:
            await inv.settle()
            reply = reply_for(exc, inv)
            if reply is None:
                for message in held:  # e.g. the framework's own 500 page, then the error
                    await send(message)
                raise
            await _send_reply(send, reply)
            return
        finally:
            current.reset(token)
        reply = reply_for(None, inv)  # the app swallowed a suspend or a mismatch
        if reply is not None:
            await _send_reply(send, reply)
            return
        for message in held:
            await send(message)

    async def _plain(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        token = current.set(None)
        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            reply = reply_for(exc, None)
            if reply is None or started:
                raise
            await _send_reply(send, reply)
        finally:
            current.reset(token)


middleware = StepgateMiddleware
