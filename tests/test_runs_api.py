"""The run ledger through the Python API, against a real nats-server and real DuckDB."""

from __future__ import annotations

import asyncio

import msgspec
import pytest
from fleetlog.schemas import encode_event, subjects
from fleetlog.schemas.runs import Proposal, RunEventAppended
from fleetlog.services.backbone.errors import StaleHolderError

from fleetlog import Fleet


class Clock:
    """A settable clock: lease expiry without sleeping."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(fleet: Fleet) -> Clock:
    c = Clock()
    fleet.runs.clock = c
    fleet.runtimes.clock = c
    return c


async def test_unknown_status_is_refused_first(fleet: Fleet) -> None:
    for call in (
        fleet.runs.create("r1", "runner", status="bogus"),
        fleet.runs.finalize("nope", "bogus"),
        fleet.runs.release("nope", "tok", status="bogus"),
        fleet.runs.list(statuses=["queued", "bogus"]),
    ):
        with pytest.raises(ValueError, match="Unknown run status"):
            await call
    assert await fleet.runs.get("r1") is None


async def test_create_is_idempotent_and_sets_started_at(fleet: Fleet, clock: Clock) -> None:
    run = await fleet.runs.create("r1", "runner-a", metadata={"k": 1})
    assert run.status == "running" and run.started_at == run.created_at == int(clock.now)
    again = await fleet.runs.create("r1", "runner-b", status="queued", metadata={"k": 2})
    assert again == run  # unchanged
    queued = await fleet.runs.create("r2", "runner-a", status="queued", queue_name="q")
    assert queued.started_at is None and queued.queue_name == "q"
    assert (await fleet.runs.get("r1")) == run


async def test_claim_order_token_and_fence(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("low", "r", status="queued", priority=0)
    clock.now += 1
    await fleet.runs.create("high-old", "r", status="queued", priority=5)
    clock.now += 1
    await fleet.runs.create("high-new", "r", status="queued", priority=5)
    await fleet.runs.create("running", "r", status="running", priority=9)
    first = await fleet.runs.claim_next("rt-1", lease_s=0.2)
    assert first is not None and first.run_id == "high-old"
    assert first.status == "claimed" and first.claimed_by_runtime_id == "rt-1"
    assert first.dispatch_attempts == 1 and first.last_claimed_at == int(clock.now)
    assert first.claim_lease_expires_at == int(clock.now) + 1  # max(int(0.2), 1)
    assert first.fence == first.fence and first.fence > 0
    second = await fleet.runs.claim_next("rt-2")
    third = await fleet.runs.claim_next("rt-3")
    assert second is not None and third is not None
    assert [second.run_id, third.run_id] == ["high-new", "low"]
    assert await fleet.runs.claim_next("rt-4") is None
    # the token appears only in the claim result
    got = await fleet.runs.get("high-old")
    listed = await fleet.runs.list()
    assert got is not None
    for shown in (msgspec.json.encode(got), msgspec.json.encode(listed)):
        assert first.claim_token.encode() not in shown
        assert b"claim_token" not in shown


async def test_striped_proposals_keep_priority_and_the_window(
    fleet: Fleet, clock: Clock, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What contended claimers are shown: every run of a higher priority before any lower one;
    within a priority the caller's stripe first, then the other stripes, each in creation
    order; and only the oldest STRIPE_WINDOW candidates (no run waits behind a busy stripe)."""
    from fleetlog.projections import run_queries
    from fleetlog.schemas.runs import CandidatesQuery, Proposals

    ids = [f"s-{i:03d}" for i in range(120)]
    for i, r in enumerate(ids):  # one by one: creation order is the list order
        await fleet.runs.create(r, "r", status="queued", priority=5 if i % 3 else 1)

    async def proposals(stripe: tuple[int, int, int] | None) -> list[Proposal]:
        query = CandidatesQuery(runtime_id="rt", now=clock.now, limit=1000, stripe=stripe,
                                min_seq=fleet.runs._token(None))
        return (await fleet.request("fleetlog.runs.candidates", query, Proposals)).items

    exact = [p.run_id for p in await proposals(None)]
    assert exact == [r for i, r in enumerate(ids) if i % 3] + [r for i, r in enumerate(ids) if not i % 3]
    for k, salt in ((0, 1), (3, 99), (7, 12345)):
        got = await proposals((k, 8, salt))
        assert sorted(p.run_id for p in got) == sorted(ids)
        prios = [p.priority for p in got]
        assert prios == sorted(prios, reverse=True)  # never a lower priority ahead of a higher one
        for prio in (5, 1):
            group = [p for p in got if p.priority == prio]
            own = [p.run_id for p in group if p.stripe == k]
            assert [p.run_id for p in group[: len(own)]] == own  # the caller's stripe first
            for s in {p.stripe for p in group}:  # each stripe contiguous, in creation order
                at = [i for i, p in enumerate(group) if p.stripe == s]
                assert at == list(range(at[0], at[0] + len(at)))
                assert [group[i].run_id for i in at] == [r for r in exact if r in {group[i].run_id for i in at}]
        assert len({p.stripe for p in got}) > 1
    monkeypatch.setattr(run_queries, "STRIPE_WINDOW", 30)
    windowed = await proposals((5, 8, 7))
    assert sorted(p.run_id for p in windowed) == sorted(exact[:30])  # only the oldest 30 of the order


async def test_claim_filters_and_requested_runtime(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("for-b", "r1", status="queued", requested_runtime_id="rt-b")
    await fleet.runs.create("threaded", "r2", status="queued", thread_id="t1", queue_name="q")
    await fleet.runs.create("plain", "r3", status="queued", queue_name="q", bot_id="bot")
    assert await fleet.runs.claim_next("rt-a", runner_ids=["r1"]) is None  # requested for rt-b
    claim = await fleet.runs.claim_next("rt-b", runner_ids=["r1", "r9"])
    assert claim is not None and claim.run_id == "for-b"
    assert await fleet.runs.claim_next("rt-a", queue_name="q", bot_id="other") is None
    strict = await fleet.runs.claim_next("rt-a", queue_name="q", strict_thread=True)
    assert strict is not None and strict.run_id == "plain"  # strict, no thread: runs without a thread
    threaded = await fleet.runs.claim_next("rt-a", thread_id="t1")
    assert threaded is not None and threaded.run_id == "threaded"


async def test_renew_release_rules(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("r", "runner", status="queued")
    claim = await fleet.runs.claim_next("rt-1", lease_s=30)
    assert claim is not None
    assert await fleet.runs.renew("r", "wrong-token", 30) is None
    assert await fleet.runs.renew("r", claim.claim_token, 30, runtime_id="rt-other") is None
    clock.now += 10
    renewed = await fleet.runs.renew("r", claim.claim_token, 60, runtime_id="rt-1")
    assert renewed is not None and renewed.claim_lease_expires_at == int(clock.now) + 60
    assert not renewed.cancel_requested
    released = await fleet.runs.release("r", claim.claim_token, status="failed", status_reason="gave up")
    assert released is not None
    assert released.status == "failed" and released.finished_at == int(clock.now)
    assert released.claimed_by_runtime_id is None
    assert released.status_reason == "gave up" and released.claim_lease_expires_at is None
    assert await fleet.runs.release("r", claim.claim_token) is None  # no longer claimed
    assert await fleet.runs.renew("r", claim.claim_token, 30) is None


async def test_expired_lease_is_overtaken_and_old_holder_refused(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("r", "runner", status="queued")
    old = await fleet.runs.claim_next("rt-old", lease_s=5)
    assert old is not None
    assert await fleet.runs.claim_next("rt-new") is None  # lease live
    clock.now += 6
    assert await fleet.runs.renew("r", old.claim_token, 30) is None  # expired
    new = await fleet.runs.claim_next("rt-new", lease_s=30)
    assert new is not None and new.run_id == "r"
    assert new.fence > old.fence and new.claim_token != old.claim_token
    assert new.dispatch_attempts == 2
    assert await fleet.runs.renew("r", old.claim_token, 30) is None
    assert await fleet.runs.release("r", old.claim_token) is None
    with pytest.raises(StaleHolderError, match="claim ownership is not active"):
        await fleet.runs.append_event("r", 1, "message", claim_token=old.claim_token)
    with pytest.raises(StaleHolderError, match="claim ownership is not active"):
        await fleet.runs.append_event("r", 1, "message", fence=old.fence)
    with pytest.raises(StaleHolderError, match="claim ownership is not active"):
        await fleet.runs.finalize("r", "completed", claim_token=old.claim_token)
    with pytest.raises(StaleHolderError, match="active claim ownership"):
        await fleet.runs.finalize("r", "completed")
    ok = await fleet.runs.append_event("r", 1, "message", {"text": "hi"}, fence=new.fence)
    assert ok is not None and ok.fence == new.fence
    done = await fleet.runs.finalize("r", "completed", claim_token=new.claim_token)
    assert done is not None and done.status == "completed" and done.claimed_by_runtime_id is None


async def test_stale_fire_and_forget_event_lands_in_rejects(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("r", "runner", status="queued")
    old = await fleet.runs.claim_next("rt-old", lease_s=1)
    assert old is not None
    clock.now += 2
    new = await fleet.runs.claim_next("rt-new", lease_s=30)
    assert new is not None
    fleet.runs.emit_event("r", 7, "late", {"from": "old"}, fence=old.fence)
    fleet.runs.emit_event("r", 8, "fresh", {"from": "new"}, fence=new.fence)
    token = await fleet.flush()
    page = await fleet.runs.events("r", min_seq=token)
    assert [(e.sequence, e.type) for e in page.items] == [(8, "fresh")]
    rejects = await fleet.rejects("runs")
    assert any("fence" in r.reason and '"late"' in r.data for r in rejects.items)


async def test_release_expired_and_two_sweepers(fleet: Fleet, settings, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    for i in range(6):
        await fleet.runs.create(f"r{i}", "runner", status="queued")
        assert await fleet.runs.claim_next(f"rt{i}", lease_s=10 + i) is not None
    clock.now += 12.5  # r0..r2 expired (leases 10, 11, 12 s), r3.. live
    other = await Fleet.connect(settings=settings)
    try:
        other.runs.clock = clock
        a, b = await asyncio.gather(fleet.runs.release_expired(), other.runs.release_expired())
    finally:
        await other.close()
    ids = sorted(v.run_id for v in [*a, *b])
    assert ids == ["r0", "r1", "r2"]  # each exactly once between the two sweepers
    for run_id in ids:
        run = await fleet.runs.get(run_id)
        assert run is not None and run.status == "queued" and run.status_reason == "claim lease expired"
        assert run.claimed_by_runtime_id is None
    assert (await fleet.runs.get("r3")).status == "claimed"  # type: ignore[union-attr]
    assert await fleet.runs.release_expired(limit=0) == []  # clamped to 1, nothing left


async def test_append_event_is_idempotent_and_pages(fleet: Fleet, clock: Clock) -> None:
    assert await fleet.runs.append_event("ghost", 1, "message") is None
    await fleet.runs.create("r", "runner")
    first = await fleet.runs.append_event("r", 1, "message", {"v": 1}, usage={"tokens": 3})
    dup = await fleet.runs.append_event("r", 1, "message", {"v": 2})
    assert first is not None and dup is not None
    assert dup.data == {"v": 1} and dup.usage == {"tokens": 3}  # first write wins
    for seq in range(2, 8):
        await fleet.runs.append_event("r", seq, "message", {"v": seq}, artifact_refs=[f"a{seq}"])
    page = await fleet.runs.events("r", limit=3)
    assert [e.sequence for e in page.items] == [1, 2, 3] and page.has_more
    assert page.next_cursor == 3 and page.prev_cursor == 1
    nxt = await fleet.runs.events("r", after_sequence=page.next_cursor, limit=3)
    assert [e.sequence for e in nxt.items] == [4, 5, 6]
    back = await fleet.runs.events("r", before_sequence=5, limit=10, direction="backward")
    assert [e.sequence for e in back.items] == [4, 3, 2, 1] and not back.has_more
    assert back.items[0].artifact_refs == ["a4"]


async def test_raw_duplicate_outside_dedup_window_keeps_first(fleet: Fleet, clock: Clock) -> None:
    """First write wins forever: a second raw publish of (run, sequence) is ignored by the view."""
    await fleet.runs.create("r", "runner")
    await fleet.runs.append_event("r", 1, "message", {"v": "first"})
    nc = await fleet.nats()
    js = nc.jetstream()
    second = RunEventAppended(id="01900000-0000-7000-8000-000000000001", ts="2026-01-01T00:00:00+00:00",
                              run_id="r", sequence=1, event_type="message", data={"v": "second"})
    ack = await js.publish(subjects.run_event("r", 1), encode_event(second))
    page = await fleet.runs.events("r", min_seq={ack.stream: ack.seq})
    assert [e.data for e in page.items] == [{"v": "first"}]
    assert (await fleet.runs.append_event("r", 1, "message", {"v": "third"})).data == {"v": "first"}  # type: ignore[union-attr]


async def test_audit_events_allocate_distinct_sequences(fleet: Fleet, clock: Clock) -> None:
    assert await fleet.runs.append_audit_event("ghost", "x") is None
    await fleet.runs.create("r", "runner")
    await fleet.runs.append_event("r", 5, "message")
    results = await asyncio.gather(*(fleet.runs.append_audit_event("r", "audit", {"i": i}) for i in range(20)))
    seqs = sorted(r.sequence for r in results if r is not None)
    assert seqs == list(range(6, 26))
    assert all(r is not None and r.source == "host" for r in results)
    page = await fleet.runs.events("r", limit=100)
    assert [e.sequence for e in page.items] == [5, *range(6, 26)]


async def test_finalize_rules(fleet: Fleet, clock: Clock) -> None:
    assert await fleet.runs.finalize("ghost", "completed") is None
    await fleet.runs.create("r", "runner", metadata={"a": 1, "b": 1})
    done = await fleet.runs.finalize("r", "completed", status_reason="ok", usage={"t": 1}, cost={"usd": 0.5},
                                     metadata={"b": 2})
    assert done is not None and done.finished_at == int(clock.now) and done.metadata == {"a": 1, "b": 2}
    clock.now += 100
    again = await fleet.runs.finalize("r", "completed", metadata={"c": 3})
    assert again is not None and again.finished_at == done.finished_at  # set once
    assert again.metadata == {"a": 1, "b": 2, "c": 3} and again.status_reason == "ok"  # kept when not given
    with pytest.raises(ValueError, match="Cannot transition terminal run"):
        await fleet.runs.finalize("r", "failed")


async def test_request_cancel_reaches_the_holder(fleet: Fleet, clock: Clock) -> None:
    assert await fleet.runs.request_cancel("ghost") is None
    await fleet.runs.create("r", "runner", status="queued")
    claim = await fleet.runs.claim_next("rt", lease_s=60)
    assert claim is not None
    seen: list[bool] = []

    async def watch() -> None:
        async for run in fleet.runs.watch("r"):
            seen.append(run.cancel_requested)
            if run.cancel_requested:
                return

    watcher = asyncio.create_task(watch())
    await asyncio.sleep(0.2)
    cancelled = await fleet.runs.request_cancel("r", status_reason="operator")
    assert cancelled is not None and cancelled.status == "claimed" and cancelled.cancel_requested_at == int(clock.now)
    await asyncio.wait_for(watcher, 10)
    assert seen[-1] is True
    renewed = await fleet.runs.renew("r", claim.claim_token, 60)
    assert renewed is not None and renewed.cancel_requested
    events = await fleet.runs.events("r")
    audit = [e for e in events.items if e.type == "admin.run_cancel"]
    assert len(audit) == 1 and audit[0].source == "host" and audit[0].data == {"status_reason": "operator"}


async def test_list_filters_cursor_and_total(fleet: Fleet, clock: Clock) -> None:
    for i in range(7):
        await fleet.runs.create(f"r{i}", "runner-a" if i % 2 else "runner-b", status="queued",
                                conversation_id="c1" if i < 5 else "c2", thread_id="t" if i == 0 else None)
    page = await fleet.runs.list(conversation_id="c1", limit=2)
    assert [r.run_id for r in page.items] == ["r4", "r3"] and page.has_more and page.total_count == 5
    assert page.next_cursor == page.items[1].id and page.items[0].id > page.items[1].id  # ids order by creation
    page2 = await fleet.runs.list(conversation_id="c1", limit=2, before_id=page.next_cursor)
    assert [r.run_id for r in page2.items] == ["r2", "r1"] and page2.total_count == 5
    last = await fleet.runs.list(conversation_id="c1", limit=2, before_id=page2.items[1].id)
    assert [r.run_id for r in last.items] == ["r0"] and not last.has_more and last.next_cursor is None
    assert (await fleet.runs.list(runner_id="runner-a")).total_count == 3
    assert [r.run_id for r in (await fleet.runs.list(conversation_id="c1", strict_thread=True)).items] == [
        "r4", "r3", "r2", "r1"]
    assert (await fleet.runs.list(limit=1000)).total_count == 7
    assert len((await fleet.runs.list(limit=0)).items) == 1  # clamped to 1


async def test_runtimes_register_heartbeat_list_and_stale(fleet: Fleet, server, clock: Clock) -> None:  # type: ignore[no-untyped-def]
    assert await fleet.runtimes.heartbeat("ghost") is None
    reg = await fleet.runtimes.register("rt-1", display_name="one", capabilities={"py": True}, labels={"zone": "a"},
                                        metadata={"a": 1}, heartbeat_deadline_s=5)
    assert reg.status == "online"
    await fleet.runtimes.register("rt-2", labels={"zone": "b"}, metadata={"x": 1})
    hb = await fleet.runtimes.heartbeat("rt-1", metadata={"b": 2}, active_runs=3)
    assert hb is not None and hb.metadata == {"a": 1, "b": 2}
    await fleet.runtimes.heartbeat("rt-1", metadata={"c": 3})
    token = await fleet.flush()
    got = await fleet.runtimes.get("rt-1", min_seq=token)
    assert got is not None and got.metadata == {"a": 1, "b": 2, "c": 3} and got.capabilities == {"py": True}
    zone_a = await fleet.runtimes.list(labels={"zone": "a"}, min_seq=token)
    assert [r.runtime_id for r in zone_a.items] == ["rt-1"] and zone_a.total == 1
    everything = await fleet.runtimes.list(limit=1, min_seq=token)
    assert len(everything.items) == 1 and everything.total == 2
    # re-registering replaces metadata
    await fleet.runtimes.register("rt-1", metadata={"fresh": True}, heartbeat_deadline_s=5)
    assert (await fleet.runtimes.get("rt-1")).metadata == {"fresh": True}  # type: ignore[union-attr]
    # the marker: deadline passed -> stale; a heartbeat brings it back
    clock.now = 10**10
    marked = await fleet.runtimes.mark_stale_runtimes()
    assert sorted((r.runtime_id, r.status) for r in marked) == [("rt-1", "stale"), ("rt-2", "stale")]
    assert await fleet.runtimes.mark_stale_runtimes() == []  # already stale: nothing to do
    stale = await fleet.runtimes.list(statuses=["stale"])
    assert stale.total == 2 and stale.items[0].status_reason == "heartbeat deadline passed"
    await fleet.runtimes.heartbeat("rt-1")
    token = await fleet.flush()
    assert (await fleet.runtimes.get("rt-1", min_seq=token)).status == "online"  # type: ignore[union-attr]


async def test_a_cancel_request_keeps_the_run_next_in_line(fleet: Fleet) -> None:
    """Found by the model test: after this client's cancel request on the oldest queued run,
    its cached proposal for that run was stale and the claimer skipped it, claiming a younger
    run first. A stale proposal is re-read, not skipped."""
    for name in "abcd":
        await fleet.runs.create(f"cx-{name}", "runner", status="queued", conversation_id="cx")
    first = await fleet.runs.claim_next("rt", lease_s=1, conversation_id="cx")
    assert first is not None and first.run_id == "cx-a"
    await fleet.runs.request_cancel("cx-b")
    second = await fleet.runs.claim_next("rt", lease_s=1, conversation_id="cx")
    assert second is not None and second.run_id == "cx-b"
