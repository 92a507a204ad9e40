"""What the adapters answer for each way a handler can end (pure, no I/O)."""

from __future__ import annotations

import asyncio
import json

import pytest
from stepgate import NonRetriableError, ReplayMismatchError, Suspend
from stepgate._responses import SUSPEND, reply_for

from tests.sdk.fakes import FakeGateway

MISMATCH = ReplayMismatchError("moved", run_id="r", step_id="b", recorded_step_id="a", seq=0)


def test_an_ordinary_ending_is_left_alone(fake_gateway: FakeGateway) -> None:
    assert reply_for(None, None) is None
    assert reply_for(None, fake_gateway.invocation()) is None
    assert reply_for(ValueError("x"), fake_gateway.invocation()) is None


@pytest.mark.parametrize(
    "signal", [asyncio.CancelledError(), KeyboardInterrupt(), SystemExit(0), GeneratorExit()]
)
def test_control_flow_is_never_answered(fake_gateway: FakeGateway, signal: BaseException) -> None:
    inv = fake_gateway.invocation()
    inv.suspended = True
    assert reply_for(signal, inv) is None


def test_suspend_by_exception_or_by_flag(fake_gateway: FakeGateway) -> None:
    inv = fake_gateway.invocation()
    assert reply_for(Suspend(run_id="r", step_id="s"), inv) is SUSPEND
    assert SUSPEND.status == 202 and dict(SUSPEND.headers) == {"Stepgate-Suspend": "true"}
    inv.suspended = True  # the handler caught the signal and returned or raised otherwise
    assert reply_for(None, inv) is SUSPEND
    assert reply_for(RuntimeError("later"), inv) is SUSPEND


def test_non_retriable_error_becomes_its_problem() -> None:
    reply = reply_for(NonRetriableError("card declined", status=402), None)
    assert reply is not None
    assert reply.status == 402
    assert dict(reply.headers) == {
        "Content-Type": "application/problem+json",
        "Stepgate-No-Retry": "true",
    }
    assert json.loads(reply.body) == {
        "type": "about:blank",
        "title": "Payment Required",
        "status": 402,
        "detail": "card declined",
    }


def test_a_mismatch_wins_even_when_swallowed(fake_gateway: FakeGateway) -> None:
    inv = fake_gateway.invocation()
    inv.fatal = MISMATCH
    reply = reply_for(None, inv)
    assert reply is not None and reply.status == 500
    assert ("Stepgate-No-Retry", "true") in reply.headers
    assert json.loads(reply.body)["detail"] == "moved"


def test_exception_groups_are_searched(fake_gateway: FakeGateway) -> None:
    suspend = Suspend(run_id="r", step_id="s")
    assert reply_for(BaseExceptionGroup("tg", [suspend, suspend]), None) is SUSPEND
    # a parallel step failing next to a parked one: park; the failed step re-runs on wake-up
    assert reply_for(BaseExceptionGroup("tg", [suspend, ValueError()]), None) is SUSPEND
    refused = reply_for(BaseExceptionGroup("tg", [suspend, NonRetriableError("no", 409)]), None)
    assert refused is not None and refused.status == 409
    nested = ExceptionGroup("outer", [ExceptionGroup("inner", [MISMATCH])])
    mismatch = reply_for(nested, None)
    assert mismatch is not None and mismatch.status == 500
    assert reply_for(ExceptionGroup("tg", [ValueError()]), None) is None


def test_non_retriable_status_must_be_an_error_status() -> None:
    with pytest.raises(ValueError):
        NonRetriableError("fine", status=200)
