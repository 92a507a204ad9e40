"""The handle `step.signal` returns: the URL to hand out, and `wait()` for what is POSTed to it.

    approval = await step.signal("approve", timeout=timedelta(days=2))
    await step.run("mail-approver", send_mail, approval.url)
    decision = await approval.wait()        # the POSTed JSON, or None after the time-out

The signal step is recorded (and its run can be woken) from the moment `step.signal` returns;
`wait()` makes no callback: it returns what the record holds, or suspends the invocation until
the URL is POSTed to or the time-out passes, when the gateway invokes the run again and the
replayed `step.signal` finds the signal completed.
"""

from __future__ import annotations

from typing import Any

from stepgate._context import Invocation
from stepgate._protocol import Call, SignalState

__all__ = ["Signal", "SyncSignal"]


class _Handle:
    __slots__ = ("_call", "_invocation", "_state")

    def __init__(self, invocation: Invocation, call: Call, state: SignalState) -> None:
        self._invocation = invocation
        self._call = call
        self._state = state

    @property
    def url(self) -> str:
        """Where to POST the signal: `{public_url}/_stepgate/signals/{id}?token=…` (relative to
        the gateway's public listener unless the gateway sets `public_url`). Single use, and a
        secret: whoever has it can complete the signal."""
        return self._state.url

    @property
    def step_id(self) -> str:
        return self._call.step_id

    @property
    def completed(self) -> bool:
        """Whether the signal was POSTed to (or timed out) before this invocation."""
        return self._state.completed

    def _result(self) -> Any:
        self._invocation.check_live()
        if self._state.completed:
            return self._state.output
        raise self._invocation.suspend(self._call)

    def __repr__(self) -> str:
        state = "completed" if self._state.completed else "waiting"
        return f"<{type(self).__name__} {self._call.step_id!r} {state}>"


class Signal(_Handle):
    """A signal of an async handler (`stepgate.step.signal`)."""

    __slots__ = ()

    async def wait(self) -> Any:
        """The JSON body POSTed to `url`, or None once the signal's time-out has passed. Until
        then the invocation suspends (the run is parked; no process waits)."""
        return self._result()


class SyncSignal(_Handle):
    """A signal of a blocking handler (`stepgate.sync.step.signal`)."""

    __slots__ = ()

    def wait(self) -> Any:
        """As `Signal.wait`, without await."""
        return self._result()
