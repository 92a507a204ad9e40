"""A trip-booking service whose four steps are durable behind Stepgate.

    POST /trips  {"traveller", "flight", "hotel"}   books a trip:
                 reserve-flight and reserve-hotel (in parallel), charge-card, send-confirmation
                 reserve-hotel has a policy of its own: 2 retries, a back-off from 100 ms up to
                 400 ms, 10 s an attempt. When its attempts are spent the handler catches
                 StepFailed, refunds the flight (step refund-flight) and answers 409.
         ?fail=STEP          STEP raises once per run (the run is told by Stepgate-Run-Id)
         ?fail=STEP:N        STEP raises on its first N attempts in a run
         ?fail=STEP:always   STEP raises on every attempt
         ?fail=STEP:fatal    STEP raises NonRetriableError (422): the run ends at once
         ?hotel_timeout=SECONDS
                             reserve-hotel's time-out (default 10): a slower attempt is cut off
         ?announce=1         after the charge, send the event trip.booked (step.send_event,
                             sent once however often the run is replayed); the answer's
                             "announced" is its event id
         ?cooloff=SECONDS    a durable pause before the card is charged
         ?await=payment[:SECONDS]
                             before the charge, wait (default up to 3600 s) for the event
                             trip.paid whose data.trip is the run id; the answer's "payment"
                             is that event, or null when the wait timed out
         ?approval=SECONDS   the trip is over budget: before the charge a manager must approve
                             it through a link (a signal, valid SECONDS) that the step
                             mail-approver "mails" (prints); POST {"approved": true} to it.
                             Anything else, or no answer in time, declines the trip (403)
         ?insure=1           travel insurance from POST /insurance (a durable route of its own),
                             run as a child run of the booking: its answer is the booking's
                             "insurance"; ?insure=decline makes the insurer refuse (422), and the
                             booking goes on with {"declined": 422}
         ?latency=SECONDS    each reservation takes this long to succeed (a failing one fails at
                             once); the two run concurrently
         ?drift=1            from attempt 2 on, charge-card is called charge-card-v2, as if the
                             code changed under the run: the SDK refuses the replay (500, no retry)
         ?stall=STEP:SECONDS STEP takes SECONDS the first time it runs in a run (repeatable):
                             longer than the route's timeout, the gateway gives up on the attempt
                             and starts the next; the stalled handler's late step is refused
                             (the attempt is fenced) and it stops there
    POST /insurance  {"traveller", "flight", "decline"?}   a quote, as the step quote-insurance
    GET  /stats  how many times each step's function ran (refund-flight too): a retried run
                 re-runs only the failed step, so with ?fail=charge-card every count is 1
                 except charge-card's 2

TRIP_FAIL in the environment (e.g. TRIP_FAIL=charge-card,send-confirmation:always) adds
failures to every request.

Run: python examples/python/trip_service.py [--port 3000]      (127.0.0.1; PORT also works)
and put the gateway in front: stepgate serve --config config.example.yaml
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import uuid
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

try:
    import stepgate.aiohttp
except ImportError:  # run from a checkout without `pip install .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "client" / "python"))
    import stepgate.aiohttp
from stepgate import Backoff, NonRetriableError, StepFailed, step

STEPS = ("reserve-flight", "reserve-hotel", "charge-card", "send-confirmation", "refund-flight")
# The hotel's booking system is flaky: retry it quickly, on its own budget.
HOTEL_RETRIES = 2
HOTEL_BACKOFF = Backoff(initial=0.1, max=0.4)
TRIP_PRICE_CENTS = 42_000
FATAL_STATUS = 422  # ?fail=STEP:fatal

executions: Counter[str] = Counter(dict.fromkeys(STEPS, 0))  # behind GET /stats
failed_times: Counter[tuple[str, str]] = Counter()  # (run, step): failures so far, for ?fail
stalled_once: set[tuple[str, str]] = set()  # (run, step) pairs that already stalled, for ?stall

T = TypeVar("T")


async def create_trip(request: web.Request) -> web.Response:
    trip = await read_trip(request)
    failures = parse_failures(
        [
            *request.query.getall("fail", []),
            *filter(None, os.environ.get("TRIP_FAIL", "").split(",")),
        ]
    )
    cooloff = parse_cooloff(request.query.get("cooloff", "0"))
    payment_timeout = parse_await(request.query.get("await"))
    approval_timeout = parse_approval(request.query.get("approval"))
    insure = parse_insure(request.query.get("insure"))
    latency = parse_seconds("latency", request.query.get("latency", "0"), 60)
    drift = parse_drift(request.query.get("drift", "0"))
    stalls = parse_stalls(request.query.getall("stall", []))
    hotel_timeout = parse_seconds("hotel_timeout", request.query.get("hotel_timeout", "10"), 60)
    announce = parse_flag("announce", request.query.get("announce", "0"))
    # Outside the gateway there is no run: every request is its own.
    run = request.headers.get("Stepgate-Run-Id") or uuid.uuid4().hex
    attempt = int(request.headers.get("Stepgate-Attempt", "1"))
    # ?drift=1: from attempt 2 on the record no longer fits the code (see the docstring).
    drifted = "charge-card" if drift and attempt >= 2 else None

    def booking_step(
        name: str, work: Callable[[], T], *, takes: float = 0, **policy: Any
    ) -> Coroutine[Any, Any, T]:
        """A step that counts its executions, fails when ?fail asks, else takes `takes` s;
        `policy` is the step's own retries, backoff and timeout."""

        async def execute() -> T:
            executions[name] += 1
            mode = failures.get(name)
            if mode == "fatal":
                raise NonRetriableError(
                    f"{name} failed for good (fail={name}:fatal)", status=FATAL_STATUS
                )
            if mode == "always":
                raise RuntimeError(f"{name} failed (fail={name}:always)")
            if isinstance(mode, int) and failed_times[run, name] < mode:
                failed_times[run, name] += 1
                if mode == 1:
                    raise RuntimeError(f"{name} failed once for this run (fail={name})")
                raise RuntimeError(
                    f"{name} failed, {failed_times[run, name]} of {mode} (fail={name}:{mode})"
                )
            if takes:  # after the failures: a failing call fails fast, as they tend to
                await asyncio.sleep(takes)
            if name in stalls and (run, name) not in stalled_once:
                stalled_once.add((run, name))
                await asyncio.sleep(stalls[name])
            return work()

        return step.run(f"{name}-v2" if name == drifted else name, execute, **policy)

    # Random references are made inside the steps: a replay returns the recorded ones.
    outcomes: list[Any] = await asyncio.gather(
        booking_step(
            "reserve-flight",
            lambda: {"flight": trip["flight"], "reference": reference("FL")},
            takes=latency,
        ),
        booking_step(
            "reserve-hotel",
            lambda: {"hotel": trip["hotel"], "reference": reference("HT")},
            takes=latency,
            retries=HOTEL_RETRIES,
            backoff=HOTEL_BACKOFF,
            timeout=hotel_timeout,
        ),
        return_exceptions=True,  # the flight's outcome is needed to undo it
    )
    flight, hotel = outcomes
    if isinstance(hotel, StepFailed) and not isinstance(flight, BaseException):
        # No hotel however often it is tried: undo the flight, in a step of its own (recorded,
        # so a replay does not refund twice), and tell the client.
        refund = await booking_step(
            "refund-flight",
            lambda: {"flight": flight["reference"], "refund": reference("RF")},
        )
        return web.json_response(
            {
                "traveller": trip["traveller"],
                "error": f"no hotel: {hotel.error['message'] if hotel.error else hotel}",
                "refund": refund,
            },
            status=409,
        )
    for outcome in (flight, hotel):
        if isinstance(outcome, BaseException):
            raise outcome
    if cooloff:
        await step.sleep("cool-off", cooloff)  # durable: the run is parked, not this process
    extra: dict[str, Any] = {}
    if payment_timeout is not None:
        # Durable too: the run is parked until the event arrives or the wait times out.
        extra["payment"] = await step.wait_for_event(
            "payment", event="trip.paid", match={"data.trip": run}, timeout=payment_timeout
        )
    if approval_timeout is not None:
        extra["approval"] = await get_approval(trip, approval_timeout)
    if insure is not None:
        extra["insurance"] = await insure_trip(trip, decline=insure == "decline")
    charge = await booking_step(
        "charge-card",
        lambda: {
            "reference": reference("CH"),
            "amount_cents": TRIP_PRICE_CENTS,
            "traveller": trip["traveller"],
        },
    )
    if announce:
        # Sent once: a replay (after a failed confirmation, say) gets the recorded id back.
        extra["announced"] = await step.send_event(
            "trip.booked", {"trip": run, "traveller": trip["traveller"]}
        )
    confirmation = await booking_step(
        "send-confirmation",
        lambda: {
            "to": trip["traveller"],
            "text": f"Flight {flight['reference']}, hotel {hotel['reference']},"
            f" charge {charge['reference']}",
        },
    )
    return web.json_response(
        {
            "traveller": trip["traveller"],
            "flight": flight,
            "hotel": hotel,
            "charge": charge,
            "confirmation": confirmation,
            **extra,
        }
    )


async def get_approval(trip: dict[str, str], timeout: float) -> dict[str, Any]:
    """A manager's yes, through a single-use link: the run is parked until it is POSTed to."""
    approval = await step.signal("approval", timeout=timeout)
    await step.run("mail-approver", mail_approver, trip, approval.url)
    decision = await approval.wait()  # the POSTed JSON, or None after the time-out
    if not isinstance(decision, dict) or decision.get("approved") is not True:
        why = "no approval came in time" if decision is None else "the manager declined it"
        raise NonRetriableError(f"the trip was not approved: {why}", status=403)
    return {"url": approval.url, "decision": decision}


async def insure_trip(trip: dict[str, str], *, decline: bool) -> dict[str, Any]:
    """A quote from the insurance route, as a child run: started once, however often this run
    is replayed, and this run is parked until it has answered."""
    body = {"traveller": trip["traveller"], "flight": trip["flight"], "decline": decline}
    try:
        quote: dict[str, Any] = await step.invoke("insure", route="insurance", body=body)
    except StepFailed as failed:  # the child run ended failed: book without insurance
        return {"declined": failed.status}
    return quote


async def insurance(request: web.Request) -> web.Response:
    """The insurer: a durable route of its own, here invoked by the booking."""
    body = await request.json()

    def quote() -> dict[str, Any]:
        if body.get("decline"):
            raise NonRetriableError(f"no cover for {body['traveller']}", status=422)
        return {"policy": reference("IN"), "flight": body["flight"], "premium_cents": 1_900}

    return web.json_response(await step.run("quote-insurance", quote))


def mail_approver(trip: dict[str, str], url: str) -> dict[str, str]:
    # A real service would send a mail; this one prints the link for the README's walk-through.
    print(f"approval needed for {trip['traveller']}'s trip: POST {url}", flush=True)
    return {"to": "manager@example.com", "url": url}


async def stats(request: web.Request) -> web.Response:
    return web.json_response(executions)


async def read_trip(request: web.Request) -> dict[str, str]:
    # Bad input stays bad however often it is retried: NonRetriableError ends the run at once.
    try:
        body = await request.json()
    except ValueError:
        raise NonRetriableError("the body must be JSON", status=400) from None
    for field in ("traveller", "flight", "hotel"):
        if not isinstance(body, dict) or not isinstance(body.get(field), str) or not body[field]:
            raise NonRetriableError(f'"{field}" must be a non-empty string', status=400)
    return {field: body[field] for field in ("traveller", "flight", "hotel")}


def parse_failures(values: list[str]) -> dict[str, str | int]:
    """?fail=STEP[:once|:N|:always|:fatal]: how each step fails ("once" is 1)."""
    failures: dict[str, str | int] = {}
    for value in values:
        name, _, mode = value.strip().partition(":")
        count = int(mode) if mode.isascii() and mode.isdigit() and len(mode) < 4 else None
        if name not in STEPS or (mode not in ("", "once", "always", "fatal") and count is None):
            raise NonRetriableError(
                f"fail={value}: expected STEP, STEP:N, STEP:always or STEP:fatal,"
                " STEP one of " + ", ".join(STEPS),
                status=400,
            )
        failures[name] = count if count is not None else 1 if mode in ("", "once") else mode
    return failures


def parse_flag(knob: str, value: str) -> bool:
    if value not in ("0", "1"):
        raise NonRetriableError(f"{knob}={value}: expected 0 or 1", status=400)
    return value == "1"


def parse_cooloff(value: str) -> float:
    return parse_seconds("cooloff", value, 3600)


def parse_seconds(knob: str, value: str, most: float) -> float:
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= most:
        raise NonRetriableError(f"{knob}={value}: expected seconds from 0 to {most:g}", status=400)
    return seconds


def parse_await(value: str | None) -> float | None:
    """?await=payment[:SECONDS]: how long to wait for the payment event; None: no wait."""
    if value is None:
        return None
    what, colon, timeout = value.partition(":")
    seconds = parse_seconds("await", timeout, 86_400) if colon else 3600.0
    if what != "payment" or seconds == 0:
        raise NonRetriableError(f"await={value}: expected payment or payment:SECONDS", status=400)
    return seconds


def parse_approval(value: str | None) -> float | None:
    """?approval=SECONDS: how long the approval link stays valid; None: no approval needed."""
    if value is None:
        return None
    seconds = parse_seconds("approval", value, 86_400)
    if seconds == 0:
        raise NonRetriableError(f"approval={value}: expected seconds above 0", status=400)
    return seconds


def parse_insure(value: str | None) -> str | None:
    if value not in (None, "1", "decline"):
        raise NonRetriableError(f"insure={value}: expected 1 or decline", status=400)
    return value


def parse_drift(value: str) -> bool:
    return parse_flag("drift", value)


def parse_stalls(values: list[str]) -> dict[str, float]:
    """?stall=STEP:SECONDS, repeatable: which steps stall on their first run, for how long."""
    stalls: dict[str, float] = {}
    for value in values:
        name, colon, seconds = value.partition(":")
        if name not in STEPS or not colon:
            raise NonRetriableError(
                f"stall={value}: expected STEP:SECONDS, STEP one of " + ", ".join(STEPS), status=400
            )
        stalls[name] = parse_seconds("stall", seconds, 60)
    return stalls


def reference(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4).upper()}"


def make_app() -> web.Application:
    app = web.Application(middlewares=[stepgate.aiohttp.middleware])
    app.router.add_post("/trips", create_trip)
    app.router.add_post("/insurance", insurance)
    app.router.add_get("/stats", stats)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The Stepgate trip-booking example service.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "3000")))
    args = parser.parse_args()
    web.run_app(make_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
