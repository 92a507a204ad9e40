"""Stepgate's handler SDK: durable steps for handlers behind the Stepgate gateway.

    from stepgate import step, NonRetriableError
    import stepgate.aiohttp            # or stepgate.asgi, stepgate.wsgi

    app = web.Application(middlewares=[stepgate.aiohttp.middleware])

    async def process(request):
        user = await step.run("load-user", load_user, request.query["id"])
        await step.sleep("cool-off", timedelta(minutes=5))
        ...

Blocking code uses `from stepgate.sync import step`. The core needs only the standard library;
each adapter imports only its own framework. The error tree is in `stepgate.errors`.
"""

from stepgate._protocol import Backoff
from stepgate._signal import Signal, SyncSignal
from stepgate._step import Step, step
from stepgate.errors import (
    CallbackError,
    GatewayUnavailableError,
    NonRetriableError,
    ReplayMismatchError,
    StepFailed,
    StepgateError,
    StepOutputError,
    StepTimeoutError,
    Superseded,
    Suspend,
)

__all__ = [
    "Backoff",
    "CallbackError",
    "GatewayUnavailableError",
    "NonRetriableError",
    "ReplayMismatchError",
    "Signal",
    "Step",
    "StepFailed",
    "StepOutputError",
    "StepTimeoutError",
    "StepgateError",
    "Superseded",
    "Suspend",
    "SyncSignal",
    "step",
]

__version__ = "0.1.0"
