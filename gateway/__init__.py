"""Stepgate: a sidecar gateway that turns any HTTP endpoint into a durable endpoint."""

from gateway.errors import GatewayError, StoreError

__all__ = ["GatewayError", "StoreError", "__version__"]

__version__ = "0.1.0"
