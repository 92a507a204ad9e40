"""`step` for blocking code (WSGI, threads): the same calls as `stepgate.step`, without await.

    from stepgate.sync import step

    def checkout(environ, start_response):
        order = step.run("create-order", create_order, cart)
        step.sleep("cool-off", 30)

Replay rules, ids and outputs are exactly those of the async API (see `stepgate._step`); the
callbacks go over a blocking, per-thread keep-alive connection. Calling these from inside a
running event loop raises StepgateError: it would block the loop, so use `stepgate.step` there.
A fenced attempt raises `Superseded` here too, and threads sharing the invocation see it.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import threading
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar, cast

from stepgate import _protocol as proto
from stepgate._context import Invocation, current, in_step, refuse_nesting
from stepgate._protocol import Backoff, Call, Recorded
from stepgate._signal import SyncSignal
from stepgate.errors import CallbackError, StepFailed, StepgateError, StepTimeoutError

__all__ = ["SyncStep", "step"]

T = TypeVar("T")


class SyncStep:
    """The blocking step API; use the shared instance `stepgate.sync.step`."""

    __slots__ = ()

    def run(
        self,
        name: str,
        fn: Callable[..., T],
        /,
        *args: Any,
        retries: int | None = None,
        backoff: Backoff | timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> T:
        """Run `fn(*args, **kwargs)` once per run and return its (JSON) output.

        `retries`, `backoff` and `timeout` are the step's own policy, as in `stepgate.step.run`;
        with a `timeout` the function runs in a thread of its own, left to its end unobserved
        when it is cut off.
        """
        options = proto.check_options(retries, backoff, timeout)
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            result = _call(name, fn, args, kwargs, options.timeout)
            proto.check_output(Call(name, name, 0, "run"), result)
            return result
        call = inv.begin(name, "run")
        inv.check_live()
        record = _recorded(inv, call)
        if record is not None and record.status == "completed":
            return cast(T, record.output)
        if record is not None and record.final:  # failed for good: it does not run again
            raise inv.final(proto.final_failure(call, inv.run_id, record.error, record.attempts))
        try:
            result = _call(call.step_id, fn, args, kwargs, options.timeout)
            body = proto.output_body(call, result, inv.run_id)
        except Exception as exc:
            final = _record_failure(inv, call, exc, options)
            if final is not None:
                raise inv.final(final) from exc
            raise
        reply = inv.request_sync("PUT", inv.step_url(call.step_id), body, step_id=call.step_id)
        if reply.status == 201:
            return result
        data = proto.answer(
            reply, what=f"PUT step {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
        )
        if proto.is_final(data):
            raise inv.final(proto.final_failure(call, inv.run_id, None, data.get("attempts")))
        return cast(T, data.get("output"))  # the output the run keeps, stored first

    def send_event(self, name: str, data: Any = None) -> str:
        """Send the event `name` with `data` from this run, once; returns its event id (see
        `stepgate.step.send_event`). Needs the gateway."""
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "send_event")
        call = inv.begin(name, "event")
        body = proto.event_body(call, data)
        inv.check_live()
        record = _recorded(inv, call)
        if record is not None and record.status == "completed":
            return proto.event_id(record.output, inv.run_id, call)
        reply = inv.request_sync("POST", inv.events_url, body, step_id=call.step_id)
        answer = proto.answer(
            reply, what=f"send_event {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
        )
        return proto.event_id(answer, inv.run_id, call)

    def sleep(self, name: str, duration: timedelta | float) -> None:
        """Pause the run for `duration`; under the gateway the invocation suspends."""
        seconds = proto.to_seconds(duration, "duration")
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            time.sleep(seconds)
            return
        _sleep(inv, inv.begin(name, "sleep"), proto.now() + timedelta(seconds=seconds))

    def sleep_until(self, name: str, moment: datetime) -> None:
        """Pause the run until `moment` (timezone-aware)."""
        moment = proto.check_moment(moment)
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            time.sleep(max(0.0, (moment - proto.now()).total_seconds()))
            return
        _sleep(inv, inv.begin(name, "sleep"), moment)

    def wait_for_event(
        self,
        name: str,
        *,
        event: str,
        match: Mapping[str, Any] | None = None,
        timeout: timedelta | float = proto.DEFAULT_WAIT_TIMEOUT,
    ) -> dict[str, Any] | None:
        """Wait for a matching event (or None after `timeout`); needs the gateway."""
        event, match, seconds = proto.check_wait(event, match, timeout)
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name)
        call = inv.begin(name, "wait")
        inv.check_live()
        record = _recorded(inv, call)
        if record is not None and record.status == "completed":
            return proto.event_output(record.output)
        if record is not None and record.status == "waiting":
            raise inv.suspend(call)
        reply = inv.request_sync(
            "PUT",
            inv.step_url(call.step_id),
            proto.wait_body(call, event, match, seconds),
            step_id=call.step_id,
        )
        data = proto.answer(
            reply, what=f"PUT wait {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
        )
        if proto.parked(data, "waiting", inv.run_id, call):
            raise inv.suspend(call)
        return proto.event_output(data.get("output"))

    def signal(
        self, name: str, *, timeout: timedelta | float = proto.DEFAULT_WAIT_TIMEOUT
    ) -> SyncSignal:
        """A single-use URL that completes this step when JSON is POSTed to it (see
        `stepgate.Step.signal`); `handle.wait()` blocks for nothing: it returns the body or
        suspends. Needs the gateway."""
        seconds = proto.check_timeout(timeout, f"signal {name!r}")
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "signal")
        call = inv.begin(name, "signal")
        inv.check_live()
        state = proto.recorded_signal(_recorded(inv, call))
        if state is None:
            reply = inv.request_sync(
                "PUT",
                inv.step_url(call.step_id),
                proto.signal_body(call, seconds),
                step_id=call.step_id,
            )
            data = proto.answer(
                reply, what=f"PUT signal {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
            )
            state = proto.signal_state(data, inv.run_id, call)
        return SyncSignal(inv, call, state)

    def invoke(self, name: str, *, route: str, body: Any = None) -> Any:
        """Run the durable route `route` as a child of this run (see `stepgate.Step.invoke`):
        its answer, or StepFailed when it ends failed. Needs the gateway."""
        invoke = proto.check_invoke(name, route, body)
        proto.check_name(name)
        _check_blocking_allowed(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "invoke")
        call = inv.begin(name, "invoke")
        payload = proto.invoke_body(call, invoke)
        inv.check_live()
        record = _recorded(inv, call)
        if record is not None and proto.settled_invoke(record):
            state = {"status": record.status, "output": record.output, "error": record.error}
        else:
            reply = inv.request_sync(
                "PUT", inv.step_url(call.step_id), payload, step_id=call.step_id
            )
            state = proto.answer(
                reply, what=f"PUT invoke {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
            )
        status, value = proto.invoke_outcome(state, inv.run_id, call)
        if status == "waiting":
            raise inv.suspend(call)
        if status == "failed":
            raise inv.final(value)
        return value


step = SyncStep()


def _check_blocking_allowed(name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise StepgateError(
        f"stepgate.sync step {name!r} called on a running event loop, which it would block;"
        " in async code use `from stepgate import step` and await it"
    )


def _call(
    step_id: str,
    fn: Callable[..., T],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limit: float | None = None,
) -> T:
    token = in_step.set(step_id)
    try:
        result = fn(*args, **kwargs) if limit is None else _within(step_id, fn, args, kwargs, limit)
    finally:
        in_step.reset(token)
    if inspect.isawaitable(result):
        if inspect.iscoroutine(result):
            result.close()  # never awaited; close it so Python does not warn as well
        raise TypeError(
            f"step {step_id!r}: stepgate.sync runs plain functions, and this one"
            " returned an awaitable; use `from stepgate import step` in async code"
        )
    return result


def _within(
    step_id: str, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any], limit: float
) -> T:
    """`fn`'s result, or StepTimeoutError after `limit` seconds. A thread cannot be stopped: a
    daemon thread runs `fn`, and one that is cut off runs on to its end, its result dropped."""
    outcome: list[tuple[bool, Any]] = []
    context = contextvars.copy_context()

    def work() -> None:
        try:
            outcome.append((True, context.run(fn, *args, **kwargs)))
        except BaseException as exc:
            outcome.append((False, exc))

    thread = threading.Thread(target=work, name=f"stepgate-step:{step_id}"[:64], daemon=True)
    thread.start()
    thread.join(limit)
    if not outcome:
        raise StepTimeoutError(
            f"step {step_id!r} took longer than its timeout of {limit:g}s",
            step_id=step_id,
            timeout=limit,
        )
    ok, value = outcome[0]
    if not ok:
        raise value
    return cast(T, value)


def _recorded(inv: Invocation, call: Call) -> Recorded | None:
    if inv.recorded is None:
        if inv.recorded_count == 0:
            return None
        with inv.fetch_mutex:  # threads sharing the invocation fetch once
            if inv.recorded is None:
                reply = inv.request_sync("GET", inv.steps_url)
                inv.recorded = proto.parse_steps(reply, inv.run_id)
    return inv.replayed(call)


def _record_failure(
    inv: Invocation, call: Call, exc: Exception, options: proto.Options
) -> StepFailed | None:
    proto.tag(exc, inv.run_id, call)
    try:
        reply = inv.request_sync(
            "PUT",
            inv.step_url(call.step_id),
            proto.error_body(call, exc, options),
            step_id=call.step_id,
        )
        data = proto.answer(
            reply, what=f"PUT step {call.step_id!r} error", run_id=inv.run_id, step_id=call.step_id
        )
    except CallbackError as failed:
        exc.add_note(f"stepgate: could not record this failure of step {call.step_id!r}: {failed}")
        inv.failed(call, exc, recorded=False)
        return None
    inv.failed(call, exc, recorded=True)
    if proto.is_final(data):
        return proto.final_failure(call, inv.run_id, None, data.get("attempts"), exc)
    return None


def _sleep(inv: Invocation, call: Call, until: datetime) -> None:
    inv.check_live()
    record = _recorded(inv, call)
    if record is not None and record.status == "completed":
        return
    if record is not None and record.status == "sleeping":
        raise inv.suspend(call)
    reply = inv.request_sync(
        "PUT", inv.step_url(call.step_id), proto.sleep_body(call, until), step_id=call.step_id
    )
    data = proto.answer(
        reply, what=f"PUT sleep {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
    )
    if proto.parked(data, "sleeping", inv.run_id, call):
        raise inv.suspend(call)
