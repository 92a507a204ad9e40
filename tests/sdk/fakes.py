"""A fake gateway behind the SDK's one seam, the transport.

`FakeGateway.handle` answers callbacks the way the gateway's callback API does (201 for a new
output, 200 with the first output after that, failed attempts counted, sleeps due or not,
waits matched by a delivered event), in memory, and records every call. The same handler also
serves the real transports from an aiohttp server in the transport tests. `fence_at` plays the
gateway giving up on the attempt (protocol v1.1): from that call on, every callback is refused
with the 409 "superseded" problem and changes nothing.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any
from urllib.parse import unquote

from stepgate._context import Invocation, current
from stepgate._transport import Reply

RUN_ID = "run-1"
TOKEN = "secret-token"
CALLBACK = f"http://gateway.test/v1/runs/{RUN_ID}"
SUPERSEDED = "https://stepgate.dev/problems/superseded"


def _json(status: int, value: Any) -> Reply:
    return Reply(status, json.dumps(value).encode())


def _problem(status: int, detail: str) -> Reply:
    return _json(
        status, {"type": "about:blank", "title": "error", "status": status, "detail": detail}
    )


def superseded_reply(
    attempt: int = 1, current_attempt: int = 2, run_status: str = "running"
) -> Reply:
    return _json(
        409,
        {
            "type": SUPERSEDED,
            "title": "Attempt superseded",
            "status": 409,
            "detail": f"attempt {attempt} was superseded by {current_attempt}",
            "run_id": RUN_ID,
            "attempt": attempt,
            "current_attempt": current_attempt,
            "run_status": run_status,
        },
    )


class FakeGateway:
    def __init__(self) -> None:
        self.steps: dict[str, dict[str, Any]] = {}
        self.calls: list[tuple[str, str | None, Any]] = []  # (method, step id, body)
        self.log: list[str] = []  # calls and step executions, interleaved, for ordering
        self.events: dict[str, dict[str, Any] | None] = {}  # event name -> delivered event
        self.fail_next: Reply | None = None
        # "GET steps" or "PUT <step id>": the call at which the gateway gives up on the attempt
        self.fence_at: str | None = None
        self.fenced = False

    # --- set-up helpers ---------------------------------------------------------------------

    def record(
        self,
        step_id: str,
        seq: int,
        *,
        kind: str = "run",
        status: str = "completed",
        output: Any = None,
        attempts: int = 1,
    ) -> None:
        self.steps[step_id] = {
            "id": step_id,
            "seq": seq,
            "kind": kind,
            "status": status,
            "output": output,
            "attempts": attempts,
        }

    def invocation(
        self, *, steps: int | None = None, transport: Any = None, sync_transport: Any = None
    ) -> Invocation:
        """An invocation as the adapters build it; `steps` defaults to what is recorded."""
        return Invocation(
            callback=CALLBACK,
            token=TOKEN,
            run_id=RUN_ID,
            recorded_count=len(self.steps) if steps is None else steps,
            transport=transport or FakeAsyncTransport(self),
            sync_transport=sync_transport or FakeSyncTransport(self),
        )

    def headers(self, *, steps: int | None = None) -> dict[str, str]:
        return {
            "Stepgate-Callback": CALLBACK,
            "Stepgate-Token": TOKEN,
            "Stepgate-Run-Id": RUN_ID,
            "Stepgate-Attempt": "1",
            "Stepgate-Steps": str(len(self.steps) if steps is None else steps),
        }

    def puts(self) -> list[tuple[str, Any]]:
        return [(step_id or "", body) for method, step_id, body in self.calls if method == "PUT"]

    # --- the callback API -------------------------------------------------------------------

    def handle(
        self, method: str, path: str, authorization: str | None, body: bytes | None
    ) -> Reply:
        prefix = f"/v1/runs/{RUN_ID}/steps"
        step_id = unquote(path[len(prefix) + 1 :]) if path.startswith(prefix + "/") else None
        data = json.loads(body) if body else None
        self.calls.append((method, step_id, data))
        self.log.append(f"{method} {step_id or 'steps'}")
        if self.fence_at == f"{method} {step_id or 'steps'}":
            self.fenced = True
        if self.fenced:
            return superseded_reply()
        if self.fail_next is not None:
            reply, self.fail_next = self.fail_next, None
            return reply
        if authorization != f"Bearer {TOKEN}":
            return _problem(401, "wrong token")
        if not path.startswith(prefix):
            return _problem(404, "no such run")
        if method == "GET" and step_id is None:
            ordered = sorted(self.steps.values(), key=lambda s: s["seq"])
            return _json(200, {"steps": ordered})
        if method != "PUT" or step_id is None or not isinstance(data, dict):
            return _problem(400, "malformed")
        return self._put(step_id, data)

    def _put(self, step_id: str, data: dict[str, Any]) -> Reply:
        known = self.steps.get(step_id)
        seq = data.get("seq", known["seq"] if known else len(self.steps))
        if known is not None and known["status"] == "completed":
            return _json(200, {"status": "completed", "output": known["output"]})
        if "output" in data:
            self.record(step_id, seq, output=data["output"])
            return _json(201, {"status": "completed", "output": data["output"]})
        if "error" in data:
            attempts = (known["attempts"] if known else 0) + 1
            self.record(step_id, seq, status="failed", attempts=attempts)
            self.steps[step_id]["error"] = data["error"]
            return _json(200, {"status": "failed", "attempts": attempts})
        if "sleep" in data:
            until = datetime.fromisoformat(data["sleep"]["until"])
            status = "completed" if until <= datetime.now(UTC) else "sleeping"
            self.record(step_id, seq, kind="sleep", status=status)
            return _json(200, {"status": status})
        if "wait" in data:
            name = data["wait"]["event"]
            if name in self.events:
                self.record(step_id, seq, kind="wait", output=self.events[name])
                return _json(200, {"status": "completed", "output": self.events[name]})
            self.record(step_id, seq, kind="wait", status="waiting")
            return _json(200, {"status": "waiting"})
        return _problem(400, "malformed")


def _split(url: str) -> str:
    assert url.startswith("http://gateway.test/"), url
    return url[len("http://gateway.test") :]


class FakeAsyncTransport:
    def __init__(self, gateway: FakeGateway) -> None:
        self.gateway = gateway

    async def request(self, method: str, url: str, token: str, body: bytes | None = None) -> Reply:
        return self.gateway.handle(method, _split(url), f"Bearer {token}", body)


class FakeSyncTransport:
    def __init__(self, gateway: FakeGateway) -> None:
        self.gateway = gateway

    def request(self, method: str, url: str, token: str, body: bytes | None = None) -> Reply:
        return self.gateway.handle(method, _split(url), f"Bearer {token}", body)


@contextmanager
def active(inv: Invocation | None) -> Iterator[Invocation | None]:
    """Run the block as the adapters run a handler: with `inv` as the current invocation."""
    token = current.set(inv)
    try:
        yield inv
    finally:
        current.reset(token)
