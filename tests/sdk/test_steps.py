"""The async step API against a fake gateway at the transport seam."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from stepgate import (
    CallbackError,
    GatewayUnavailableError,
    NonRetriableError,
    ReplayMismatchError,
    StepgateError,
    StepOutputError,
    Suspend,
    step,
)
from stepgate._transport import Reply

from tests.sdk.fakes import FakeGateway, active

# --- outside the gateway ------------------------------------------------------------------


async def test_without_gateway_steps_simply_run() -> None:
    ran: list[str] = []

    def plain(x: int) -> int:
        ran.append("plain")
        return x + 1

    async def coro(x: int, *, times: int) -> list[int]:
        ran.append("coro")
        return [x] * times

    assert await step.run("plain", plain, 1) == 2
    assert await step.run("coro", coro, 3, times=2) == [3, 3]
    assert await step.run("plain", plain, 1) == 2  # no memo outside the gateway
    assert ran == ["plain", "coro", "plain"]


async def test_without_gateway_a_non_json_output_fails_early() -> None:
    with pytest.raises(StepOutputError, match=r"'when'.*datetime.*not JSON"):
        await step.run("when", lambda: datetime.now(UTC))


async def test_without_gateway_sleep_sleeps_in_process() -> None:
    started = time.monotonic()
    await step.sleep("nap", timedelta(milliseconds=50))
    await step.sleep_until("nap-until", datetime.now(UTC) + timedelta(milliseconds=50))
    await step.sleep_until("past", datetime.now(UTC) - timedelta(hours=1))
    assert time.monotonic() - started >= 0.1


async def test_without_gateway_wait_for_event_is_a_clear_error() -> None:
    with pytest.raises(StepgateError, match="needs the Stepgate gateway"):
        await step.wait_for_event("paid", event="order.paid")


@pytest.mark.parametrize(
    ("name", "error"),
    [
        ("", ValueError),
        ("a#2", ValueError),
        ("x" * 300, ValueError),
        (7, TypeError),
    ],
)
async def test_bad_step_names_are_refused_at_the_call(name: Any, error: type[Exception]) -> None:
    with pytest.raises(error):
        _ = step.run(name, lambda: 1)


@pytest.mark.parametrize("duration", [-1, float("nan"), True, "5s"])
async def test_bad_durations_are_refused(duration: Any) -> None:
    with pytest.raises((ValueError, TypeError)):
        _ = step.sleep("nap", duration)


async def test_sleep_until_needs_an_aware_datetime() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        _ = step.sleep_until("nap", datetime(2030, 1, 1))


async def test_steps_cannot_nest() -> None:
    async def outer() -> int:
        return await step.run("inner", lambda: 1)

    with pytest.raises(StepgateError, match="'inner' is called inside step 'outer'"):
        await step.run("outer", outer)


# --- first invocation ---------------------------------------------------------------------


async def test_first_invocation_calls_nothing_before_the_first_step(
    fake_gateway: FakeGateway,
) -> None:
    def load() -> dict[str, int]:
        fake_gateway.log.append("ran load")
        return {"id": 1}

    with active(fake_gateway.invocation(steps=0)):
        assert await step.run("load", load) == {"id": 1}
    assert fake_gateway.log == ["ran load", "PUT load"]
    assert fake_gateway.puts() == [("load", {"output": {"id": 1}, "seq": 0})]


async def test_repeated_names_get_numbered_ids_in_call_order(fake_gateway: FakeGateway) -> None:
    with active(fake_gateway.invocation(steps=0)):
        for i in range(3):
            await step.run("charge", int, i)
        await step.run("other", lambda: "x")
        await step.run("charge", lambda: 3)
    assert [(sid, body["seq"]) for sid, body in fake_gateway.puts()] == [
        ("charge", 0),
        ("charge#2", 1),
        ("charge#3", 2),
        ("other", 3),
        ("charge#4", 4),
    ]


async def test_gather_numbers_steps_in_call_order_not_finish_order(
    fake_gateway: FakeGateway,
) -> None:
    async def slow() -> str:
        await asyncio.sleep(0.05)
        return "slow"

    async def fast() -> str:
        return "fast"

    with active(fake_gateway.invocation(steps=0)):
        results = await asyncio.gather(
            step.run("a", slow), step.run("b", fast), step.run("a", fast)
        )
    assert list(results) == ["slow", "fast", "fast"]
    finished = [(sid, body["seq"]) for sid, body in fake_gateway.puts()]
    assert finished[0] == ("b", 1)  # b finished first ...
    assert sorted(finished, key=lambda p: p[1]) == [("a", 0), ("b", 1), ("a#2", 2)]  # ... seq kept


async def test_ids_are_fixed_when_the_call_is_made_not_when_awaited(
    fake_gateway: FakeGateway,
) -> None:
    with active(fake_gateway.invocation(steps=0)):
        first = step.run("first", lambda: 1)
        second = step.run("second", lambda: 2)
        await second
        await first
    assert fake_gateway.puts() == [
        ("second", {"output": 2, "seq": 1}),
        ("first", {"output": 1, "seq": 0}),
    ]


async def test_a_concurrently_stored_output_wins(fake_gateway: FakeGateway) -> None:
    # Another invocation of the same run stored "quote" first: the run keeps that output.
    fake_gateway.record("quote", 0, output=100)
    with active(fake_gateway.invocation(steps=0)):
        assert await step.run("quote", lambda: 999) == 100


# --- replay -------------------------------------------------------------------------------


async def test_replay_returns_recorded_outputs_and_reruns_failed_steps(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.record("reserve", 0, output={"ok": True})
    fake_gateway.record("charge", 1, status="failed")
    ran: list[str] = []

    def reserve() -> dict[str, bool]:
        ran.append("reserve")
        return {"ok": False}

    def charge() -> str:
        ran.append("charge")
        return "charged"

    with active(fake_gateway.invocation()):
        assert await step.run("reserve", reserve) == {"ok": True}
        assert await step.run("charge", charge) == "charged"
        assert await step.run("notify", lambda: "sent") == "sent"
    assert ran == ["charge"]
    assert fake_gateway.log == ["GET steps", "PUT charge", "PUT notify"]
    assert fake_gateway.steps["charge"]["status"] == "completed"


async def test_parallel_first_steps_share_one_fetch(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("a", 0, output=1)
    fake_gateway.record("b", 1, output=2)
    with active(fake_gateway.invocation()):
        results = await asyncio.gather(
            step.run("a", lambda: 0), step.run("b", lambda: 0), step.run("c", lambda: 3)
        )
    assert list(results) == [1, 2, 3]
    assert fake_gateway.log.count("GET steps") == 1


async def test_a_different_step_at_a_recorded_position_is_a_mismatch(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.record("reserve-flight", 0, output="FL1")
    ran: list[str] = []
    inv = fake_gateway.invocation()
    with active(inv), pytest.raises(ReplayMismatchError) as caught:
        await step.run("reserve-hotel", lambda: ran.append("hotel"))
    error = caught.value
    assert (error.run_id, error.step_id, error.recorded_step_id, error.seq) == (
        "run-1",
        "reserve-hotel",
        "reserve-flight",
        0,
    )
    assert "'reserve-hotel'" in str(error) and "'reserve-flight'" in str(error)
    assert inv.fatal is error
    assert ran == []
    assert fake_gateway.puts() == []


async def test_a_different_kind_at_a_recorded_position_is_a_mismatch(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.record("pause", 0, kind="sleep", status="sleeping")
    with active(fake_gateway.invocation()), pytest.raises(ReplayMismatchError, match="sleep"):
        await step.run("pause", lambda: 1)


# --- errors -------------------------------------------------------------------------------


async def test_a_failing_step_records_a_retriable_error_and_reraises(
    fake_gateway: FakeGateway,
) -> None:
    boom = ValueError("card service down")

    def charge() -> None:
        raise boom

    with active(fake_gateway.invocation(steps=0)), pytest.raises(ValueError) as caught:
        await step.run("charge", charge)
    assert caught.value is boom
    assert fake_gateway.puts() == [
        (
            "charge",
            {
                "error": {"message": "card service down", "type": "ValueError", "retriable": True},
                "seq": 0,
            },
        )
    ]


async def test_a_non_retriable_step_error_is_recorded_as_such(fake_gateway: FakeGateway) -> None:
    async def charge() -> None:
        raise NonRetriableError("card declined", status=402)

    with active(fake_gateway.invocation(steps=0)), pytest.raises(NonRetriableError) as caught:
        await step.run("charge", charge)
    assert (caught.value.status, caught.value.step_id, caught.value.run_id) == (
        402,
        "charge",
        "run-1",
    )
    error = fake_gateway.puts()[0][1]["error"]
    assert error["retriable"] is False
    assert error["type"] == "stepgate.errors.NonRetriableError"


async def test_a_non_json_output_is_recorded_as_a_non_retriable_failure(
    fake_gateway: FakeGateway,
) -> None:
    with active(fake_gateway.invocation(steps=0)), pytest.raises(StepOutputError) as caught:
        await step.run("when", lambda: {1, 2})
    assert caught.value.step_id == "when"
    assert fake_gateway.puts()[0][1]["error"]["retriable"] is False


async def test_an_unrecordable_failure_keeps_the_original_error(
    fake_gateway: FakeGateway,
) -> None:
    class Unreachable:
        async def request(self, *args: Any) -> Reply:
            raise GatewayUnavailableError("the gateway at x is unreachable")

    def fail() -> None:
        raise KeyError("k")

    with (
        active(fake_gateway.invocation(steps=0, transport=Unreachable())),
        pytest.raises(KeyError) as caught,
    ):
        await step.run("s", fail)
    assert any("could not record this failure" in note for note in caught.value.__notes__)


async def test_a_refused_callback_raises_callback_error(fake_gateway: FakeGateway) -> None:
    fake_gateway.fail_next = Reply(
        409, b'{"type":"about:blank","status":409,"detail":"the run has ended (cancelled)"}'
    )
    with active(fake_gateway.invocation(steps=0)), pytest.raises(CallbackError) as caught:
        await step.run("s", lambda: 1)
    assert caught.value.status == 409
    assert "the run has ended (cancelled)" in str(caught.value)


async def test_a_failed_step_list_fetch_raises_and_is_not_cached(
    fake_gateway: FakeGateway,
) -> None:
    fake_gateway.record("a", 0, output=1)
    fake_gateway.fail_next = Reply(500, b"oops")
    with active(fake_gateway.invocation()):
        with pytest.raises(CallbackError, match="500"):
            await step.run("a", lambda: 0)
        assert await step.run("b", lambda: 2) == 2
    assert fake_gateway.log == ["GET steps", "GET steps", "PUT b"]


# --- sleep and wait -----------------------------------------------------------------------


async def test_a_sleep_that_is_not_due_suspends(fake_gateway: FakeGateway) -> None:
    inv = fake_gateway.invocation(steps=0)
    before = datetime.now(UTC)
    with active(inv), pytest.raises(Suspend) as caught:
        try:
            await step.sleep("cool-off", timedelta(minutes=5))
        except Exception:  # a handler's broad except must not swallow the signal
            pytest.fail("Suspend was caught by `except Exception`")
    assert (caught.value.run_id, caught.value.step_id) == ("run-1", "cool-off")
    assert inv.suspended
    body = fake_gateway.puts()[0][1]
    until = datetime.fromisoformat(body["sleep"]["until"])
    assert until.utcoffset() is not None
    assert timedelta(minutes=5) <= until - before < timedelta(minutes=5, seconds=5)
    assert body["seq"] == 0


async def test_a_sleep_already_due_continues(fake_gateway: FakeGateway) -> None:
    inv = fake_gateway.invocation(steps=0)
    with active(inv):
        await step.sleep_until("deadline", datetime.now(UTC) - timedelta(seconds=1))
        await step.sleep("zero", 0)
    assert not inv.suspended
    assert [sid for sid, _ in fake_gateway.puts()] == ["deadline", "zero"]


async def test_recorded_sleeps_replay_without_calls(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("first", 0, kind="sleep", status="completed")
    fake_gateway.record("second", 1, kind="sleep", status="sleeping")
    with active(fake_gateway.invocation()), pytest.raises(Suspend):
        await step.sleep("first", 60)
        await step.sleep("second", 60)
    assert fake_gateway.log == ["GET steps"]


async def test_a_wait_registers_and_suspends(fake_gateway: FakeGateway) -> None:
    with active(fake_gateway.invocation(steps=0)), pytest.raises(Suspend):
        await step.wait_for_event(
            "paid", event="order.paid", match={"data.order_id": 7}, timeout=timedelta(hours=1)
        )
    assert fake_gateway.puts() == [
        (
            "paid",
            {
                "wait": {"event": "order.paid", "match": {"data.order_id": 7}, "timeout": "3600s"},
                "seq": 0,
            },
        )
    ]


async def test_a_wait_returns_the_event_once_matched(fake_gateway: FakeGateway) -> None:
    event = {"name": "order.paid", "data": {"order_id": 7}, "id": "e1", "ts": "2030-01-01"}
    fake_gateway.events["order.paid"] = event
    with active(fake_gateway.invocation(steps=0)):
        assert await step.wait_for_event("paid", event="order.paid", timeout=1.5) == event
    assert fake_gateway.puts()[0][1]["wait"]["timeout"] == "1500ms"


async def test_recorded_waits_replay(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("timed-out", 0, kind="wait", output=None)
    fake_gateway.record("pending", 1, kind="wait", status="waiting")
    with active(fake_gateway.invocation()):
        assert await step.wait_for_event("timed-out", event="e") is None
        with pytest.raises(Suspend):
            await step.wait_for_event("pending", event="e")
    assert fake_gateway.log == ["GET steps"]


async def test_wait_arguments_are_checked(fake_gateway: FakeGateway) -> None:
    with pytest.raises(ValueError):
        _ = step.wait_for_event("w", event="")
    with pytest.raises(ValueError):
        _ = step.wait_for_event("w", event="e", timeout=0)
    with active(fake_gateway.invocation(steps=0)), pytest.raises(TypeError, match="JSON"):
        await step.wait_for_event("w", event="e", match={"data.x": object()})
