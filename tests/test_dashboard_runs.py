"""The Runs, Run, Runtimes and Processors pages over real HTTP from a real node."""

from __future__ import annotations

import re
import time

from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .dashboard_helpers import dashboard_of, get


def _table(page: str, table_id: str) -> str:
    found = re.search(rf"<table id={table_id}>.*?</table>", page, re.S)
    assert found, f"no table {table_id}"
    return found.group(0)


async def test_runs_page_depth_claims_finals_and_a_run_with_its_events(server: Server, fleet: Fleet) -> None:
    for i, prio in enumerate((0, 0, 5, 5, 5)):
        await fleet.runs.create(f"r{i}", "runner", status="queued", queue_name="q", priority=prio)
    await fleet.runs.create("other", "runner", status="queued", queue_name="slow", priority=1)
    claimed = await fleet.runs.claim_next("rt-1", queue_name="q", lease_s=300)
    assert claimed is not None
    await fleet.runs.append_event(claimed.run_id, 1, "output", {"text": "hello from the run"},
                                  claim_token=claimed.claim_token)
    await fleet.runs.create("done", "runner", status="running")
    await fleet.runs.finalize("done", "failed", status_reason="exploded")
    async with dashboard_of(server) as dash:
        token = await fleet.flush()
        await fleet.runs.list(limit=1, min_seq=token)
        _, _, page = await get(dash.url + "/runs")
        status, _, detail = await get(dash.url + f"/run?id={claimed.run_id}")
        missing, _, _ = await get(dash.url + "/run?id=nope")
    depth = _table(page, "depth")
    assert "<td>q</td><td class=num>5</td><td class=num>2</td>" in depth  # one of the three prio-5 is claimed
    assert "<td>q</td><td class=num>0</td><td class=num>2</td>" in depth
    assert "<td>slow</td><td class=num>1</td><td class=num>1</td>" in depth
    row = re.search(rf'<tr data-run="{claimed.run_id}">.*?</tr>', _table(page, "claimed"))
    assert row and "<td class=holder>rt-1</td>" in row.group(0)
    assert f"<td class='num fence'>{claimed.fence}</td>" in row.group(0)
    lease = re.search(r"<td class='num lease'>(\d+)s</td>", row.group(0))
    assert lease and 0 < int(lease.group(1)) <= 301  # the view rounds the lease end up
    assert "exploded" in _table(page, "finals") and 'class="outcome failed"' in _table(page, "finals")
    assert status == 200 and "hello from the run" in _table(detail, "events")
    assert "claim_token" not in detail and "authorization" not in detail
    assert missing == 404


async def test_runtimes_and_processors_pages(server: Server, fleet: Fleet) -> None:
    await fleet.runtimes.register("rt-live", display_name="Live one", heartbeat_deadline_s=60)
    await fleet.runtimes.register("rt-gone", heartbeat_deadline_s=1)
    await fleet.runtimes.mark_stale_runtimes(now=time.time() + 30)  # past rt-gone's 1 s, not rt-live's 60 s
    await fleet.processors.mark_processed("extract", "alice/s1.jsonl", "alice", 3, "h1")
    token = await fleet.flush()
    await fleet.runtimes.list(min_seq=token)
    await fleet.processors.summary(min_seq=token)
    async with dashboard_of(server) as dash:
        _, _, runtimes = await get(dash.url + "/runtimes")
        _, _, processors = await get(dash.url + "/processors")
    live = re.search(r'<tr data-runtime="rt-live">.*?</tr>', runtimes)
    gone = re.search(r'<tr data-runtime="rt-gone">.*?</tr>', runtimes)
    assert live and "Live one" in live.group(0) and 'class="status stale"' not in live.group(0)
    assert gone and 'class="status stale"' in gone.group(0)
    assert re.search(r'<td class="num age">\d+s</td>', live.group(0))
    row = re.search(r'<tr data-processor="extract">.*?</tr>', processors)
    assert row and "<td class=num>1</td><td class=num>3</td>" in row.group(0)  # one session, three items
    assert "<td class=lock>free</td>" in row.group(0)
