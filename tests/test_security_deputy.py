"""Replies as a deputy (review finding 1): NATS checks the subject a client publishes to, never
the reply subject it names, so whoever answers a request writes where the requester chose.

A real secure nats-server with the services on it as `service`, raw nats-py clients that name
stream subjects as their replies. The query service (endpoints and nats.micro's PING) answers
inbox replies only; nats-server's own answers (JetStream acks, API replies) cannot be stopped
in one account, so what they store on another identity's subject must be harmless: every
fold refuses it (rejects, with a reason) and a run or a processor lock whose last message it
became is still claimed and taken. One node serves the module."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
from fleetlog.schemas import AttemptRecorded, encode_event, new_event_id, now_iso
from fleetlog.schemas.runs import Candidates, FoldedStateQuery
from fleetlog.services.backbone.errors import PermissionDenied

from fleetlog import Fleet

from .security_helpers import Node, errors_of, identity, raw, secure_node

shared_node = pytest.mark.asyncio(loop_scope="module")
WAIT_S = 20.0  # a bound on waiting for the broker to store something, never a measured time


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def secure(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Node]:
    async with secure_node(tmp_path_factory.mktemp("deputy")) as node:
        yield node


def _admin(node: Node) -> Any:
    broker, _, settings = node
    return Fleet.connect(settings=settings.model_copy(update={"credentials": broker.credentials_path(
        "admin-fleetlog")}))


async def _last_seq(nc: nats.NATS, stream: str, subject: str) -> int:
    try:
        return int((await nc.jetstream().get_last_msg(stream, subject)).seq or 0)
    except nats.js.errors.NotFoundError:
        return 0


async def _until_moved(nc: nats.NATS, stream: str, subject: str, past: int) -> int:
    """The subject's last seq once it is past `past` (the broker stored the reply there)."""
    deadline = asyncio.get_running_loop().time() + WAIT_S
    while (seq := await _last_seq(nc, stream, subject)) <= past:
        assert asyncio.get_running_loop().time() < deadline, f"nothing stored on {subject} past seq {past}"
        await asyncio.sleep(0.05)
    return seq


def _attempt(agent: str) -> tuple[str, bytes]:
    e = AttemptRecorded(id=new_event_id(), ts=now_iso(), agent=agent, action="probe", outcome="success",
                        elapsed_s=0.1)
    return e.subject(), encode_event(e)


@shared_node
async def test_the_query_service_answers_inbox_replies_only(secure: Node) -> None:
    broker, server, settings = secure
    dash = await identity(broker, "reader", "dash")
    async with _admin(secure) as admin:
        await admin.runs.create("victim-q", "runner", status="queued", queue_name="qq")
        anc = await admin.nats()
        run_seq = await _last_seq(anc, "FLEET_RUNS", "fleet.run.victim-q.state")
        attempts_seq = await _last_seq(anc, "FLEET_ATTEMPTS", "fleet.attempt.alice.viaping")
        service = server.query._service
        assert service is not None
        dropped = getattr(service, "foreign_replies", 0)
        r = await raw(broker, dash)
        try:
            await r.publish("fleetlog.status", b"{}", reply="fleet.run.victim-q.state")
            await r.publish("$SRV.PING.fleetlog", b"", reply="fleet.attempt.alice.viaping")
            await r.publish("$SRV.STATS.fleetlog", b"", reply=r.new_inbox())  # STATS: the trusted roles'
            await r.flush()
            deadline = asyncio.get_running_loop().time() + WAIT_S
            # Until both are dropped (counted before any answer is made), or an answer got stored.
            while (getattr(service, "foreign_replies", 0) < dropped + 2
                   and await _last_seq(anc, "FLEET_RUNS", "fleet.run.victim-q.state") == run_seq
                   and await _last_seq(anc, "FLEET_ATTEMPTS", "fleet.attempt.alice.viaping") == attempts_seq):
                assert asyncio.get_running_loop().time() < deadline, "neither answered nor dropped"
                await asyncio.sleep(0.05)
            assert await _last_seq(anc, "FLEET_RUNS", "fleet.run.victim-q.state") == run_seq  # nothing written
            assert await _last_seq(anc, "FLEET_ATTEMPTS", "fleet.attempt.alice.viaping") == attempts_seq
            await r.flush()
            assert any('publish to "$srv.stats.fleetlog"' in t.lower() for t in errors_of(r)), errors_of(r)
        finally:
            await r.close()
    async with Fleet.connect(broker.url, credentials=dash, spool_dir=settings.spool_dir, ensure=False) as fleet:
        assert (await fleet.status()).node_state == "serving"  # its own inbox: answered
        assert [n.node for n in await fleet.nodes()] == [server.query.node]  # `status --nodes`: PING


# Where an identity can make nats-server store a PubAck-shaped JSON: one subject per fold.
FAMILIES = (("attempts", "FLEET_ATTEMPTS", "fleet.attempt.alice.deputy"),
            ("snapshots", "FLEET_SNAPSHOTS", "fleet.snapshot.h1.alice"),
            ("snapshots", "FLEET_DIFFS", "fleet.diff.h1.alice"),
            ("state", "FLEET_STATE", "fleet.state.s.h.k"),
            ("runtimes", "FLEET_RUNTIMES", "fleet.runtime.rtx.registration"),
            ("processors", "FLEET_PROCESSORS", "fleet.proc.px.lock"),
            ("runs", "FLEET_RUNS", "fleet.run.rx.state"))


@shared_node
async def test_every_fold_refuses_an_ack_stored_on_its_subjects(secure: Node) -> None:
    broker, _, _ = secure
    mallory = await raw(broker, await identity(broker, "agent", "mallory"))
    try:
        async with _admin(secure) as admin:
            anc = await admin.nats()
            for projection, stream, target in FAMILIES:
                before = await _last_seq(anc, stream, target)
                # Its own attempt, allowed; the broker acks it to the reply it named: another's subject.
                await mallory.publish(*_attempt("mallory"), reply=target)
                seq = await _until_moved(anc, stream, target, before)
                stored = await anc.jetstream().get_last_msg(stream, target)
                assert b'"stream":"FLEET_ATTEMPTS"' in stored.data  # the PubAck, stored as a fact
                rows = (await admin.rejects(projection, limit=200, min_seq={stream: seq})).items
                mine = [r for r in rows if r.stream == stream and r.seq == seq]
                assert len(mine) == 1 and mine[0].subject == target and mine[0].reason, (projection, rows[:3])
    finally:
        await mallory.close()


@shared_node
async def test_a_run_and_a_lock_outlive_junk_on_their_subjects(secure: Node) -> None:
    broker, _, settings = secure
    rt = await identity(broker, "runtime", "rt1")
    proc = await identity(broker, "processor", "p1")
    reader = await raw(broker, await identity(broker, "reader", "dash2"))
    run_subject, lock_subject = "fleet.run.victim.state", "fleet.proc.p1.lock"

    async def junk(stream: str, subject: str) -> int:
        """A reader has the broker store its stream-info answer as the subject's last message."""
        before = await _last_seq(anc, stream, subject)
        await reader.publish(f"$JS.API.STREAM.INFO.{stream}", b"", reply=subject)
        return await _until_moved(anc, stream, subject, before)

    try:
        async with _admin(secure) as admin, \
                Fleet.connect(broker.url, credentials=rt, spool_dir=settings.spool_dir, ensure=False) as f, \
                Fleet.connect(broker.url, credentials=proc, spool_dir=settings.spool_dir, ensure=False) as p:
            anc = await admin.nats()
            await admin.runs.create("victim", "runner", status="queued", queue_name="q-deputy")
            held = await p.processors.acquire("p1", holder="first", lease_s=60)
            assert held is not None
            run_junk = await junk("FLEET_RUNS", run_subject)
            lock_junk = await junk("FLEET_PROCESSORS", lock_subject)

            await f.runtimes.register("rt1")
            reg_junk = await junk("FLEET_RUNTIMES", "fleet.runtime.rt1.registration")
            again_rt = await f.runtimes.register("rt1")  # over the junk (the view forgot rt1: a first one)
            assert again_rt.runtime_id == "rt1" and again_rt.id > reg_junk
            view = await f.runs.get("victim")  # the view's state stands in for the foreign message
            assert view is not None and view.status == "queued"
            claimed = await f.runs.claim_next("rt1", queue_name="q-deputy")
            assert claimed is not None and claimed.run_id == "victim" and claimed.claimed_by_runtime_id == "rt1"
            assert claimed.fence is not None and claimed.fence > run_junk  # the claim replaced the junk
            again = await f.runs.get("victim")
            assert again is not None and again.claimed_by_runtime_id == "rt1"

            # The processors view forgets a lock whose last message it refused: free, for the client
            # too; the old holder learns it at its next renewal, the next acquire replaces the junk.
            taken = await p.processors.acquire("p1", holder="second", lease_s=60)
            assert taken is not None and taken.holder == "second" and taken.seq > lock_junk
            assert not await p.processors.renew(held, 60) and held.lost
            assert await p.processors.renew(taken, 60)
            for projection, stream, seq in (("runs", "FLEET_RUNS", run_junk),
                                            ("processors", "FLEET_PROCESSORS", lock_junk)):
                rows = (await admin.rejects(projection, limit=200, min_seq={stream: seq})).items
                assert [r.seq for r in rows if r.stream == stream and r.seq == seq] == [seq], rows[:3]
    finally:
        await reader.close()


@shared_node
async def test_a_denial_is_said_at_once_whatever_the_case(secure: Node, tmp_path: Path) -> None:
    broker = secure[0]
    big = await identity(broker, "runtime", "RT9")  # nats-py lowercases the subject it reports
    async with Fleet.connect(broker.url, credentials=big, spool_dir=tmp_path, ensure=False) as f:
        with pytest.raises(PermissionDenied, match=r"fleet\.runtime\.Other\.registration"):
            await f.runtimes.register("Other")
        assert (await f.runtimes.register("RT9")).runtime_id == "RT9"  # as itself: stored
    dash = await identity(broker, "reader", "Dash3")
    async with Fleet.connect(broker.url, credentials=dash, spool_dir=tmp_path, ensure=False) as f:
        with pytest.raises(PermissionDenied, match=r"\$JS\.API\.DIRECT\.GET\.FLEET_RUNS"):
            await f.runs.get("victim")  # a reader may not read the runs stream directly
        with pytest.raises(PermissionDenied, match=r"fleetlog\.runs\.state"):  # runtimes only
            await f.request("fleetlog.runs.state", FoldedStateQuery(run_id="victim"), Candidates, timeout=5)
