"""Roles on a secure broker: NATS itself refuses what a role may not publish or request.

A real nats-server with generated users and permissions, the real services on it
authenticated as `service`, and clients authenticated as each role. One node serves the
module (a node per test cost ~9 s each): each test has identities, runs and spools of its
own and asserts only on them, in any order."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.services.backbone.errors import FleetError, PermissionDenied
from fleetlog.services.node.broker import EmbeddedBroker, reload_secure_broker
from fleetlog.services.node.identities import IdentityError, Registry, permissions
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .security_helpers import Node, errors_of, identity, raw, secure_node

# The async tests run in the module's loop, the one the shared node lives in.
shared_node = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    async with secure_node(tmp_path_factory.mktemp("secure")) as node:
        yield node


def _attempt(agent: str) -> tuple[str, bytes]:
    e = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=agent, action="probe", outcome="success",
                        elapsed_s=0.1)
    return e.subject(), encode_event(e)


@shared_node
async def test_no_credentials_no_connection(secure: tuple[EmbeddedBroker, Server, FleetSettings]) -> None:
    broker, _, _ = secure
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(broker.url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=2)


@shared_node
async def test_agent_speaks_only_for_itself(secure: tuple[EmbeddedBroker, Server, FleetSettings]) -> None:
    broker, _, settings = secure
    creds = await identity(broker, "agent", "alice")
    nc = await raw(broker, creds)
    try:
        js = nc.jetstream()
        subject, payload = _attempt("alice")
        ack = await js.publish(subject, payload, timeout=5)  # its own subject: stored
        forged_subject, forged = _attempt("bob")
        with pytest.raises(nats.errors.TimeoutError):  # another agent's subject: the broker drops it
            await js.publish(forged_subject, forged, timeout=2)
        await nc.flush()
        texts = errors_of(nc)
        assert any("fleet.attempt.bob.probe" in t for t in texts), texts
        with pytest.raises(nats.errors.TimeoutError):  # nor purge, nor sql
            await js.publish("fleet.attempt.purge", b"{}", timeout=2)
        for denied in ("fleetlog.sql", "fleetlog.attempts.purge", "fleetlog.rebuild"):
            with pytest.raises(nats.errors.TimeoutError):
                await nc.request(denied, b"{}", timeout=1)
        await nc.flush()
        texts = errors_of(nc)
        assert any('publish to "fleetlog.sql"' in t.lower() for t in texts), texts
    finally:
        await nc.close()

    async with Fleet.connect(settings=settings.model_copy(update={"credentials": broker.credentials_path(
            "admin-fleetlog")})) as admin:
        page = await admin.attempts.query(agent="alice", min_seq={"FLEET_ATTEMPTS": ack.seq})
        assert [(r.agent, r.action) for r in page.items] == [("alice", "probe")]
        forged = await admin.sql("SELECT count(*) FROM attempts WHERE agent IN ('alice', 'bob')")
        assert forged.rows == [[1]]  # nothing forged landed


@shared_node
async def test_agent_records_through_the_sdk_and_reads(secure: tuple[EmbeddedBroker, Server, FleetSettings]) -> None:
    broker, _, settings = secure
    creds = await identity(broker, "agent", "carol")
    async with Fleet.connect(broker.url, credentials=creds, spool_dir=settings.spool_dir, ensure=False) as carol:
        carol.attempts.record(agent="carol", action="x", outcome="success", elapsed_s=1.0)
        token = await carol.flush()
        page = await carol.attempts.query(agent="carol", min_seq=token)  # a read-only query endpoint
        assert [r.action for r in page.items] == ["x"]
        with pytest.raises(PermissionDenied, match=r"may not publish to 'fleetlog\.sql'"):  # admin-only
            await carol.sql("SELECT 1", timeout=1)
        with pytest.raises(PermissionDenied, match=r"'fleetlog\.attempts\.purge'"):
            await carol.attempts.purge(days=0)
        with pytest.raises(PermissionDenied, match=r"'fleetlog\.rejects'"):  # others' refused payloads
            await carol.rejects("attempts")


@shared_node
async def test_reader_reads_but_no_sql_and_admin_has_sql(secure: tuple[EmbeddedBroker, Server, FleetSettings]) -> None:
    broker, _, settings = secure
    reader = await identity(broker, "reader", "dash")
    async with Fleet.connect(broker.url, credentials=reader, spool_dir=settings.spool_dir, ensure=False) as fleet:
        assert (await fleet.attempts.query(agent="dash")).items == []  # a read-only query endpoint
        with pytest.raises(PermissionDenied, match=r"'fleetlog\.sql'") as info:
            await fleet.sql("SELECT 1", timeout=1)
        assert info.value.subject == "fleetlog.sql" and isinstance(info.value, FleetError)
    nc = await raw(broker, reader)
    try:
        with pytest.raises(nats.errors.TimeoutError):  # a reader states no facts at all
            await nc.jetstream().publish(*_attempt("dash"), timeout=2)
    finally:
        await nc.close()
    async with Fleet.connect(broker.url, credentials=broker.credentials_path("admin-fleetlog"),
                             spool_dir=settings.spool_dir) as admin:
        assert (await admin.sql("SELECT 42")).rows == [[42]]


@shared_node
async def test_revoked_identity_is_refused_without_a_restart(
        secure: tuple[EmbeddedBroker, Server, FleetSettings]) -> None:
    broker, _, _ = secure
    creds = await identity(broker, "agent", "eve")
    nc = await raw(broker, creds)
    await nc.close()
    assert Registry(broker.data_dir).revoke("agent-eve")
    assert await reload_secure_broker(broker.data_dir)
    pid = broker.process.pid if broker.process else None
    with pytest.raises(Exception, match=r"[Aa]uthorization"):
        await nats.connect(broker.url, nkeys_seed=str(creds), allow_reconnect=False, max_reconnect_attempts=0,
                           connect_timeout=2)
    assert broker.process is not None and broker.process.pid == pid and broker.process.poll() is None


def test_permissions_and_names_are_checked() -> None:
    agent = permissions("agent", "alice", host="h1", public_key="UALICE")
    assert agent["publish"]["allow"][:3] == ["fleet.attempt.alice.>", "fleet.snapshot.h1.alice", "fleet.diff.h1.alice"]
    assert "fleetlog.sql" in agent["publish"]["deny"] and agent["subscribe"]["allow"] == ["_INBOX.UALICE.>"]
    assert permissions("runtime", "r1", public_key="U1")["publish"]["allow"][0] == "fleet.runtime.r1.>"
    assert permissions("admin", "x", public_key="U2") == {"publish": {"allow": [">"]}, "subscribe": {"allow": [">"]}}
    for role, name, host, rule in [("root", "a", None, "role: 'root'"), ("agent", "a.b", None, "name: 'a.b'"),
                                   ("agent", "*", None, "name: '*'"), ("reader", "r", "h", "host: 'h'")]:
        with pytest.raises(IdentityError, match=rule):
            permissions(role, name, host, public_key="U3")
    assert json.loads(json.dumps(agent)) == agent


@shared_node
async def test_a_forbidden_record_is_dead_lettered_as_permission_denied(
        secure: tuple[EmbeddedBroker, Server, FleetSettings], tmp_path: Path) -> None:
    """record() for another agent: the broker drops it; the publisher dead-letters it at once
    with the reason (never retried, never an endless spool), and its own events still land."""
    broker, _, _ = secure
    creds = await identity(broker, "agent", "mallory")
    spool = tmp_path / "mallory-spool"
    async with Fleet.connect(broker.url, credentials=creds, spool_dir=spool, ensure=False) as mallory:
        mallory.attempts.record(agent="victim", action="forged", outcome="success", elapsed_s=1.0)
        own = mallory.attempts.record(agent="mallory", action="honest", outcome="success", elapsed_s=1.0)
        token = await mallory.flush(timeout=30)
        stats = mallory.publisher_stats()
        assert stats.dead_lettered == 1 and stats.acked == 1 and stats.spool_pending == 0  # nothing left to retry
        page = await mallory.attempts.query(agent="mallory", min_seq=token)
        assert [(r.agent, r.id) for r in page.items] == [("mallory", own.id)]
        assert (await mallory.attempts.query(agent="victim", min_seq=token)).items == []  # nothing forged landed
    letters = [json.loads(line) for f in spool.rglob("dead-letter.jsonl") for line in f.read_text().splitlines()]
    assert [(d["subject"], d["reason"]) for d in letters] == [
        ("fleet.attempt.victim.forged", "permission denied: this identity may not publish to "
                                        "'fleet.attempt.victim.forged'")]


@shared_node
async def test_runtime_claims_and_heartbeats_only_as_itself(
        secure: tuple[EmbeddedBroker, Server, FleetSettings], tmp_path: Path) -> None:
    """A runtime registers, heartbeats and claims as itself; registering as another runtime
    and an agent's claim are refused, and nothing of theirs lands."""
    broker, _, settings = secure
    rt = await identity(broker, "runtime", "rt1")
    agent = await identity(broker, "agent", "grace")
    async with Fleet.connect(settings=settings.model_copy(update={
            "credentials": broker.credentials_path("admin-fleetlog")})) as admin:
        await admin.runs.create("sec-run", "runner", status="queued", queue_name="q")
        await admin.runs.create("sec-run-2", "runner", status="queued", queue_name="q2")
        folded = await admin.sql("SELECT count(*) FROM runs WHERE run_id IN ('sec-run', 'sec-run-2')",
                                 min_seq={"FLEET_RUNS": admin.runs._seen})
        assert folded.rows == [[2]]  # the candidates a claim reads come from the view
    async with Fleet.connect(broker.url, credentials=rt, spool_dir=tmp_path / "rt", ensure=False) as fleet:
        assert (await fleet.runtimes.register("rt1")).runtime_id == "rt1"
        claimed = await fleet.runs.claim_next("rt1", queue_name="q")
        assert claimed is not None and claimed.run_id == "sec-run" and claimed.claimed_by_runtime_id == "rt1"
        with pytest.raises(PermissionDenied, match=r"may not publish to 'fleet\.runtime\.rt2\.registration'"):
            await fleet.runtimes.register("rt2")
        assert await fleet.runtimes.get("rt2") is None
    async with Fleet.connect(broker.url, credentials=agent, spool_dir=tmp_path / "ag", ensure=False) as fleet:
        with pytest.raises(PermissionDenied, match=r"'fleetlog\.runs\.candidates'"):  # runtime-only proposals
            await fleet.runs.claim_next("grace", queue_name="q2")
    async with Fleet.connect(settings=settings.model_copy(update={
            "credentials": broker.credentials_path("admin-fleetlog")})) as admin:
        run = await admin.runs.get("sec-run-2")
        assert run is not None and run.status == "queued" and run.claimed_by_runtime_id is None


@shared_node
async def test_processor_keeps_only_its_own_books_and_lock(
        secure: tuple[EmbeddedBroker, Server, FleetSettings], tmp_path: Path) -> None:
    broker, _, _ = secure
    creds = await identity(broker, "processor", "digest")
    async with Fleet.connect(broker.url, credentials=creds, spool_dir=tmp_path / "p", ensure=False) as fleet:
        token = await fleet.processors.mark_processed("digest", "u/a.jsonl", "u", 3, "h1")
        assert await fleet.processors.is_processed("digest", "u/a.jsonl", "h1", min_seq=token)
        lock = await fleet.processors.acquire("digest", holder="me")
        assert lock is not None
        with pytest.raises(PermissionDenied, match=r"'fleet\.proc\.other\.lock'"):
            await fleet.processors.acquire("other", holder="me")
        forged = await fleet.processors.mark_processed("other", "u/b.jsonl", "u", 1, "h2")  # dead-lettered
        assert fleet.publisher_stats().dead_lettered == 1
        assert not await fleet.processors.is_processed("other", "u/b.jsonl", "h2", min_seq=forged)


def test_credentials_and_registry_files_are_checked(tmp_path: Path) -> None:
    """A file that is not a seed, a damaged seed, an older fleetlog's password registry: each
    refused with an error naming the file and what is wrong; a seed file is never overwritten."""
    old = tmp_path / "alice.json"
    old.write_text(json.dumps({"user": "agent-alice", "password": "x", "role": "agent", "name": "alice"}))
    with pytest.raises(ValueError, match=r"alice\.json is not an nkey user seed file"):
        FleetSettings(nats_url="nats://127.0.0.1:1", credentials=old).servers()
    entry = Registry(tmp_path / "reg").add("agent", "alice", out=tmp_path / "alice.nk")
    seed = (tmp_path / "alice.nk").read_text().strip()
    servers = FleetSettings(nats_url="nats://127.0.0.1:1", credentials=tmp_path / "alice.nk").servers()
    assert servers == ["nats://127.0.0.1:1"] and servers.identity is not None
    assert servers.identity.public_key == entry["nkey"]
    assert seed not in (tmp_path / "reg" / "identities.json").read_text()
    damaged = tmp_path / "damaged.nk"
    damaged.write_text(seed[:-3] + ("AAA" if not seed.endswith("AAA") else "BBB"))
    with pytest.raises(ValueError, match=r"damaged\.nk holds a damaged nkey seed"):
        FleetSettings(nats_url="nats://127.0.0.1:1", credentials=damaged).servers()
    with pytest.raises(IdentityError, match=r"never overwritten"):
        Registry(tmp_path / "reg").add("agent", "bob", out=tmp_path / "alice.nk")
    assert (tmp_path / "alice.nk").read_text().strip() == seed and Registry(tmp_path / "reg").get("agent-bob") is None
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    (legacy / "identities.json").write_text(json.dumps({"users": [{"user": "agent-a", "password": "p"}]}))
    with pytest.raises(IdentityError, match=r"users without an nkey"):
        Registry(legacy).load()
