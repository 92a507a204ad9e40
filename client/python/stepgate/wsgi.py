"""WSGI adapter: `app = StepgateMiddleware(app)`; handlers use `from stepgate.sync import step`.

    app.wsgi_app = StepgateMiddleware(app.wsgi_app)                  # Flask
    application = StepgateMiddleware(get_wsgi_application())         # Django (wsgi.py)

Requests without the gateway's headers pass straight through. Requests from the gateway run
with the step context set for the whole response, body iteration included, and the response
is collected before it is passed on, so a suspend, fence or no-retry answer can still replace
it.

Frameworks that render exceptions themselves (Flask without PROPAGATE_EXCEPTIONS, Django
without DEBUG_PROPAGATE_EXCEPTIONS) hand back their own 500 page instead of raising. A suspend,
a fenced attempt and a replay mismatch are still answered, since the SDK flags those on the
invocation; and a NonRetriableError that was raised while the request ran is answered when the
application's answer is that 500 (its status, problem+json, `Stepgate-No-Retry: true`), so the
run ends instead of being retried; so is a StepFailed (a step that failed for good, answered
500). An application that catches the error and answers anything but 500 keeps its answer.

Forged headers. WSGI (like CGI) names a header `HTTP_` + its name upper-cased with `-` turned
into `_`, so `Stepgate_Callback` and `Stepgate-Callback` land in the same `HTTP_STEPGATE_CALLBACK`
key. The gateway removes every client-sent `Stepgate-*` header, and drops header names with
underscores; this adapter also refuses (400 problem+json, nothing run) a request on which a
`Stepgate-*` key holds two comma-joined values, which is how wsgiref and CGI merge a forged
header with the gateway's. A WSGI server that keeps only one of the two cannot be told apart, so
the service must be reachable only through the gateway; `internal_url` (the gateway's, as in its
config) additionally refuses any callback URL that does not start with `{internal_url}/v1/runs/`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any

from stepgate._context import Invocation, current, from_headers
from stepgate._responses import Reply, problem, reply_for
from stepgate.errors import raised_refusal, refusals

if TYPE_CHECKING:
    from _typeshed.wsgi import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = ["StepgateMiddleware", "forged_headers", "middleware"]

# The environ keys of the Stepgate-* request headers the SDK reads.
_KEYS = {
    "HTTP_STEPGATE_CALLBACK": "Stepgate-Callback",
    "HTTP_STEPGATE_TOKEN": "Stepgate-Token",
    "HTTP_STEPGATE_RUN_ID": "Stepgate-Run-Id",
    "HTTP_STEPGATE_ATTEMPT": "Stepgate-Attempt",
    "HTTP_STEPGATE_STEPS": "Stepgate-Steps",
}


def forged_headers(environ: Mapping[str, Any], internal_url: str | None = None) -> str | None:
    """Why the request's Stepgate-* values cannot be trusted, or None if nothing is wrong."""
    for key, header in _KEYS.items():
        value = environ.get(key)
        if isinstance(value, str) and "," in value:
            # None of these values has a comma: two headers were merged into one key.
            return (
                f"{header} arrived more than once (a client may have sent it spelt with"
                " underscores); refusing to trust it"
            )
    callback = environ.get("HTTP_STEPGATE_CALLBACK")
    if internal_url is not None and callback:
        prefix = internal_url.rstrip("/") + "/v1/runs/"
        if not str(callback).startswith(prefix):
            return f"Stepgate-Callback is not under this service's gateway ({prefix})"
    return None


def _start(start_response: StartResponse, reply: Reply) -> list[bytes]:
    headers = [*reply.headers, ("Content-Length", str(len(reply.body)))]
    start_response(f"{reply.status} {reply.reason}", headers)
    return [reply.body]


def _close(result: Iterable[bytes]) -> None:
    close = getattr(result, "close", None)
    if close is not None:
        close()


def _is_500(status: str) -> bool:
    return status[:4] == "500 " or status == "500"


class StepgateMiddleware:
    """Wraps a WSGI application with Stepgate's step context and answers.

    `internal_url`: the gateway's internal URL (its `internal_url` setting, e.g.
    "http://127.0.0.1:8081"); when given, a callback URL anywhere else is refused as forged.
    """

    def __init__(self, app: WSGIApplication, *, internal_url: str | None = None) -> None:
        self.app = app
        self.internal_url = internal_url

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        forged = forged_headers(environ, self.internal_url)
        if forged is not None:
            return _start(start_response, problem(400, forged))
        inv = from_headers(lambda name: environ.get("HTTP_" + name.upper().replace("-", "_")))
        noticed = refusals.set([])
        try:
            if inv is None:
                return self._plain(environ, start_response)
            return self._durable(inv, environ, start_response)
        finally:
            refusals.reset(noticed)

    def _plain(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        replaced: list[Reply] = []
        returned = False

        def watch(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
            # Only while the app has not returned: later, its body may already be on its way.
            if not returned and _is_500(status):
                reply = reply_for(raised_refusal(), None)
                if reply is not None:
                    replaced.append(reply)
                    return lambda data: None  # the app's write(): its 500 page is dropped
            return start_response(status, headers, exc_info)

        token = current.set(None)
        try:
            result = self.app(environ, watch)
        except Exception as exc:
            reply = reply_for(exc, None)
            if reply is None:
                raise
            return _start(start_response, reply)
        finally:
            returned = True
            current.reset(token)
        if replaced:
            _close(result)
            return _start(start_response, replaced[0])
        return result

    def _durable(
        self, inv: Invocation, environ: WSGIEnvironment, start_response: StartResponse
    ) -> list[bytes]:
        status = "500 Internal Server Error"
        headers: list[tuple[str, str]] = []
        written: list[bytes] = []

        def capture(
            new_status: str, new_headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            nonlocal status, headers
            status, headers = new_status, list(new_headers)
            return written.append  # the legacy write() callable

        token = current.set(inv)
        try:
            result = self.app(environ, capture)
            try:
                written.extend(result)
            finally:
                _close(result)
        except BaseException as exc:
            reply = reply_for(exc, inv)
            if reply is None:
                raise
            return _start(start_response, reply)
        finally:
            current.reset(token)
        # The app swallowed a signal or a mismatch, or its framework answered 500 for a
        # NonRetriableError or a step failed for good: answer as if the error had propagated.
        raised: Exception | None = None
        if _is_500(status):
            raised = raised_refusal() or (inv.finals[-1] if inv.finals else None)
        reply = reply_for(raised, inv)
        if reply is not None:
            return _start(start_response, reply)
        start_response(status, headers)
        return written


middleware = StepgateMiddleware
