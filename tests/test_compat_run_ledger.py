"""fleetlog.compat.run_ledger exercised the way LangBot's own RunLedgerStore tests do (the store
built on a connected Fleet instead of an engine; a lease aged through the test hook instead of SQL)."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

import pytest
from fleetlog.services.backbone.errors import StaleHolderError

from fleetlog import Fleet
from fleetlog.compat.run_ledger import RUN_STATUSES, TERMINAL_STATUSES, RunLedgerStore

RUN_KEYS = {
    "id", "run_id", "event_id", "agent_id", "binding_id", "runner_id", "conversation_id", "thread_id",
    "workspace_id", "bot_id", "status", "status_reason", "queue_name", "priority", "requested_runtime_id",
    "claimed_by_runtime_id", "claim_lease_expires_at", "dispatch_attempts", "last_claimed_at", "created_at",
    "started_at", "finished_at", "updated_at", "deadline_at", "cancel_requested_at", "usage", "cost", "metadata",
}


async def _queued(store: RunLedgerStore, run_id: str, **kw: object) -> dict[str, object]:
    return await store.create_run(run_id=run_id, event_id=f"ev-{run_id}", binding_id=kw.pop("binding_id", "b1"),  # type: ignore[arg-type]
                                  runner_id=kw.pop("runner_id", "runner-a"), status="queued", queue_name="q",  # type: ignore[arg-type]
                                  **kw)  # type: ignore[arg-type]


async def test_claim_lifecycle(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    assert RUN_STATUSES >= TERMINAL_STATUSES == {"completed", "failed", "cancelled", "timeout"}
    created = await _queued(store, "r1", metadata={"a": 1})
    assert set(created) == RUN_KEYS and created["status"] == "queued" and created["metadata"] == {"a": 1}
    assert await _queued(store, "r1") == created  # idempotent by run_id
    claim = await store.claim_next_run(runtime_id="rt-1", queue_name="q", lease_seconds=30)
    assert claim is not None and set(claim) == RUN_KEYS | {"claim_token"}
    assert claim["status"] == "claimed" and claim["claimed_by_runtime_id"] == "rt-1" and claim["dispatch_attempts"] == 1
    token = str(claim["claim_token"])
    assert await store.claim_next_run(runtime_id="rt-2", queue_name="q") is None
    assert await store.validate_active_claim(run_id="r1", runtime_id="rt-1", claim_token=token) is True
    assert await store.validate_active_claim(run_id="r1", runtime_id="rt-2", claim_token=token) is False
    renewed = await store.renew_claim(run_id="r1", claim_token=token, lease_seconds=120)
    assert renewed is not None and "claim_token" not in renewed
    assert await store.renew_claim(run_id="r1", claim_token="wrong") is None
    with pytest.raises(StaleHolderError, match="active claim ownership"):
        await store.append_event(run_id="r1", sequence=1, event_type="message.delta", data={"t": "x"})
    ev = await store.append_event(run_id="r1", sequence=1, event_type="message.delta", data={"t": "x"},
                                  claim_token=token)
    assert ev is not None and (ev["sequence"], ev["type"], ev["data"], ev["source"]) == (1, "message.delta",
                                                                                      {"t": "x"}, "runner")
    again = await store.append_event(run_id="r1", sequence=1, event_type="other", claim_token=token)
    assert again is not None and again["type"] == "message.delta"  # the first write stands
    released = await store.release_claim(run_id="r1", claim_token=token, status_reason="handoff")
    assert released is not None and released["status"] == "queued" and released["status_reason"] == "handoff"
    assert released["claimed_by_runtime_id"] is None
    claim2 = await store.claim_next_run(runtime_id="rt-2", queue_name="q")
    assert claim2 is not None and claim2["dispatch_attempts"] == 2
    done = await store.finalize_run(run_id="r1", status="completed", usage={"tokens": 3}, metadata={"b": 2},
                                    claim_token=str(claim2["claim_token"]), runtime_id="rt-2")
    assert done is not None and done["status"] == "completed" and done["finished_at"] is not None
    assert done["usage"] == {"tokens": 3} and done["metadata"] == {"a": 1, "b": 2}
    assert await store.get_run("missing") is None


async def test_expired_lease_is_released_through_the_test_hook(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    await _queued(store, "r-exp")
    claim = await store.claim_next_run(runtime_id="rt-1", queue_name="q", lease_seconds=60)
    assert claim is not None
    assert await store.release_expired_claims() == []
    await store.expire_claim_for_tests("r-exp")
    released = await store.release_expired_claims()
    assert [(r["run_id"], r["status"], r["status_reason"]) for r in released] == [
        ("r-exp", "queued", "claim lease expired")]
    assert await store.validate_active_claim(run_id="r-exp", runtime_id="rt-1",
                                             claim_token=str(claim["claim_token"])) is False


async def test_release_expired_claims_at_a_given_now(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    await _queued(store, "r-now")
    assert await store.claim_next_run(runtime_id="rt-1", queue_name="q", lease_seconds=60) is not None
    later = datetime.now(UTC) + timedelta(minutes=5)
    assert [r["run_id"] for r in await store.release_expired_claims(now=later)] == ["r-now"]


async def test_list_runs_filters_and_pages(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    for i in range(5):
        await _queued(store, f"l{i}", binding_id="agent_42_x" if i % 2 else "b-other", conversation_id="c1")
    await store.create_run(run_id="l5", event_id=None, binding_id=None, runner_id="runner-a", agent_id="42")
    items, cursor, more, total = await store.list_runs(conversation_id="c1", limit=2)
    assert [r["run_id"] for r in items] == ["l4", "l3"] and more and total == 5 and cursor == items[-1]["id"]
    items2, _, more2, _ = await store.list_runs(conversation_id="c1", limit=2, before_id=cursor)
    assert [r["run_id"] for r in items2] == ["l2", "l1"] and more2
    by_binding = await store.list_runs(binding_id="b-other")
    assert sorted(r["run_id"] for r in by_binding[0]) == ["l0", "l2", "l4"] and by_binding[3] == 3
    by_agent = await store.list_runs(agent_id="42")
    assert sorted(r["run_id"] for r in by_agent[0]) == ["l1", "l3", "l5"]


async def test_cancel_keeps_reason_and_appends_an_audit_event(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    await store.create_run(run_id="rc", event_id=None, binding_id=None, runner_id="runner-a")
    await store.append_event(run_id="rc", sequence=1, event_type="message.delta", data={})
    await store.append_event(run_id="rc", sequence=2, event_type="message.delta", data={})
    cancelled = await store.request_cancel(run_id="rc", status_reason="user stop")
    assert cancelled is not None and cancelled["status"] == "running" and cancelled["status_reason"] == "user stop"
    assert cancelled["cancel_requested_at"] is not None
    audit = await store.append_audit_event(run_id="rc", event_type="admin.note", data={"k": 1})
    assert audit is not None and audit["sequence"] == 4 and audit["source"] == "host"
    items, next_cursor, prev_cursor, more = await store.page_run_events(run_id="rc", limit=2)
    assert [e["sequence"] for e in items] == [1, 2] and more and next_cursor == 2 and prev_cursor == 1
    back = await store.page_run_events(run_id="rc", direction="backward", limit=10)
    assert [(e["sequence"], e["type"]) for e in back[0]] == [(4, "admin.note"), (3, "admin.run_cancel"),
                                                            (2, "message.delta"), (1, "message.delta")]
    odd = await store.page_run_events(run_id="rc", direction="sideways", after_sequence=2)
    assert [e["sequence"] for e in odd[0]] == [3, 4]


async def test_runtimes_registry(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    reg = await store.register_runtime(runtime_id="rt-a", display_name="A", capabilities={"gpu": True},
                                       labels={"zone": "eu"}, metadata={"m": 1}, heartbeat_deadline_seconds=30)
    assert set(reg) == {"id", "runtime_id", "status", "display_name", "endpoint", "version", "capabilities",
                        "labels", "metadata", "last_heartbeat_at", "heartbeat_deadline_at", "created_at",
                        "updated_at"}
    await store.register_runtime(runtime_id="rt-b", labels={"zone": "us"})
    hb = await store.heartbeat_runtime(runtime_id="rt-a", metadata={"n": 2})
    assert hb is not None and hb["metadata"] == {"m": 1, "n": 2}
    assert await store.heartbeat_runtime(runtime_id="nobody") is None
    got = await store.get_runtime("rt-a")
    assert got is not None and got["metadata"] == {"m": 1, "n": 2} and got["capabilities"] == {"gpu": True}
    items, total = await store.list_runtimes(labels={"zone": "eu"})
    assert [r["runtime_id"] for r in items] == ["rt-a"] and total == 1
    stale = await store.mark_stale_runtimes(now=datetime.now(UTC) + timedelta(hours=1))
    assert sorted(r["runtime_id"] for r in stale) == ["rt-a", "rt-b"] and {r["status"] for r in stale} == {"stale"}
    assert await store.mark_stale_runtimes(now=datetime.now(UTC) + timedelta(hours=1)) == []


async def test_stats_as_the_original_reported_them(fleet: Fleet) -> None:
    store = RunLedgerStore(fleet)
    await store.create_run(run_id="s-run", event_id=None, binding_id=None, runner_id="runner-a")  # running
    await _queued(store, "s-claim")
    assert await store.claim_next_run(runtime_id="rt-1", queue_name="q") is not None
    await store.create_run(run_id="s-fail", event_id=None, binding_id=None, runner_id="runner-b")
    await store.finalize_run(run_id="s-fail", status="failed")
    now = int(time.time())
    rt = await store.get_runtime_stats()
    assert (rt["active_runs"], rt["claimed_runs"]) == (2, 1) and "by_runtime" not in rt
    runs = await store.get_run_stats(start_time=now - 60, end_time=now + 60)
    assert (runs["total_count"], runs["running_count"], runs["claimed_count"], runs["failed_count"]) == (3, 1, 1, 1)
    assert runs["success_rate"] == 0.0 and runs["failure_rate"] == round(1 / 3, 4) and "as_of" not in runs
    only_b = await store.get_run_stats(start_time=now - 60, end_time=now + 60, runner_id="runner-b")
    assert only_b["success_rate"] == 0.0 and only_b["total_count"] == 1
    runners = await store.get_runner_stats(start_time=now - 60, end_time=now + 60)
    assert [(r["runner_id"], r["total_runs"], r["active_runs"], r["failed_runs"]) for r in runners] == [
        ("runner-a", 2, 2, 0), ("runner-b", 1, 0, 1)]


def test_up_and_serve_honour_fleetlog_reactors_false(monkeypatch: pytest.MonkeyPatch) -> None:
    """The original tests expect no sweeper or stale marker: `FLEETLOG_REACTORS=false fleetlog up`."""
    from fleetlog.services.cli._common import settings_from

    monkeypatch.setenv("FLEETLOG_REACTORS", "false")
    assert settings_from(None, port=4333, data_dir=None, processor_sessions=None).reactors is False
    monkeypatch.setenv("FLEETLOG_REACTORS", "true")
    assert settings_from(None, port=4333, data_dir=None, processor_sessions=None).reactors is True
