"""Fault tests: the broker, the projector and the snapshot differ really SIGKILLed and restarted."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

from fleetlog.projections import ATTEMPTS
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import live_checkpoint, start_serve, view_digest, wait_until


async def test_broker_sigkilled_while_emitting_50k(broker: EmbeddedBroker, settings: FleetSettings,
                                                   server: Server) -> None:
    """(a) one client emits 50,000 attempts; the broker is SIGKILLed and restarted meanwhile."""
    total = 50_000
    fleet = await Fleet.connect(settings=settings, name="fault-a")
    t0 = time.perf_counter()
    try:
        for i in range(total):
            fleet.attempts.record(agent=f"agent-{i % 7}", action="probe", outcome="success", elapsed_s=i / 1000)
            if i % 500 == 0:
                await asyncio.sleep(0)  # an agent doing other work: the sender gets the loop
            if i == 20_000:
                broker.kill()
                killed_at = time.perf_counter()
            if i == 35_000:
                await broker.start()
                restarted_after = time.perf_counter() - killed_at
        token = await fleet.flush(timeout=180)
        stats = fleet.publisher_stats()
        page = await fleet.attempts.stats(min_seq=token)
    finally:
        await fleet.close()
    rows = sum(s.count for s in page.items)
    con = server.store.cursor(server.projector.live("attempts").gen.schema)
    try:
        n, distinct = con.execute("SELECT count(*), count(DISTINCT id) FROM attempts").fetchone()  # type: ignore[misc]
    finally:
        con.close()
    print(f"\n[fault a] {total} emitted in {time.perf_counter() - t0:.1f}s; broker down {restarted_after:.2f}s; "
          f"spooled={stats.spooled} acked={stats.acked} broker-dedup={stats.duplicates} "
          f"dropped={stats.dropped_spool_full}; view rows={n} distinct ids={distinct}")
    assert stats.dropped_spool_full == 0
    assert rows == total
    assert n == total
    assert distinct == total


async def test_projector_sigkilled_mid_fold_equals_clean_rebuild(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """(b) `fleetlog serve` SIGKILLed while folding, restarted: its tables equal a clean rebuild."""
    total = 120_000
    settings = FleetSettings(nats_url=broker.url, data_dir=tmp_path / "client", spool_dir=tmp_path / "spool")
    fleet = await Fleet.connect(settings=settings, name="fault-b")
    try:
        for i in range(total):
            fleet.attempts.record(agent=f"a{i % 13}", action=f"act{i % 5}", outcome="success", elapsed_s=i % 97,
                                  extras={"i": i})
            if i % 1000 == 0:
                await asyncio.sleep(0)
        token = await fleet.flush(timeout=120)
        last = token["FLEET_ATTEMPTS"]

        live_dir = tmp_path / "live"
        proc = start_serve(broker.url, live_dir, tmp_path / "serve-live.log")
        kills = 0
        try:
            # Kill it twice while it is part-way through the stream.
            for target in (last // 4, last // 2):
                seen = await wait_until(lambda t=target: _at_least(fleet, t), timeout_s=120, interval_s=0.02)
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                print(f"\n[fault b] SIGKILL #{kills} with checkpoint at {seen} of {last}")
                proc = start_serve(broker.url, live_dir, tmp_path / "serve-live.log")
            await wait_until(lambda: _at_least(fleet, last), timeout_s=120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        live = view_digest(live_dir / "views" / "fleetlog.duckdb", "attempts", ATTEMPTS.tables)

        clean_dir = tmp_path / "clean"
        proc = start_serve(broker.url, clean_dir, tmp_path / "serve-clean.log")
        try:
            await wait_until(lambda: _at_least(fleet, last, fresh=True, clean_dir=clean_dir), timeout_s=120)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)
        clean = view_digest(clean_dir / "views" / "fleetlog.duckdb", "attempts", ATTEMPTS.tables)
    finally:
        await fleet.close()
    print(f"[fault b] live after kills: {live}; clean rebuild: {clean}")
    assert live["attempts"][0] == total
    assert live == clean


async def _at_least(fleet: Fleet, seq: int, fresh: bool = False, clean_dir: Path | None = None) -> int | bool:
    cp = await live_checkpoint(fleet, "attempts", "FLEET_ATTEMPTS")
    return cp if cp >= seq else False


async def test_server_stops_cleanly_with_last_batch_committed(broker: EmbeddedBroker, tmp_path: Path) -> None:
    """SIGTERM: the process exits 0 and its checkpoint matches the rows it holds."""
    settings = FleetSettings(nats_url=broker.url, data_dir=tmp_path / "client", spool_dir=tmp_path / "spool")
    fleet = await Fleet.connect(settings=settings, name="sigterm")
    data_dir = tmp_path / "srv"
    proc = start_serve(broker.url, data_dir, tmp_path / "serve.log")
    try:
        for i in range(30_000):
            fleet.attempts.record(agent="a", action="b", outcome="success", elapsed_s=1)
            if i % 1000 == 0:
                await asyncio.sleep(0)
        await fleet.flush(60)
        await wait_until(lambda: _at_least(fleet, 1), timeout_s=60)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        await fleet.close()
        if proc.poll() is None:
            proc.kill()
    import duckdb

    con = duckdb.connect(str(data_dir / "views" / "fleetlog.duckdb"), read_only=True)
    try:
        (schema,) = con.execute("SELECT schema_name FROM fleetlog_generations WHERE state = 'live'").fetchone()  # type: ignore[misc]
        (cp,) = con.execute("SELECT seq FROM fleetlog_checkpoints WHERE schema_name = ?", [schema]).fetchone()  # type: ignore[misc]
        (rows,) = con.execute(f'SELECT count(*) FROM "{schema}".attempts').fetchone()  # type: ignore[misc]
    finally:
        con.close()
    assert cp > 0
    assert rows == cp  # every folded seq is a row (no rejects, no purges here)


