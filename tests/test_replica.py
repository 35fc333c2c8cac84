"""`fleetlog replica` and `fleetlog export`: the views folded into a file of one's own."""

from __future__ import annotations

import json
from pathlib import Path

import duckdb
import nats
from fleetlog.services.node.server import Server
from fleetlog.services.query.replica import fold_replica

from fleetlog import Fleet, FleetSettings

from .helpers import cli_json, cli_runner, wait_until


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
