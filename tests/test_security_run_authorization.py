"""A run's `authorization` (the credentials its holder works with) on a real secure node (review
finding 3): readers, agents and processors never read it — the query answers leave it out and
the broker refuses them the answers and reads that carry it — while the claimer gets it in its
ClaimedRun, and a runtime's or admin's `get` (a read of the stream) has it. The compat run
ledger returns what the store it replaces returned: the run's keys, never `authorization`."""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import nats
import pytest
from fleetlog.schemas.runs import CandidatesQuery, ExpiredQuery
from fleetlog.services.backbone.errors import FleetError

from fleetlog import Fleet
from fleetlog.compat.run_ledger import RunLedgerStore

from .security_helpers import errors_of, identity, raw, secure_node

SECRET = {"github_token": "ghp_SECRET123"}
# The keys the original store's get_run / list_runs returned (its _run_to_dict).
ORIGINAL_KEYS = {
    "id", "run_id", "event_id", "agent_id", "binding_id", "runner_id", "conversation_id", "thread_id",
    "workspace_id", "bot_id", "status", "status_reason", "queue_name", "priority", "requested_runtime_id",
    "claimed_by_runtime_id", "claim_lease_expires_at", "dispatch_attempts", "last_claimed_at", "created_at",
    "started_at", "finished_at", "updated_at", "deadline_at", "cancel_requested_at", "usage", "cost", "metadata",
}


async def _refused(nc: nats.NATS, subject: str, payload: bytes) -> str:
    """The broker's refusal of a request (nats-py reports it asynchronously; the request times out)."""
    with pytest.raises(nats.errors.TimeoutError):
        await nc.request(subject, payload, timeout=2)
    return subject


async def test_only_run_writers_read_a_runs_authorization(tmp_path: Path) -> None:
    async with secure_node(tmp_path) as (broker, _, settings):
        admin_creds = broker.credentials_path("admin-fleetlog")
        creds = {role: await identity(broker, role, name)
                 for role, name in (("reader", "dash"), ("agent", "a1"), ("runtime", "rt1"), ("processor", "p1"))}
        async with Fleet.connect(settings=settings.model_copy(update={"credentials": admin_creds})) as admin:
            await admin.runs.create("r1", "runner", status="queued", queue_name="q", authorization=SECRET)
            last = await admin.runs.create("r2", "runner", status="queued", queue_name="q2", authorization=SECRET)
            token = {"FLEET_RUNS": last.id}
            got = await admin.runs.get("r1")
            assert got is not None and got.authorization == SECRET  # admin: read from the stream

            # Readers and agents: the list answer leaves it out; the stream read is refused.
            async def reads(role: str) -> None:
                async with Fleet.connect(broker.url, credentials=creds[role], spool_dir=tmp_path / role,
                                         ensure=False) as f:
                    page = await f.runs.list(min_seq=token)
                    assert {r.run_id for r in page.items} == {"r1", "r2"}, role
                    assert all(r.authorization is None for r in page.items), role
                    assert b"ghp_SECRET" not in msgspec.json.encode(page), role
                    with pytest.raises(FleetError, match=r"(?i)DIRECT\.GET\.FLEET_RUNS"):
                        await f.runs.get("r1")

            # The answers that carry whole states (a claim and an expiry are written from them),
            # and the stream's own reads: refused by the broker to every identity that writes no runs.
            candidates = msgspec.json.encode(CandidatesQuery(runtime_id="x", now=0.0, queue="q", min_seq=token))
            expired = msgspec.json.encode(ExpiredQuery(now=1e12, min_seq=token))
            msg_get = msgspec.json.encode({"last_by_subj": "fleet.run.r1.state"})

            async def requests(role: str) -> None:
                nc = await raw(broker, creds[role])
                try:
                    refused = await asyncio.gather(
                        _refused(nc, "fleetlog.runs.candidates", candidates),
                        _refused(nc, "fleetlog.runs.expired", expired),
                        _refused(nc, "$JS.API.STREAM.MSG.GET.FLEET_RUNS", msg_get),
                        _refused(nc, "$JS.API.DIRECT.GET.FLEET_RUNS.fleet.run.r1.state", b""),
                    )
                    await nc.flush()
                    errors = " ".join(errors_of(nc)).lower()
                    assert all(f'permissions violation for publish to "{s.lower()}"' in errors for s in refused), \
                        (role, errors)
                finally:
                    await nc.close()

            # Concurrently: each refusal is waited out (a request timeout), not answered.
            await asyncio.gather(reads("reader"), reads("agent"),
                                 *(requests(role) for role in ("reader", "agent", "processor")))
            # What the refusal hides: the same request answered to the admin carries the state.
            nc = await raw(broker, admin_creds)
            try:
                answer = await nc.request("fleetlog.runs.candidates", candidates, timeout=30)
                assert b"ghp_SECRET123" in answer.data
            finally:
                await nc.close()

        # A runtime: its list answer leaves it out too; its get and its claim carry it.
        async with Fleet.connect(broker.url, credentials=creds["runtime"], spool_dir=tmp_path / "rt",
                                 ensure=False) as rt:
            page = await rt.runs.list(min_seq=token)
            assert page.items and all(r.authorization is None for r in page.items)
            got = await rt.runs.get("r2")
            assert got is not None and got.authorization == SECRET
            claimed = await rt.runs.claim_next("rt1", "q")
            assert claimed is not None and claimed.run_id == "r1" and claimed.authorization == SECRET
            # The drop-in returns the original store's keys: it never returned `authorization`.
            store = RunLedgerStore(rt)
            run = await store.get_run("r1")
            assert run is not None and set(run) == ORIGINAL_KEYS and run["claimed_by_runtime_id"] == "rt1"
            items, _, _, total = await store.list_runs()
            assert total == 2 and all(set(item) == ORIGINAL_KEYS for item in items)
