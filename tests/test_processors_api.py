"""Processor bookkeeping through the Python API against the real broker: the (processor,
session file) rows, read-your-writes, deletes as tombstones, the lock decided by JetStream
(races, expiry, fencing) and the compacted-stream view (live == rebuild)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import nats
import pytest
from fleetlog.schemas import subjects
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.processors.api import ProcessorLockBusy, ProcessorLockLost, compute_file_hash, parse_jsonl
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, FleetSync

from .helpers import rebuild_and_wait

T0 = datetime(2026, 3, 1, 12, 0, 0)


async def test_mark_is_an_upsert_and_every_query_reads_its_own_writes(fleet: Fleet) -> None:
    token = await fleet.processors.mark_processed("extract", "alice/s1.jsonl", "alice", 3, "h1", read_at=T0)
    assert token["FLEET_PROCESSORS"] > 0
    # no min_seq given: the client's own last write is waited for
    assert await fleet.processors.is_processed("extract", "alice/s1.jsonl", "h1")
    assert not await fleet.processors.is_processed("extract", "alice/s1.jsonl", "other")
    assert not await fleet.processors.is_processed("extract", "alice/none.jsonl", "h1")
    later = T0 + timedelta(minutes=5)
    await fleet.processors.mark_processed("extract", "alice/s1.jsonl", "alice@x.io", 7, "h2", read_at=later)
    await fleet.processors.mark_processed("extract", "bob/s2.jsonl", "bob", 2, "h3",
                                          read_at=datetime(2026, 3, 1, 14, 0, tzinfo=timezone(timedelta(hours=2))))
    await fleet.processors.mark_processed("other", "alice/s1.jsonl", "alice", 100, "h1", read_at=T0)
    states = await fleet.processors.get_states_for_session_files("extract", ["alice/s1.jsonl", "bob/s2.jsonl",
                                                                            "nobody/x.jsonl"])
    assert states == {
        "alice/s1.jsonl": {"username": "alice@x.io", "processed_at": later, "items_extracted": 7, "file_hash": "h2"},
        "bob/s2.jsonl": {"username": "bob", "processed_at": T0, "items_extracted": 2, "file_hash": "h3"},  # 14:00+2
    }
    assert await fleet.processors.processed_session_files("extract") == {"alice/s1.jsonl", "bob/s2.jsonl"}
    assert await fleet.processors.max_processed_at("extract") == later
    assert await fleet.processors.max_processed_at("nobody") is None
    assert await fleet.processors.activity_since("extract", T0 + timedelta(minutes=1)) == {
        "last_processed_at": later, "items_extracted": 7}
    assert await fleet.processors.activity_since("extract", T0) == {"last_processed_at": later, "items_extracted": 9}
    assert await fleet.processors.activity_since("extract", later + timedelta(seconds=1)) == {
        "last_processed_at": None, "items_extracted": 0}
    # read_at omitted: now, naive UTC
    before = datetime.now(UTC).replace(tzinfo=None)
    await fleet.processors.mark_processed("extract", "carol/s.jsonl", "carol", 0, "h4")
    (row,) = (await fleet.processors.get_states_for_session_files("extract", ["carol/s.jsonl"])).values()
    assert row["processed_at"] is not None and before <= row["processed_at"] <= datetime.now(UTC).replace(tzinfo=None)


async def test_delete_for_processors_tombstones_every_row(fleet: Fleet) -> None:
    for i in range(5):
        await fleet.processors.mark_processed("a", f"u/{i}.jsonl", "u", i, "h", read_at=T0)
    await fleet.processors.mark_processed("b", "u/0.jsonl", "u", 1, "h", read_at=T0)
    await fleet.processors.mark_processed("c", "u/0.jsonl", "u", 1, "h", read_at=T0)
    published = fleet.publisher_stats().accepted
    assert await fleet.processors.delete_for_processors([]) == 0
    assert fleet.publisher_stats().accepted == published  # nothing published
    assert await fleet.processors.delete_for_processors(["a", "b", "nobody"]) == 6
    assert await fleet.processors.processed_session_files("a") == set()
    assert await fleet.processors.processed_session_files("b") == set()
    assert await fleet.processors.processed_session_files("c") == {"u/0.jsonl"}
    assert not await fleet.processors.is_processed("a", "u/0.jsonl", "h")
    # a row marked again after its tombstone is back
    await fleet.processors.mark_processed("a", "u/0.jsonl", "u", 9, "h", read_at=T0)
    assert await fleet.processors.is_processed("a", "u/0.jsonl", "h")


async def test_many_rows_are_read_in_chunks_and_pages(fleet: Fleet) -> None:
    """5,001 rows: more than one `sessions` request and more than one page."""
    for i in range(5_001):
        fleet.emit(fleet.processors._mark_event("bulk", f"user-{i % 7}/{i:05d}.jsonl", "u", 1, f"{i}", T0))
    token = await fleet.flush()
    names = [f"user-{i % 7}/{i:05d}.jsonl" for i in range(5_001)]
    states = await fleet.processors.get_states_for_session_files("bulk", [*names, "x/y.jsonl"], min_seq=token)
    assert len(states) == 5_001 and states[names[4_321]]["file_hash"] == "4321"
    assert await fleet.processors.processed_session_files("bulk") == set(names)


@pytest.mark.parametrize("kwargs, field", [
    ({"processor": ""}, "processor"),
    ({"session_file": ""}, "session_file"),
    ({"session_file": 7}, "session_file"),
    ({"username": None}, "username"),
    ({"items_count": -1}, "items_count"),
    ({"items_count": True}, "items_count"),
    ({"file_hash": 5}, "file_hash"),
    ({"read_at": "2026-01-01"}, "read_at"),
])
async def test_mark_refuses_bad_input(fleet: Fleet, kwargs: dict[str, object], field: str) -> None:
    args: dict[str, object] = {"processor": "p", "session_file": "u/s.jsonl", "username": "u", "items_count": 1,
                               "file_hash": "h", **kwargs}
    with pytest.raises(FleetValidationError) as info:
        await fleet.processors.mark_processed(**args)  # type: ignore[arg-type]
    assert info.value.field == field
    assert fleet.publisher_stats().accepted == 0
    with pytest.raises(FleetValidationError, match="names"):
        await fleet.processors.delete_for_processors("p")
    with pytest.raises(FleetValidationError, match="session_files"):
        await fleet.processors.get_states_for_session_files("p", "u/s.jsonl")


def test_compute_file_hash_and_parse_jsonl(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    f = tmp_path / "s.jsonl"
    f.write_bytes(b'{"a": 1}\n\n   \n{broken\n[1, 2]\n{"b": "\xc3\xa9"}\n')
    import hashlib
    assert compute_file_hash(f) == hashlib.md5(f.read_bytes()).hexdigest()
    with caplog.at_level("WARNING", logger="fleetlog.processors"):
        assert list(parse_jsonl(f)) == [{"a": 1}, {"b": "é"}]
    assert "s.jsonl:4: malformed JSON line skipped" in caplog.text


async def test_the_sync_facade_has_the_same_api(settings: FleetSettings, fleet: Fleet) -> None:
    def work() -> tuple[bool, object]:
        sync = FleetSync.connect(settings=settings)  # in a thread: the server runs on this loop
        try:
            sync.processors.mark_processed("syncp", "u/a.jsonl", "u", 4, "h", read_at=T0)
            return sync.processors.is_processed("syncp", "u/a.jsonl", "h"), sync.processors.max_processed_at("syncp")
        finally:
            sync.close()

    assert await asyncio.to_thread(work) == (True, T0)


async def test_tombstones_and_garbage_live_as_after_a_rebuild(fleet: Fleet, server: Server) -> None:
    for i in range(3):
        await fleet.processors.mark_processed("p", f"u/{i}.jsonl", "u", i, "h", read_at=T0)
    await fleet.processors.delete_for_processors(["p"])
    await fleet.processors.mark_processed("p", "u/1.jsonl", "u", 5, "h", read_at=T0)
    await fleet.processors.mark_processed("p", "u/9.jsonl", "u", 5, "h", read_at=T0)
    lock = await fleet.processors.acquire("p", "me", lease_s=30)
    assert lock is not None
    nc = await nats.connect(fleet.settings.nats_url)
    try:
        ack = await nc.jetstream().publish(subjects.proc_session("p", "u/9.jsonl"), b"\x00 garbage")
    finally:
        await nc.close()
    token = {"FLEET_PROCESSORS": ack.seq}
    assert await fleet.processors.processed_session_files("p", min_seq=token) == {"u/1.jsonl"}
    tables = ("proc_sessions", "proc_runs", "proc_locks")
    live = server.store.table_digest(server.projector.live("processors").gen.schema, tables)
    await rebuild_and_wait(fleet, "processors")
    assert server.store.table_digest(server.projector.live("processors").gen.schema, tables) == live


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
        seq = await owner.processors.mark_locked(first, "u/x.jsonl", "u", 1, "h")
        assert seq > first.seq
        assert await owner.processors.renew(first, lease_s=30) and first.seq > seq and first.fence == state.fence
        await owner.processors.mark_locked(first, "u/y.jsonl", "u", 1, "h")  # after its own renewal: still fine

        # The lease passes (the new holder's clock is 31 s ahead): it takes over.
        now = owner.processors.clock()
        fleet.processors.clock = lambda: now + 31
        second = await fleet.processors.acquire("ingest", "late", lease_s=30)
        assert second is not None and second.fence > first.fence
        with pytest.raises(ProcessorLockLost):
            await owner.processors.mark_locked(first, "u/z.jsonl", "u", 1, "h")
        assert first.lost
        assert not await owner.processors.renew(first)
        assert not await owner.processors.release(first)
        token = {"FLEET_PROCESSORS": second.seq}
        assert await fleet.processors.get_states_for_session_files("ingest", ["u/z.jsonl"], min_seq=token) == {}
        await fleet.processors.mark_locked(second, "u/z.jsonl", "u", 2, "h2")
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
        await fleet.processors.mark_locked(lock, "u/n.jsonl", "u", 0, "h")
        assert not lock.lost
    state = await fleet.processors.lock("nightly", min_seq={"FLEET_PROCESSORS": lock.seq})
    assert state.state == "released" and not state.held
    again = await fleet.processors.acquire("nightly", "next")
    assert again is not None and again.fence > lock.fence



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


