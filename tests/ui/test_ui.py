"""The timeline page in a real headless Chromium, against a real gateway and upstream.

Needs Debian's `chromium` and `chromium-driver` packages and the `selenium` Python package; the
tests skip (never fail) when any of them is missing. The gateway runs in the test's event loop,
so every blocking browser call goes through `asyncio.to_thread` to keep the loop serving the
page's API calls. Screenshots land in test-artifacts/ at the repository root.
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import pytest
from aiohttp import web

from tests.conftest import ROOT, GatewayFactory, Running, UpstreamFactory
from tests.gateway.rawsteps import RawSteps, Suspend, raw_wait, suspended

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver
    from selenium.webdriver.remote.webelement import WebElement

ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
WAIT = 15.0  # seconds for the page to show something; well inside the test timeout
FAST_RETRY = {"attempts": 3, "initial": "300ms", "max": "300ms"}

T = TypeVar("T")


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebDriver]:
    selenium = pytest.importorskip(
        "selenium", reason="the selenium package is not installed (pip install selenium)"
    )
    del selenium
    for binary, package in ((CHROMIUM, "chromium"), (CHROMEDRIVER, "chromium-driver")):
        if not Path(binary).is_file():
            pytest.skip(f"{binary} not found: apt-get install -y {package}")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        f"--user-data-dir={tmp_path_factory.mktemp('chromium')}",
        "--window-size=1360,1000",
        "--lang=en-GB",
    ):
        options.add_argument(flag)
    # An explicit driver path keeps Selenium Manager from trying to download one.
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


async def blocking(fn: Callable[..., T], *args: Any) -> T:
    return await asyncio.to_thread(fn, *args)


def wait_for(driver: WebDriver, condition: Callable[[WebDriver], T], what: str) -> T:
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, WAIT, poll_frequency=0.05).until(condition, what)
    except Exception:
        screenshot(driver, "ui-failure.png")
        raise


def find(driver: WebDriver, css: str) -> list[WebElement]:
    from selenium.webdriver.common.by import By

    return driver.find_elements(By.CSS_SELECTOR, css)


def screenshot(driver: WebDriver, name: str) -> Path:
    """Save the whole page, not just the window, through the DevTools protocol."""
    import base64

    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / name
    size = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})["cssContentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    path.write_bytes(base64.b64decode(shot["data"]))
    return path


def checkout() -> web.Application:
    """`charge` fails on the first invocation of each run (a 503, so the gateway retries);
    `?broken=1` records a non-retriable step failure and answers a 500 that ends the run."""
    charged: dict[str, int] = {}

    async def handle(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        if request.query.get("broken"):
            error = {"message": "bad card number", "type": "ValueError", "retriable": False}
            await steps.put("validate", {"error": error})
            return web.Response(
                status=500, text="broken for good", headers={"Stepgate-No-Retry": "true"}
            )
        run_id = steps.run_id or ""

        async def reserve() -> str:
            return "seat-7"

        async def charge() -> dict[str, Any]:
            charged[run_id] = charged.get(run_id, 0) + 1
            if charged[run_id] == 1:
                raise RuntimeError("card declined")
            return {"amount": 42, "currency": "EUR", "lines": [f"line {n}" for n in range(30)]}

        async def notify() -> dict[str, str]:
            return {"sent": "<b>not markup</b>"}

        seat = await steps.run("reserve", reserve)
        try:
            paid = await steps.run("charge", charge)
        except RuntimeError:
            return web.Response(status=503, text="try later")
        await steps.run("notify", notify)
        return web.json_response({"seat": seat, "paid": paid["amount"]})

    app = web.Application()
    app.router.add_post("/checkout", handle)
    return app


async def start(gateway: GatewayFactory, upstream: UpstreamFactory, **extra: Any) -> Running:
    base = await upstream(checkout())
    route = {
        "name": "checkout",
        "path": "/checkout",
        "upstream": base,
        "durable": True,
        "retry": FAST_RETRY,
    }
    return await gateway([route], **extra)


async def test_retried_run_is_listed_and_drawn(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    from selenium.webdriver.support.ui import Select

    gw = await start(gateway, upstream)
    async with gw.session.post(gw.url + "/checkout", data=b"{}") as resp:
        assert resp.status == 200
        retried = resp.headers["Stepgate-Run-Id"]
    async with gw.session.post(gw.url + "/checkout?broken=1") as resp:
        assert resp.status == 500
        broken = resp.headers["Stepgate-Run-Id"]

    # The list: both runs with their status.
    await blocking(browser.get, gw.internal + "/ui")
    row = f'tr[data-run-id="{retried}"]'
    await blocking(wait_for, browser, lambda d: find(d, row), "the retried run is listed")
    assert await blocking(lambda: find(browser, row + " .badge")[0].text) == "completed"
    assert (
        await blocking(lambda: find(browser, f'tr[data-run-id="{broken}"] .badge')[0].text)
        == "failed"
    )
    await blocking(screenshot, browser, "ui-list.png")

    # Paging: one run per page, then "More" follows the cursor to the other one.
    await blocking(browser.get, gw.internal + "/ui#/runs?limit=1")
    await blocking(wait_for, browser, lambda d: find(d, "#more:not([hidden])"), "a next page")
    assert await blocking(
        lambda: [r.get_attribute("data-run-id") for r in find(browser, "tr.run-row")]
    ) == [broken]
    await blocking(lambda: find(browser, "#more")[0].click())
    await blocking(wait_for, browser, lambda d: len(find(d, "tr.run-row")) == 2, "the next page")
    assert await blocking(lambda: find(browser, "#more")[0].is_displayed()) is False
    await blocking(browser.get, gw.internal + "/ui#/runs")
    await blocking(wait_for, browser, lambda d: find(d, row), "the first page again")

    # The status filter goes through the admin API: only the failed run is left.
    def only_failed() -> None:
        Select(find(browser, "select[name=status]")[0]).select_by_value("failed")
        find(browser, "#filters button[type=submit]")[0].click()

    await blocking(only_failed)
    await blocking(wait_for, browser, lambda d: not find(d, row), "the filter hides the run")
    assert await blocking(lambda: len(find(browser, "tr.run-row"))) == 1
    assert "status=failed" in await blocking(lambda: browser.current_url)

    # Back to every run, then open the retried one from the list.
    def open_retried() -> None:
        find(browser, "#filters a")[0].click()  # "Clear"
        wait_for(browser, lambda d: find(d, row + " a"), "the run is listed again")
        find(browser, row + " a")[0].click()

    await blocking(open_retried)
    await blocking(wait_for, browser, lambda d: find(d, "#steps"), "the run view is drawn")
    assert await blocking(lambda: browser.current_url.endswith("#/runs/" + retried))

    def read_run() -> dict[str, Any]:
        return {
            "id": find(browser, "#run-id")[0].text,
            "status": browser.find_element("css selector", "[data-run-status]").get_attribute(
                "data-run-status"
            ),
            "attempts": [
                [td.text for td in r.find_elements("css selector", "td")]
                for r in find(browser, "tr.attempt-row")
            ],
            "steps": [
                [td.text for td in r.find_elements("css selector", "td")][:5]
                for r in find(browser, "tr.step-row")
            ],
            "timeline": [e.text for e in find(browser, "#timeline .tl-name")],
            "bars": [e.get_attribute("class") for e in find(browser, "#timeline .tl-bar")],
            "live": len(find(browser, ".live-dot")),
            "detail": [e.text for e in find(browser, "tr.step-row td.detail")],
        }

    seen = await blocking(read_run)
    assert seen["id"] == retried
    assert seen["status"] == "completed"
    assert seen["live"] == 0
    assert [a[0] for a in seen["attempts"]] == ["1", "2"]
    assert seen["attempts"][0][3:5] == ["response", "503"]
    assert seen["attempts"][1][3:5] == ["response", "200"]
    assert seen["steps"] == [
        ["0", "reserve", "run", "completed", "1"],
        ["1", "charge", "run", "completed", "2"],
        ["2", "notify", "run", "completed", "1"],
    ]
    assert seen["timeline"] == ["run", "attempt 1", "attempt 2", "reserve", "charge", "notify"]
    assert seen["bars"][1:3] == ["tl-bar bad", "tl-bar ok"]
    assert "retried" in seen["bars"][4]  # charge failed once before it completed
    assert '"amount": 42' in seen["detail"][1]
    assert "Show all" in seen["detail"][1]  # a long output is cut, with a way to see it all
    assert '"sent": "<b>not markup</b>"' in seen["detail"][2]  # shown as text, not parsed
    assert not await blocking(lambda: find(browser, "tr.step-row td.detail b"))

    path = await blocking(screenshot, browser, "ui-run.png")
    assert path.stat().st_size > 10_000

    # The failed run shows its failed step's error and the run's own error.
    await blocking(browser.get, f"{gw.internal}/ui#/runs/{broken}")
    await blocking(
        wait_for,
        browser,
        lambda d: find(d, 'tr[data-step-id="validate"]'),
        "the failed run is drawn",
    )
    failed = await blocking(read_run)
    assert failed["status"] == "failed"
    assert failed["steps"] == [["0", "validate", "run", "failed", "1"]]
    assert failed["detail"] == ["ValueError: bad card number (not retriable)"]
    assert failed["bars"] == ["tl-bar s-failed", "tl-bar bad", "tl-bar bad"]
    await blocking(screenshot, browser, "ui-failed.png")


def waiting_checkout() -> web.Application:
    async def handle(request: web.Request) -> web.Response:
        steps = RawSteps(request)
        try:
            event = await raw_wait(steps, "paid", "order.paid", {"data.order": 7}, "1m")
        except Suspend:
            return suspended()
        return web.json_response({"paid": event["data"]})

    app = web.Application()
    app.router.add_post("/checkout", handle)
    return app


async def test_live_run_refreshes_until_it_ends(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    base = await upstream(waiting_checkout())
    gw = await gateway(
        [{"name": "checkout", "path": "/checkout", "upstream": base, "durable": True}]
    )
    async with gw.session.post(gw.url + "/checkout", headers={"Prefer": "respond-async"}) as resp:
        assert resp.status == 202
        run_id = resp.headers["Stepgate-Run-Id"]
    for _ in range(200):
        async with gw.session.get(f"{gw.internal}/v1/runs/{run_id}") as resp:
            if (await resp.json())["status"] == "waiting":
                break
        await asyncio.sleep(0.02)

    await blocking(browser.get, f"{gw.internal}/ui#/runs/{run_id}")
    status = "[data-run-status]"

    def run_status(driver: WebDriver) -> str | None:
        found = find(driver, status)
        return found[0].get_attribute("data-run-status") if found else None

    await blocking(wait_for, browser, lambda d: run_status(d) == "waiting", "the run waits")
    assert await blocking(lambda: len(find(browser, ".live-dot"))) == 1
    detail = await blocking(lambda: find(browser, "tr.step-row td.detail")[0].text)
    assert "order.paid" in detail and '{"data.order":7}' in detail
    await blocking(screenshot, browser, "ui-live.png")

    # The event arrives while the page is open: the page must notice without a reload.
    async with gw.session.post(
        gw.internal + "/v1/events", json={"name": "order.paid", "data": {"order": 7}}
    ) as resp:
        assert resp.status == 202
        assert (await resp.json())["woke"] == 1
    await blocking(wait_for, browser, lambda d: run_status(d) == "completed", "the run ends")
    assert await blocking(lambda: len(find(browser, ".live-dot"))) == 0
    texts = await blocking(lambda: [e.text for e in find(browser, "#timeline .tl-name")])
    assert texts == ["run", "attempt 1", "attempt 2", "paid"]
    assert "order.paid" in await blocking(lambda: find(browser, "tr.step-row td.detail")[0].text)

    # Ended: no more polling. Count the page's requests to the run over two refresh periods.
    before = await blocking(
        browser.execute_script, "return performance.getEntriesByType('resource').length"
    )
    await asyncio.sleep(2.2)
    after = await blocking(
        browser.execute_script, "return performance.getEntriesByType('resource').length"
    )
    assert after == before


async def test_admin_token_is_asked_for_and_sent(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    gw = await start(gateway, upstream, admin_token="s3cret-token")
    async with gw.session.post(gw.url + "/checkout", data=b"{}") as resp:
        assert resp.status == 200
        run_id = resp.headers["Stepgate-Run-Id"]

    await blocking(browser.get, gw.internal + "/ui")
    await blocking(
        wait_for,
        browser,
        lambda d: find(d, "#token-form:not([hidden])"),
        "the page asks for the token",
    )
    notice = await blocking(lambda: find(browser, "#notice")[0].text)
    assert "admin token" in notice

    def enter(token: str) -> None:
        field = find(browser, "#token-input")[0]
        field.clear()
        field.send_keys(token)
        find(browser, "#token-form button[type=submit]")[0].click()

    await blocking(enter, "wrong")
    await blocking(
        wait_for,
        browser,
        lambda d: "refused" in find(d, "#notice")[0].text,
        "a wrong token is refused",
    )
    await blocking(enter, "s3cret-token")
    await blocking(
        wait_for,
        browser,
        lambda d: find(d, f'tr[data-run-id="{run_id}"]'),
        "the run is listed with the token",
    )
    assert await blocking(lambda: find(browser, "#notice")[0].is_displayed()) is False
    stored = await blocking(
        browser.execute_script, "return sessionStorage.getItem('stepgate.adminToken')"
    )
    assert stored == "s3cret-token"
    # The run view uses the same token.
    await blocking(browser.get, f"{gw.internal}/ui#/runs/{run_id}")
    await blocking(wait_for, browser, lambda d: find(d, "#steps"), "the run view is drawn")


async def test_queued_runs_are_listed_and_filtered(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    from selenium.webdriver.support.ui import Select

    release = asyncio.Event()

    async def busy(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response(text="done")

    app = web.Application()
    app.router.add_post("/report", busy)
    route = {
        "name": "report",
        "path": "/report",
        "upstream": await upstream(app),
        "durable": True,
        "concurrency": 1,
    }
    gw = await gateway([route])
    try:
        ids = []
        for _ in range(2):
            async with gw.session.post(
                gw.url + "/report", headers={"Prefer": "respond-async"}
            ) as resp:
                assert resp.status == 202
                ids.append(resp.headers["Stepgate-Run-Id"])
        running, queued = ids

        def only_queued() -> None:
            Select(find(browser, "select[name=status]")[0]).select_by_value("queued")
            find(browser, "#filters button[type=submit]")[0].click()

        await blocking(browser.get, gw.internal + "/ui")
        row = f'tr[data-run-id="{queued}"]'
        await blocking(wait_for, browser, lambda d: find(d, row), "the queued run is listed")
        assert await blocking(lambda: find(browser, row + " .badge")[0].text) == "queued"
        await blocking(only_queued)
        await blocking(
            wait_for, browser, lambda d: not find(d, f'tr[data-run-id="{running}"]'), "filtered"
        )
        assert await blocking(
            lambda: [r.get_attribute("data-run-id") for r in find(browser, "tr.run-row")]
        ) == [queued]
    finally:
        release.set()


async def test_a_final_failure_and_its_compensation_are_shown(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    from tests.gateway.test_step_policies import Hotel
    from tests.gateway.test_step_policies import route as trip_route

    hotel = Hotel(fails=10)
    gw = await gateway([trip_route(await upstream(hotel.app()))])
    async with gw.session.post(gw.url + "/trip") as resp:
        assert resp.status == 409
        run_id = resp.headers["Stepgate-Run-Id"]

    await blocking(browser.get, f"{gw.internal}/ui#/runs/{run_id}")
    await blocking(wait_for, browser, lambda d: find(d, "#steps"), "the run view is drawn")

    def rows() -> dict[str, list[str]]:
        return {
            r.get_attribute("data-step-id") or "": [
                td.text for td in r.find_elements("css selector", "td")
            ]
            for r in find(browser, "tr.step-row")
        }

    steps = await blocking(rows)
    assert list(steps) == ["flight", "hotel", "refund"]
    assert steps["hotel"][3] == "failed final"  # the status badge and the final one
    assert steps["hotel"][4] == "3 of 3"  # attempts out of the step's own policy
    assert "Failed for good" in steps["hotel"][7]
    assert "the hotel is down" in steps["hotel"][7]
    assert steps["refund"][3] == "completed"
    timeline = await blocking(lambda: find(browser, "#timeline")[0].text)
    assert "failed for good" in timeline
    await blocking(screenshot, browser, "ui-final-failure.png")


async def test_a_parent_and_its_child_run_link_to_each_other(
    browser: WebDriver, gateway: GatewayFactory, upstream: UpstreamFactory
) -> None:
    from tests.gateway.test_invoke import Trip, routes

    trip = Trip()
    gw = await gateway(routes(await upstream(trip.app())))
    async with gw.session.post(gw.url + "/trip", json={}) as resp:
        parent = resp.headers["Stepgate-Run-Id"]
        child = (await resp.json())["hotel"]["run"]

    await blocking(browser.get, f"{gw.internal}/ui#/runs/{parent}")
    await blocking(wait_for, browser, lambda d: find(d, "#child-runs a"), "the child's link")
    assert await blocking(lambda: find(browser, "#child-runs a")[0].text) == child
    step_link = 'tr[data-step-id="book-hotel"] .child-link a'
    assert await blocking(lambda: find(browser, step_link)[0].text) == child
    await blocking(screenshot, browser, "ui-parent.png")
    await blocking(lambda: find(browser, "#child-runs a")[0].click())
    await blocking(wait_for, browser, lambda d: find(d, "#parent-run a"), "the parent's link")
    assert await blocking(lambda: find(browser, "#run-id")[0].text) == child
    assert await blocking(lambda: find(browser, "#parent-run a")[0].text) == parent
    assert "book-hotel" in await blocking(lambda: find(browser, "#parent-run")[0].text)
