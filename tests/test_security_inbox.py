"""Per-identity reply inboxes and snapshots on a secure broker (one node serves the module: each
test has identities and spools of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.backbone.nkeyauth import Identity

from fleetlog import Fleet

from .security_helpers import Node, errors_of, identity, raw, secure_node

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def node(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    async with secure_node(tmp_path_factory.mktemp("secure")) as shared:
        yield shared


async def test_an_identity_reads_only_its_own_replies(node: Node, tmp_path: Path) -> None:
    """Each identity subscribes only under `_INBOX.<its public key>`: another's inbox, or the
    default `_INBOX.>`, is refused by the broker and nothing sent there reaches it; with its own
    root everything still works (JetStream acks, queries, the SDK's record and flush)."""
    broker = node[0]
    alice, bob = await identity(broker, "agent", "alice"), await identity(broker, "agent", "bob")
    bob_root = Identity.load(bob).inbox_prefix
    assert bob_root.startswith("_INBOX.U") and bob_root != Identity.load(alice).inbox_prefix
    nc = await raw(broker, alice)
    try:
        stolen: list[bytes] = []
        own: asyncio.Queue[bytes] = asyncio.Queue()

        async def steal(msg: nats.aio.msg.Msg) -> None:
            stolen.append(msg.data)

        async def mine(msg: nats.aio.msg.Msg) -> None:
            own.put_nowait(msg.data)

        await nc.subscribe(f"{bob_root}.>", cb=steal)
        await nc.subscribe("_INBOX.>", cb=steal)
        await nc.subscribe(f"{Identity.load(alice).inbox_prefix}.probe", cb=mine)
        await nc.flush()
        # Two of alice's attempts, the first acked to bob's inbox, the second to her own: the
        # stream acks in order (and, on a secure node's accounts, the admin's messages cannot
        # reach a client inbox at all), so once hers arrived, bob's would have (were it allowed).
        await nc.publish("fleet.attempt.alice.probe", _attempt("alice"), reply=f"{bob_root}.x.y")
        await nc.publish("fleet.attempt.alice.probe", _attempt("alice"),
                         reply=f"{Identity.load(alice).inbox_prefix}.probe")
        await nc.flush()
        assert b'"stream":"FLEET_ATTEMPTS"' in await asyncio.wait_for(own.get(), 30)
        assert stolen == []
        refused = [t for t in errors_of(nc) if "permissions violation for subscription" in t.lower()]
        assert any(bob_root.lower() in t for t in refused), errors_of(nc)
        assert any('"_inbox.>"' in t for t in refused), errors_of(nc)

        ack = await nc.jetstream().publish("fleet.attempt.alice.probe", _attempt("alice"), timeout=10)
        assert ack.stream == "FLEET_ATTEMPTS"  # a JetStream ack on her own root
    finally:
        await nc.close()
    async with Fleet.connect(broker.url, credentials=alice, spool_dir=tmp_path / "a", ensure=False) as fleet:
        assert fleet._link.nc is not None and bytes(fleet._link.nc._inbox_prefix).decode() == \
            Identity.load(alice).inbox_prefix  # nats-py's requests and the publisher's raw wire alike
        fleet.attempts.record(agent="alice", action="sdk", outcome="success", elapsed_s=1.0)
        token = await fleet.flush(timeout=30)
        page = await fleet.attempts.query(agent="alice", min_seq=token)
        assert sorted(r.action for r in page.items) == ["probe"] * 3 + ["sdk"]


async def test_snapshots_only_as_its_own_agent_and_host(node: Node, tmp_path: Path) -> None:
    """An agent bound to a host stores its snapshots there; as another agent, or from another
    host, the broker refuses them: dead-lettered as permission denied, nothing lands."""
    broker = node[0]
    creds = await identity(broker, "agent", "sam", host="h1")
    async with Fleet.connect(broker.url, credentials=creds, spool_dir=tmp_path / "a", ensure=False) as fleet:
        await fleet.snapshots.take("sam", {"cwd": "/w", "n": 1}, host="h1")
        await fleet.snapshots.take("sam", {"cwd": "/w", "n": 2}, host="h2")  # another host
        await fleet.snapshots.take("bob", {"cwd": "/w", "n": 3}, host="h1")  # another agent
        token = await fleet.flush(timeout=30)
        stats = fleet.publisher_stats()
        assert (stats.acked, stats.dead_lettered, stats.spool_pending) == (1, 2, 0)
    admin_creds = broker.credentials_path("admin-fleetlog")
    async with Fleet.connect(broker.url, credentials=admin_creds, spool_dir=tmp_path / "ad") as admin:
        page = await admin.snapshots.all_latest(agent="sam", min_seq=token)
        assert [(r.host, r.agent, r.data["n"]) for r in page.items] == [("h1", "sam", 1)]
    letters = sorted((tmp_path / "a").rglob("dead-letter.jsonl"))[0].read_text()
    assert "may not publish to 'fleet.snapshot.h2.sam'" in letters
    assert "may not publish to 'fleet.snapshot.h1.bob'" in letters


def _attempt(agent: str) -> bytes:
    return encode_event(AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=agent, action="probe",
                                        outcome="success", elapsed_s=0.1))
