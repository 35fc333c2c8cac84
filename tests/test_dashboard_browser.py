"""The dashboard in a real browser: Playwright driving Debian's chromium, headless.

`.ci/run` installs chromium (`apt-get install -y chromium`); where it cannot be installed
these tests skip, saying so. Screenshots of each page are saved under the test's tmp dir
(the path is printed)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from fleetlog.services.dashboard import Dashboard
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .dashboard_helpers import dashboard_of

CHROMIUM = "/usr/bin/chromium"
# This machine's network is closed, and the browser must not try to reach anything.
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not os.access(CHROMIUM, os.X_OK),
                                reason=f"no chromium at {CHROMIUM} (.ci/run installs it: apt-get install -y chromium)")

if os.access(CHROMIUM, os.X_OK):
    from playwright.async_api import Browser, Page, async_playwright


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as pw:
        b = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        try:
            yield b
        finally:
            await b.close()


async def _shot(page: Page, tmp_path: Path, name: str) -> None:
    path = tmp_path / f"dashboard-{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 0
    print(f"screenshot: {path}")


async def _open_live(browser: Browser, dash: Dashboard) -> Page:
    page = await browser.new_page(viewport={"width": 1400, "height": 900})
    await page.goto(dash.url + "/")
    await page.wait_for_selector("body[data-live='1']", timeout=30_000)  # subscribed: facts from now on show
    return page


async def test_fleet_page_goes_live_new_attempts_appear_and_a_diff_highlights_its_field(
        server: Server, fleet: Fleet, browser: Browser, tmp_path: Path) -> None:
    fleet.attempts.record(agent="alpha", action="probe", outcome="success", elapsed_s=1.0)
    await fleet.snapshots.take("alpha", {"load1": 0.5, "context_percent": 12}, host="h1")
    token = await fleet.flush()
    await fleet.snapshots.all_latest(limit=1, min_seq=token)
    await fleet.attempts.query(limit=1, min_seq=token)
    async with dashboard_of(server) as dash:
        page = await _open_live(browser, dash)
        alpha = page.locator("tr[data-agent='alpha']")
        assert await alpha.locator("td.action").inner_text() == "probe"
        assert await page.locator("tr[data-agent='newbie']").count() == 0

        fleet.attempts.record(agent="newbie", action="deploy", outcome="failure", elapsed_s=3.0)
        newbie = page.locator("tr[data-agent='newbie'] td.outcome")
        await newbie.filter(has_text="failure").wait_for(timeout=30_000)  # published after load, shown live
        fleet.attempts.record(agent="alpha", action="build", outcome="success", elapsed_s=2.0)
        await alpha.locator("td.action", has_text="build").wait_for(timeout=30_000)

        assert await alpha.locator("td.changed").count() == 0
        await fleet.snapshots.take("alpha", {"load1": 4.75, "context_percent": 12}, host="h1")
        await alpha.locator("td.changed[data-field='load1']").wait_for(timeout=30_000)
        assert await alpha.locator("td[data-field='load1']").inner_text() == "4.75"
        assert await alpha.locator("td.changed").count() == 1  # context_percent did not change
        await _shot(page, tmp_path, "fleet")


async def test_attempts_filter_narrows_the_table_and_a_row_opens_its_panes(
        server: Server, fleet: Fleet, browser: Browser, tmp_path: Path) -> None:
    for i in range(12):
        fleet.attempts.record(agent="a" if i % 4 else "b", action="probe", outcome="success" if i % 3 else "failure",
                              elapsed_s=0.1 * i, pane_after=f"screen {i}")
    token = await fleet.flush()
    await fleet.attempts.query(limit=1, min_seq=token)
    async with dashboard_of(server) as dash:
        page = await browser.new_page(viewport={"width": 1400, "height": 900})
        await page.goto(dash.url + "/attempts")
        rows = page.locator("#attempts tr.row")
        assert await rows.count() == 12
        assert await page.locator("#chart rect").count() >= 1
        await page.fill("input[name=agent]", "b")
        await page.click("form.filters button")
        await page.wait_for_url("**/attempts?agent=b*")
        assert await rows.count() == 3
        assert set(await page.locator("#attempts td.agent").all_inner_texts()) == {"b"}
        pane = page.locator("#attempts tr.pane").first
        assert not await pane.is_visible()
        await rows.first.click()
        assert await pane.is_visible() and "screen 8" in await pane.inner_text()
        await _shot(page, tmp_path, "attempts")
        await page.goto(dash.url + "/system")
        await page.locator("#projections tr[data-projection='attempts']").wait_for()
        await _shot(page, tmp_path, "system")
