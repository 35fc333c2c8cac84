"""Dashboard (issue 18): time to first paint of the Fleet page with 1,000 agents and N
attempts (default 1,000,000) in the view, the query cost of its refresh, and the fold rate
with the dashboard open and live compared with it off, in the same run.

1. load: N attempts over 1,000 agents (20 actions, 5 outcomes, --pane-bytes panes) by the
   bare acked publisher of bench/_common.py, one snapshot per agent; a `Server` in this
   process folds them, and its dashboard (services/dashboard/, as `up` starts it) listens
   on a free loopback port.
2. refresh: the Fleet page's reads timed --repeat times: the per-agent `fleetlog.sql` over
   the whole view (what the dashboard's kept rows cost to load once, and every
   FULL_EVERY_S; the earlier per-agent query beside it, same run, its rows asserted equal),
   the incremental refresh after --touch new attempts (what a page load waits for, at most
   WAIT_S), every agent's latest snapshot.
3. paint: headless chromium (Playwright, Debian's /usr/bin/chromium) opens the page; the
   browser's own first-contentful-paint and the time until the page is live (EventSource
   subscribed).
4. fold with it off, then on: --more attempts published and folded with no page open, then
   --more again with the Fleet page open and live (every attempt also goes to the page).

    python bench/bench_dashboard.py [--n 1000000] [--more 200000] [--pane-bytes 256]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import AttemptFactory, CpuMonitor, broker, emit_json, raw_publish_attempts, settings_for, table
from fleetlog.services.node.server import Server, start_dashboard

from fleetlog import Fleet

AGENTS = 1000
# The query the Fleet page ran on every load before the dashboard kept its rows (two windows
# over every attempt): measured beside the kept rows' full load, same run, same view.
WINDOW_SQL = """
WITH r AS (
  SELECT agent, action, outcome, ts, elapsed_s,
         row_number() OVER (PARTITION BY agent ORDER BY ts_utc DESC, seq DESC) AS newest,
         row_number() OVER (PARTITION BY agent, action ORDER BY ts_utc DESC, seq DESC) AS nth
  FROM attempts
), per_action AS (
  SELECT agent, action,
         list_sort(list(elapsed_s))[CAST(greatest(0, floor(0.95 * (count(*) - 1))) AS BIGINT) + 1] AS p95,
         max(CASE WHEN newest = 1 THEN outcome END) AS last_outcome,
         max(CASE WHEN newest = 1 THEN ts END) AS last_ts
  FROM r WHERE nth <= 100 GROUP BY agent, action
)
SELECT agent,
       string_agg(action || ' ' || printf('%.2f', p95) || 's', ' · ' ORDER BY action) AS p95,
       max(CASE WHEN last_ts IS NOT NULL THEN action END) AS last_action,
       max(last_outcome) AS last_outcome, max(last_ts) AS last_ts
FROM per_action GROUP BY agent ORDER BY agent"""
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


class ThousandAgents(AttemptFactory):
    def kwargs(self, i: int, n: int = 1) -> dict[str, Any]:
        kw = super().kwargs(i, n)
        kw["agent"] = f"agent-{i % AGENTS:04d}"
        return kw


def _fetch(url: str) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=60) as resp:
        return resp.status, resp.read().decode()


async def _folded_to(server: Server, target: int) -> None:
    await server.projector.wait_for("attempts", {"FLEET_ATTEMPTS": target}, 3600)


async def _fold(url: str, server: Server, fac: AttemptFactory, start_seq: int, more: int) -> dict[str, Any]:
    """Publish `more` attempts and time until the view folded them all (publish overlaps fold)."""
    mon = CpuMonitor()
    mon.start()
    t0 = time.perf_counter()
    pub = await raw_publish_attempts(url, more, fac)
    await _folded_to(server, start_seq + more)
    dt = time.perf_counter() - t0
    return {"events": more, "seconds": round(dt, 2), "events_per_s": round(more / dt),
            "publish_events_per_s": pub["events_per_s"], "cpu": mon.stop()}


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--more", type=int, default=200_000)
    ap.add_argument("--pane-bytes", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--touch", type=int, default=1000, help="new attempts before each incremental refresh")
    a = ap.parse_args()
    from playwright.async_api import async_playwright

    async with broker() as (b, work):
        settings = settings_for(b.url, work / "data", http="127.0.0.1:0", reactors=False)
        server = Server(settings)
        await server.start()
        dash = await start_dashboard(server)
        assert dash is not None
        fleet = await Fleet.connect(settings=settings)
        try:
            fac = ThousandAgents(pane_bytes=a.pane_bytes, ts_spread_days=6)
            t0 = time.perf_counter()
            load = await raw_publish_attempts(b.url, a.n, fac)
            for i in range(AGENTS):
                await fleet.snapshots.take(f"agent-{i:04d}", {"load1": 1.0, "context_percent": i % 100}, host="h")
            await fleet.flush()
            await _folded_to(server, a.n)
            load["folded_s"] = round(time.perf_counter() - t0, 2)
            print(f"loaded {a.n} attempts, {AGENTS} agents: {load}")

            sql_ms, window_ms, incr_ms, latest_ms, page_ms = [], [], [], [], []
            seq = a.n
            for _ in range(a.repeat):
                t = time.perf_counter()
                await dash.summary.load_all()
                sql_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                before = await fleet.sql(WINDOW_SQL, max_rows=100_000)
                window_ms.append((time.perf_counter() - t) * 1000)
                assert dash.summary.rows == {  # the same numbers, the house p95
                    agent: {"p95": p95, "last_action": action, "last_outcome": outcome, "last_ts": ts}
                    for agent, p95, action, outcome, ts in before.rows}
                await raw_publish_attempts(b.url, a.touch, fac)
                seq += a.touch
                await _folded_to(server, seq)
                t = time.perf_counter()
                await dash.summary.fresh(seq)
                incr_ms.append((time.perf_counter() - t) * 1000)
                t = time.perf_counter()
                after: list[str] | None = None
                while True:
                    got = await fleet.snapshots.all_latest(limit=500, after=after)
                    if not got.next_after:
                        break
                    after = got.next_after
                latest_ms.append((time.perf_counter() - t) * 1000)
            assert len(dash.summary.rows) == AGENTS

            render_ms = []
            for _ in range(a.repeat):  # the server's part of a load: the whole page, no browser
                t = time.perf_counter()
                status, body = await asyncio.to_thread(_fetch, dash.url + "/")
                render_ms.append((time.perf_counter() - t) * 1000)
                assert status == 200 and body.count("<tr data-agent=") == AGENTS

            async with async_playwright() as pw:
                browser = await pw.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
                paint, live = [], []
                for _ in range(a.repeat):
                    page = await browser.new_page()
                    t = time.perf_counter()
                    await page.goto(dash.url + "/")
                    page_ms.append((time.perf_counter() - t) * 1000)
                    await page.wait_for_selector("body[data-live='1']")
                    live.append((time.perf_counter() - t) * 1000)
                    fcp = await page.evaluate(
                        "performance.getEntriesByType('paint').find(e => e.name === 'first-contentful-paint')"
                        "?.startTime ?? null")
                    paint.append(fcp)
                    rows = await page.locator("#agents tbody tr").count()
                    assert rows == AGENTS, rows
                    await page.close()

                off = await _fold(b.url, server, fac, seq, a.more)
                page = await browser.new_page()
                await page.goto(dash.url + "/")
                await page.wait_for_selector("body[data-live='1']")
                on = await _fold(b.url, server, fac, seq + a.more, a.more)
                on["live"] = dash.live.figures()
                await page.close()
                await browser.close()
        finally:
            await fleet.close()
            await dash.stop()
            await server.stop()

    med = statistics.median
    rows_out = [
        ["full load of the kept rows (200 agents a request) (ms, median)", f"{med(sql_ms):.0f}"],
        ["the same rows by the earlier window query (ms, median)", f"{med(window_ms):.0f}"],
        [f"incremental refresh after {a.touch} new attempts (ms, median)", f"{med(incr_ms):.0f}"],
        ["refresh: latest snapshots, all pages (ms, median)", f"{med(latest_ms):.0f}"],
        ["GET / server side: the whole page over HTTP, no browser (ms, median)", f"{med(render_ms):.0f}"],
        ["GET / until load event (ms, median)", f"{med(page_ms):.0f}"],
        ["first contentful paint (ms, median)", f"{med([p for p in paint if p is not None]):.0f}"],
        ["until live (ms, median)", f"{med(live):.0f}"],
        ["fold, dashboard off (events/s)", off["events_per_s"]],
        ["fold, dashboard open and live (events/s)", on["events_per_s"]],
    ]
    print(table(rows_out, ["measure", "value"]))
    emit_json("dashboard", {"n": a.n, "agents": AGENTS, "load": load, "sql_ms": sql_ms, "window_ms": window_ms,
                            "incremental_ms": incr_ms, "latest_ms": latest_ms, "render_ms": render_ms,
                            "page_ms": page_ms, "fcp_ms": paint, "live_ms": live, "fold_off": off, "fold_on": on})


if __name__ == "__main__":
    asyncio.run(main())
