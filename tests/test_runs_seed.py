"""The run ledger keeps the shapes and operations of the store it replaces (issue 14):
its keys, its rules for cancel, event paging, stale runtimes, claim validation and reconcile.
Real nats-server, real DuckDB."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import msgspec
import pytest
from fleetlog.schemas import new_event_id, subjects
from fleetlog.schemas.runs import ClaimedRun, RunEventView, RunView
from fleetlog.schemas.runtimes import RuntimeView
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings, FleetSync

from .test_runs_api import Clock

STORE_RUN_KEYS = {
    "id", "run_id", "event_id", "agent_id", "binding_id", "runner_id", "conversation_id", "thread_id",
    "workspace_id", "bot_id", "status", "status_reason", "queue_name", "priority", "requested_runtime_id",
    "claimed_by_runtime_id", "claim_lease_expires_at", "dispatch_attempts", "last_claimed_at", "created_at",
    "started_at", "finished_at", "updated_at", "deadline_at", "cancel_requested_at", "usage", "cost", "metadata",
}
STORE_RUNTIME_KEYS = {
    "id", "runtime_id", "status", "display_name", "endpoint", "version", "capabilities", "labels", "metadata",
    "last_heartbeat_at", "heartbeat_deadline_at", "created_at", "updated_at",
}
STORE_EVENT_KEYS = {
    "id", "run_id", "sequence", "type", "data", "usage", "created_at", "source", "artifact_refs", "metadata",
}


@pytest.fixture
def clock(fleet: Fleet) -> Clock:
    c = Clock()
    fleet.runs.clock = c
    fleet.runtimes.clock = c
    return c


def keys(value: msgspec.Struct) -> set[str]:
    return set(msgspec.to_builtins(value))


async def test_run_views_carry_the_store_keys(fleet: Fleet, clock: Clock) -> None:
    assert STORE_RUN_KEYS <= set(RunView.__struct_fields__)
    assert not {"reason", "queue", "claimed_by", "lease_expires_at", "claim_token"} & set(RunView.__struct_fields__)
    first = await fleet.runs.create("a", "runner", status="queued", queue_name="q", agent_id="ag", binding_id="b")
    second = await fleet.runs.create("b", "runner", status="queued", queue_name="q")
    assert isinstance(first.id, int) and 0 < first.id < second.id  # the creation's stream sequence
    assert (first.queue_name, first.agent_id, first.binding_id, first.metadata) == ("q", "ag", "b", {})
    assert first.updated_at == first.created_at == int(clock.now) and first.cost is None
    clock.now += 7
    claim = await fleet.runs.claim_next("rt-1", queue_name="q", lease_s=30)
    assert isinstance(claim, ClaimedRun) and keys(claim) == keys(first) | {"claim_token"}
    assert (claim.id, claim.run_id, claim.claimed_by_runtime_id) == (first.id, "a", "rt-1")
    assert claim.claim_lease_expires_at == int(clock.now) + 30 and claim.updated_at == int(clock.now)
    got = await fleet.runs.get("a")
    assert got is not None and type(got) is RunView and got.id == first.id and "claim_token" not in keys(got)
    listed = await fleet.runs.list()
    assert [(r.id, r.run_id) for r in listed.items] == [(second.id, "b"), (first.id, "a")]
    clock.now += 3
    done = await fleet.runs.finalize("a", "completed", status_reason="ok", usage={"tokens": 5},
                                     cost={"usd": 0.25}, claim_token=claim.claim_token)
    assert done is not None and (done.status_reason, done.usage, done.cost) == ("ok", {"tokens": 5}, {"usd": 0.25})
    assert done.updated_at == int(clock.now) and done.id == first.id
    with pytest.raises(FleetValidationError, match="cost"):
        await fleet.runs.finalize("b", "failed", cost=1.5)  # type: ignore[arg-type]
    event = await fleet.runs.append_event("a", 0, "message", {"t": 1})
    assert isinstance(event, RunEventView) and STORE_EVENT_KEYS <= keys(event) and event.id > done.id
    page = await fleet.runs.events("a")
    assert [(e.id, e.sequence) for e in page.items] == [(event.id, 0)]


async def test_request_cancel_keeps_the_reason_and_appends_the_audit_event(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("r", "runner", status="queued")
    for seq in (1, 2):
        await fleet.runs.append_event("r", seq, "message", {"n": seq})
    clock.now += 5
    cancelled = await fleet.runs.request_cancel("r", status_reason="operator asked")
    assert cancelled is not None and cancelled.status == "queued"  # status unchanged
    assert cancelled.status_reason == "operator asked" and cancelled.cancel_requested_at == int(clock.now)
    stored = await fleet.runs.get("r")
    assert stored is not None and stored.status_reason == "operator asked"
    events = (await fleet.runs.events("r")).items
    assert [(e.sequence, e.type, e.source) for e in events] == [
        (1, "message", "runner"), (2, "message", "runner"), (3, "admin.run_cancel", "host")]
    assert events[-1].data == {"status_reason": "operator asked"}
    clock.now += 5
    again = await fleet.runs.request_cancel("r")  # no reason: the old one stays; the time is stamped anew
    assert again is not None and again.status_reason == "operator asked" and again.cancel_requested_at == int(clock.now)
    await fleet.runs.create("quiet", "runner", status="queued")
    await fleet.runs.request_cancel("quiet")
    audit = (await fleet.runs.events("quiet")).items
    assert [(e.sequence, e.type) for e in audit] == [(1, "admin.run_cancel")]  # max + 1, as the store numbered it


async def test_event_paging_treats_an_unknown_direction_as_forward(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("r", "runner")
    for seq in range(1, 5):
        await fleet.runs.append_event("r", seq, "message")
    forward = await fleet.runs.events("r", limit=2)
    sideways = await fleet.runs.events("r", limit=2, direction="sideways")
    backward = await fleet.runs.events("r", limit=2, direction="backward")
    assert [e.sequence for e in sideways.items] == [e.sequence for e in forward.items] == [1, 2]
    assert (sideways.next_cursor, sideways.prev_cursor, sideways.has_more) == (2, 1, True)
    assert [e.sequence for e in backward.items] == [4, 3]


async def test_validate_active_claim_follows_the_renew_rule(fleet: Fleet, clock: Clock) -> None:
    assert await fleet.runs.validate_active_claim("ghost", "tok") is False
    await fleet.runs.create("r", "runner", status="queued")
    claim = await fleet.runs.claim_next("rt-1", lease_s=10)
    assert claim is not None
    assert await fleet.runs.validate_active_claim("r", claim.claim_token) is True
    assert await fleet.runs.validate_active_claim("r", claim.claim_token, runtime_id="rt-1") is True
    assert await fleet.runs.validate_active_claim("r", claim.claim_token, runtime_id="rt-2") is False
    assert await fleet.runs.validate_active_claim("r", "not-the-token") is False
    await fleet.runs.finalize("r", "running", claim_token=claim.claim_token)  # running under the claim: still held
    assert await fleet.runs.validate_active_claim("r", claim.claim_token, "rt-1") is True
    clock.now += 10  # the lease ends at now + 10: no longer live
    assert await fleet.runs.validate_active_claim("r", claim.claim_token, "rt-1") is False


async def test_runtime_views_carry_the_store_keys(fleet: Fleet, clock: Clock) -> None:
    assert STORE_RUNTIME_KEYS <= set(RuntimeView.__struct_fields__)
    first = await fleet.runtimes.register("rt-1", heartbeat_deadline_s=30)
    assert first.capabilities == {} and first.labels == {} and first.metadata == {}
    assert first.heartbeat_deadline_at == first.last_heartbeat_at + 30 and first.updated_at == first.last_heartbeat_at
    other = await fleet.runtimes.register("rt-0")
    again = await fleet.runtimes.register("rt-1", capabilities={"gpu": 2}, heartbeat_deadline_s=5)
    assert (again.id, again.created_at) == (first.id, first.created_at) and other.id > first.id
    got = await fleet.runtimes.get("rt-1")
    assert got is not None and (got.id, got.created_at, got.capabilities) == (first.id, first.created_at, {"gpu": 2})
    listed = await fleet.runtimes.list()
    assert [r.runtime_id for r in listed.items] == ["rt-1", "rt-0"]  # by id, as the store listed them
    with pytest.raises(FleetValidationError, match="capabilities"):
        await fleet.runtimes.register("rt-2", capabilities=["py"])  # type: ignore[arg-type]


async def test_mark_stale_runtimes_rules(fleet: Fleet, clock: Clock) -> None:
    short = await fleet.runtimes.register("short", heartbeat_deadline_s=5)
    long = await fleet.runtimes.register("long", heartbeat_deadline_s=1000)
    hb = max(short.last_heartbeat_at, long.last_heartbeat_at)
    assert await fleet.runtimes.mark_stale_runtimes(now=short.last_heartbeat_at + 5) == []  # deadline not < now
    marked = await fleet.runtimes.mark_stale_runtimes(now=hb + 6)
    assert [(r.runtime_id, r.status) for r in marked] == [("short", "stale")]
    assert await fleet.runtimes.mark_stale_runtimes(now=hb + 6) == []  # already stale: skipped
    # stale_after_seconds: a last heartbeat older than that is stale too, deadline or not
    assert await fleet.runtimes.mark_stale_runtimes(now=hb + 6, stale_after_seconds=100) == []
    lost = await fleet.runtimes.mark_stale_runtimes(now=hb + 6, stale_status="lost", stale_after_seconds=-3)
    assert sorted((r.runtime_id, r.status) for r in lost) == [("long", "lost"), ("short", "lost")]  # -3 -> 0
    rows = await fleet.runtimes.list(statuses=["lost"])
    assert rows.total == 2
    with pytest.raises(FleetValidationError, match="stale_after_seconds"):
        await fleet.runtimes.mark_stale_runtimes(stale_after_seconds="soon")  # type: ignore[arg-type]


async def test_reconcile_marks_stale_and_releases_expired(fleet: Fleet, clock: Clock) -> None:
    reg = await fleet.runtimes.register("quiet", heartbeat_deadline_s=1)
    await fleet.runtimes.register("busy", heartbeat_deadline_s=10**9)
    for name in ("a", "b", "c"):
        await fleet.runs.create(name, "runner", status="queued")
    for lease in (1, 1, 10**6):
        assert await fleet.runs.claim_next("busy", lease_s=lease) is not None
    clock.now = max(clock.now, reg.last_heartbeat_at) + 5
    result = await fleet.runs.reconcile()
    assert msgspec.to_builtins(result) == {"stale_count": 1, "released_claim_count": 2}
    assert msgspec.to_builtins(await fleet.runs.reconcile()) == {"stale_count": 0, "released_claim_count": 0}
    assert [(await fleet.runs.get(n)).status for n in "abc"] == ["queued", "queued", "claimed"]  # type: ignore[union-attr]


async def test_events_stored_before_v2_are_upcast(fleet: Fleet) -> None:
    """Lifecycle events without created_seq/updated_at and with a number for cost, and a
    registration with a list of capabilities, as v1 wrote them: read and folded in the new shape."""
    js = (await fleet.nats()).jetstream()
    old = {"run_id": "old", "runner_id": "r", "status": "running", "created_at": 1_700_000_000,
           "started_at": 1_700_000_000, "cost": 0.5}
    ts = "2026-01-01T00:00:00+00:00"
    created = await js.publish(subjects.run_state("old"), msgspec.json.encode(
        {"type": "run.created", "id": new_event_id(), "ts": ts, "state": old}))
    finished = await js.publish(subjects.run_state("old"), msgspec.json.encode(
        {"type": "run.finalized", "id": new_event_id(), "ts": ts,
         "state": {**old, "status": "completed", "finished_at": 1_700_000_010}}))
    registered = await js.publish(subjects.runtime("old-rt", "registration"), msgspec.json.encode(
        {"type": "runtime.registered", "id": new_event_id(), "ts": ts, "runtime_id": "old-rt",
         "capabilities": ["py", "gpu"]}))
    got = await fleet.runs.get("old")
    assert got is not None and (got.id, got.status, got.cost) == (created.seq, "completed", {"amount": 0.5})
    assert got.updated_at == 1_767_225_600  # the event's own time
    listed = await fleet.runs.list(min_seq={"FLEET_RUNS": finished.seq})
    assert [(r.id, r.run_id, r.cost) for r in listed.items] == [(created.seq, "old", {"amount": 0.5})]
    runtime = await fleet.runtimes.get("old-rt", min_seq={"FLEET_RUNTIMES": registered.seq})
    assert runtime is not None and runtime.capabilities == {"py": True, "gpu": True}



async def test_the_operations_on_fleetsync(settings: FleetSettings, server: Server) -> None:
    """FleetSync offers the same names, blocking (agents that are plain threads)."""

    def work() -> tuple[Any, ...]:
        fleet = FleetSync.connect(settings=settings)
        try:
            fleet.runs.create("s1", "runner", status="queued", queue_name="q")
            claim = fleet.runs.claim_next("rt-s", queue_name="q", lease_s=60)
            assert claim is not None
            valid = fleet.runs.validate_active_claim("s1", claim.claim_token, runtime_id="rt-s")
            cancelled = fleet.runs.request_cancel("s1", status_reason="stop")
            now = time.time()
            stats = fleet.runs.get_run_stats(now - 60, now + 60)
            runners = fleet.runs.get_runner_stats(now - 60, now + 60)
            fleet.runtimes.register("rt-s", heartbeat_deadline_s=10**6)
            stale = fleet.runtimes.mark_stale_runtimes(now=now + 60, stale_after_seconds=0)
            return valid, cancelled.status_reason, stats.claimed_count, [r.total_runs for r in runners], \
                [r.runtime_id for r in stale], fleet.runs.get_runtime_stats().stale_count, \
                msgspec.to_builtins(fleet.runs.reconcile())
        finally:
            fleet.close()

    got = await asyncio.to_thread(work)
    assert got == (True, "stop", 1, [1], ["rt-s"], 1, {"stale_count": 0, "released_claim_count": 0})
