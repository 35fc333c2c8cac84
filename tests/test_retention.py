"""Retention: view rows follow their streams' age limits, so the live view equals a rebuild."""

from __future__ import annotations

from pathlib import Path

from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import rebuild_and_wait, wait_until

STREAM = "FLEET_ATTEMPTS"


async def test_rows_leave_the_view_when_their_messages_age_out(tmp_path: Path, broker: EmbeddedBroker) -> None:
    settings = FleetSettings(
        nats_url=broker.url, data_dir=tmp_path / "data", spool_dir=tmp_path / "spool", batch_wait_s=0.01,
        reactors=False, attempts_max_age_days=3 / 86_400, retention_interval_s=0.2,
    )
    server = Server(settings)
    await server.start()
    fleet = await Fleet.connect(settings=settings)
    try:
        for i in range(20):
            fleet.attempts.record(agent="old", action="a", outcome="success", elapsed_s=float(i))
        token = await fleet.flush()
        assert (await fleet.attempts.query(agent="old", limit=100, min_seq=token)).items  # folded

        nc = await fleet.nats()

        async def aged_out() -> bool:
            info = await nc.jetstream().stream_info(STREAM)
            page = await fleet.attempts.query(agent="old", limit=100)
            return info.state.messages == 0 and not page.items

        await wait_until(aged_out, timeout_s=30, interval_s=0.2)  # the stream dropped them, and so did the view
        fresh = fleet.attempts.record(agent="new", action="a", outcome="success", elapsed_s=1.0)
        token = await fleet.flush()
        page = await fleet.attempts.query(limit=100, min_seq=token)
        assert [r.id for r in page.items] == [fresh.id]
        stats = await fleet.attempts.stats(min_seq=token)
        assert sum(s.count for s in stats.items) == 1
        running = server.projector.live("attempts")
        live = server.store.table_digest(running.gen.schema, ("attempts", "attempt_purges"))
        await rebuild_and_wait(fleet, "attempts")
        running = server.projector.live("attempts")
        assert server.store.table_digest(running.gen.schema, ("attempts", "attempt_purges")) == live
    finally:
        await fleet.close()
        await server.stop()


async def test_snapshots_and_diffs_leave_the_view_when_they_age_out(tmp_path: Path, broker: EmbeddedBroker) -> None:
    settings = FleetSettings(
        nats_url=broker.url, data_dir=tmp_path / "data", spool_dir=tmp_path / "spool", batch_wait_s=0.01,
        reactors=False, snapshots_max_age_days=3 / 86_400, retention_interval_s=0.2,
    )
    server = Server(settings)
    await server.start()
    fleet = await Fleet.connect(settings=settings)
    try:
        for i in range(3):  # three snapshots, two of them with a diff
            await fleet.snapshots.take("a", {"i": i}, host="old")
        token = await fleet.flush()
        assert len((await fleet.snapshots.history("a", "old", min_seq=token)).items) == 3
        assert len((await fleet.snapshots.diffs(min_seq=token)).items) == 2
        nc = await fleet.nats()

        async def aged_out() -> bool:
            js = nc.jetstream()
            snaps, diffs = await js.stream_info("FLEET_SNAPSHOTS"), await js.stream_info("FLEET_DIFFS")
            return (snaps.state.messages == 0 and diffs.state.messages == 0
                    and not (await fleet.snapshots.all_latest()).items and not (await fleet.snapshots.diffs()).items)

        await wait_until(aged_out, timeout_s=30, interval_s=0.2)
        fresh = await fleet.snapshots.take("a", {"i": 9}, host="old")
        token = await fleet.flush()
        assert [s.snapshot() for s in (await fleet.snapshots.history("a", "old", min_seq=token)).items] == [fresh]
        running = server.projector.live("snapshots")
        live = server.store.table_digest(running.gen.schema, ("snapshots", "snapshot_diffs"))
        diffs_seq = running.feeds["FLEET_DIFFS"].checkpoint
        assert diffs_seq == 2
        # FLEET_DIFFS is now empty: the rebuild must still catch up (its checkpoint moves to
        # the stream's last seq) and answer a token that names the aged-out diffs.
        await rebuild_and_wait(fleet, "snapshots")
        running = server.projector.live("snapshots")
        assert server.store.table_digest(running.gen.schema, ("snapshots", "snapshot_diffs")) == live
        assert running.feeds["FLEET_DIFFS"].checkpoint == diffs_seq
        assert (await fleet.snapshots.diffs(min_seq={"FLEET_DIFFS": diffs_seq})).items == []
    finally:
        await fleet.close()
        await server.stop()
