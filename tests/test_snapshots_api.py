"""Host snapshots through the Python API: take, latest, history, get, on-demand diff, rules."""

from __future__ import annotations

import socket
from typing import Any

import nats
import pytest
from fleetlog.schemas import subjects
from fleetlog.schemas.snapshots import diff_data
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import rebuild_and_wait


@pytest.mark.parametrize("old, new, added, removed, changed", [
    (None, {"a": 1, "b": {"c": [1, 2]}}, {"/a": 1, "/b/c": [1, 2]}, [], {}),
    ({"a": 1}, {"a": 1}, {}, [], {}),
    ({"a": 1}, {"a": 1.0}, {}, [], {"/a": {"from": 1, "to": 1.0}}),  # compared as JSON
    ({"a": 1}, {"a": True}, {}, [], {"/a": {"from": 1, "to": True}}),
    ({"d": {"x": 1, "y": 2}}, {"d": {"x": 1, "z": 3}}, {"/d/z": 3}, ["/d/y"], {}),
    ({"d": {"x": 1}}, {"d": 5}, {"/d": 5}, ["/d/x"], {}),  # an object became a scalar
    ({"d": {}}, {"d": {"k": 1}}, {"/d/k": 1}, ["/d"], {}),  # an empty object is a leaf
    ({"l": [1, 2]}, {"l": [2, 1]}, {}, [], {"/l": {"from": [1, 2], "to": [2, 1]}}),  # lists are leaves
    ({"a/b": 1, "m~n": 1}, {"a/b": 2}, {}, ["/m~0n"], {"/a~1b": {"from": 1, "to": 2}}),  # RFC 6901 escapes
    ({"k": {"b": 1, "a": 2}}, {"k": {"a": 2, "b": 1}}, {}, [], {}),  # key order does not matter
])
def test_diff_data(old: dict[str, Any] | None, new: dict[str, Any], added: dict[str, Any], removed: list[str],
                   changed: dict[str, Any]) -> None:
    assert diff_data(old, new) == (added, removed, changed)


async def test_take_latest_history_get(fleet: Fleet) -> None:
    data: dict[str, Any] = {"disk": {"free_gb": 10}, "load": 0.5}
    r1 = fleet.snapshots.take("collector", data, host="web-1")
    data["load"] = 99  # the snapshot was encoded at the call
    fleet.snapshots.take("collector", {"disk": {"free_gb": 9}, "load": 0.7}, host="web-1")
    fleet.snapshots.take("watchdog", {"ok": True}, host="web-1")
    fleet.snapshots.take("collector", {"disk": {"free_gb": 50}}, host="db.1")  # a dot in the host
    mine = fleet.snapshots.take("collector", {"pid": 1})  # host defaults to this machine
    token = await fleet.flush()
    assert r1.token and mine.token

    latest = await fleet.snapshots.latest(min_seq=token)
    assert [(i.host, i.agent) for i in latest.items] == sorted(
        [("web-1", "collector"), ("web-1", "watchdog"), ("db.1", "collector"), (socket.gethostname(), "collector")]
    )
    web = {i.agent: i for i in (await fleet.snapshots.latest(host="web-1")).items}
    assert web["collector"].data == {"disk": {"free_gb": 9}, "load": 0.7}
    assert [i.host for i in (await fleet.snapshots.latest(agent="watchdog")).items] == ["web-1"]
    assert len((await fleet.snapshots.latest(limit=2)).items) == 2

    hist = await fleet.snapshots.history("web-1", "collector", limit=1)
    assert [i.data["load"] for i in hist.items] == [0.7] and hist.next_cursor is not None
    older = await fleet.snapshots.history("web-1", "collector", limit=1, before_seq=hist.next_cursor)
    assert [i.data for i in older.items] == [{"disk": {"free_gb": 10}, "load": 0.5}]
    assert older.next_cursor is None
    first = older.items[0]
    assert first.taken_at > 1_700_000_000 and first.ts.endswith("+00:00")

    got = await fleet.snapshots.get("web-1", "collector", seq=first.seq)
    assert got is not None and got.id == first.id
    newest = await fleet.snapshots.get("db.1", "collector")
    assert newest is not None and newest.data == {"disk": {"free_gb": 50}}
    assert await fleet.snapshots.get("web-1", "nobody") is None
    assert await fleet.snapshots.get("web-1", "collector", seq=10_000) is None


async def test_diff_on_demand(fleet: Fleet) -> None:
    fleet.snapshots.take("a", {"v": 1, "cfg": {"x": 1, "y": 2}}, host="h")
    fleet.snapshots.take("a", {"v": 2, "cfg": {"x": 1}}, host="h")
    fleet.snapshots.take("a", {"v": 2, "cfg": {"x": 1}, "new": [1]}, host="h")
    token = await fleet.flush()
    hist = await fleet.snapshots.history("h", "a", min_seq=token)
    s3, s2, s1 = (i.seq for i in hist.items)

    last = await fleet.snapshots.diff("h", "a")
    assert (last.found, last.from_seq, last.to_seq) == (True, s2, s3)
    assert (last.added, last.removed, last.changed) == ({"/new": [1]}, [], {})
    d = await fleet.snapshots.diff("h", "a", to_seq=s2)
    assert (d.from_seq, d.to_seq, d.removed, d.changed) == (s1, s2, ["/cfg/y"], {"/v": {"from": 1, "to": 2}})
    whole = await fleet.snapshots.diff("h", "a", from_seq=s1, to_seq=s3)
    assert whole.added == {"/new": [1]} and whole.removed == ["/cfg/y"]
    first = await fleet.snapshots.diff("h", "a", to_seq=s1)
    assert first.from_seq is None and first.added == {"/v": 1, "/cfg/x": 1, "/cfg/y": 2}
    assert not (await fleet.snapshots.diff("h", "nobody")).found
    assert not (await fleet.snapshots.diff("h", "a", from_seq=10_000)).found


@pytest.mark.parametrize("kwargs, field, rule", [
    ({"agent": "", "data": {}}, "agent", "non-empty string"),
    ({"agent": "a", "data": {}, "host": "h" * 257}, "host", "at most 256"),
    ({"agent": "a", "data": [1, 2]}, "data", "JSON object"),
    ({"agent": "a", "data": {1: "x"}}, "data", "keys must be strings"),
    ({"agent": "a", "data": {"x": object()}}, "data", "JSON-encodable"),
    ({"agent": "a", "data": {"x": "y" * 600_000}}, "data", "max_event_bytes"),
])
async def test_take_refuses_bad_input(fleet: Fleet, kwargs: dict[str, Any], field: str, rule: str) -> None:
    with pytest.raises(FleetValidationError) as info:
        fleet.snapshots.take(**kwargs)
    assert info.value.field == field and rule in str(info.value)
    assert fleet.publisher_stats().accepted == 0  # nothing published


async def test_garbage_on_the_wire_is_rejected_and_the_view_rebuilds_equal(fleet: Fleet, server: Server) -> None:
    fleet.snapshots.take("a", {"v": 1}, host="h")
    await fleet.flush()
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        js = nc.jetstream()
        await js.publish(subjects.snapshot("h", "a"), b"{not json")
        await js.publish(subjects.snapshot("h", "a"), b'{"type":"snapshot.taken","id":"0197a1b2-c3d4-7e5f-8071-'
                                                      b'8293a4b5c6d7","ts":"2026-11-22T00:00:00Z","host":"h",'
                                                      b'"agent":"a","data":[1]}')
        ack = await js.publish(subjects.snapshot("intruder", "a"), b'{"type":"snapshot.taken","id":"0197a1b2-c3d4-'
                                                                 b'7e5f-8071-8293a4b5c6d8","ts":"2026-11-22T00:00:'
                                                                 b'00Z","host":"h","agent":"a","data":{}}')
    finally:
        await nc.close()
    fleet.snapshots.take("a", {"v": 2}, host="h")
    token = await fleet.flush()
    assert token["FLEET_SNAPSHOTS"] > ack.seq
    hist = await fleet.snapshots.history("h", "a", min_seq=token)
    assert [i.data for i in hist.items] == [{"v": 2}, {"v": 1}]
    rejects = await fleet.rejects(projection="snapshots")
    reasons = sorted(r.reason.split(":")[0] for r in rejects.items)
    assert reasons == ["invalid event", "not valid JSON", "subject mismatch"]
    running = server.projector.live("snapshots")
    live = server.store.table_digest(running.gen.schema, ("snapshots", "snapshot_diffs"))
    await rebuild_and_wait(fleet, "snapshots")
    running = server.projector.live("snapshots")
    assert server.store.table_digest(running.gen.schema, ("snapshots", "snapshot_diffs")) == live


async def test_take_checks_ts_and_latest_pages(fleet: Fleet) -> None:
    for bad in ("yesterday-ish", "20240101", "2024W01"):  # Python parses the last two; the contract does not
        with pytest.raises(FleetValidationError) as info:
            fleet.snapshots.take("a", {}, host="h", ts=bad)
        assert info.value.field == "ts"
    r = fleet.snapshots.take("a", {}, host="h", ts="2026-11-22T10:00:00")
    for host in ("h1", "h2", "h3"):
        fleet.snapshots.take("b", {"x": 1}, host=host)
    token = await fleet.flush()
    got = await fleet.snapshots.get("h", "a", min_seq=token)
    assert got is not None and got.ts == "2026-11-22T10:00:00" and got.id == r.id  # stored exactly as given
    pairs: list[tuple[str, str]] = []
    after = None
    while True:
        page = await fleet.snapshots.latest(limit=3, after=after)
        pairs += [(i.host, i.agent) for i in page.items]
        if page.next_after is None:
            break
        after = page.next_after
    assert pairs == [("h", "a"), ("h1", "b"), ("h2", "b"), ("h3", "b")]
