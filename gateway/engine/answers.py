"""What the client gets for a run: its recorded final response, a 303 to the poll URL, a 202
for `Prefer: respond-async`, or the pending body of a poll."""

from __future__ import annotations

import math
import time
from typing import Final

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter

from gateway.model import Run, RunStatus
from gateway.problem import problem
from gateway.proxy import RelayedResponse

POLL_PREFIX: Final = "/_stepgate/runs/"


def poll_location(run: Run) -> str:
    return f"{POLL_PREFIX}{run.id}?token={run.poll_token}"


def retry_after_seconds(run: Run, now: float) -> int:
    if run.due_at is not None and run.due_at > now:
        return max(1, min(86_400, math.ceil(run.due_at - now)))
    return 1


def pending_body(run: Run, *, with_attempt: bool = False) -> dict[str, object]:
    body: dict[str, object] = {
        "run_id": run.id,
        "status": str(run.status),
        "poll_url": poll_location(run),
    }
    if with_attempt:
        body["attempt"] = run.attempt
    return body


def redirect(run: Run) -> web.Response:
    """303 to the poll URL: the run goes on without the client."""
    return web.json_response(
        pending_body(run),
        status=303,
        headers={
            "Location": poll_location(run),
            "Retry-After": str(retry_after_seconds(run, time.time())),
            "Stepgate-Run-Id": run.id,
        },
    )


def accepted(run: Run) -> web.Response:
    """202 for `Prefer: respond-async` (RFC 7240)."""
    return web.json_response(
        pending_body(run),
        status=202,
        headers={
            "Location": poll_location(run),
            "Retry-After": str(retry_after_seconds(run, time.time())),
            "Preference-Applied": "respond-async",
            "Stepgate-Run-Id": run.id,
        },
    )


def final_response(run: Run) -> web.StreamResponse:
    """What the client (or a poll) gets for a run that has ended."""
    extra = {"Stepgate-Run-Id": run.id}
    if run.status == RunStatus.CANCELLED:
        return problem(409, detail="the run was cancelled", headers=extra, run_id=run.id)
    if run.answer_unreadable:
        return problem(
            500,
            detail="the recorded answer does not open with the store_key (it was "
            "changed, or sealed with another key)",
            headers=extra,
            run_id=run.id,
        )
    if run.resp_status is None:
        return problem(
            502,
            detail=run.error or "no response was received from the upstream",
            headers=extra,
            run_id=run.id,
        )
    return RecordedResponse(run)


class RecordedResponse(RelayedResponse):
    """A recorded upstream response, replayed byte for byte, head and body in one write: the
    status with its reason phrase and the header names as the service sent them.

    Not a web.Response: that would invent a Content-Type for a body the upstream sent
    without one."""

    def __init__(self, run: Run) -> None:
        assert run.resp_status is not None
        super().__init__(status=run.resp_status, reason=run.resp_reason or None)
        for name, value in run.resp_headers or ():
            self.headers.add(name, value)
        self.headers["Stepgate-Run-Id"] = run.id
        self._recorded_body = run.resp_body or b""
        if "Content-Length" not in self.headers:  # a HEAD answer keeps the service's own
            self.content_length = len(self._recorded_body)

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        if request.method != "HEAD":
            # A run recorded from a HEAD kept the service's Content-Length; a GET poll of it
            # sends what was recorded, no body, and must say so.
            self.content_length = len(self._recorded_body)
        writer = await super().prepare(request)
        await self.write_eof(b"" if request.method == "HEAD" else self._recorded_body)
        return writer
