"""The node's log lines for notable things, read from a real node: start and stop, one
line per burst of rejects (not one per reject), lease sweeps, and the connection lost and
back when the broker is killed and restarted."""

from __future__ import annotations

import logging
import re

import nats
import pytest
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import wait_until


def _said(caplog: pytest.LogCaptureFixture, logger: str, pattern: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger and re.search(pattern, r.getMessage())]


async def test_node_logs_start_stop_reject_bursts_sweeps_and_reconnects(
        settings: FleetSettings, broker: EmbeddedBroker, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fleetlog")
    node = Server(settings.model_copy(update={"reactors": True, "reactor_interval_s": 0.2}), reject_log_s=0.5)
    await node.start()
    try:
        assert _said(caplog, "fleetlog.server", r"^fleetlog serving ")
        # Five bad events at once: one line (or two, should they straddle an interval), never five.
        nc = await nats.connect(settings.nats_url)
        try:
            js = nc.jetstream()
            for i in range(5):
                await js.publish(f"fleet.attempt.bad.a{i}", b"not json" if i == 0 else b"[]")
        finally:
            await nc.drain()

        async def burst_told() -> bool:
            lines = _said(caplog, "fleetlog.rejects", r"^rejects: ")
            return sum(int(line.split()[1]) for line in lines) == 5
        await wait_until(burst_told, 60)
        lines = _said(caplog, "fleetlog.rejects", r"^rejects: ")
        assert len(lines) <= 2
        assert "attempts invalid_json 1" in lines[0]
        assert "first: attempts FLEET_ATTEMPTS seq 1: not valid JSON" in lines[0]
        # A lease that passes: the sweeper releases it and says so once.
        async with Fleet.connect(settings=settings) as fleet:
            await fleet.runs.create("r1", "runner", status="queued")
            assert await fleet.runs.claim_next("rt", lease_s=0.2) is not None

            async def swept() -> bool:
                return bool(_said(caplog, "fleetlog.reactors", r"^lease sweep: released 1 claimed run"))
            await wait_until(swept, 60)
        # The broker killed and started again: the node's connections say they lost it and got it back.
        assert broker.process is not None
        broker.process.kill()
        broker.process.wait()
        await broker.start()

        async def back() -> bool:
            return bool(_said(caplog, "fleetlog.server", r"^NATS reconnected \(fleetlog-server\)")
                        and _said(caplog, "fleetlog.connection", r"^NATS reconnected \(fleetlog-reactors\)"))
        await wait_until(back, 60)
        assert _said(caplog, "fleetlog.server", r"^NATS connection lost \(fleetlog-server")
        assert _said(caplog, "fleetlog.connection", r"^NATS connection lost \(fleetlog-reactors\)")
    finally:
        await node.stop()
    assert _said(caplog, "fleetlog.server", r"^fleetlog stopping ")
    assert _said(caplog, "fleetlog.server", r"^fleetlog stopped: folded \d+ events")
    assert not _said(caplog, "fleetlog.connection", r"^NATS connection lost \(fleetlog-reactors\)")[1:]  # not on close
