"""stepgate.wsgi under frameworks that render errors themselves, and against forged headers.

Flask (without PROPAGATE_EXCEPTIONS) and Django answer their own 500 page for a view's
exception instead of raising it, so a NonRetriableError never reaches the middleware as an
exception; it must still end the run with its own status. And since WSGI maps `Stepgate_Token`
and `Stepgate-Token` to the same environ key, the adapter must not trust merged values.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

import pytest
import stepgate.wsgi
from stepgate import NonRetriableError, _transport
from stepgate.sync import step

from tests.sdk.fakes import CALLBACK, FakeGateway, FakeSyncTransport

flask = pytest.importorskip("flask")


@pytest.fixture(autouse=True)
def _fake_transport(monkeypatch: pytest.MonkeyPatch, fake_gateway: FakeGateway) -> None:
    monkeypatch.setattr(_transport, "default_sync", FakeSyncTransport(fake_gateway))


def _environ(headers: dict[str, str], path: str = "/", query: str = "") -> dict[str, Any]:
    environ: dict[str, Any] = {
        "REQUEST_METHOD": "POST",
        "PATH_INFO": path,
        "QUERY_STRING": query,
        "SCRIPT_NAME": "",
        "SERVER_NAME": "upstream.test",
        "SERVER_PORT": "80",
        "SERVER_PROTOCOL": "HTTP/1.1",
        "wsgi.url_scheme": "http",
        "wsgi.input": None,
        "wsgi.errors": None,
        "CONTENT_LENGTH": "0",
    }
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    return environ


def _call(app: Any, environ: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
    started: dict[str, Any] = {}

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        started["status"], started["headers"] = status, dict(headers)
        return lambda data: None

    result = app(environ, start_response)
    try:
        body = b"".join(result)
    finally:
        close = getattr(result, "close", None)
        if close is not None:
            close()
    return int(started["status"][:3]), started["headers"], body


# --- Flask ---------------------------------------------------------------------------------


def _flask_app() -> Any:
    app = flask.Flask("shop")
    assert not app.config["PROPAGATE_EXCEPTIONS"] and not app.testing and not app.debug

    @app.post("/refuse")
    def refuse() -> Any:
        raise NonRetriableError("card declined", status=402)

    @app.post("/refuse-in-step")
    def refuse_in_step() -> Any:
        def charge() -> None:
            raise NonRetriableError("card declined", status=402)

        step.run("charge", charge)
        return {"unreachable": True}

    @app.post("/compensate")
    def compensate() -> Any:
        try:
            raise NonRetriableError("card declined", status=402)
        except NonRetriableError:
            return {"compensated": True}

    @app.post("/bug")
    def bug() -> Any:
        NonRetriableError("made, never raised", status=400)
        raise KeyError("a bug")

    app.wsgi_app = stepgate.wsgi.StepgateMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    app.logger.disabled = True  # Flask logs the view's exception with its traceback
    return app


@pytest.mark.parametrize("gateway_mode", [True, False])
def test_flask_non_retriable_error_without_propagate_exceptions(
    fake_gateway: FakeGateway,
    gateway_mode: bool,
) -> None:
    headers = fake_gateway.headers(steps=0) if gateway_mode else {}
    status, response_headers, body = _call(_flask_app(), _environ(headers, "/refuse"))
    assert status == 402
    assert response_headers["Content-Type"] == "application/problem+json"
    assert response_headers["Stepgate-No-Retry"] == "true"
    assert json.loads(body)["detail"] == "card declined"


def test_flask_non_retriable_error_from_a_step(fake_gateway: FakeGateway) -> None:
    status, response_headers, _ = _call(
        _flask_app(), _environ(fake_gateway.headers(steps=0), "/refuse-in-step")
    )
    assert (status, response_headers["Stepgate-No-Retry"]) == (402, "true")
    [(step_id, put)] = fake_gateway.puts()
    assert step_id == "charge" and put["error"]["retriable"] is False


def test_flask_a_caught_non_retriable_error_leaves_the_answer_alone(
    fake_gateway: FakeGateway,
) -> None:
    status, _, body = _call(_flask_app(), _environ(fake_gateway.headers(steps=0), "/compensate"))
    assert (status, json.loads(body)) == (200, {"compensated": True})


def test_flask_an_ordinary_error_keeps_flasks_500(fake_gateway: FakeGateway) -> None:
    status, response_headers, body = _call(
        _flask_app(), _environ(fake_gateway.headers(steps=0), "/bug")
    )
    assert status == 500
    assert "Stepgate-No-Retry" not in response_headers  # the gateway may retry it
    assert b"Internal Server Error" in body


# --- a framework-like app that swallows exceptions, lazily answering ----------------------


def _swallowing(view: Any) -> Any:
    """What frameworks do: catch the view's exception and render a 500 page."""

    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        try:
            body = view()
            status = "200 OK"
        except Exception:
            body, status = b"<h1>Server Error (500)</h1>", "500 Internal Server Error"
        start_response(status, [("Content-Type", "text/html")])
        return [body]

    return app


def test_a_swallowed_refusal_is_answered_in_plain_mode_too() -> None:
    def view() -> bytes:
        raise NonRetriableError("no such trip", status=404)

    app = stepgate.wsgi.StepgateMiddleware(_swallowing(view))
    status, headers, body = _call(app, _environ({}))
    assert (status, headers["Content-Type"]) == (404, "application/problem+json")
    assert json.loads(body)["detail"] == "no such trip"


def test_a_refusal_of_an_earlier_request_does_not_leak(fake_gateway: FakeGateway) -> None:
    def refuse() -> bytes:
        raise NonRetriableError("no", status=400)

    def broken() -> bytes:
        raise RuntimeError("bug")

    _call(stepgate.wsgi.StepgateMiddleware(_swallowing(refuse)), _environ({}))
    status, headers, _ = _call(
        stepgate.wsgi.StepgateMiddleware(_swallowing(broken)),
        _environ(fake_gateway.headers(steps=0)),
    )
    assert status == 500 and "Stepgate-No-Retry" not in headers


# --- forged Stepgate-* headers -------------------------------------------------------------


def _stepping_app(ran: list[str]) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        value = step.run("charge", lambda: ran.append("charge") or "charged")
        start_response("200 OK", [("Content-Type", "application/json")])
        return [json.dumps({"charge": value}).encode()]

    return app


@pytest.mark.parametrize(
    "key",
    [
        "Stepgate-Callback",
        "Stepgate-Token",
        "Stepgate-Steps",
        "Stepgate-Run-Id",
        "Stepgate-Attempt",
    ],
)
def test_merged_stepgate_values_are_refused(fake_gateway: FakeGateway, key: str) -> None:
    headers = fake_gateway.headers(steps=1)
    # What wsgiref and CGI make of the gateway's header plus a client's `Stepgate_...` one.
    forged = {
        "Stepgate-Callback": "http://attacker.test/v1/runs/x",
        "Stepgate-Token": "forged",
        "Stepgate-Steps": "1",
        "Stepgate-Run-Id": "x",
        "Stepgate-Attempt": "9",
    }[key]
    headers[key] = f"{headers[key]},{forged}"
    ran: list[str] = []
    status, response_headers, body = _call(
        stepgate.wsgi.StepgateMiddleware(_stepping_app(ran)), _environ(headers)
    )
    assert status == 400
    assert response_headers["Stepgate-No-Retry"] == "true"
    assert key in json.loads(body)["detail"]
    assert ran == [] and fake_gateway.calls == []


def test_a_callback_outside_the_configured_gateway_is_refused(fake_gateway: FakeGateway) -> None:
    ran: list[str] = []
    headers = fake_gateway.headers(steps=1)
    headers["Stepgate-Callback"] = "http://attacker.test/v1/runs/x"
    app = stepgate.wsgi.StepgateMiddleware(_stepping_app(ran), internal_url="http://gateway.test/")
    status, _, _ = _call(app, _environ(headers))
    assert status == 400 and ran == [] and fake_gateway.calls == []
    # The gateway's own callback passes.
    status, _, body = _call(app, _environ(fake_gateway.headers(steps=0)))
    assert (status, json.loads(body)) == (200, {"charge": "charged"})
    assert CALLBACK.startswith("http://gateway.test/v1/runs/")
    assert [sid for sid, _ in fake_gateway.puts()] == ["charge"]


def test_forged_headers_is_a_pure_check() -> None:
    assert stepgate.wsgi.forged_headers({}) is None
    assert stepgate.wsgi.forged_headers({"HTTP_STEPGATE_CALLBACK": CALLBACK}) is None
    assert stepgate.wsgi.forged_headers({"HTTP_STEPGATE_TOKEN": "a,b"}) is not None
    assert (
        stepgate.wsgi.forged_headers({"HTTP_STEPGATE_CALLBACK": CALLBACK}, "http://gateway.test")
        is None
    )
    assert (
        stepgate.wsgi.forged_headers(
            {"HTTP_STEPGATE_CALLBACK": "http://gateway.test.evil/v1/runs/x"}, "http://gateway.test"
        )
        is not None
    )
