"""Errors raised by the gateway.

    GatewayError
    ├── ConfigError      (gateway.config) bad configuration: file, key path, message
    └── StoreError       the run store failed or refused a write
        └── DuplicateIdempotencyKey (gateway.store)

HTTP errors the gateway produces for clients are answered as application/problem+json
(gateway.problem) and never raised across module boundaries.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Root of every error the gateway raises on purpose."""


class StoreError(GatewayError):
    """The run store could not do what was asked."""
