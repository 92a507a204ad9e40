"""`step`: durable steps for async handlers.

    user = await step.run("load-user", load_user, user_id)
    charge = await step.run("charge", charge_card, order, retries=4, timeout=10)
    await step.sleep("cool-off", timedelta(minutes=5))
    paid = await step.wait_for_event("paid", event="order.paid", match={"data.id": order_id})
    approval = await step.signal("approve", timeout=timedelta(days=2))  # approval.url, .wait()
    hotel = await step.invoke("book-hotel", route="hotels", body={"nights": 2})  # a child run
    event_id = await step.send_event("order.shipped", {"order": order_id})

Each call gets its id (the name, then name#2, name#3, ... for repeats) and its position `seq`
when it is *made*, not when it is awaited, so `asyncio.gather(step.run(...), step.run(...))`
numbers steps in argument order. The returned coroutine then:

- replays: a step the run recorded as completed returns its recorded output without running;
  a recorded sleep or wait that is not over suspends the invocation again;
- or runs: the function runs, its output is stored (201), and a failure is recorded and
  re-raised. A failed step runs again on the next invocation.
- a step with a policy (`retries=`) that the gateway recorded as failed for good raises
  StepFailed instead of running, on the invocation that spent its attempts and every replay.

Outside the gateway (no `Stepgate-Callback`/`Stepgate-Token` headers) steps simply run, sleeps
sleep in-process, and wait_for_event raises StepgateError.

Once the gateway answers a callback "superseded" (the attempt is fenced), every step of the
invocation raises `Superseded`: no function runs and no callback goes out any more. A step whose
function was already running when that happened finishes, but its outcome is not sent.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from datetime import datetime, timedelta
from typing import Any, TypeVar, overload

from stepgate import _protocol as proto
from stepgate._context import Invocation, current, in_step, refuse_nesting
from stepgate._protocol import Backoff, Call, Recorded
from stepgate._signal import Signal
from stepgate.errors import CallbackError, StepFailed, StepTimeoutError

__all__ = ["Step", "step"]

T = TypeVar("T")


class Step:
    """The step API for `async def` handlers; use the shared instance `stepgate.step`."""

    __slots__ = ()

    @overload
    def run(
        self,
        name: str,
        fn: Callable[..., Awaitable[T]],
        /,
        *args: Any,
        retries: int | None = None,
        backoff: Backoff | timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, T]: ...

    @overload
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
    ) -> Coroutine[Any, Any, T]: ...

    def run(
        self,
        name: str,
        fn: Callable[..., Any],
        /,
        *args: Any,
        retries: int | None = None,
        backoff: Backoff | timedelta | float | None = None,
        timeout: timedelta | float | None = None,
        **kwargs: Any,
    ) -> Coroutine[Any, Any, Any]:
        """Run `fn(*args, **kwargs)` once per run and return its output; await the result.

        `fn` may be async or plain. A plain function runs directly on the event loop, so
        long blocking work belongs in `asyncio.to_thread` inside an async fn. The output must
        be JSON: the first execution returns the value `fn` returned, a replay returns its
        JSON round trip (tuples come back as lists). A step that raises records the error
        (retriable unless it is a NonRetriableError) and re-raises it.

        `retries`, `backoff` and `timeout` are the step's own policy (they are not passed to
        `fn`): a failed attempt is retried up to `retries` times on `backoff` (a `Backoff`, or
        a duration for its initial wait), instead of by the route's retry policy; once they
        are spent the step raises StepFailed, now and on every replay, without running again.
        `timeout` (a timedelta or seconds) cuts an attempt off with StepTimeoutError, a failed
        attempt like any other (a plain function then runs in a worker thread, which goes on to
        its end unobserved).
        """
        options = proto.check_options(retries, backoff, timeout)
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            return _run_plain(name, fn, args, kwargs, options)
        return _run(inv, inv.begin(name, "run"), fn, args, kwargs, options)

    def sleep(self, name: str, duration: timedelta | float) -> Coroutine[Any, Any, None]:
        """Pause the run for `duration` (a timedelta or seconds); await the result.

        Under the gateway the invocation suspends (the handler answers 202) and the run is
        re-invoked once the deadline, fixed at this call, has passed; no process sleeps.
        """
        seconds = proto.to_seconds(duration, "duration")
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            return asyncio.sleep(seconds)
        until = proto.now() + timedelta(seconds=seconds)
        return _sleep(inv, inv.begin(name, "sleep"), until)

    def sleep_until(self, name: str, moment: datetime) -> Coroutine[Any, Any, None]:
        """Pause the run until `moment` (timezone-aware); a past moment does not pause."""
        moment = proto.check_moment(moment)
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            return asyncio.sleep(max(0.0, (moment - proto.now()).total_seconds()))
        return _sleep(inv, inv.begin(name, "sleep"), moment)

    def wait_for_event(
        self,
        name: str,
        *,
        event: str,
        match: Mapping[str, Any] | None = None,
        timeout: timedelta | float = proto.DEFAULT_WAIT_TIMEOUT,
    ) -> Coroutine[Any, Any, dict[str, Any] | None]:
        """Wait for an event posted to the gateway; await the result.

        Returns the event `{"name", "data", "id", "ts"}` whose fields match every dotted path
        in `match` (e.g. `{"data.order_id": 42}`), or None once `timeout` (default 24 h)
        passes. Needs the gateway: outside it this raises StepgateError.
        """
        event, match, seconds = proto.check_wait(event, match, timeout)
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name)
        return _wait(inv, inv.begin(name, "wait"), event, match, seconds)

    def signal(
        self, name: str, *, timeout: timedelta | float = proto.DEFAULT_WAIT_TIMEOUT
    ) -> Coroutine[Any, Any, Signal]:
        """A single-use URL that completes this step when JSON is POSTed to it; await the result.

        Returns at once with the handle: send `handle.url` wherever it must go (a mail, a
        webhook registration, ideally from a step), then `await handle.wait()` for the POSTed
        body, or None once `timeout` (default 24 h) has passed; until then the run is parked.
        Needs the gateway: outside it this raises StepgateError.
        """
        seconds = proto.check_timeout(timeout, f"signal {name!r}")
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "signal")
        return _signal(inv, inv.begin(name, "signal"), seconds)

    def send_event(self, name: str, data: Any = None) -> Coroutine[Any, Any, str]:
        """Send the event `name` with `data` (JSON) from this run, once; await its event id.

        The sending is recorded as the step `name`: a replay returns the recorded id and sends
        nothing, and the id is the same on every attempt, so even a send cut short by a crash
        is delivered once. Waits of any run match it like an event posted to /v1/events.
        Needs the gateway: outside it this raises StepgateError.
        """
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "send_event")
        return _send_event(inv, inv.begin(name, "event"), data)

    def invoke(self, name: str, *, route: str, body: Any = None) -> Coroutine[Any, Any, Any]:
        """Run the durable route `route` as a child of this run and return its answer; await it.

        The gateway starts the child once (a POST of `body`, as JSON, to the route's path) and
        parks this run until the child ends. The result is the child's final response body,
        JSON-decoded when it is JSON, else its text. A child that ends failed raises StepFailed
        (`status` is its final HTTP status), now and on every replay. Cancelling this run
        cancels the child. Needs the gateway: outside it this raises StepgateError.
        """
        invoke = proto.check_invoke(name, route, body)
        proto.check_name(name)
        refuse_nesting(name)
        inv = current.get()
        if inv is None:
            raise proto.needs_gateway(name, "invoke")
        call = inv.begin(name, "invoke")
        return _invoke(inv, call, proto.invoke_body(call, invoke))


step = Step()


async def _call(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    result = fn(*args, **kwargs)
    if inspect.isawaitable(result):
        result = await result
    return result


async def _call_within(
    step_id: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    limit: float | None,
) -> Any:
    """`fn`'s result, cut off with StepTimeoutError after `limit` seconds."""
    if limit is None:
        return await _call(fn, args, kwargs)
    if inspect.iscoroutinefunction(fn):
        work = _call(fn, args, kwargs)
    else:  # a plain function would block the loop: only a thread can be left behind
        work = _call_in_thread(fn, args, kwargs)
    try:
        async with asyncio.timeout(limit) as scope:
            return await work
    except TimeoutError as exc:
        if not scope.expired():
            raise  # the step's own TimeoutError
        raise StepTimeoutError(
            f"step {step_id!r} took longer than its timeout of {limit:g}s",
            step_id=step_id,
            timeout=limit,
        ) from exc


async def _call_in_thread(
    fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
) -> Any:
    result = await asyncio.to_thread(fn, *args, **kwargs)
    if inspect.isawaitable(result):  # a lambda around an async call: await it here, on the loop
        result = await result
    return result


async def _run_plain(
    name: str,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: proto.Options,
) -> Any:
    token = in_step.set(name)
    try:
        result = await _call_within(name, fn, args, kwargs, options.timeout)
    finally:
        in_step.reset(token)
    proto.check_output(Call(name, name, 0, "run"), result)
    return result


async def _recorded(inv: Invocation, call: Call) -> Recorded | None:
    """The run's record for this call, fetched once per invocation and only if there is one."""
    if inv.recorded is None:
        if inv.recorded_count == 0:
            return None  # the first invocation: nothing to ask for
        if inv.fetch_lock is None:
            inv.fetch_lock = asyncio.Lock()
        async with inv.fetch_lock:  # parallel first steps share one GET
            if inv.recorded is None:
                reply = await inv.request("GET", inv.steps_url)
                inv.recorded = proto.parse_steps(reply, inv.run_id)
    return inv.replayed(call)


async def _run(
    inv: Invocation,
    call: Call,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: proto.Options = proto.NO_OPTIONS,
) -> Any:
    task = asyncio.current_task()
    if task is not None:
        inv.running.add(task)
    try:
        return await _run_step(inv, call, fn, args, kwargs, options)
    finally:
        if task is not None:
            inv.running.discard(task)


async def _run_step(
    inv: Invocation,
    call: Call,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    options: proto.Options,
) -> Any:
    inv.check_live()
    record = await _recorded(inv, call)
    if record is not None and record.status == "completed":
        return record.output
    if record is not None and record.final:  # failed for good: it does not run again
        raise inv.final(proto.final_failure(call, inv.run_id, record.error, record.attempts))
    token = in_step.set(call.step_id)
    try:
        result = await _call_within(call.step_id, fn, args, kwargs, options.timeout)
        body = proto.output_body(call, result, inv.run_id)
    except Exception as exc:
        final = await _record_failure(inv, call, exc, options)
        if final is not None:
            raise inv.final(final) from exc
        raise
    finally:
        in_step.reset(token)
    reply = await inv.request("PUT", inv.step_url(call.step_id), body, step_id=call.step_id)
    if reply.status == 201:  # stored ours
        return result
    # 200: another invocation stored this step first; its output is the one the run keeps.
    data = proto.answer(
        reply, what=f"PUT step {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
    )
    if proto.is_final(data):
        raise inv.final(proto.final_failure(call, inv.run_id, None, data.get("attempts")))
    return data.get("output")


async def _record_failure(
    inv: Invocation, call: Call, exc: Exception, options: proto.Options = proto.NO_OPTIONS
) -> StepFailed | None:
    """Record the step's error (a fenced attempt raises Superseded instead) and log one line.
    Returns the StepFailed to raise instead when the gateway says the step failed for good."""
    proto.tag(exc, inv.run_id, call)
    try:
        reply = await inv.request(
            "PUT",
            inv.step_url(call.step_id),
            proto.error_body(call, exc, options),
            step_id=call.step_id,
        )
        data = proto.answer(
            reply, what=f"PUT step {call.step_id!r} error", run_id=inv.run_id, step_id=call.step_id
        )
    except CallbackError as failed:
        # The step's own error matters more; the gateway still sees this invocation fail.
        exc.add_note(f"stepgate: could not record this failure of step {call.step_id!r}: {failed}")
        inv.failed(call, exc, recorded=False)
        return None
    inv.failed(call, exc, recorded=True)
    if proto.is_final(data):
        return proto.final_failure(call, inv.run_id, None, data.get("attempts"), exc)
    return None


async def _send_event(inv: Invocation, call: Call, data: Any) -> str:
    body = proto.event_body(call, data)
    inv.check_live()
    record = await _recorded(inv, call)
    if record is not None and record.status == "completed":
        return proto.event_id(record.output, inv.run_id, call)
    reply = await inv.request("POST", inv.events_url, body, step_id=call.step_id)
    answer = proto.answer(
        reply, what=f"send_event {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
    )
    return proto.event_id(answer, inv.run_id, call)


async def _sleep(inv: Invocation, call: Call, until: datetime) -> None:
    inv.check_live()
    record = await _recorded(inv, call)
    if record is not None and record.status == "completed":
        return
    if record is not None and record.status == "sleeping":
        raise inv.suspend(call)
    reply = await inv.request(
        "PUT", inv.step_url(call.step_id), proto.sleep_body(call, until), step_id=call.step_id
    )
    data = proto.answer(
        reply, what=f"PUT sleep {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
    )
    if proto.parked(data, "sleeping", inv.run_id, call):
        raise inv.suspend(call)


async def _wait(
    inv: Invocation, call: Call, event: str, match: Mapping[str, Any], seconds: float
) -> dict[str, Any] | None:
    inv.check_live()
    record = await _recorded(inv, call)
    if record is not None and record.status == "completed":
        return proto.event_output(record.output)
    if record is not None and record.status == "waiting":
        raise inv.suspend(call)
    reply = await inv.request(
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


async def _signal(inv: Invocation, call: Call, seconds: float) -> Signal:
    inv.check_live()
    state = proto.recorded_signal(await _recorded(inv, call))
    if state is None:
        reply = await inv.request(
            "PUT",
            inv.step_url(call.step_id),
            proto.signal_body(call, seconds),
            step_id=call.step_id,
        )
        data = proto.answer(
            reply, what=f"PUT signal {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
        )
        state = proto.signal_state(data, inv.run_id, call)
    return Signal(inv, call, state)


async def _invoke(inv: Invocation, call: Call, body: bytes) -> Any:
    inv.check_live()
    record = await _recorded(inv, call)
    if record is not None and proto.settled_invoke(record):
        state = {"status": record.status, "output": record.output, "error": record.error}
    else:
        reply = await inv.request("PUT", inv.step_url(call.step_id), body, step_id=call.step_id)
        state = proto.answer(
            reply, what=f"PUT invoke {call.step_id!r}", run_id=inv.run_id, step_id=call.step_id
        )
    status, value = proto.invoke_outcome(state, inv.run_id, call)
    if status == "waiting":
        raise inv.suspend(call)
    if status == "failed":
        raise inv.final(value)
    return value
