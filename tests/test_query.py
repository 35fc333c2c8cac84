"""The query service's own behaviour (real nats-server, real DuckDB)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from fleetlog.services.server import Server

from fleetlog import Fleet, FleetSettings, StaleError

STREAM = "FLEET_ATTEMPTS"


async def test_requests_waiting_for_min_seq_hold_no_query_slot(settings: FleetSettings, tmp_path: Path) -> None:
    """More requests than there are query slots (64) wait for a position the view has not
    folded; a query that needs no wait, and status, are answered while they all still wait."""
    quick = settings.model_copy(update={"query_wait_max_s": 3.0, "data_dir": tmp_path / "q"})
    srv = Server(quick)
    await srv.start()
    try:
        async with await Fleet.connect(settings=quick) as fleet:
            fleet.attempts.record(agent="slots", action="a", outcome="success", elapsed_s=1)
            token = await fleet.flush()
            beyond = {STREAM: token[STREAM] + 1000}
            waiting = [asyncio.create_task(fleet.attempts.stats(min_seq=beyond)) for _ in range(80)]
            page = await fleet.attempts.query(agent="slots", min_seq=token)
            status = await fleet.status()
            assert [r.agent for r in page.items] == ["slots"]
            assert status.projections
            assert not any(t.done() for t in waiting)
            results = await asyncio.gather(*waiting, return_exceptions=True)
            assert all(isinstance(r, StaleError) for r in results), {type(r).__name__ for r in results}
            with pytest.raises(StaleError):
                await fleet.attempts.query(min_seq=beyond)
    finally:
        await srv.stop()
