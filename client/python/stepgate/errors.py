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
     └── Suspend                    run_id, step_id: control flow, not an error. A sleep or wait
                                    is not due yet; the adapter answers 202 and the gateway
                                    re-invokes the run later. It is not an Exception, so a
                                    handler's `except Exception` cannot swallow it.

Bad arguments (an empty step name, a negative sleep) raise the usual ValueError or TypeError at
the call. A step called inside another step, and wait_for_event outside the gateway, raise a
plain StepgateError.
"""

from __future__ import annotations

__all__ = [
    "CallbackError",
    "GatewayUnavailableError",
    "NonRetriableError",
    "ReplayMismatchError",
    "StepOutputError",
    "StepgateError",
    "Suspend",
]


class StepgateError(Exception):
    """The root of the SDK's errors. `run_id` and `step_id` say where, when known."""

    def __init__(self, message: str, *, run_id: str | None = None,
                 step_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.run_id = run_id
        self.step_id = step_id

    def __str__(self) -> str:
        return self.message


class NonRetriableError(StepgateError):
    """Raise to end the run: the adapter answers `status` with `Stepgate-No-Retry: true`.

    Use it when retrying the same request cannot help (bad input, a declined card). Raised
    inside a step, the step's failure is recorded with `retriable: false`.
    """

    def __init__(self, message: str, status: int = 500, *, run_id: str | None = None,
                 step_id: str | None = None) -> None:
        if not 400 <= status <= 599:
            raise ValueError(f"NonRetriableError status must be 400-599, got {status}")
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.status = status


class ReplayMismatchError(StepgateError):
    """The step called at position `seq` is `step_id`, but the run recorded `recorded_step_id`.

    Replaying would hand one step's output to another, so the run ends instead: retrying the
    same code cannot help.
    """

    def __init__(self, message: str, *, run_id: str, step_id: str, recorded_step_id: str,
                 seq: int) -> None:
        super().__init__(message, run_id=run_id, step_id=step_id)
        self.recorded_step_id = recorded_step_id
        self.seq = seq


class StepOutputError(StepgateError):
    """A step returned a value that is not JSON (outputs are stored and replayed as JSON)."""


class CallbackError(StepgateError):
    """The gateway answered a step callback with an error `status` (None: no usable answer)."""

    def __init__(self, message: str, *, status: int | None = None, run_id: str | None = None,
                 step_id: str | None = None) -> None:
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
