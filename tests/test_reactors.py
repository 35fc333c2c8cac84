"""The reactors live in `serve`/`up`: the lease sweeper re-queues expired claims, the stale marker
flags silent runtimes; two servers' reactors at once cause no double effect."""

from __future__ import annotations

import asyncio
from pathlib import Path

from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import wait_until


async def test_two_servers_reactors_sweep_and_mark_once(settings: FleetSettings, tmp_path: Path) -> None:
    live = settings.model_copy(update={"reactors": True, "reactor_interval_s": 0.2})
    servers = [Server(live), Server(live.model_copy(update={"data_dir": tmp_path / "second"}))]
    for s in servers:
        await s.start()
    fleet = await Fleet.connect(settings=settings)
    try:
        for i in range(5):
            await fleet.runs.create(f"r{i}", "runner", status="queued")
        claims = [await fleet.runs.claim_next(f"rt{i}", lease_s=1) for i in range(5)]
        assert all(c is not None for c in claims)
        await fleet.runtimes.register("quiet", heartbeat_deadline_s=1)

        async def all_requeued() -> bool:
            runs = [await fleet.runs.get(f"r{i}") for i in range(5)]
            return all(r is not None and r.status == "queued" for r in runs)

        await wait_until(all_requeued, timeout_s=30)
        for i in range(5):
            run = await fleet.runs.get(f"r{i}")
            assert run is not None and run.status_reason == "claim lease expired" and run.claimed_by_runtime_id is None

        async def stale() -> bool:
            rt = await fleet.runtimes.get("quiet")
            return rt is not None and rt.status == "stale"

        await wait_until(stale, timeout_s=30)
        await asyncio.sleep(1.0)  # several more ticks of both servers' reactors
        page = await fleet.runs.events("r0")
        assert page.items == []
        # exactly one lease_expired per run, however many sweepers ran
        swept = sum(s.reactors.swept for s in servers if s.reactors is not None)
        marked = sum(s.reactors.marked for s in servers if s.reactors is not None)
        assert (swept, marked) == (5, 1)
    finally:
        await fleet.close()
        for s in servers:
            await s.stop()
