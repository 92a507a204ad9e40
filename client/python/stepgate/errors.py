"""Everything the SDK raises.

    Exception
     └── StepgateError              run_id, step_id: the root; catch this for "anything Stepgate"
          ├── NonRetriableError     status: raise it to end the run with that HTTP status
          ├── ReplayMismatchError   recorded_step_id, seq: the code no longer calls the steps
          │                         the run recorded (it changed under a running run)
          ├── StepOutputError       a step returned something JSON cannot hold
          └── CallbackError         status: the gateway refused a step callback
               └── GatewayUnavailableError   no answer at all: refused, reset or timed out

    BaseException
     ├── Suspend                    run_id, step_id: control flow, not an error. A sleep or wait
     │                              is not due yet; the adapter answers 202 and the gateway
     │                              re-invokes the run later.
     └── Superseded                 run_id, attempt, current_attempt, run_status, step_id: the
                                    gateway has given up on this attempt (it timed out, a newer
                                    attempt runs, the run ended); nothing more may be recorded,
                                    so the handler stops and the adapter answers 409.

The two signals are not Exceptions, so a handler's `except Exception` cannot swallow them.

Bad arguments (an empty step name, a negative sleep) raise the usual ValueError or TypeError at
the call. A step called inside another step, and wait_for_event outside the gateway, raise a
plain StepgateError.
"""

from __future__ import annotations

from contextvars import ContextVar

__all__ = [
    "CallbackError",
    "GatewayUnavailableError",
    "NonRetriableError",
    "ReplayMismatchError",
    "StepFailed",
    "StepOutputError",
    "StepTimeoutError",
    "StepgateError",
    "Superseded",
    "Suspend",
]


class StepgateError(Exception):
    """The root of the SDK's errors. `run_id` and `step_id` say where, when known."""

    def __init__(
        self, message: str, *, run_id: str | None = None, step_id: str | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.step_id = step_id

    def __str__(self) -> str:
        return self.message


# The NonRetriableErrors made while the WSGI adapter runs a request (None elsewhere): frameworks
# such as Flask and Django catch a view's exception and answer their own 500 page, so the
# adapter looks here for one that was raised (it has a traceback) to answer it after all.
refusals: ContextVar[list[NonRetriableError] | None] = ContextVar("stepgate_refusals", default=None)


class NonRetriableError(StepgateError):
    """Raise to end the run: the adapter answers `status` with `Stepgate-No-Retry: true`.

    Use it when retrying the same request cannot help (bad input, a declined card). Raised
    inside a step, the step's failure is recorded with `retriable: false`.
    """

    def __init__(
        self,
        message: str,
        status: int = 500,
        *,
        run_id: str | None = None,
        step_id: str | None = None,
    ) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"NonRetriableError status must be 400-599, got {status}")
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.status = status
        noticed = refusals.get()
        if noticed is not None:
            noticed.append(self)


def raised_refusal() -> NonRetriableError | None:
    """The last NonRetriableError raised during the WSGI request being run, if any."""
    noticed = refusals.get()
    return next((e for e in reversed(noticed or ()) if e.__traceback__ is not None), None)


class ReplayMismatchError(StepgateError):
    """The step called at position `seq` is `step_id`, but the run recorded `recorded_step_id`.

    Replaying would hand one step's output to another, so the run ends instead: retrying the
    same code cannot help.
    """

    def __init__(
        self, message: str, *, run_id: str, step_id: str, recorded_step_id: str, seq: int
    ) -> None:
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.recorded_step_id = recorded_step_id
        self.seq = seq


class StepOutputError(StepgateError):
    """A step returned a value that is not JSON (outputs are stored and replayed as JSON)."""


class StepFailed(StepgateError):
    """The step `step_id` has failed for good; it is not run again, on this or any replay.

    Raised by the step call when the gateway recorded the step `failed` with `final: true`: its
    retry policy's attempts are spent (`attempts` of them; `error` is the last recorded error,
    `{"message", "type"?}`), or the child run it started ended failed (`status` is the child's
    final HTTP status, `error` what it said). Catch it to compensate (undo the earlier steps in
    further steps) and answer; left uncaught, the run fails (retrying cannot change a final
    step, so the adapter answers 500 with `Stepgate-No-Retry`).
    """

    def __init__(
        self,
        message: str,
        *,
        step_id: str,
        run_id: str | None = None,
        error: dict[str, object] | None = None,
        attempts: int | None = None,
        status: int | None = None,
    ) -> None:
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.step_id: str = step_id
        self.error = error
        self.attempts = attempts
        self.status = status


class StepTimeoutError(StepgateError):
    """The step `step_id` ran longer than its `timeout` (seconds) and was cut off.

    Recorded as a failed attempt of the step (type `StepTimeoutError`), then raised like any
    step error; with a retry policy the gateway runs the step again on its back-off.
    """

    def __init__(
        self, message: str, *, step_id: str, timeout: float, run_id: str | None = None
    ) -> None:
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.step_id: str = step_id
        self.timeout = timeout


class CallbackError(StepgateError):
    """The gateway answered a step callback with an error `status` (None: no usable answer)."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        run_id: str | None = None,
        step_id: str | None = None,
    ) -> None:
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.status = status


class GatewayUnavailableError(CallbackError):
    """The gateway could not be reached, dropped the connection or did not answer in time."""


class Suspend(BaseException):
    """The handler stopped at a sleep or wait that is not due; the run resumes later.

    Adapters turn it into `202` with `Stepgate-Suspend: true`. Let it propagate.
    """

    def __init__(self, *, run_id: str, step_id: str) -> None:
        super().__init__(f"run {run_id} suspended at step {step_id!r}")
        self.run_id = run_id
        self.step_id = step_id


class Superseded(BaseException):
    """The gateway refused a callback of this attempt: it has given up on it (protocol v1.1).

    A newer attempt of the run has started (after a gateway restart or a time-out), or the run
    was cancelled or has ended. Nothing this attempt sends is recorded any more, so the SDK
    stops the handler: every later step call raises this again without running or calling
    back, and the adapter answers 409 (the gateway ignores that answer). Let it propagate.

    `attempt` is this invocation's attempt number; `current_attempt` and `run_status` are what
    the gateway said the run is at now, when it said so.
    """

    def __init__(
        self,
        *,
        run_id: str,
        attempt: int,
        current_attempt: int | None = None,
        run_status: str | None = None,
        step_id: str | None = None,
    ) -> None:
        now = f" (the run is at attempt {current_attempt})" if current_attempt else ""
        super().__init__(f"attempt {attempt} of run {run_id} was superseded{now}")
        self.run_id = run_id
        self.attempt = attempt
        self.current_attempt = current_attempt
        self.run_status = run_status
        self.step_id = step_id
