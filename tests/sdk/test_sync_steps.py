"""`stepgate.sync.step`: the blocking API follows the same rules as the async one."""

from __future__ import annotations

import asyncio
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest
from stepgate import NonRetriableError, ReplayMismatchError, StepgateError, Suspend
from stepgate.sync import step

from tests.sdk.fakes import FakeGateway, active


def test_without_gateway_steps_run_and_sleep_in_process() -> None:
    assert step.run("add", lambda a, b: a + b, 1, 2) == 3
    started = time.monotonic()
    step.sleep("nap", 0.05)
    step.sleep_until("nap2", datetime.now(UTC) + timedelta(milliseconds=30))
    assert time.monotonic() - started >= 0.08
    with pytest.raises(StepgateError, match="needs the Stepgate gateway"):
        step.wait_for_event("paid", event="order.paid")


def test_first_invocation_runs_then_records(fake_gateway: FakeGateway) -> None:
    def load(user: str) -> dict[str, str]:
        fake_gateway.log.append("ran load")
        return {"user": user}

    with active(fake_gateway.invocation(steps=0)):
        assert step.run("load", load, "ada") == {"user": "ada"}
        assert step.run("load", load, "bob") == {"user": "bob"}
    assert fake_gateway.log == ["ran load", "PUT load", "ran load", "PUT load#2"]
    assert [body["seq"] for _, body in fake_gateway.puts()] == [0, 1]


def test_replay_skips_completed_and_reruns_failed(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("a", 0, output="recorded")
    fake_gateway.record("b", 1, status="failed")
    ran: list[str] = []

    def fresh(name: str) -> str:
        ran.append(name)
        return "fresh"

    with active(fake_gateway.invocation()):
        assert step.run("a", fresh, "a") == "recorded"
        assert step.run("b", fresh, "b") == "fresh"
    assert ran == ["b"]
    assert fake_gateway.log == ["GET steps", "PUT b"]


def test_errors_are_recorded_with_the_retriable_flag(fake_gateway: FakeGateway) -> None:
    def declined() -> None:
        raise NonRetriableError("declined", status=402)

    def flaky() -> None:
        raise ConnectionError("try later")

    with active(fake_gateway.invocation(steps=0)):
        with pytest.raises(ConnectionError):
            step.run("flaky", flaky)
        with pytest.raises(NonRetriableError):
            step.run("declined", declined)
    assert [body["error"]["retriable"] for _, body in fake_gateway.puts()] == [True, False]


def test_mismatch_sleep_and_wait(fake_gateway: FakeGateway) -> None:
    fake_gateway.record("a", 0, output=1)
    with active(fake_gateway.invocation()), pytest.raises(ReplayMismatchError):
        step.run("z", lambda: 1)

    other = FakeGateway()
    inv = other.invocation(steps=0)
    with active(inv):
        with pytest.raises(Suspend):
            step.sleep("nap", 60)
        other.events["go"] = {"name": "go", "data": {}, "id": "1", "ts": "t"}
        assert step.wait_for_event("go-wait", event="go") == other.events["go"]
    assert inv.suspended
    assert [(sid, body["seq"]) for sid, body in other.puts()] == [("nap", 0), ("go-wait", 1)]


def test_threads_sharing_an_invocation_get_distinct_ids(fake_gateway: FakeGateway) -> None:
    inv = fake_gateway.invocation(steps=0)

    def work() -> None:
        with active(inv):
            for _ in range(20):
                step.run("t", lambda: 1)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    ids = sorted(sid for sid, _ in fake_gateway.puts())
    assert len(set(ids)) == 80
    assert sorted(body["seq"] for _, body in fake_gateway.puts()) == list(range(80))


def test_an_async_function_is_refused() -> None:
    async def coro() -> int:
        return 1

    with pytest.raises(TypeError, match="returned an awaitable"):
        step.run("c", coro)  # type: ignore[unused-coroutine]  # refused, never awaited


async def test_calling_from_a_running_event_loop_is_refused() -> None:
    with pytest.raises(StepgateError, match="would block"):
        step.run("blocking", lambda: 1)
    # ... but a worker thread (asyncio.to_thread copies the context) may use it
    assert await asyncio.to_thread(step.run, "in-thread", lambda: 5) == 5
