"""What the SDK logs: one concise line per failed step, no traceback for expected failures.

The handler's final exception is the framework's to show; under aiohttp (where the middleware
answers it itself) an error that is not a recorded step failure is logged the way aiohttp logs
an unhandled one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import pytest
import stepgate.aiohttp
from aiohttp import web
from stepgate import _transport, step
from stepgate.sync import step as sync_step

from tests.sdk.fakes import RUN_ID, FakeAsyncTransport, FakeGateway, FakeSyncTransport, active

AiohttpClient = Callable[[web.Application], Any]


@pytest.fixture(autouse=True)
def _fake_transports(monkeypatch: pytest.MonkeyPatch, fake_gateway: FakeGateway) -> None:
    monkeypatch.setattr(_transport, "default_async", FakeAsyncTransport(fake_gateway))
    monkeypatch.setattr(_transport, "default_sync", FakeSyncTransport(fake_gateway))


def _declined() -> None:
    raise RuntimeError("card declined\nby the issuer")


def _shown(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    """Records a default logging set-up shows (INFO and up), access log lines aside."""
    return [r for r in caplog.records if r.levelno >= logging.INFO and r.name != "aiohttp.access"]


async def test_a_failed_step_logs_one_line_without_traceback(
    caplog: pytest.LogCaptureFixture,
    fake_gateway: FakeGateway,
) -> None:
    caplog.set_level(logging.DEBUG)
    with active(fake_gateway.invocation(steps=0)), pytest.raises(RuntimeError):
        await step.run("charge", _declined)
    [record] = caplog.records
    assert (record.name, record.levelno) == ("stepgate", logging.WARNING)
    assert record.exc_info is None
    message = record.getMessage()
    assert "\n" not in message
    assert f"run_id={RUN_ID}" in message and "step=charge" in message
    assert "recorded=yes" in message
    assert "RuntimeError: card declined by the issuer" in message


def test_a_failed_sync_step_logs_one_line(
    caplog: pytest.LogCaptureFixture, fake_gateway: FakeGateway
) -> None:
    caplog.set_level(logging.DEBUG)
    with active(fake_gateway.invocation(steps=0)), pytest.raises(RuntimeError):
        sync_step.run("charge", _declined)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "step=charge" in record.getMessage()


async def test_outside_the_gateway_a_failing_step_logs_nothing(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(RuntimeError):
        await step.run("charge", _declined)
    assert caplog.records == []


def _app() -> web.Application:
    async def pay(request: web.Request) -> web.Response:
        if request.query.get("bug"):
            raise KeyError("not a step")
        await step.run("charge", _declined)
        return web.json_response({})

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/pay", pay)
    return app


async def test_aiohttp_a_step_failure_is_not_logged_again_with_its_traceback(
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
    fake_gateway: FakeGateway,
) -> None:
    caplog.set_level(logging.DEBUG)
    client = await aiohttp_client(_app())
    resp = await client.post("/pay", headers=fake_gateway.headers(steps=0))
    assert resp.status == 500
    assert resp.headers["Content-Type"] == "application/problem+json"
    shown = _shown(caplog)
    assert [(r.name, r.levelno) for r in shown] == [("stepgate", logging.WARNING)]
    assert all(r.exc_info is None for r in shown)
    # The traceback is there for whoever turns DEBUG on.
    assert any(r.exc_info for r in caplog.records if r.levelno == logging.DEBUG)


async def test_aiohttp_an_error_outside_steps_is_logged_like_aiohttp_does(
    aiohttp_client: AiohttpClient,
    caplog: pytest.LogCaptureFixture,
    fake_gateway: FakeGateway,
) -> None:
    client = await aiohttp_client(_app())
    resp = await client.post("/pay?bug=1", headers=fake_gateway.headers(steps=0))
    assert resp.status == 500
    [record] = [r for r in _shown(caplog) if r.levelno >= logging.ERROR]
    assert (record.name, record.getMessage()) == ("aiohttp.server", "Error handling request")
    assert record.exc_info is not None and record.exc_info[0] is KeyError


async def test_a_fenced_attempt_logs_one_line(
    caplog: pytest.LogCaptureFixture, fake_gateway: FakeGateway
) -> None:
    from stepgate import Superseded

    caplog.set_level(logging.DEBUG)
    fake_gateway.fence_at = "PUT a"
    with active(fake_gateway.invocation(steps=0)):
        for name in ("a", "b", "c"):
            with pytest.raises(Superseded):
                await step.run(name, lambda: 1)
    [record] = caplog.records
    assert record.levelno == logging.WARNING and record.exc_info is None
    assert "attempt.superseded" in record.getMessage()
    assert "current_attempt=2" in record.getMessage()
