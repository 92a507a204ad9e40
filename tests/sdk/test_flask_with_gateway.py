"""A real Flask app (PROPAGATE_EXCEPTIONS off) behind a real gateway: a NonRetriableError ends the
run after one attempt with its own status, where Flask's 500 page used to be retried."""

from __future__ import annotations

import socketserver
import threading
from collections.abc import AsyncIterator
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest
import stepgate.wsgi
from stepgate import NonRetriableError
from stepgate.sync import step

from tests.conftest import GatewayFactory

flask = pytest.importorskip("flask")


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
async def flask_shop() -> AsyncIterator[tuple[str, list[str]]]:
    ran: list[str] = []
    app = flask.Flask("shop")
    app.logger.disabled = True  # Flask logs the view's exception with its traceback

    @app.post("/pay")
    def pay() -> Any:
        step.run("reserve", lambda: ran.append("reserve") or "seat 4A")

        def charge() -> None:
            ran.append("charge")
            raise NonRetriableError("card declined", status=402)

        step.run("charge", charge)
        return {"unreachable": True}

    app.wsgi_app = stepgate.wsgi.StepgateMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(
        target=server.serve_forever, args=(0.05,), daemon=True, name="flask-shop"
    )
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", ran
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


async def test_flask_non_retriable_error_ends_the_run_at_once(
    gateway: GatewayFactory,
    flask_shop: tuple[str, list[str]],
) -> None:
    url, ran = flask_shop
    gw = await gateway(
        [
            {
                "name": "pay",
                "path": "/pay",
                "upstream": url,
                "durable": True,
                "hold": "10s",
                "retry": {"attempts": 4, "initial": "50ms"},
            }
        ]
    )
    async with gw.session.post(gw.url + "/pay", json={}) as resp:
        assert resp.status == 402, await resp.text()
        assert resp.headers["Content-Type"] == "application/problem+json"
        problem = await resp.json()
        run_id = resp.headers["Stepgate-Run-Id"]
    assert problem["detail"] == "card declined"
    assert ran == ["reserve", "charge"]
    async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
        run = await resp.json()
    assert (run["status"], len(run["attempts"]), run["response_status"]) == ("failed", 1, 402)


async def test_flask_step_failed_for_good_ends_the_run_at_once(gateway: GatewayFactory) -> None:
    """A step whose policy is spent raises StepFailed; Flask answers its own 500 page for it,
    and the middleware answers 500 with Stepgate-No-Retry instead: a retry could not help."""
    ran: list[str] = []
    app = flask.Flask("trips")
    app.logger.disabled = True

    @app.post("/book")
    def book() -> Any:
        def hotel() -> None:
            ran.append("hotel")
            raise ConnectionError("the hotel is down")

        step.run("hotel", hotel, retries=1, backoff=0.02)
        return {"unreachable": True}

    app.wsgi_app = stepgate.wsgi.StepgateMiddleware(app.wsgi_app)  # type: ignore[method-assign]
    server = make_server(
        "127.0.0.1", 0, app, server_class=_ThreadingWSGIServer, handler_class=_QuietHandler
    )
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        route = {
            "name": "book",
            "path": "/book",
            "upstream": f"http://127.0.0.1:{server.server_port}",
            "durable": True,
            "hold": "10s",
            "retry": {"attempts": 4, "initial": "50ms"},
        }
        gw = await gateway([route])
        async with gw.session.post(gw.url + "/book", json={}) as resp:
            assert resp.status == 500, await resp.text()
            problem = await resp.json(content_type="application/problem+json")
            run_id = resp.headers["Stepgate-Run-Id"]
        async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
            run = await resp.json()
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
    assert problem["detail"] == "step 'hotel' failed for good"
    assert ran == ["hotel", "hotel"]  # its own two attempts, then no retry of the run
    assert (run["status"], len(run["attempts"])) == ("failed", 2)
