"""Replies as a deputy (review finding 1): NATS checks the subject a client publishes to, never
the reply subject it names, so whoever answers a request writes where the requester chose.

A real secure nats-server with the services on it as `service`, raw nats-py clients that name
stream subjects as their replies. On a secure node the streams live in the account FLEET and
every client identity in CLIENTS (services/node/identities.py `accounts`): nats-server's own
answers to a client (JetStream acks, API replies) and the query service's cross back to
CLIENTS, where no stream stores anything, so no client identity can have anything stored on
a state key, a lock, a run or a registration. Inside one account (FLEET's own identities, or
an operator who runs one account) the query service still answers inbox and import replies
only, and what the server's answers store is harmless: every fold refuses it (rejects, with a
reason) and a run or a processor lock whose last message it became is still claimed and
taken. One node serves the module."""

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


# A client's deputies: what nats-server or the query service answers to the reply a client names.
CTX: dict[str, Any] = {"runner_id": "runner-1", "bot_id": "bot-1", "workspace_id": "ws-1",
                       "conversation_id": "conv-1", "actor_id": "user-1", "subject_id": "ticket-1"}
BIND: dict[str, Any] = {"binding_id": "bind-A"}


def _answered(server: Any) -> int:
    """Requests the query service has answered (its latency histograms count each once)."""
    service = server.query._service
    return sum(sum(lat.counts) for c in service.counters.values() for lat in c.latency.values())


@shared_node
async def test_no_client_can_have_a_reply_stored_on_a_guarded_subject(secure: Node) -> None:
    broker, server, settings = secure
    rt, proc = await identity(broker, "runtime", "rt0"), await identity(broker, "processor", "p0")
    mallory = await raw(broker, await identity(broker, "agent", "mallory"))
    reader = await raw(broker, await identity(broker, "reader", "dash0"))
    rtx = await raw(broker, await identity(broker, "runtime", "rtx"))  # may direct-get runs, not touch a lock
    try:
        async with _admin(secure) as admin, \
                Fleet.connect(broker.url, credentials=rt, spool_dir=settings.spool_dir, ensure=False) as f, \
                Fleet.connect(broker.url, credentials=proc, spool_dir=settings.spool_dir, ensure=False) as p:
            anc = await admin.nats()
            js = anc.jetstream()
            key = await f.state.set("conversation", "mood", "calm", context=CTX, binding=BIND)
            held = await p.processors.acquire("p0", holder="first", lease_s=60)
            assert held is not None
            await f.runtimes.register("rt0")
            await admin.runs.create("victim0", "runner", status="queued", queue_name="q-deputy0")
            targets = [("FLEET_STATE", (await js.get_msg("FLEET_STATE", key.seq)).subject),
                       ("FLEET_PROCESSORS", "fleet.proc.p0.lock"), ("FLEET_RUNS", "fleet.run.victim0.state"),
                       ("FLEET_RUNTIMES", "fleet.runtime.rt0.registration")]
            heads = {stream: (await js.stream_info(stream)).state.last_seq for stream, _ in targets}
            lasts = {t: await js.get_last_msg(stream, t) for stream, t in targets}
            answered, dropped = _answered(server), server.query._service.foreign_replies
            for stream, target in targets:
                await mallory.publish(*_attempt("mallory"), reply=target)  # its own attempt: a JetStream ack
                await reader.publish(f"$JS.API.STREAM.INFO.{stream}", b"", reply=target)  # a JetStream API answer
                await rtx.publish("$JS.API.DIRECT.GET.FLEET_RUNS.fleet.run.victim0.state", b"", reply=target)
                await reader.publish("fleetlog.status", b"{}", reply=target)  # the query service
                await reader.publish("$SRV.PING.fleetlog", b"", reply=target)  # every instance answers
            # Each deputy's own round trip after its requests: the server has handled those.
            await mallory.jetstream().publish(*_attempt("mallory"))
            await reader.request("$JS.API.STREAM.INFO.FLEET_RUNS", b"", timeout=WAIT_S)
            await rtx.request("$JS.API.DIRECT.GET.FLEET_RUNS.fleet.run.victim0.state", b"", timeout=WAIT_S)

            async def unchanged() -> None:
                for stream, target in targets:
                    now = await js.get_last_msg(stream, target)
                    assert (now.seq, now.data) == (lasts[target].seq, lasts[target].data), (target, now.data[:80])
                    assert (await js.stream_info(stream)).state.last_seq == heads[stream], (stream, target)

            await unchanged()  # nats-server's answers: stored nowhere
            deadline = asyncio.get_running_loop().time() + WAIT_S
            while _answered(server) < answered + len(targets):  # answered through the import: `_R_.` replies
                assert asyncio.get_running_loop().time() < deadline, "the query service did not answer"
                await asyncio.sleep(0.05)
            assert server.query._service.foreign_replies == dropped
            await unchanged()  # nor the query service's
            # The key, the lock, the run and the registration are intact and readable.
            assert await f.state.get("conversation", "mood", context=CTX, binding=BIND, min_seq=key) == "calm"
            assert await p.processors.renew(held, 60) and not held.lost
            registered = await f.runtimes.get("rt0", min_seq={"FLEET_RUNTIMES": heads["FLEET_RUNTIMES"]})
            assert registered is not None and registered.runtime_id == "rt0"
            run = await f.runs.get("victim0")
            assert run is not None and run.status == "queued"
            for projection, stream in (("state", "FLEET_STATE"), ("processors", "FLEET_PROCESSORS"),
                                       ("runs", "FLEET_RUNS"), ("runtimes", "FLEET_RUNTIMES")):
                rows = (await admin.rejects(projection, limit=200, min_seq={stream: heads[stream]})).items
                assert [r for r in rows if r.stream == stream and r.seq > heads[stream]] == [], rows[:3]
            assert not errors_of(mallory) and not errors_of(reader) and not errors_of(rtx)  # all were allowed
    finally:
        for nc in (mallory, reader, rtx):
            await nc.close()


@shared_node
async def test_the_query_service_answers_inbox_and_import_replies_only(secure: Node) -> None:
    """Inside FLEET (its own identities, or one account) the query service is still a deputy:
    a reply that is neither an inbox nor an import's `_R_.` subject is dropped and counted."""
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
        inside = await raw(broker, broker.credentials_path("admin-fleetlog"))
        r = await raw(broker, dash)
        try:
            await inside.publish("fleetlog.status", b"{}", reply="fleet.run.victim-q.state")
            await inside.publish("$SRV.PING.fleetlog", b"", reply="fleet.attempt.alice.viaping")
            await inside.flush()
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
            await inside.close()
    async with Fleet.connect(broker.url, credentials=dash, spool_dir=settings.spool_dir, ensure=False) as fleet:
        assert (await fleet.status()).node_state == "serving"  # its own inbox, through the import: answered
        assert [n.node for n in await fleet.nodes()] == [server.query.node]  # `status --nodes`: PING


# Where an identity of the streams' own account (FLEET here; every identity on a one-account
# NATS an operator runs) can make nats-server store a PubAck-shaped JSON: one subject per fold.
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
    mallory = await raw(broker, broker.credentials_path("admin-fleetlog"))  # inside FLEET
    try:
        async with _admin(secure) as admin:
            anc = await admin.nats()
            for projection, stream, target in FAMILIES:
                before = await _last_seq(anc, stream, target)
                # An attempt; the broker acks it to the reply it named: another's subject.
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
    reader = await raw(broker, broker.credentials_path("admin-fleetlog"))  # inside FLEET: one account
    run_subject, lock_subject = "fleet.run.victim.state", "fleet.proc.p1.lock"

    async def junk(stream: str, subject: str) -> int:
        """The broker stores a stream-info answer as the subject's last message (one account)."""
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
