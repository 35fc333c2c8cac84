"""Taking snapshots through the Python API against the real broker: the take-time diff, reads, the
diff records, ten racing takers, the broker away during take, old (v1) events, bad input."""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

import msgspec
import nats
import pytest
from fleetlog.schemas import new_event_id, now_iso, subjects
from fleetlog.schemas.snapshots import HostSnapshot
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.node.broker import EmbeddedBroker
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, FleetSync, compute_diff_fields

from .helpers import rebuild_and_wait


async def stored(fleet: Fleet, stream: str, subject: str) -> list[tuple[int, dict[str, Any]]]:
    """Every message on `subject`, in stream order, straight from JetStream."""
    g, out, seq = Guarded(await fleet.nats()), [], 1
    while (msg := await g.next(stream, subject, seq)) is not None:
        out.append((msg.seq, json.loads(msg.data)))
        seq = msg.seq + 1
    return out


async def test_take_diffs_at_take_time_and_reads(fleet: Fleet, server: Server) -> None:
    first = {"timestamp": "2026-01-01T09:00:00+09:00", "a": 1, "pids": {"tmux": {"server": 1, "pane": 2}}}
    got = await fleet.snapshots.take("a1", first, host="h1")
    assert got == {**first, "has_diff": False, "diff_fields": []}  # the first: no diff, nothing added
    assert "has_diff" not in first  # the caller's dict is left alone
    only_time = {**first, "timestamp": "2026-01-01T09:01:00+09:00"}
    assert (await fleet.snapshots.take("a1", only_time, host="h1"))["diff_fields"] == []
    third = {"timestamp": "2026-01-01T09:02:00+09:00", "a": 2.0, "pids": {"tmux": {"server": 3, "pane": 2}}}
    got = await fleet.snapshots.take("a1", third, host="h1")
    assert got == {**third, "has_diff": True, "diff_fields": ["a", "pids.tmux.server"]}
    quiet = await fleet.snapshots.take("a1", {"a": 9}, host="h1", with_diff=False)
    assert quiet == {"a": 9, "has_diff": False, "diff_fields": []}

    token = await fleet.flush()
    assert await fleet.snapshots.latest("a1", "h1", min_seq=token) == quiet
    assert await fleet.snapshots.prev("a1", "h1") == got
    assert await fleet.snapshots.latest("nobody", "h1") is None and await fleet.snapshots.prev("nobody") is None
    history = await fleet.snapshots.history("a1", "h1", limit=10)
    assert [i.diff_fields for i in history.items] == [[], ["a", "pids.tmux.server"], [], []]

    # Exactly one diff record: the one snapshot that had a diff.
    diffs = await fleet.snapshots.diffs(min_seq=token)
    assert [(d.host, d.agent, d.timestamp, d.diff_fields, d.changes) for d in diffs.items] == [
        ("h1", "a1", third["timestamp"], ["a", "pids.tmux.server"],
         {"a": {"from": 1, "to": 2.0}, "pids.tmux.server": {"from": 1, "to": 3}})]
    records = await stored(fleet, "FLEET_DIFFS", subjects.diff("h1", "a1"))
    assert len(records) == 1 and records[0][1]["snapshot_id"] == history.items[1].id

    # A rebuild folds the records again and publishes nothing.
    js = (await fleet.nats()).jetstream()
    before = (await js.stream_info("FLEET_DIFFS")).state.last_seq
    await rebuild_and_wait(fleet, "snapshots")
    assert (await fleet.snapshots.diffs(min_seq=token)).items == diffs.items
    assert (await js.stream_info("FLEET_DIFFS")).state.last_seq == before


async def test_take_gathers_with_an_empty_path(fleet: Fleet, server: Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "")
    snap = await fleet.snapshots.take("a2")
    assert snap["agent"] == "a2" and snap["tmux_count"] is None and snap["has_diff"] is False
    again = await fleet.snapshots.take("a2")
    assert again["diff_fields"] == compute_diff_fields({k: v for k, v in snap.items() if k not in (
        "has_diff", "diff_fields")}, {k: v for k, v in again.items() if k not in ("has_diff", "diff_fields")})
    assert await fleet.snapshots.latest("a2", min_seq=await fleet.flush()) == again


def check_chain(chain: list[tuple[int, dict[str, Any]]], n: int) -> None:
    """n snapshots, each diffed against the one stored right before it."""
    assert len(chain) == n
    prev: dict[str, Any] | None = None
    for _, event in chain:
        assert event["diff_fields"] == compute_diff_fields(prev, event["data"])
        assert event["has_diff"] == (prev is not None)
        prev = event["data"]


async def test_ten_racing_clients_each_get_their_true_predecessor(fleet: Fleet, server: Server,
                                                                  settings: FleetSettings) -> None:
    # Ten connections (as ten processes would be), one agent: {"n": i, "k<i>": true} makes each
    # diff name its predecessor (k<j>), so a wrong base would show.
    clients = [await Fleet.connect(settings=settings, name=f"racer-{i}") for i in range(10)]
    try:
        taken = await asyncio.gather(*(c.snapshots.take("race", {"n": i, f"k{i}": True}, host="h")
                                       for i, c in enumerate(clients)))
        for c in clients:
            await c.flush()
    finally:
        for c in clients:
            await c.close()
    chain = await stored(fleet, "FLEET_SNAPSHOTS", subjects.snapshot("h", "race"))
    check_chain(chain, 10)
    by_n = {event["data"]["n"]: event["diff_fields"] for _, event in chain}
    assert {t["n"]: t["diff_fields"] for t in taken} == by_n  # each caller got what was stored
    records = await stored(fleet, "FLEET_DIFFS", subjects.diff("h", "race"))
    # Once per snapshot with a diff, naming it; ten takers' records may interleave in their own order.
    assert sorted((r["snapshot_id"], r["diff_fields"]) for _, r in records) == sorted(
        (e["id"], e["diff_fields"]) for _, e in chain[1:])


async def test_ten_threads_on_one_sync_client(settings: FleetSettings, server: Server, fleet: Fleet) -> None:
    sync = FleetSync.connect(settings=settings)
    try:
        threads = [threading.Thread(target=sync.snapshots.take, args=("threads", {"n": i, f"k{i}": 1}),
                                    kwargs={"host": "h"}) for i in range(10)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        sync.flush()
    finally:
        sync.close()
    check_chain(await stored(fleet, "FLEET_SNAPSHOTS", subjects.snapshot("h", "threads")), 10)
    assert len(await stored(fleet, "FLEET_DIFFS", subjects.diff("h", "threads"))) == 9


async def test_broker_down_during_take(broker: EmbeddedBroker, settings: FleetSettings, server: Server,
                                       fleet: Fleet) -> None:
    assert (await fleet.snapshots.take("away", {"a": 1}, host="h"))["diff_fields"] == []
    await fleet.flush()
    await broker.stop()
    # Returns with the broker gone: diffed against the last snapshot this process knows, spooled.
    assert (await fleet.snapshots.take("away", {"a": 2}, host="h"))["diff_fields"] == ["a"]
    assert (await fleet.snapshots.take("away", {"a": 2, "b": 1}, host="h"))["diff_fields"] == ["b"]
    assert fleet.publisher_stats().spooled + fleet.publisher_stats().queued >= 1
    await broker.start()
    token = await fleet.flush(timeout=60)
    # Back: the spooled ones drained in order, and the next take follows them.
    assert (await fleet.snapshots.take("away", {"a": 3, "b": 1}, host="h"))["diff_fields"] == ["a"]
    await fleet.flush()
    chain = await stored(fleet, "FLEET_SNAPSHOTS", subjects.snapshot("h", "away"))
    assert [e["data"] for _, e in chain] == [{"a": 1}, {"a": 2}, {"a": 2, "b": 1}, {"a": 3, "b": 1}]
    check_chain(chain, 4)
    records = await stored(fleet, "FLEET_DIFFS", subjects.diff("h", "away"))
    assert [r["diff_fields"] for _, r in records] == [["a"], ["b"], ["a"]]
    assert (await fleet.snapshots.history("away", "h", min_seq=token)).items


async def test_old_events_upcast_or_rejected(fleet: Fleet, server: Server) -> None:
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        v1_snap = {"type": "snapshot.taken", "id": new_event_id(), "ts": now_iso(), "v": 1, "host": "old",
                   "agent": "a", "data": {"disk": {"free": 1}}}
        v1_diff = {"type": "snapshot.diff", "id": new_event_id(), "ts": now_iso(), "v": 1, "host": "old",
                   "agent": "a", "from_seq": None, "to_seq": 1, "added": {"/disk/free": 1}}
        s = await js.publish(subjects.snapshot("old", "a"), json.dumps(v1_snap).encode())
        d = await js.publish(subjects.diff("old", "a"), json.dumps(v1_diff).encode())
    finally:
        await nc.close()
    token = {"FLEET_SNAPSHOTS": s.seq, "FLEET_DIFFS": d.seq}
    assert await fleet.snapshots.latest("a", "old", min_seq=token) == {
        "disk": {"free": 1}, "has_diff": False, "diff_fields": []}  # upcast
    assert (await fleet.snapshots.diffs(min_seq=token)).items == []
    rejects = (await fleet.rejects("snapshots", min_seq=token)).items
    assert [(r.seq, r.stream) for r in rejects] == [(d.seq, "FLEET_DIFFS")]
    assert "snapshot.diff v1" in rejects[0].reason and "JSON Pointer" in rejects[0].reason
    # A new take diffs against the old snapshot's data.
    assert (await fleet.snapshots.take("a", {"disk": {"free": 2}}, host="old"))["diff_fields"] == ["disk.free"]


async def test_bad_input_names_the_field(fleet: Fleet) -> None:
    with pytest.raises(FleetValidationError, match="agent"):
        await fleet.snapshots.take("", {})
    with pytest.raises(FleetValidationError, match=r"data.*JSON object"):
        await fleet.snapshots.take("a", [1, 2])  # type: ignore[arg-type]
    with pytest.raises(FleetValidationError, match=r"data.*keys must be strings"):
        await fleet.snapshots.take("a", {1: 2})
    with pytest.raises(FleetValidationError, match=r"data.*JSON-encodable"):
        await fleet.snapshots.take("a", {"x": object()})
    with pytest.raises(FleetValidationError, match=r"data.*max_event_bytes"):
        await fleet.snapshots.take("a", {"x": "y" * (fleet.settings.max_event_bytes + 1)})
    assert msgspec.json.decode(msgspec.json.encode(HostSnapshot(id=new_event_id(), ts=now_iso(), host="h",
                                                                agent="a"))).get("v") == 2


async def test_a_diff_record_too_large_keeps_its_fields(fleet: Fleet, server: Server) -> None:
    # Each snapshot fits max_event_bytes; the record would carry both values of "blob" and not.
    big = fleet.settings.max_event_bytes * 6 // 10
    await fleet.snapshots.take("fat", {"blob": "x" * big, "n": 1}, host="h")
    snap = await fleet.snapshots.take("fat", {"blob": "y" * big, "n": 2}, host="h")
    assert snap["diff_fields"] == ["blob", "n"]
    page = await fleet.snapshots.diffs(agent="fat", min_seq=await fleet.flush())
    assert [(d.diff_fields, d.changes) for d in page.items] == [(["blob", "n"], {})]
