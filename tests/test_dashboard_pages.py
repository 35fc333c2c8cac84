"""The dashboard's pages over real HTTP from a real node: Fleet, Attempts, System, the
event stream, and what the server refuses."""

from __future__ import annotations

import asyncio
import re

import pytest
from fleetlog.services.backbone.errors import FleetError
from fleetlog.services.node.server import Server, start_dashboard

from fleetlog import Fleet, FleetSettings

from .dashboard_helpers import dashboard_of, get


async def _folded(fleet: Fleet) -> None:
    """Wait until the views hold everything published so far (read-your-writes)."""
    token = await fleet.flush()
    await fleet.attempts.query(limit=1, min_seq=token)
    await fleet.snapshots.all_latest(limit=1, min_seq=token)


def _row(page: str, agent: str) -> str:
    found = re.search(rf'<tr data-agent="{re.escape(agent)}">(.*?)</tr>', page)
    assert found, f"no row for {agent}"
    return found.group(1)


async def test_fleet_page_one_row_per_agent_with_last_action_p95_and_the_last_diff(
        server: Server, fleet: Fleet) -> None:
    for i in range(20):  # p95 of 1..20 by the house formula: index floor(0.95*19) = 18 -> 19.0
        fleet.attempts.record(agent="alpha", action="probe", outcome="success", elapsed_s=float(i + 1))
    fleet.attempts.record(agent="alpha", action="deploy", outcome="failure", elapsed_s=2.5)
    fleet.attempts.record(agent="beta", action="probe", outcome="success", elapsed_s=0.5)
    await fleet.snapshots.take("alpha", {"load1": 0.5, "context_percent": 10, "mood": "calm"}, host="h1")
    await fleet.snapshots.take("alpha", {"load1": 3.25, "context_percent": 10, "mood": "busy"}, host="h1")
    await fleet.snapshots.take("gamma", {"load1": 1.0}, host="h2")
    await _folded(fleet)
    async with dashboard_of(server) as dash:
        status, ctype, page = await get(dash.url + "/")
    assert status == 200 and ctype.startswith("text/html")
    alpha = _row(page, "alpha")
    assert "<td class=host>h1</td>" in alpha and "<td class=action>deploy</td>" in alpha
    assert 'class="outcome failure">failure' in alpha
    assert "probe 19.00s" in alpha and "deploy 2.50s" in alpha
    assert '<td class="num changed" data-field="load1">3.25</td>' in alpha  # the last diff's field
    assert '<td class="num" data-field="context_percent">10</td>' in alpha  # unchanged: not highlighted
    assert "<td class=diff>mood</td>" in alpha  # changed, not a key figure
    assert "probe 0.50s" in _row(page, "beta")
    assert "<td class=host>h2</td>" in _row(page, "gamma")  # snapshots only, no attempts: a row too


async def test_attempts_page_filters_pages_and_counts(server: Server, fleet: Fleet) -> None:
    for i in range(60):
        fleet.attempts.record(agent="a", action="build", outcome="success" if i % 3 else "failure",
                              elapsed_s=1.0, pane_after={"text": f"pane-{i}"})
    for _ in range(4):
        fleet.attempts.record(agent="b", action="test", outcome="success", elapsed_s=2.0)
    await _folded(fleet)
    async with dashboard_of(server) as dash:
        _, _, first = await get(dash.url + "/attempts")
        _, _, older = await get(dash.url + "/attempts?offset=50")
        _, _, only_b = await get(dash.url + "/attempts?agent=b")
        _, _, failures = await get(dash.url + "/attempts?agent=a&outcome=failure&since=1h")
        bad_status, _, bad = await get(dash.url + "/attempts?since=yesterday-ish")
    rows = lambda page: re.findall(r'<tr class=row data-id="[^"]+"', page)  # noqa: E731
    assert len(rows(first)) == 50 and 'id=older href="?offset=50"' in first
    assert len(rows(older)) == 14 and "id=older" not in older
    assert len(rows(only_b)) == 4 and "<td class=agent>a</td>" not in only_b
    assert len(rows(failures)) == 20
    assert "<svg id=chart" in first and "■ failure 20</span>" in first and "■ success 44</span>" in first
    stats = re.search(r"<table id=stats>.*?</table>", first, re.S)
    assert stats and "<td class=num>40</td>" in stats.group(0) and "<td class=num>20</td>" in stats.group(0)
    # the newest "a" attempt (after the four of b) has its pane in the row a click opens
    assert re.search(r'<tr class=pane id="pane-4"><td colspan=5><b>pane before</b>.*?pane-59.*?</tr>', first, re.S)
    assert bad_status == 400 and "since" in bad


async def test_system_page_streams_projections_lag_and_rejects(server: Server, fleet: Fleet) -> None:
    fleet.attempts.record(agent="a", action="x", outcome="success", elapsed_s=1.0)
    nc = await fleet.nats()
    await nc.jetstream().publish("fleet.attempt.a.x", b"not json at all")
    await fleet.flush()
    for _ in range(300):  # the reject is recorded by its own publish after the fold
        if (await fleet.rejects()).items:
            break
        await asyncio.sleep(0.05)
    async with dashboard_of(server) as dash:
        status, _, page = await get(dash.url + "/system")
    assert status == 200
    assert "<td>FLEET_ATTEMPTS</td>" in page
    assert '<tr data-projection="attempts">' in page and "FLEET_ATTEMPTS: 2" in page  # checkpoint
    rejects = re.search(r"<table id=rejects>.*?</table>", page, re.S)
    assert rejects and "fleet.attempt.a.x" in rejects.group(0) and "<td class=reason>" in rejects.group(0)
    assert "bytes waiting on disk" in page


async def _read_event(reader: asyncio.StreamReader, kind: str) -> str:
    while True:
        block = (await reader.readuntil(b"\n\n")).decode()
        if f"event: {kind}\n" in block:
            return block


async def test_events_stream_carries_attempts_and_diffs_published_after_it_opened(
        server: Server, fleet: Fleet) -> None:
    await fleet.snapshots.take("w", {"load1": 1.0}, host="h")
    async with dashboard_of(server) as dash:
        reader, writer = await asyncio.open_connection(dash.http.host, dash.http.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        assert "200 OK" in head and "text/event-stream" in head
        await asyncio.wait_for(_read_event(reader, "ready"), 30)
        assert dash.live.listeners == 1
        fleet.attempts.record(agent="w", action="probe", outcome="timeout", elapsed_s=4.0)
        attempt = await asyncio.wait_for(_read_event(reader, "attempt"), 30)
        await fleet.snapshots.take("w", {"load1": 2.0}, host="h")
        diff = await asyncio.wait_for(_read_event(reader, "diff"), 30)
        writer.close()
        await writer.wait_closed()
        for _ in range(200):  # the server notices the page went when its next write fails
            if dash.live.listeners == 0:
                break
            fleet.attempts.record(agent="w", action="probe", outcome="success", elapsed_s=1.0)
            await asyncio.sleep(0.05)
        assert dash.live.listeners == 0
    assert '"agent":"w"' in attempt and '"outcome":"timeout"' in attempt
    assert '"diff_fields":["load1"]' in diff


async def test_read_only_unknown_paths_and_bad_addresses(server: Server, settings: FleetSettings) -> None:
    async with dashboard_of(server) as dash:
        missing, _, _ = await get(dash.url + "/nope")
        reader, writer = await asyncio.open_connection(dash.http.host, dash.http.port)
        writer.write(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n")
        posted = (await reader.read()).decode()
        writer.close()
        health, _, ok = await get(dash.url + "/healthz")
    assert missing == 404 and posted.startswith("HTTP/1.1 405") and (health, ok) == (200, "ok")
    with pytest.raises(ValueError, match="http must be HOST:PORT"):
        FleetSettings(http="localhost")
    assert FleetSettings(http="off").http_address() is None
    assert FleetSettings().http_address() == ("127.0.0.1", 4280)


async def test_events_coalesce_to_the_newest_fact_and_never_send_an_older_one_after_it(
        server: Server, fleet: Fleet) -> None:
    async with dashboard_of(server) as dash:
        reader, writer = await asyncio.open_connection(dash.http.host, dash.http.port)
        writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
        await reader.readuntil(b"\r\n\r\n")
        await asyncio.wait_for(_read_event(reader, "ready"), 30)
        for i in range(40):
            fleet.attempts.record(agent="c", action="step", outcome=f"o{i:02d}", elapsed_s=float(i))
        await fleet.flush()
        seen: list[str] = []
        while "o39" not in seen:
            block = await asyncio.wait_for(_read_event(reader, "attempt"), 30)
            seen.append(re.search(r'"outcome":"(o\d+)"', block).group(1))  # type: ignore[union-attr]
        writer.close()
        await writer.wait_closed()
    assert seen == sorted(seen) and len(set(seen)) == len(seen)  # newest last, none twice
    assert dash.live.received == 40 and dash.live.delivered == len(seen) <= 40


async def test_an_open_node_serves_its_dashboard_on_loopback_only(server: Server) -> None:
    """No login on an open node, so no address others reach, unless asked for on purpose."""
    base = server.settings
    server.settings = base.model_copy(update={"http": "0.0.0.0:0"})
    with pytest.raises(FleetError, match="an open node's dashboard has no login, so it binds to loopback only"):
        await start_dashboard(server)
    server.settings = base.model_copy(update={"http": "0.0.0.0:0", "http_open": True})
    dash = await start_dashboard(server)
    assert dash is not None
    try:
        status, _, _ = await get(f"http://127.0.0.1:{dash.http.port}/healthz")
        assert status == 200
    finally:
        await dash.stop()
        server.settings = base
