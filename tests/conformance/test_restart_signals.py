"""A signal and a child run across a SIGKILLed gateway, through both SDKs: the trip example
(Python and JavaScript, the services of test_conformance) behind a real gateway process.

The booking asks for an approval and for insurance (`?approval=30&insure=1`). While it is parked
on the approval link, the gateway is killed and started again on the same file: the link the
service "mailed" still works, the run wakes, starts its insurance child run on the restarted
gateway and completes, and no step ran twice.
"""

from __future__ import annotations

from pathlib import Path

import aiohttp

from tests.conformance.test_conformance import STEPS, Service, routes, service  # noqa: F401
from tests.conformance.test_restart import TRIP, counts, until
from tests.gateway.procs import GatewayProcess
from tests.gateway.test_crash import procs, wait_for_status  # noqa: F401 - fixtures


async def test_an_approval_link_and_a_child_run_outlive_a_killed_gateway(
    tmp_path: Path,
    service: Service,  # noqa: F811
    procs: list[GatewayProcess],  # noqa: F811
) -> None:
    gw = GatewayProcess(tmp_path, routes(service.url))
    procs.append(gw)
    await gw.start()
    async with aiohttp.ClientSession() as session:
        before = await counts(session, service)
        async with session.post(
            f"{gw.url}/trips?approval=30&insure=1", json=TRIP, headers={"Prefer": "respond-async"}
        ) as resp:
            assert resp.status == 202
            run_id, poll = resp.headers["Stepgate-Run-Id"], resp.headers["Location"]
        url = ""

        async def parked() -> bool:
            nonlocal url
            async with session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
                run = await resp.json()
            mailed = [s for s in run["steps"] if s["id"] == "mail-approver"]
            if run["status"] == "waiting" and mailed:
                url = mailed[0]["output"]["url"]
                return True
            return False

        await until(parked, "the run parked on its approval")
        gw.kill()
        await gw.start()
        async with session.post(gw.url + url, json={"approved": True}) as resp:
            assert resp.status == 202, await resp.text()
        run = await wait_for_status(gw.internal, run_id, "completed", timeout=30)
        async with session.get(gw.url + poll) as resp:
            answer = await resp.json()
        after = await counts(session, service)
    assert {name: after[name] - before[name] for name in STEPS} == {
        "reserve-flight": 1,
        "reserve-hotel": 1,
        "charge-card": 1,
        "send-confirmation": 1,
        "refund-flight": 0,
    }
    steps = {s["id"]: s for s in run["steps"]}
    assert answer["approval"] == {"url": url, "decision": {"approved": True}}
    assert answer["insurance"] == steps["insure"]["output"]
    assert steps["approval"]["url"] == url and steps["mail-approver"]["attempts"] == 1
    (child,) = run["children"]
    assert (child["route"], child["status"], child["step"]) == ("insurance", "completed", "insure")
