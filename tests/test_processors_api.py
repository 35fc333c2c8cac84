"""Processor bookkeeping through the Python API against the real broker: file markers, runs,
the lock decided by JetStream (races, expiry, fencing) and the compacted-stream view."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from fleetlog.schemas import subjects
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.guarded import BrokerRefused
from fleetlog.services.client.processors import ProcessorLockBusy, ProcessorLockLost, hash_file, path_hash
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .helpers import rebuild_and_wait


async def test_file_markers_seen_unprocessed_and_paging(fleet: Fleet, tmp_path: Path) -> None:
    f = tmp_path / "a.csv"
    f.write_text("x,y\n1,2\n")
    content = hash_file(f)
    fleet.processors.mark("ingest", str(f), "processing", file_hash=content, size=f.stat().st_size)
    fleet.processors.mark("ingest", str(f), "done", file_hash=content, size=f.stat().st_size, detail={"rows": 1})
    for i in range(5):
        fleet.processors.mark("ingest", f"/data/{i}.csv", "failed" if i == 3 else "done", run_id="r1")
    fleet.processors.mark("other", "/data/0.csv", "pending")  # another processor: its own bookkeeping
    token = await fleet.flush()

    got = await fleet.processors.file("ingest", content, min_seq=token)
    assert got is not None and (got.status, got.detail, got.size) == ("done", {"rows": 1}, 8)
    assert got.file_path == str(f) and got.updated_at > 1_700_000_000
    hashes = [content, path_hash("/data/3.csv"), path_hash("/data/4.csv"), path_hash("/never.csv")]
    assert await fleet.processors.seen("ingest", hashes) == {
        content: "done", hashes[1]: "failed", hashes[2]: "done"}
    assert await fleet.processors.unprocessed("ingest", hashes) == [hashes[1], hashes[3]]
    assert await fleet.processors.seen("other", hashes) == {}
    assert (await fleet.processors.seen("other", [path_hash("/data/0.csv")])) == {path_hash("/data/0.csv"): "pending"}

    page = await fleet.processors.files("ingest", limit=4)
    assert page.total_count == 6 and len(page.items) == 4 and page.next_cursor == page.items[-1].file_hash
    rest = await fleet.processors.files("ingest", after=page.next_cursor, limit=4)
    assert len(rest.items) == 2 and rest.next_cursor is None
    hashes_in_order = [i.file_hash for i in page.items + rest.items]
    assert hashes_in_order == sorted(hashes_in_order)
    failed = await fleet.processors.files("ingest", statuses=["failed"])
    assert [i.file_path for i in failed.items] == ["/data/3.csv"] and failed.total_count == 1
    assert (await fleet.processors.files("ingest", run_id="r1")).total_count == 5
    assert await fleet.processors.file("ingest", "nope") is None


@pytest.mark.parametrize("args, kwargs, field", [
    (("", "/x", "done"), {}, "processor"),
    (("p", "/x", ""), {}, "status"),
    (("p", 7, "done"), {}, "file_path"),
    (("p", "/x", "done"), {"size": -1}, "size"),
    (("p", "/x", "done"), {"detail": [1]}, "detail"),
    (("p", "/x", "done"), {"file_hash": "h" * 300}, "file_hash"),
])
async def test_mark_refuses_bad_input(fleet: Fleet, args: tuple[object, ...], kwargs: dict[str, object],
                                      field: str) -> None:
    with pytest.raises(FleetValidationError) as info:
        fleet.processors.mark(*args, **kwargs)  # type: ignore[arg-type]
    assert info.value.field == field
    assert fleet.publisher_stats().accepted == 0


async def test_runs_lifecycle(fleet: Fleet) -> None:
    run = await fleet.processors.start_run("ingest", "r-1", files_total=3, detail={"dir": "/in"})
    assert (run.status, run.files_total, run.finished_at) == ("running", 3, None) and run.started_at
    again = await fleet.processors.start_run("ingest", "r-1", files_total=99)
    assert again.files_total == 3 and again.seq == run.seq  # idempotent by run_id
    done = await fleet.processors.finish_run("ingest", "r-1", "completed", files_ok=2, files_failed=1,
                                             detail={"note": "one bad"})
    assert done is not None and (done.status, done.files_ok, done.files_failed) == ("completed", 2, 1)
    assert done.detail == {"dir": "/in", "note": "one bad"} and done.finished_at is not None
    same = await fleet.processors.finish_run("ingest", "r-1", "completed")
    assert same is not None and same.seq == done.seq
    with pytest.raises(ValueError, match="already completed"):
        await fleet.processors.finish_run("ingest", "r-1", "failed")
    with pytest.raises(ValueError, match="Unknown run status"):
        await fleet.processors.finish_run("ingest", "r-1", "bogus")
    assert await fleet.processors.finish_run("ingest", "nope", "failed") is None
    auto = await fleet.processors.start_run("ingest")  # a fresh run id
    view = await fleet.processors.run("ingest", "r-1")
    assert view is not None and view.status == "completed" and view.seq == done.seq
    runs = await fleet.processors.runs("ingest", limit=1)
    assert [r.run_id for r in runs.items] == [auto.run_id] and runs.next_cursor == auto.seq
    older = await fleet.processors.runs("ingest", before_seq=runs.next_cursor)
    assert [r.run_id for r in older.items] == ["r-1"]
    fleet.processors.mark("ingest", "/a", "done")
    summary = await fleet.processors.summary(min_seq=await fleet.flush())
    (s,) = summary.items
    assert (s.processor, s.files, s.runs, s.lock_holder) == ("ingest", {"done": 1}, 2, None)
    assert s.last_run is not None and s.last_run.run_id == auto.run_id


async def test_lock_race_expiry_and_fencing(fleet: Fleet) -> None:
    """8 acquirers on 8 connections: exactly one wins. After its lease passes another holder
    takes the lock with a higher fence, and every write of the old holder is refused."""
    clients = [await Fleet.connect(settings=fleet.settings, name=f"acq-{i}") for i in range(8)]
    try:
        got = await asyncio.gather(*(c.processors.acquire("ingest", f"h{i}", lease_s=30)
                                     for i, c in enumerate(clients)))
        winners = [g for g in got if g is not None]
        assert len(winners) == 1
        first = winners[0]
        owner = clients[got.index(first)]
        state = await fleet.processors.lock("ingest", min_seq={"FLEET_PROCESSORS": first.seq})
        assert (state.holder, state.fence, state.held) == (first.holder, first.fence, True)
        assert await fleet.processors.acquire("ingest", "someone", lease_s=30) is None
        seq = await owner.processors.mark_locked(first, "/x", "done")
        assert seq > first.seq
        assert await owner.processors.renew(first, lease_s=30) and first.seq > seq and first.fence == state.fence
        await owner.processors.mark_locked(first, "/y", "done")  # after its own renewal: still fine

        # The lease passes (the new holder's clock is 31 s ahead): it takes over.
        now = owner.processors.clock()
        fleet.processors.clock = lambda: now + 31
        second = await fleet.processors.acquire("ingest", "late", lease_s=30)
        assert second is not None and second.fence > first.fence
        with pytest.raises(ProcessorLockLost):
            await owner.processors.mark_locked(first, "/z", "done")
        assert first.lost
        assert not await owner.processors.renew(first)
        assert not await owner.processors.release(first)
        with pytest.raises(ProcessorLockLost):
            await owner.processors.start_run("ingest", "r-stale", lock=first)
        token = {"FLEET_PROCESSORS": second.seq}
        assert await fleet.processors.file("ingest", path_hash("/z"), min_seq=token) is None
        assert await fleet.processors.run("ingest", "r-stale") is None
        run = await fleet.processors.start_run("ingest", "r-2", lock=second)
        assert run.holder == "late"
        assert await fleet.processors.release(second)
        free = await fleet.processors.lock("ingest", min_seq={"FLEET_PROCESSORS": second.seq})
        assert (free.state, free.held, free.fence) == ("released", False, second.fence)
    finally:
        for c in clients:
            await c.close()


async def test_locked_context_manager(fleet: Fleet) -> None:
    async with fleet.processors.locked("nightly", lease_s=1.5, renew_every_s=0.3) as lock:
        with pytest.raises(ProcessorLockBusy):
            async with fleet.processors.locked("nightly", holder="intruder"):
                pass
        await asyncio.sleep(2.0)  # longer than the lease: the background renewal keeps it
        await fleet.processors.mark_locked(lock, "/n", "done")
        assert not lock.lost
    state = await fleet.processors.lock("nightly", min_seq={"FLEET_PROCESSORS": lock.seq})
    assert state.state == "released" and not state.held
    again = await fleet.processors.acquire("nightly", "next")
    assert again is not None and again.fence > lock.fence


async def test_garbage_on_a_file_subject_live_as_after_a_rebuild(fleet: Fleet, server: Server) -> None:
    fleet.processors.mark("p", "/a", "done")
    fleet.processors.mark("p", "/b", "done")
    await fleet.flush()
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        ack = await nc.jetstream().publish(subjects.proc_file("p", path_hash("/a")), b"\x00 garbage")
    finally:
        await nc.close()
    token = {"FLEET_PROCESSORS": ack.seq}
    assert await fleet.processors.file("p", path_hash("/a"), min_seq=token) is None  # its marker was replaced
    assert await fleet.processors.file("p", path_hash("/b")) is not None
    running = server.projector.live("processors")
    live = server.store.table_digest(running.gen.schema, ("proc_files", "proc_runs", "proc_locks"))
    await rebuild_and_wait(fleet, "processors")
    running = server.projector.live("processors")
    assert server.store.table_digest(running.gen.schema, ("proc_files", "proc_runs", "proc_locks")) == live


async def test_one_holder_name_in_two_processes_still_excludes(fleet: Fleet) -> None:
    other = await Fleet.connect(settings=fleet.settings, name="other-process")
    try:
        mine = await fleet.processors.acquire("cron", "cron@host", lease_s=30)
        assert mine is not None
        assert await other.processors.acquire("cron", "cron@host", lease_s=30) is None
        with pytest.raises(ProcessorLockBusy):
            async with other.processors.locked("cron", holder="cron@host"):
                pass
        assert (await fleet.processors.lock("cron", min_seq={"FLEET_PROCESSORS": mine.seq})).holder == "cron@host"
        assert await fleet.processors.release(mine)  # the busy `locked` above released nothing of ours
    finally:
        await other.close()


async def test_run_records_start_and_finish_once_under_races_with_a_lock(fleet: Fleet) -> None:
    lock = await fleet.processors.acquire("batch", lease_s=30)
    assert lock is not None
    starts = await asyncio.gather(*(fleet.processors.start_run("batch", "r", files_total=n, lock=lock)
                                    for n in (1, 2, 3)))
    assert len({(r.seq, r.files_total) for r in starts}) == 1  # one record; the others got it back
    results = await asyncio.gather(
        fleet.processors.finish_run("batch", "r", "completed", lock=lock),
        fleet.processors.finish_run("batch", "r", "failed", lock=lock),
        fleet.processors.finish_run("batch", "r", "cancelled"),
        return_exceptions=True,
    )
    done = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, ValueError)]
    assert len(done) == 1 and len(refused) == 2, results
    view = await fleet.processors.run("batch", "r", min_seq={"FLEET_PROCESSORS": done[0].seq})
    assert view is not None and view.status == done[0].status


async def test_garbage_on_a_run_subject_is_no_run(fleet: Fleet) -> None:
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        await nc.jetstream().publish(subjects.proc_run("p", "r"), b"not a run")
    finally:
        await nc.close()
    assert await fleet.processors.finish_run("p", "r", "failed") is None
    run = await fleet.processors.start_run("p", "r", files_total=2)
    assert run.files_total == 2 and run.status == "running"


async def test_seen_takes_any_number_of_hashes(fleet: Fleet) -> None:
    hashes = [f"{i:064x}" for i in range(5_001)]
    for h in (hashes[0], hashes[2_500], hashes[-1]):
        fleet.processors.mark("big", f"/{h}", "done", file_hash=h)
    token = await fleet.flush()
    todo = await fleet.processors.unprocessed("big", hashes, min_seq=token)
    assert len(todo) == 4_998 and hashes[-1] not in todo and hashes[1] in todo


async def test_locked_survives_a_failing_renewal_and_keeps_the_body_error(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(lock: object, lease_s: float = 60) -> bool:
        raise ConnectionError("connection closed")

    monkeypatch.setattr(fleet.processors, "renew", broken)
    with pytest.raises(KeyError):
        async with fleet.processors.locked("fragile", lease_s=3, renew_every_s=0.1) as lock:
            await asyncio.sleep(0.3)  # a few renewals fail
            raise KeyError("the body's own error")
    state = await fleet.processors.lock("fragile", min_seq={"FLEET_PROCESSORS": lock.seq})  # the release
    assert state.state == "released"  # released although every renewal failed
    with pytest.raises(FleetValidationError):
        async with fleet.processors.locked("fragile", lease_s=1, renew_every_s=2):
            pass


async def test_a_run_record_of_an_overtaken_holder_is_never_stored(fleet: Fleet) -> None:
    """The run record and the lock's re-assertion go in one atomic batch: once another holder
    took over, the old holder's finish is refused by JetStream even though its own clock
    still says the lease holds (no check-then-write window)."""
    other = await Fleet.connect(settings=fleet.settings, name="taker")
    try:
        old = await fleet.processors.acquire("etl", "old", lease_s=30)
        assert old is not None
        run = await fleet.processors.start_run("etl", "r", lock=old)
        assert old.seq == run.seq - 1  # the re-assertion went with it
        await fleet.processors.mark_locked(old, "/f", "done")  # guarded on the re-asserted seq
        now = fleet.processors.clock()
        other.processors.clock = lambda: now + 31
        new = await other.processors.acquire("etl", "new", lease_s=30)
        assert new is not None and new.fence > old.fence
        with pytest.raises(ProcessorLockLost):
            await fleet.processors.finish_run("etl", "r", "completed", lock=old)
        view = await fleet.processors.run("etl", "r", min_seq={"FLEET_PROCESSORS": new.seq})
        assert view is not None and view.status == "running"
        done = await other.processors.finish_run("etl", "r", "failed", lock=new)
        assert done is not None and done.status == "failed"
        state = await fleet.processors.lock("etl", min_seq={"FLEET_PROCESSORS": done.seq})
        assert (state.holder, state.fence) == ("new", new.fence)
    finally:
        await other.close()


async def test_a_locked_run_write_refuses_a_server_without_atomic_batches(fleet: Fleet) -> None:
    """nats-server < 2.12 ignores the batch headers and would store the run record on its own
    guard alone: the write is refused instead, and nothing is stored."""
    lock = await fleet.processors.acquire("old-server", lease_s=30)
    assert lock is not None
    nc = await fleet.nats()
    real = nc._current_server.server_version  # type: ignore[union-attr]
    nc._current_server.server_version = "2.11.4"  # type: ignore[union-attr]  # what the server would say
    try:
        with pytest.raises(BrokerRefused, match=r"2\.12"):
            await fleet.processors.start_run("old-server", "r", lock=lock)
    finally:
        nc._current_server.server_version = real  # type: ignore[union-attr]
    assert await fleet.processors.run("old-server", "r", min_seq={"FLEET_PROCESSORS": lock.seq}) is None
