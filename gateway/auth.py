"""Bearer tokens on the internal listener: the attempt's token on callbacks, the admin token on
admin and event calls.

A run has one secret, which never leaves the gateway. Each invocation is given a token derived
from it and from the attempt's number, `<attempt>.<mac>`, so a callback says which attempt it
comes from and no handler can speak for another attempt than its own (the fencing of
superseded attempts rests on that).
"""

from __future__ import annotations

import base64
import hashlib
import hmac

from aiohttp import web


def bearer_token(request: web.Request) -> str | None:
    """The token of `Authorization: Bearer <token>` (scheme case-insensitive), or None."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


def same_secret(given: str, expected: str) -> bool:
    """Compare in constant time, so a token can't be guessed byte by byte from timings."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def _mac(secret: str, attempt: int) -> str:
    digest = hmac.new(secret.encode(), str(attempt).encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:18]).decode()


def attempt_token(secret: str, attempt: int) -> str:
    """The token handed to invocation `attempt` of a run with this secret."""
    return f"{attempt}.{_mac(secret, attempt)}"


def token_attempt(token: str) -> int | None:
    """The attempt a token claims to be from (not yet verified), or None if it has no shape."""
    number, dot, mac = token.partition(".")
    if not dot or not mac or not number.isascii() or not number.isdigit() or len(number) > 9:
        return None
    return int(number)


def token_valid(secret: str, token: str, attempt: int) -> bool:
    return same_secret(token, attempt_token(secret, attempt))


def sent_event_id(secret: str, step_id: str) -> str:
    """The id of the event a run sends as step `step_id` (step.send_event): the same for every
    attempt, so a send repeated after a crash is the same event and is delivered once; derived
    from the run's secret, so no one else can take it first."""
    digest = hmac.new(secret.encode(), b"event\x00" + step_id.encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest[:16]).decode().rstrip("=")
