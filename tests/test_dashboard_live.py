"""The Fleet page's rows and live view under load, from a real node over real HTTP: the
rows refresh only the agents with new attempts, and after NATS dropped facts to the live
view (a real slow consumer) an open page's data converges on each agent's newest."""

from __future__ import annotations

import asyncio
import re
import threading
from urllib.parse import urlsplit

import msgspec
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .dashboard_helpers import dashboard_of, get

AGENTS = [f"burst-{i:02d}" for i in range(20)]
PER_AGENT = 30


def _p95(page: str, agent: str) -> str:
    found = re.search(rf'<tr data-agent="{re.escape(agent)}">.*?<td class=p95>(.*?)</td>', page)
    assert found, f"no row for {agent}"
    return found.group(1)


async def test_fleet_rows_refresh_only_agents_with_new_attempts(server: Server, fleet: Fleet) -> None:
    for i in range(10):  # p95 of 1..10: index floor(0.95*9) = 8 -> 9.0
        fleet.attempts.record(agent="steady", action="probe", outcome="success", elapsed_s=float(i + 1))
        fleet.attempts.record(agent="moving", action="probe", outcome="success", elapsed_s=1.0)
    for action in ("zeta", "Alpha", "beta"):  # a quote in the name; actions in code point order
        fleet.attempts.record(agent="o'neil", action=action, outcome="success", elapsed_s=2.0)
    await fleet.attempts.query(limit=1, min_seq=await fleet.flush())
    async with dashboard_of(server) as dash:
        _, _, first = await get(dash.url + "/")
        full_at, refreshes = dash.summary.full_at, dash.summary.refreshes
        for _ in range(30):  # p95 of ten 1.0 and thirty 50.0: index floor(0.95*39) = 37 -> 50.0
            fleet.attempts.record(agent="moving", action="probe", outcome="failure", elapsed_s=50.0)
        token = await fleet.flush()
        rows = await dash.summary.fresh(token["FLEET_ATTEMPTS"])  # what a page load waits for (or not)
        _, _, second = await get(dash.url + "/")
    assert _p95(first, "moving") == "probe 1.00s" and _p95(first, "steady") == "probe 9.00s"
    assert _p95(first, "o&#x27;neil") == "Alpha 2.00s · beta 2.00s · zeta 2.00s"
    assert _p95(second, "moving") == "probe 50.00s" and _p95(second, "steady") == "probe 9.00s"
    assert rows["moving"]["last_outcome"] == "failure"
    assert dash.summary.full_at == full_at and dash.summary.refreshes > refreshes  # incremental, not full


def _publish_burst(settings: FleetSettings) -> None:
    """PER_AGENT attempts for each agent, the last one `final`, from another thread's loop."""

    async def burst() -> None:
        async with Fleet.connect(settings=settings) as f:
            for i in range(PER_AGENT):
                for agent in AGENTS:
                    f.attempts.record(agent=agent, action="final" if i == PER_AGENT - 1 else "step",
                                      outcome="success", elapsed_s=float(i))
            await f.flush()

    asyncio.run(burst())


async def _next_event(reader: asyncio.StreamReader) -> tuple[str, bytes]:
    kind, data = "", b""
    while True:
        line = (await reader.readline()).rstrip(b"\r\n")
        if not line:
            if kind:
                return kind, data
            continue
        if line.startswith(b"event: "):
            kind = line[7:].decode()
        elif line.startswith(b"data: "):
            data = line[6:]


async def test_live_view_converges_after_nats_dropped_facts(server: Server, fleet: Fleet,
                                                            settings: FleetSettings) -> None:
    async with dashboard_of(server) as dash:
        dash.live.pending_msgs = 16  # NATS drops what does not fit: a slow consumer on any burst
        url = urlsplit(dash.url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        try:
            writer.write(b"GET /events HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            while (await _next_event(reader))[0] != "ready":
                pass
            # The whole burst is published while this loop (the dashboard's) is blocked: it
            # then arrives at once, far more than 16 messages per read.
            publisher = threading.Thread(target=_publish_burst, args=(settings,))
            publisher.start()
            publisher.join()
            newest: dict[str, str] = {}
            async with asyncio.timeout(120):  # a deadline against hanging, not a timing assert
                while any(newest.get(a) != "final" for a in AGENTS):
                    kind, data = await _next_event(reader)
                    if kind == "attempt":
                        fact = msgspec.json.decode(data)
                        newest[fact["agent"]] = fact["action"]
        finally:
            writer.close()
        _, _, metrics = await get(dash.url + "/metrics")
    assert dash.live.dropped_nats > 0 and dash.live.resyncs >= 1
    assert re.search(r"^fleetlog_dashboard_live_dropped_nats_total [1-9]", metrics, re.M)
    assert re.search(r"^fleetlog_dashboard_live_resyncs_total [1-9]", metrics, re.M)
