"""What an adapter answers instead of the handler's own response, decided without I/O.

    the gateway has given up on this attempt    -> 409 problem+json, type .../superseded
    the run's code no longer matches its record  -> 500 problem+json, Stepgate-No-Retry: true
    NonRetriableError(message, status)           -> status problem+json, Stepgate-No-Retry: true
    StepFailed left uncaught (a final step)      -> 500 problem+json, Stepgate-No-Retry: true
    a sleep or wait suspended the invocation     -> 202, Stepgate-Suspend: true, empty body
    anything else                                -> None: the handler's response or exception

The invocation's flags count as much as the exception: a handler that catches the suspend
signal or a mismatch (`except BaseException`, or a framework that renders errors itself) must
still not tell the gateway the run finished. Exception groups (asyncio.TaskGroup) are searched.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from http import HTTPStatus

from stepgate._context import Invocation
from stepgate._protocol import SUPERSEDED_TYPE
from stepgate.errors import (
    NonRetriableError,
    ReplayMismatchError,
    StepFailed,
    Superseded,
    Suspend,
)

__all__ = ["Reply", "failure", "problem", "reply_for", "superseded"]


@dataclass(frozen=True, slots=True)
class Reply:
    status: int
    headers: tuple[tuple[str, str], ...]
    body: bytes

    @property
    def reason(self) -> str:
        try:
            return HTTPStatus(self.status).phrase
        except ValueError:
            return "Error"


SUSPEND = Reply(202, (("Stepgate-Suspend", "true"),), b"")


def problem(status: int, detail: str) -> Reply:
    """An RFC 9457 problem that also tells the gateway not to retry."""
    title = Reply(status, (), b"").reason
    body = json.dumps(
        {"type": "about:blank", "title": title, "status": status, "detail": detail}
    ).encode()
    return Reply(
        status, (("Content-Type", "application/problem+json"), ("Stepgate-No-Retry", "true")), body
    )


def superseded(signal: Superseded) -> Reply:
    """The answer of a fenced attempt. The gateway ignores it (it has moved on); it says what
    happened to anyone else reading the service's answers, in the gateway's own terms."""
    body = json.dumps(
        {
            "type": SUPERSEDED_TYPE,
            "title": "Attempt superseded",
            "status": 409,
            "detail": "the gateway has given up on this attempt; the handler stopped",
            "run_id": signal.run_id,
            "attempt": signal.attempt,
        }
    ).encode()
    return Reply(409, (("Content-Type", "application/problem+json"),), body)


def failure(exc: Exception) -> Reply:
    """An unexpected error under the gateway: 500 problem+json naming only the error's type
    (its message may hold data the client must not see); the gateway may retry it."""
    body = json.dumps(
        {
            "type": "about:blank",
            "title": "Internal Server Error",
            "status": 500,
            "detail": f"the handler failed with {type(exc).__name__}",
        }
    ).encode()
    return Reply(500, (("Content-Type", "application/problem+json"),), body)


def _leaves(exc: BaseException) -> Iterator[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        for inner in exc.exceptions:
            yield from _leaves(inner)
    else:
        yield exc


def reply_for(exc: BaseException | None, inv: Invocation | None) -> Reply | None:
    """The answer to send instead, given how the handler ended; None to leave it alone."""
    if exc is not None and not isinstance(
        exc, Exception | Suspend | Superseded | BaseExceptionGroup
    ):
        return None  # cancellation, KeyboardInterrupt, SystemExit: not ours to answer
    leaves = list(_leaves(exc)) if exc is not None else []
    # Fenced: nothing this attempt says is recorded any more, whatever else went wrong.
    fence = inv.superseded if inv is not None else None
    if fence is None:
        fence = next((e for e in leaves if isinstance(e, Superseded)), None)
    if fence is not None:
        return superseded(fence)
    mismatch = next((e for e in leaves if isinstance(e, ReplayMismatchError)), None)
    if mismatch is None and inv is not None:
        mismatch = inv.fatal
    if mismatch is not None:
        return problem(500, str(mismatch))
    refused = next((e for e in leaves if isinstance(e, NonRetriableError)), None)
    if refused is not None:
        return problem(refused.status, str(refused))
    final = next((e for e in leaves if isinstance(e, StepFailed)), None)
    if final is not None:
        # A final step fails the same way on every replay: retrying cannot help. The detail
        # names the step only; the recorded error may hold data the client must not see.
        return problem(500, f"step {final.step_id!r} failed for good")
    if (inv is not None and inv.suspended) or any(isinstance(e, Suspend) for e in leaves):
        # Parked steps decide when the run continues; an error beside them (a failed parallel
        # step) is recorded and will be retried at that re-invocation.
        return SUSPEND
    return None
