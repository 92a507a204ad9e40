"""The benchmark's durable handler written for Restate, the peer we compare against.

The same work as the upstream's /steps/{n}: n journaled steps of a trivial async
function, answering {"steps": n, "total": ...}. Served by hypercorn; the harness
registers it with restate-server's admin API and calls it through the ingress:

    hypercorn --bind 127.0.0.1:9080 restate_service:app      (cwd: bench/)
    POST http://127.0.0.1:9070/deployments {"uri": "http://127.0.0.1:9080"}
    POST http://127.0.0.1:8080/bench/steps  body: 3
"""

from __future__ import annotations

import restate

service = restate.Service("bench")


async def bump(i: int) -> int:
    # Async on purpose: the SDK runs a sync action in a thread pool, which would
    # charge Restate for a thread hop our handler does not pay.
    return i + 1


@service.handler("steps")
async def steps(ctx: restate.Context, n: int) -> dict[str, int]:
    total = 0
    for i in range(n):
        # run_typed is the SDK's current name for ctx.run (which it marks deprecated);
        # both journal the result before the handler continues.
        total += await ctx.run_typed(f"s{i}", bump, restate.RunOptions(), i)
    return {"steps": n, "total": total}


app = restate.app([service])
