"""The invocation being handled, in a ContextVar that adapters set per request.

An invocation is one forwarding of a run to the handler. It knows where to call back, how many
steps the run had recorded before it (`Stepgate-Steps`), the recorded steps once fetched, and
hands out step ids and positions in call order. Tasks started by the handler (asyncio.gather)
copy the context, so they share the same Invocation object.

Every callback goes through `request` / `request_sync`, which enforce the fence (protocol v1.1):
once the gateway has answered one callback "superseded", the invocation is over; later step
calls of any task or thread raise the same Superseded signal without calling back.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from stepgate import _transport
from stepgate._protocol import (
    Call,
    Kind,
    Recorded,
    nested_step,
    one_line,
    quote_step_id,
    step_id_for,
    superseded_problem,
)
from stepgate._transport import Reply
from stepgate.errors import ReplayMismatchError, StepFailed, Superseded, Suspend

__all__ = ["Invocation", "current", "from_headers", "in_step", "refuse_nesting"]

log = logging.getLogger("stepgate")

current: ContextVar[Invocation | None] = ContextVar("stepgate_invocation", default=None)
# The id of the step whose function is running, to refuse nested steps.
in_step: ContextVar[str | None] = ContextVar("stepgate_in_step", default=None)


def refuse_nesting(name: str) -> None:
    outer = in_step.get()
    if outer is not None:
        raise nested_step(name, outer)


def _default_async() -> _transport.AsyncTransportLike:
    return _transport.default_async


def _default_sync() -> _transport.SyncTransportLike:
    return _transport.default_sync


@dataclass(eq=False, slots=True)
class Invocation:
    callback: str  # {internal_url}/v1/runs/{id}
    token: str
    run_id: str
    attempt: int = 1
    recorded_count: int | None = None  # Stepgate-Steps; None: unknown, so ask
    transport: _transport.AsyncTransportLike = field(default_factory=_default_async)
    sync_transport: _transport.SyncTransportLike = field(default_factory=_default_sync)
    recorded: dict[int, Recorded] | None = None  # by seq, fetched at the first step call
    suspended: bool = False  # a sleep or wait stopped this invocation
    fatal: ReplayMismatchError | None = None  # seen even if the handler swallows it
    superseded: Superseded | None = None  # the first fencing answer; sticky
    failures: list[BaseException] = field(default_factory=list)  # recorded step errors
    finals: list[StepFailed] = field(default_factory=list)  # raised for steps failed for good
    fetch_lock: asyncio.Lock | None = None
    fetch_mutex: threading.Lock = field(default_factory=threading.Lock)
    running: set[asyncio.Task[Any]] = field(default_factory=set)  # tasks inside a step.run
    _repeats: dict[str, int] = field(default_factory=dict)
    _next_seq: int = 0
    _mutex: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.callback = self.callback.rstrip("/")

    @property
    def steps_url(self) -> str:
        return self.callback + "/steps"

    @property
    def events_url(self) -> str:
        return self.callback + "/events"

    def final(self, error: StepFailed) -> StepFailed:
        """Note a step that failed for good (one line) and return its StepFailed to raise."""
        log.warning(
            "step.failed_for_good run_id=%s attempt=%s step=%s attempts=%s",
            self.run_id,
            self.attempt,
            error.step_id,
            error.attempts,
            extra={"run_id": self.run_id, "attempt": self.attempt, "step": error.step_id},
        )
        with self._mutex:
            self.finals.append(error)
        return error

    def step_url(self, step_id: str) -> str:
        return f"{self.callback}/steps/{quote_step_id(step_id)}"

    def begin(self, name: str, kind: Kind) -> Call:
        """Fix the call's id and seq now, in call order (threads may share an invocation)."""
        with self._mutex:
            repeat = self._repeats.get(name, 0) + 1
            self._repeats[name] = repeat
            seq = self._next_seq
            self._next_seq = seq + 1
        return Call(name, step_id_for(name, repeat), seq, kind)

    def replayed(self, call: Call) -> Recorded | None:
        """The record for `call`'s position, if any; a different step there is a mismatch."""
        if self.recorded is None:
            return None
        record = self.recorded.get(call.seq)
        if record is None:
            return None
        if record.step_id != call.step_id or record.kind not in (None, call.kind):
            error = ReplayMismatchError(
                f"step {call.step_id!r} ({call.kind}) is called at position {call.seq}, where"
                f" run {self.run_id} recorded step {record.step_id!r} ({record.kind or '?'}):"
                " the handler's code changed under a running run, or it picks its steps"
                " non-deterministically",
                run_id=self.run_id,
                step_id=call.step_id,
                recorded_step_id=record.step_id,
                seq=call.seq,
            )
            self.fatal = error
            raise error
        return record

    async def settle(self) -> None:
        """Wait for steps still running in other tasks (a parallel step beside one that failed)
        so their outcome is recorded before the answer: otherwise the retry could start first
        and run a step again that was about to finish."""
        me = asyncio.current_task()
        others = [task for task in self.running if task is not me and not task.done()]
        if others:
            await asyncio.wait(others)

    def suspend(self, call: Call) -> Suspend:
        self.suspended = True
        return Suspend(run_id=self.run_id, step_id=call.step_id)

    def check_live(self) -> None:
        """Raise the fence's signal if the gateway has given up on this attempt."""
        if self.superseded is not None:
            raise self.superseded

    async def request(
        self, method: str, url: str, body: bytes | None = None, *, step_id: str | None = None
    ) -> Reply:
        """One callback of this attempt; a fenced attempt sends none."""
        self.check_live()
        reply = await self.transport.request(method, url, self.token, body)
        self._check_fence(reply, step_id)
        return reply

    def request_sync(
        self, method: str, url: str, body: bytes | None = None, *, step_id: str | None = None
    ) -> Reply:
        self.check_live()
        reply = self.sync_transport.request(method, url, self.token, body)
        self._check_fence(reply, step_id)
        return reply

    def _check_fence(self, reply: Reply, step_id: str | None) -> None:
        problem = superseded_problem(reply)
        if problem is None:
            return
        with self._mutex:  # parallel steps: the first answer wins, the others raise it too
            first = self.superseded is None
            if first:
                self.superseded = Superseded(
                    run_id=self.run_id,
                    attempt=_int(problem.get("attempt")) or self.attempt,
                    current_attempt=_int(problem.get("current_attempt")),
                    run_status=_str(problem.get("run_status")),
                    step_id=step_id,
                )
            signal = self.superseded
        assert signal is not None
        if first:
            log.warning(
                "attempt.superseded run_id=%s attempt=%s step=%s current_attempt=%s"
                " run_status=%s: the gateway has given up on this attempt; stopping"
                " the handler",
                signal.run_id,
                signal.attempt,
                step_id,
                signal.current_attempt,
                signal.run_status,
                extra={"run_id": signal.run_id, "attempt": signal.attempt, "step": step_id},
            )
        raise signal

    def failed(self, call: Call, exc: BaseException, recorded: bool) -> None:
        """Note a step's failure: one concise line, no traceback (the handler's framework shows
        the exception if the handler lets it out)."""
        self.failures.append(exc)
        log.warning(
            "step.failed run_id=%s attempt=%s step=%s recorded=%s error=%s",
            self.run_id,
            self.attempt,
            call.step_id,
            "yes" if recorded else "no",
            one_line(exc),
            extra={"run_id": self.run_id, "attempt": self.attempt, "step": call.step_id},
        )

    def recorded_failure(self, exc: BaseException) -> bool:
        """Whether `exc` (every leaf of a group) is a step failure already reported."""
        if isinstance(exc, BaseExceptionGroup):
            return all(self.recorded_failure(inner) for inner in exc.exceptions)
        return any(exc is seen for seen in self.failures)


def _int(value: object) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _count(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        return None
    return value if value >= 0 else None


def from_headers(get: Callable[[str], str | None]) -> Invocation | None:
    """The invocation described by a request's `Stepgate-*` headers, or None outside the gateway.

    `get` looks a header up case-insensitively. Gateway mode needs both the callback URL and
    the token; anything less is treated as a plain request, where steps simply run.
    """
    callback = get("Stepgate-Callback")
    token = get("Stepgate-Token")
    if not callback or not token:
        return None
    return Invocation(
        callback=callback,
        token=token,
        run_id=get("Stepgate-Run-Id") or "",
        attempt=_count(get("Stepgate-Attempt")) or 1,
        recorded_count=_count(get("Stepgate-Steps")),
    )
