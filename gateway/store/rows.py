"""A run as a row of the `runs` table and back, the same for every dialect; with a store key,
the request and the recorded answer are sealed here (gateway.store.sealing)."""

from __future__ import annotations

import json
from typing import Any, Final, Protocol

from gateway.model import Headers, Run, RunHead, RunStatus, Step, StepKind, StepStatus
from gateway.store.sealing import SealBroken, Sealer, StoreKeyError

RUN_COLUMNS: Final = (
    "id, route, status, attempt, token, poll_token, method, target, headers, body, created_at, "
    "updated_at, failures, no_retry, wake_pending, idem_key, request_hash, trace_id, due_at, "
    "resp_status, resp_reason, resp_headers, resp_body, error, ended_at, sealed, slot_key, "
    "throttle_key, queued_at"
)
# A run's head (model.RunHead): what a step write reads of its run.
HEAD_COLUMNS: Final = "id, route, status, attempt, token"
HEAD_WIDTH: Final = HEAD_COLUMNS.count(",") + 1
STEP_COLUMNS: Final = (
    "run_id, step_id, seq, kind, status, output, error, attempts, wake_at, event, match, "
    "created_at, updated_at"
    # step policies (protocol v1.1)
    ", policy, final, failed_in"
)
STEP_WIDTH: Final = STEP_COLUMNS.count(",") + 1
# A run's new state: its request never changes, its answer is sealed anew (`?` placeholders,
# in the order of Rows.update).
UPDATE_RUN: Final = (
    "UPDATE runs SET status = ?, attempt = ?, failures = ?, no_retry = ?, "
    "wake_pending = ?, due_at = ?, resp_status = ?, resp_reason = ?, resp_headers = ?, "
    "resp_body = ?, error = ?, updated_at = ?, ended_at = ?, queued_at = ?, slot_key = ?, "
    "throttle_key = ?, "
    "sealed = (sealed & ?) | ? WHERE id = ?"
)
# An admin retry of an ended run gives its final steps their whole budget again (`?` placeholders:
# now, run id); their last error stays for the timeline.
RESTART_FINAL_STEPS: Final = (
    "UPDATE steps SET final = 0, attempts = 0, updated_at = ? WHERE run_id = ? AND final = 1"
)

# Bits of runs.sealed: the request (target, headers, body, request_hash), the recorded answer
# (resp_headers, resp_body).
SEALED_REQUEST: Final = 1
SEALED_ANSWER: Final = 2


class Row(Protocol):
    """A fetched row as either driver gives it: values by position."""

    def __getitem__(self, index: int, /) -> Any: ...


def head_from_row(row: Row) -> RunHead:
    return RunHead(row[0], row[1], RunStatus(row[2]), row[3], row[4])


def headers_from(text: str | None) -> Headers | None:
    return None if text is None else [(name, value) for name, value in json.loads(text)]


def dump_headers(headers: Headers | None) -> str | None:
    return None if headers is None else json.dumps(headers, separators=(",", ":"))


def step_from_row(row: Row) -> Step:
    return Step(
        row[0],
        row[1],
        row[2],
        StepKind(row[3]),
        StepStatus(row[4]),
        row[5],
        row[6],
        row[7],
        row[8],
        row[9],
        row[10],
        row[11],
        row[12],
        row[13],
        bool(row[14]),
        row[15],
    )


def step_values(step: Step) -> tuple[Any, ...]:
    """The values of STEP_COLUMNS."""
    return (
        step.run_id,
        step.id,
        step.seq,
        str(step.kind),
        str(step.status),
        step.output,
        step.error,
        step.attempts,
        step.wake_at,
        step.event,
        step.match,
        step.created_at,
        step.updated_at,
        step.policy,
        int(step.final),
        step.failed_in,
    )


class Rows:
    """A run as a row and back. With a store key, the request and the recorded answer are sealed
    and `sealed` says which of a row's values are, so runs stored before the key was set stay
    readable until they are purged.

    `binary_text`: the dialect keeps the sealable text columns as bytes (PostgreSQL's `bytea`,
    since a column there has one type); SQLite keeps plain text as text and sealed as blob."""

    def __init__(self, sealer: Sealer | None, *, binary_text: bool = False) -> None:
        self.sealer = sealer
        self.binary_text = binary_text

    def run(self, row: Row) -> Run:
        """The run of a row. A sealed value that does not open reads as empty and is named in
        `Run.unreadable`, so one changed row cannot stop a listing or a start."""
        run_id, sealed = row[0], row[25]
        request, answer = bool(sealed & SEALED_REQUEST), bool(sealed & SEALED_ANSWER)
        broken: list[str] = []

        def text(column: str, value: Any, is_sealed: bool) -> Any:
            try:
                return self._text(run_id, column, value, is_sealed)
            except SealBroken:
                broken.append(column)
                return None

        def blob(column: str, value: Any, is_sealed: bool) -> bytes | None:
            try:
                return self._blob(run_id, column, value, is_sealed)
            except SealBroken:
                broken.append(column)
                return None

        target = text("target", row[7], request)
        headers = headers_from(text("headers", row[8], request)) or []
        body = blob("body", row[9], request) or b""
        request_hash = text("request_hash", row[16], request)
        resp_headers = headers_from(text("resp_headers", row[21], answer))
        resp_body = blob("resp_body", row[22], answer)
        return Run(
            id=run_id,
            route=row[1],
            status=RunStatus(row[2]),
            attempt=row[3],
            token=row[4],
            poll_token=row[5],
            method=row[6],
            target=target or "",
            headers=headers,
            body=body,
            created_at=row[10],
            updated_at=row[11],
            failures=row[12],
            no_retry=bool(row[13]),
            wake_pending=bool(row[14]),
            idem_key=row[15],
            request_hash=request_hash,
            trace_id=row[17],
            due_at=row[18],
            resp_status=row[19],
            resp_reason=row[20],
            resp_headers=resp_headers,
            resp_body=resp_body,
            error=row[23],
            ended_at=row[24],
            slot_key=row[26],
            throttle_key=row[27],
            queued_at=row[28],
            unreadable=tuple(broken),
        )

    def insert(self, run: Run) -> tuple[Any, ...]:
        """The values of RUN_COLUMNS for a new row."""
        return (
            run.id,
            run.route,
            str(run.status),
            run.attempt,
            run.token,
            run.poll_token,
            run.method,
            self._seal_text(run.id, "target", run.target),
            self._seal_text(run.id, "headers", dump_headers(run.headers)),
            self._seal_blob(run.id, "body", run.body),
            run.created_at,
            run.updated_at,
            run.failures,
            int(run.no_retry),
            int(run.wake_pending),
            run.idem_key,
            # The body's hash too: a guess at a short body could be checked against it.
            self._seal_text(run.id, "request_hash", run.request_hash),
            run.trace_id,
            run.due_at,
            run.resp_status,
            run.resp_reason,
            self._seal_text(run.id, "resp_headers", dump_headers(run.resp_headers)),
            self._seal_blob(run.id, "resp_body", run.resp_body),
            run.error,
            run.ended_at,
            SEALED_REQUEST | SEALED_ANSWER if self.sealer else 0,
            run.slot_key,
            run.throttle_key,
            run.queued_at,
        )

    def update(self, run: Run) -> tuple[Any, ...]:
        """The values of UPDATE_RUN."""
        return (
            str(run.status),
            run.attempt,
            run.failures,
            int(run.no_retry),
            int(run.wake_pending),
            run.due_at,
            run.resp_status,
            run.resp_reason,
            self._seal_text(run.id, "resp_headers", dump_headers(run.resp_headers)),
            self._seal_blob(run.id, "resp_body", run.resp_body),
            run.error,
            run.updated_at,
            run.ended_at,
            run.queued_at,
            run.slot_key,
            run.throttle_key,
            SEALED_REQUEST,
            SEALED_ANSWER if self.sealer else 0,
            run.id,
        )

    def _seal_text(self, run_id: str, column: str, text: str | None) -> str | bytes | None:
        if text is None:
            return None
        if self.sealer is None:
            return text.encode("utf-8", "surrogateescape") if self.binary_text else text
        return self.sealer.seal(run_id, column, text.encode("utf-8", "surrogateescape"))

    def _seal_blob(self, run_id: str, column: str, blob: bytes | None) -> bytes | None:
        if blob is None or self.sealer is None:
            return blob
        return self.sealer.seal(run_id, column, blob)

    def _open(self, run_id: str, column: str, value: Any) -> bytes:
        if self.sealer is None:  # refused at open (check_key); only another process can do it
            raise StoreKeyError(f"run {run_id} is sealed with a store_key and none is set")
        return self.sealer.open(run_id, column, bytes(value))

    def _text(self, run_id: str, column: str, value: Any, sealed: bool) -> Any:
        if value is None:
            return None
        if sealed:
            return self._open(run_id, column, value).decode("utf-8", "surrogateescape")
        if isinstance(value, bytes | memoryview):
            return bytes(value).decode("utf-8", "surrogateescape")
        return value

    def _blob(self, run_id: str, column: str, value: Any, sealed: bool) -> bytes | None:
        if value is None:
            return None
        return self._open(run_id, column, value) if sealed else bytes(value)


# Flow control (gateway.flow), the same text for every dialect (`?` placeholders).
# The slots a flow's runs hold and the runs waiting for one, read under the flow's lock.
FLOW_COUNTS: Final = (
    "SELECT count(*) FILTER (WHERE status = 'running' OR due_at IS NOT NULL), "
    "count(*) FILTER (WHERE status = 'queued' AND due_at IS NULL) FROM runs "
    "WHERE route = ? AND slot_key = ? AND status IN ('running', 'queued')"
)
ANY_WAITING: Final = (
    "SELECT 1 FROM runs WHERE route = ? AND slot_key = ? AND status = 'queued' "
    "AND due_at IS NULL LIMIT 1"
)
QUEUED_ON_ROUTE: Final = "SELECT count(*) FROM runs WHERE route = ? AND status = 'queued'"
# The runs waiting longest for a slot of a flow.
OLDEST_WAITING: Final = (
    f"SELECT {RUN_COLUMNS} FROM runs WHERE route = ? AND slot_key = ? AND status = 'queued' "
    "AND due_at IS NULL ORDER BY queued_at, id LIMIT ?"
)
# The flows that have runs waiting for a slot (looked at after a start or a reload).
WAITING_FLOWS: Final = (
    "SELECT DISTINCT route, slot_key FROM runs WHERE status = 'queued' AND due_at IS NULL"
)
BUCKET_TAT: Final = "SELECT tat FROM flow_buckets WHERE name = ?"
SET_BUCKET_TAT: Final = (
    "INSERT INTO flow_buckets (name, tat) VALUES (?, ?) "
    "ON CONFLICT (name) DO UPDATE SET tat = excluded.tat"
)
