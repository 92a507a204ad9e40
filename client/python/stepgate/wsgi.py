"""WSGI adapter: `app = StepgateMiddleware(app)`; handlers use `from stepgate.sync import step`.

Requests without the gateway's headers pass straight through. Requests from the gateway run
with the step context set for the whole response, body iteration included, and the response
is collected before it is passed on, so a suspend or no-retry answer can still replace it.
(Frameworks that render exceptions themselves, such as Flask, hand back their 500 page instead
of raising; a suspend or replay mismatch is still caught, since the SDK also flags those on the
invocation, but a NonRetriableError must propagate: e.g. Flask's PROPAGATE_EXCEPTIONS.)
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from stepgate._context import Invocation, current, from_headers
from stepgate._responses import Reply, reply_for

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["StepgateMiddleware", "middleware"]


def _start(start_response: StartResponse, reply: Reply) -> list[bytes]:
    headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
    start_response(f"{reply.status} {reply.reason}", headers)
    return [reply.body]


class StepgateMiddleware:
    """Wraps a WSGI application with Stepgate's step context and answers."""

    def __init__(self, app: WSGIApplication) -> None:
        self.app = app

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        inv = from_headers(lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))
        if inv is None:
            token = current.set(None)
            try:
                return self.app(environ, start_response)
            except Exception as exc:
                reply = reply_for(exc, None)
                if reply is None:
                    raise
                return _start(start_response, reply)
            finally:
                current.reset(token)
        return self._durable(inv, environ, start_response)

    def _durable(self, inv: Invocation, environ: WSGIEnvironment,
                 start_response: StartResponse) -> list[bytes]:
        status = "500 Internal Server Error"
        headers: list[tuple[str, str]] = []
        written: list[bytes] = []

        def capture(new_status: str, new_headers: list[tuple[str, str]],
                    exc_info: Any = None) -> Any:
            nonlocal status, headers
            status, headers = new_status, list(new_headers)
            return written.append   # the legacy write() callable

        token = current.set(inv)
        try:
            result = self.app(environ, capture)
            try:
                written.extend(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        except BaseException as exc:
            reply = reply_for(exc, inv)
            if reply is None:
                raise
            return _start(start_response, reply)
        finally:
            current.reset(token)
        reply = reply_for(None, inv)   # the app swallowed a suspend or a mismatch
        if reply is not None:
            return _start(start_response, reply)
        start_response(status, headers)
        return written


middleware = StepgateMiddleware
