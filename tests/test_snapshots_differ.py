"""The snapshot differ against the real broker: chained diffs, exactly one per snapshot, races,
restarts, redelivery, live `watch`, and a rebuild that re-emits nothing."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from typing import Any

import nats
import pytest
from fleetlog.schemas import subjects
from fleetlog.schemas.snapshots import SnapshotDiff
from fleetlog.services.backbone.errors import FleetUnavailable
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.node.server import Server
from fleetlog.services.reactors.snapshot_differ import SnapshotDiffer
from fleetlog.services.reactors.supervisor import Reactors

from fleetlog import Fleet

from .helpers import rebuild_and_wait


async def _drain(differ: SnapshotDiffer) -> None:
    """Diff everything waiting, then unsubscribe (a live pull subscription holds up the
    connection's drain at shutdown)."""
    while await differ.run_once(timeout=0.5):
        pass
    await differ.stop()


async def _diff_stream_seq(fleet: Fleet) -> int:
    js = (await fleet.nats()).jetstream()
    return (await js.stream_info("FLEET_DIFFS")).state.last_seq


async def test_one_diff_per_snapshot_chained(fleet: Fleet, server: Server) -> None:
    fleet.snapshots.take("a", {"v": 1, "cfg": {"x": 1}}, host="h")
    fleet.snapshots.take("a", {"v": 1, "cfg": {"x": 1}}, host="h")  # unchanged: an empty diff
    fleet.snapshots.take("a", {"v": 2, "cfg": {}}, host="h")
    fleet.snapshots.take("b", {"up": True}, host="h")
    token = await fleet.flush()
    snaps = (await fleet.snapshots.history("h", "a", min_seq=token)).items[::-1]
    differ = SnapshotDiffer(server.nc)
    await _drain(differ)
    assert (differ.published, differ.covered, differ.skipped) == (4, 0, 0)

    last = await _diff_stream_seq(fleet)
    diffs = (await fleet.snapshots.diffs(min_seq={"FLEET_DIFFS": last})).items
    assert len(diffs) == 4
    of_a = [d for d in diffs if d.agent == "a"]
    assert [(d.from_seq, d.to_seq) for d in of_a] == [
        (None, snaps[0].seq), (snaps[0].seq, snaps[1].seq), (snaps[1].seq, snaps[2].seq)]
    assert of_a[0].added == {"/v": 1, "/cfg/x": 1}
    assert (of_a[1].added, of_a[1].removed, of_a[1].changed) == ({}, [], {})
    assert of_a[2].changed == {"/v": {"from": 1, "to": 2}} and of_a[2].removed == ["/cfg/x"]
    assert of_a[2].added == {"/cfg": {}} and of_a[2].snapshot_ts == snaps[2].ts
    changes = await fleet.snapshots.diffs(host="h", changes_only=True)
    assert len(changes.items) == 3  # the empty diff left out
    assert [d.agent for d in (await fleet.snapshots.diffs(agent="b")).items] == ["b"]

    # Redelivered (a crash between publish and ack): covered, nothing published twice.
    again = SnapshotDiffer(server.nc, durable="another-consumer")
    await _drain(again)
    assert (again.published, again.covered) == (0, 4)


async def test_two_differs_race_and_restart(fleet: Fleet, server: Server) -> None:
    """Two differs on one durable consumer, one of them stopped half way and replaced by a
    third: every snapshot gets exactly one diff (a differ handed a later snapshot first
    diffs the ones before it), each subject's diffs form one chain ending at its last
    snapshot, and each diff is the diff of the snapshots it names."""
    hosts = [f"h{i}" for i in range(4)]
    for n in range(60):
        for h in hosts:
            fleet.snapshots.take("agent", {"n": n // 3, "h": h}, host=h)
    token = await fleet.flush()
    await fleet.snapshots.latest(min_seq=token)
    nc2 = await nats.connect(fleet.settings.nats_url)
    try:
        one, two = SnapshotDiffer(server.nc, batch=16), SnapshotDiffer(nc2, batch=16)
        for _ in range(2):  # (one fetch at a time per differ, as in its loop)
            await asyncio.gather(one.run_once(), two.run_once())
        await two.stop()  # stopped half way
        three = SnapshotDiffer(nc2, batch=16)  # a restarted differ: same durable consumer

        await asyncio.gather(_drain(one), _drain(three))
    finally:
        await nc2.close()
    differs = (one, two, three)
    assert sum(d.published for d in differs) == 240  # exactly one diff per snapshot
    assert one.published and two.published and three.published
    last_seq = await _diff_stream_seq(fleet)
    diffs = await fleet.snapshots.diffs(limit=500, min_seq={"FLEET_DIFFS": last_seq})
    assert len(diffs.items) == 240
    for h in hosts:
        chain = [d for d in diffs.items if d.host == h]
        assert len(chain) == 60 and chain[0].from_seq is None
        assert all(b.from_seq == a.to_seq for a, b in itertools.pairwise(chain))
        newest = await fleet.snapshots.get(h, "agent")
        assert newest is not None and chain[-1].to_seq == newest.seq
        for d in chain[1:]:
            expected = await fleet.snapshots.diff(h, "agent", from_seq=d.from_seq, to_seq=d.to_seq)
            assert (d.added, d.removed, d.changed) == (expected.added, expected.removed, expected.changed)


async def test_garbage_is_skipped_and_a_rebuild_emits_nothing(fleet: Fleet, server: Server) -> None:
    fleet.snapshots.take("a", {"v": 1}, host="h")
    await fleet.flush()
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        await nc.jetstream().publish(subjects.snapshot("h", "a"), b"garbage")
    finally:
        await nc.close()
    fleet.snapshots.take("a", {"v": 2}, host="h")
    await fleet.flush()
    differ = SnapshotDiffer(server.nc)
    await _drain(differ)
    assert (differ.published, differ.skipped) == (2, 1)
    before = await _diff_stream_seq(fleet)
    diffs = await fleet.snapshots.diffs(min_seq={"FLEET_DIFFS": before})
    assert [d.changed for d in diffs.items] == [{}, {"/v": {"from": 1, "to": 2}}]
    await rebuild_and_wait(fleet, "snapshots")
    assert await _diff_stream_seq(fleet) == before
    assert len((await fleet.snapshots.diffs()).items) == 2


async def test_watch_follows_the_reactor_live(fleet: Fleet, server: Server) -> None:
    reactors = Reactors(fleet.settings)
    await reactors.start()
    got: list[tuple[int, SnapshotDiff]] = []

    async def follow() -> None:
        async for seq, diff in fleet.snapshots.watch(host="w"):
            got.append((seq, diff))

    task = asyncio.create_task(follow())
    try:
        await asyncio.sleep(0.3)  # the subscription is in place (deliver: new)
        fleet.snapshots.take("a", {"v": 1}, host="w")
        fleet.snapshots.take("a", {"v": 1}, host="w")  # an empty diff: not shown (changes_only)
        fleet.snapshots.take("a", {"v": 2}, host="w")
        fleet.snapshots.take("a", {"v": 9}, host="other")  # another host: filtered out
        await fleet.flush()
        for _ in range(200):
            if len(got) >= 2:
                break
            await asyncio.sleep(0.05)
        assert [d.changed or d.added for _, d in got] == [{"/v": 1}, {"/v": {"from": 1, "to": 2}}]
        assert got[0][0] < got[1][0]
        # Replay from a position: the history first, empty diffs included when asked.
        replayed: list[SnapshotDiff] = []
        watcher = fleet.snapshots.watch(host="w", after_seq=0, changes_only=False)
        async for _, diff in watcher:
            replayed.append(diff)
            if len(replayed) == 3:
                break
        await watcher.aclose()
        assert [d.empty for d in replayed] == [False, True, False]
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await reactors.stop()


async def test_a_diff_too_large_is_published_truncated_and_blocks_nothing(fleet: Fleet, server: Server) -> None:
    """Paths repeat their parents and `changed` holds both values, so a diff can be far larger
    than its snapshots: here ~37 KB snapshots give a ~650 KB diff, over the projector's limit."""
    wide = {"k" * 200: {f"leaf{i}": i for i in range(3000)}}
    fleet.snapshots.take("a", wide, host="big")
    fleet.snapshots.take("a", {"small": 1}, host="big")
    await fleet.flush()
    differ = SnapshotDiffer(server.nc, max_event_bytes=fleet.settings.max_event_bytes)
    await _drain(differ)
    assert (differ.published, differ.truncated, differ.failed) == (2, 2, 0)  # both diffs name 3000+ paths
    diffs = await fleet.snapshots.diffs(host="big", min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})
    assert [(d.truncated, d.added) for d in diffs.items] == [(True, {}), (True, {})]
    assert (await fleet.snapshots.diffs(host="big", changes_only=True)).items  # truncated is a change
    fleet.snapshots.take("a", {"small": 2}, host="big")
    await fleet.flush()
    await _drain(differ)
    last = (await fleet.snapshots.diffs(host="big", min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})).items
    assert last[-1].changed == {"/small": {"from": 1, "to": 2}} and not last[-1].truncated


async def test_an_error_hands_the_batch_back_in_order(fleet: Fleet, server: Server,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """One failed publish (the broker away for a moment): the snapshot and the rest of its batch
    come back in order after the retry delay, and each still gets its own diff."""
    for v in range(4):
        fleet.snapshots.take("a", {"v": v}, host="flaky")
    await fleet.flush()
    differ = SnapshotDiffer(server.nc)
    real = differ.guarded.publish
    calls = 0

    async def once_unavailable(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise FleetUnavailable("broker away for a moment")
        return await real(*args, **kwargs)

    monkeypatch.setattr(differ.guarded, "publish", once_unavailable)
    assert await differ.run_once(timeout=0.5) == 1  # the first diffed, then the error
    assert differ.retried == 3
    for _ in range(50):
        if differ.published == 4:
            break
        await differ.run_once(timeout=0.5)
    await differ.stop()
    # `covered` may be > 0: on a loaded machine the first snapshot's ack can miss its ack wait
    # and come back with the batch; it is then found diffed and only acked (never diffed twice).
    assert (differ.published, differ.failed) == (4, 0)
    diffs = await fleet.snapshots.diffs(host="flaky", min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})
    assert [d.changed for d in diffs.items[1:]] == [{"/v": {"from": v, "to": v + 1}} for v in range(3)]


async def test_the_differ_skips_what_the_projector_rejects(fleet: Fleet, server: Server) -> None:
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        await nc.jetstream().publish(subjects.snapshot("h", "a"), b'{"type":"snapshot.taken","id":"0197a1b2-c3d4-7e5f'
                                                                b'-8071-8293a4b5c6d7","ts":"yesterday-ish","host":"h",'
                                                                b'"agent":"a","data":{}}')
    finally:
        await nc.close()
    fleet.snapshots.take("a", {"v": 1}, host="h")
    await fleet.flush()
    differ = SnapshotDiffer(server.nc)
    await _drain(differ)
    assert (differ.published, differ.skipped) == (1, 1)
    diffs = await fleet.snapshots.diffs(min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})
    (only,) = diffs.items
    assert only.from_seq is None and only.added == {"/v": 1}


async def test_two_differs_walking_one_long_chain(fleet: Fleet, server: Server) -> None:
    """Both handed the newest of 300 snapshots on one subject at once: both walk the chain,
    every snapshot gets exactly one diff, and losing many races on the way is no error."""
    for v in range(300):
        fleet.snapshots.take("a", {"v": v}, host="long")
    await fleet.flush()
    g = Guarded(server.nc)
    newest = await g.last("FLEET_SNAPSHOTS", subjects.snapshot("long", "a"))
    assert newest is not None
    nc2 = await nats.connect(fleet.settings.nats_url)
    try:
        one, two = SnapshotDiffer(server.nc), SnapshotDiffer(nc2)
        await asyncio.gather(*(d.handle(newest.seq, newest.subject, newest.data) for d in (one, two)))
    finally:
        await nc2.close()
    assert one.published + two.published == 300 and one.published and two.published
    diffs = await fleet.snapshots.diffs(host="long", limit=500,
                                        min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})
    assert [d.to_seq for d in diffs.items] == sorted({d.to_seq for d in diffs.items}) and len(diffs.items) == 300


async def test_a_foreign_message_on_a_diff_subject_starts_a_fresh_chain_here(fleet: Fleet, server: Server) -> None:
    for v in range(3):
        fleet.snapshots.take("a", {"v": v}, host="f")
    await fleet.flush()
    differ = SnapshotDiffer(server.nc)
    await _drain(differ)
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        await nc.jetstream().publish(subjects.diff("f", "a"), b"not a diff")
    finally:
        await nc.close()
    fleet.snapshots.take("a", {"v": 9}, host="f")
    token = await fleet.flush()
    differ = SnapshotDiffer(server.nc)
    await _drain(differ)
    assert differ.published == 1  # only the new snapshot: the history is not diffed again
    diffs = await fleet.snapshots.diffs(host="f", min_seq={"FLEET_DIFFS": await _diff_stream_seq(fleet)})
    last = diffs.items[-1]
    assert (last.from_seq, last.to_seq, last.added) == (None, token["FLEET_SNAPSHOTS"], {"/v": 9})
