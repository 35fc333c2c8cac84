"""`fleetlog replica` and `fleetlog export`: the views folded into a file of one's own."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import Any

import duckdb
import nats
from fleetlog.services.node.server import Server
from fleetlog.services.query.replica import fold_replica

from fleetlog import Fleet, FleetSettings

from .helpers import cli_json, cli_runner, fleetlog_cmd, wait_until


async def test_replica_equals_the_served_views_and_publishes_nothing(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path) -> None:
    for i in range(30):
        fleet.attempts.record(agent=f"rep{i % 3}", action="a", outcome="success", elapsed_s=float(i))
    await fleet.runs.create("rep-run", "runner", status="queued", priority=2)
    await fleet.state.set("actor", "k", {"v": 1}, context={"runner_id": "r", "actor_id": "u"},
                          binding={"binding_id": "b"})
    nc = await nats.connect(settings.nats_url)
    try:
        await nc.jetstream().publish("fleet.attempt.rep0.a", b"not json")  # one reject

        async def served_reject_published() -> bool:  # by `serve`, once
            return (await nc.jetstream().stream_info("FLEET_REJECTS")).state.messages == 1

        await wait_until(served_reject_published, timeout_s=30)
    finally:
        await nc.close()
    token = await fleet.flush()
    await fleet.attempts.query(min_seq=token)
    path = tmp_path / "mine.duckdb"
    watcher = await nats.connect(settings.nats_url)
    published: list[str] = []

    async def seen(msg: object) -> None:
        published.append(getattr(msg, "subject", ""))

    await watcher.subscribe("fleet.reject.>", cb=seen)  # sees a publish even if JetStream dedupes it
    try:
        position = await fold_replica(settings, path, timeout_s=60)
        await watcher.flush()
    finally:
        await watcher.close()
    assert published == []  # the replica folded the reject but published nothing
    assert position["FLEET_ATTEMPTS"] >= token["FLEET_ATTEMPTS"]

    con = duckdb.connect(str(path), read_only=True)  # any DuckDB client can open it
    try:
        assert con.execute("SELECT count(*) FROM attempts").fetchone() == (30,)
        assert con.execute("SELECT run_id, status FROM runs").fetchall() == [("rep-run", "queued")]
        assert con.execute("SELECT key FROM state").fetchall() == [("k",)]
        replica_schema = con.execute(
            "SELECT schema_name FROM fleetlog_generations WHERE name = 'attempts' AND state = 'live'").fetchone()
        assert replica_schema is not None
        assert con.execute(f'SELECT count(*) FROM "{replica_schema[0]}"._rejects').fetchone() == (1,)
    finally:
        con.close()
    served = server.store.table_digest(server.projector.live("attempts").gen.schema, ("attempts",))
    from fleetlog.services.projector.store import ViewStore

    store = ViewStore(path)
    try:
        assert store.table_digest(replica_schema[0], ("attempts",)) == served  # the same rows
    finally:
        store.close()
    nc = await nats.connect(settings.nats_url)
    try:  # the replica re-published none of the rejects it folded
        assert (await nc.jetstream().stream_info("FLEET_REJECTS")).state.messages == 1
    finally:
        await nc.close()


async def test_replica_catches_up_incrementally_and_export_writes_parquet(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path) -> None:
    cli = cli_runner(settings.nats_url, tmp_path)
    for i in range(10):
        fleet.attempts.record(agent="exp", action="a", outcome="success", elapsed_s=float(i))
    await fleet.flush()
    path = tmp_path / "r.duckdb"
    first = cli_json(await cli("replica", str(path), "--json"))
    for i in range(5):
        fleet.attempts.record(agent="exp", action="b", outcome="success", elapsed_s=float(i))
    token = await fleet.flush()
    second = cli_json(await cli("replica", str(path), "--json"))  # picks up where it stopped
    assert second["streams"]["FLEET_ATTEMPTS"] == token["FLEET_ATTEMPTS"] > first["streams"]["FLEET_ATTEMPTS"]
    con = duckdb.connect(str(path), read_only=True)
    try:
        assert con.execute("SELECT action, count(*) FROM attempts GROUP BY 1 ORDER BY 1").fetchall() == [
            ("a", 10), ("b", 5)]
    finally:
        con.close()

    out_dir = tmp_path / "export"
    watermark = cli_json(await cli("export", str(out_dir), "--json"))
    assert watermark["streams"]["FLEET_ATTEMPTS"] == token["FLEET_ATTEMPTS"]
    assert json.loads((out_dir / "watermark.json").read_text()) == watermark
    assert {"attempts", "runs", "run_events", "state", "runtimes"} <= set(watermark["files"])
    con = duckdb.connect()
    try:
        assert con.execute(f"SELECT count(*) FROM '{out_dir / 'attempts.parquet'}'").fetchone() == (15,)
    finally:
        con.close()


def _start_follower(path: Path, nats_url: str, data_dir: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(data_dir), "FLEETLOG_BATCH_WAIT_S": "0.01",
           "FLEETLOG_BATCH_MAX": "7"}  # small batches: many commits between and during copies
    return subprocess.Popen([*fleetlog_cmd(), "replica", str(path), "--follow", "--every", "0.1", "--json",
                             "--nats", nats_url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _wal_of(path: Path) -> Path | None:
    wal = Path(str(path) + ".wal")
    return wal if wal.exists() else None


def _open_read_only(path: Path) -> duckdb.DuckDBPyConnection:
    """A reader of its own. `duckdb.connect(path)` would share one database instance per path in
    this process (DuckDB caches them), so a second open would see the first one's copy."""
    con = duckdb.connect()
    con.execute(f"ATTACH '{path}' AS replica (READ_ONLY)")
    con.execute("USE replica")
    return con


def _read_copy(path: Path) -> tuple[int, int, int]:
    """(attempt rows, the copy's recorded FLEET_ATTEMPTS seq, copy number), read-only like any client."""
    con = _open_read_only(path)
    try:
        rows = con.execute("SELECT count(*) FROM attempts").fetchone()
        mark = con.execute("SELECT seq, copy FROM fleetlog_replica WHERE stream = 'FLEET_ATTEMPTS'").fetchone()
    finally:
        con.close()
    assert rows is not None and mark is not None
    return int(rows[0]), int(mark[0]), int(mark[1])


async def test_a_following_replica_publishes_consistent_copies_others_read_while_it_runs(
        fleet: Fleet, server: Server, settings: FleetSettings, tmp_path: Path) -> None:
    """The attempts stream holds only attempts here, so a consistent copy has exactly as many
    attempt rows as its recorded FLEET_ATTEMPTS seq: a copy taken in the middle of a batch
    (rows without their checkpoint, or the other way round) would show a difference."""
    for i in range(20):
        fleet.attempts.record(agent="follow", action="a", outcome="success", elapsed_s=float(i))
    first = await fleet.flush()
    path = tmp_path / "followed.duckdb"
    proc = _start_follower(path, settings.nats_url, tmp_path / "cli")
    lines: list[dict[str, Any]] = []

    async def progress_until(seq: int) -> dict[str, Any]:
        while True:
            line = await asyncio.to_thread(proc.stdout.readline)  # type: ignore[union-attr]
            assert line, f"the follower ended: {proc.wait()} {proc.stderr.read()}"  # type: ignore[union-attr]
            lines.append(json.loads(line))
            if lines[-1]["streams"]["FLEET_ATTEMPTS"]["folded"] >= seq:
                return lines[-1]

    try:
        caught_up = await asyncio.wait_for(progress_until(first["FLEET_ATTEMPTS"]), 120)
        assert caught_up["rows"]["attempts"] == 20
        assert caught_up["streams"]["FLEET_ATTEMPTS"] == {"folded": first["FLEET_ATTEMPTS"],
                                                          "last": first["FLEET_ATTEMPTS"]}
        held = _open_read_only(path)  # a reader that keeps its copy open
        seen: list[tuple[int, int, int]] = []
        stop = threading.Event()

        def reader() -> None:  # another client, reading the file over and over while copies replace it
            while not stop.is_set():
                seen.append(_read_copy(path))

        reading = asyncio.create_task(asyncio.to_thread(reader))
        try:
            for burst in range(40):  # a steady trickle: the follower folds while it copies
                for i in range(5):
                    fleet.attempts.record(agent="follow", action=f"b{burst}", outcome="success", elapsed_s=float(i))
                await asyncio.sleep(0.02)
            token = await fleet.flush()
            await asyncio.wait_for(progress_until(token["FLEET_ATTEMPTS"]), 120)
            assert held.execute("SELECT count(*) FROM attempts").fetchone() == (20,)  # its copy, unchanged
        finally:
            stop.set()
            await reading
            held.close()
        last = lines[-1]
        assert _read_copy(path)[:2] == (220, 220) == (last["rows"]["attempts"],
                                                     last["streams"]["FLEET_ATTEMPTS"]["folded"])
        assert all(rows == seq for rows, seq, _ in seen), seen  # every copy read was consistent
        assert len({rows for rows, _, _ in seen}) > 1  # ... and the reader saw the rows grow
        assert [c for _, _, c in seen] == sorted(c for _, _, c in seen)  # copies only move forward
        assert [entry["copy"] for entry in lines] == list(range(1, len(lines) + 1))
        assert _wal_of(path) is None  # a copy is one file
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=60) == 0, proc.stderr.read()  # type: ignore[union-attr]
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    # The working file goes on from where it stopped: a one-shot run folds nothing again.
    again = cli_json(await cli_runner(settings.nats_url, tmp_path)("replica", str(path), "--json"))
    assert again["streams"]["FLEET_ATTEMPTS"] == last["streams"]["FLEET_ATTEMPTS"]["folded"]
    assert _read_copy(path)[:2] == (220, 220)
