"""Bearer tokens on the internal listener: the run's token on callbacks, the admin token on
admin and event calls."""

from __future__ import annotations

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
    return hmac.compare_digest(given.encode(), expected.encode())
