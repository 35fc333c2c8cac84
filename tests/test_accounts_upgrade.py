"""Accounts on a secure node, around the edges: a store of a fleetlog before accounts (streams
in nats-server's global account `$G`) moves to FLEET at a single node's start and back at a
plain start; a secure cluster over such a store is refused with what to do; a request through
an import that nobody answers is a no-responders error at once, not a timeout. Real
nats-server processes on real store dirs."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest
from fleetlog.services.backbone.errors import FleetUnavailable
from fleetlog.services.node.broker import BrokerError, EmbeddedBroker, account_stores, free_port, reload_secure_broker
from fleetlog.services.node.cluster import LocalCluster
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .security_helpers import identity, raw

WAIT_S = 20.0  # a bound on an answer, never a measured time


def _settings(url: str, tmp_path: Path, credentials: Path | None) -> FleetSettings:
    return FleetSettings(nats_url=url, data_dir=tmp_path / "data", spool_dir=tmp_path / "spool", batch_wait_s=0.01,
                         reactors=False, credentials=credentials)


@pytest.mark.asyncio
async def test_a_global_account_store_moves_to_fleet_and_back(tmp_path: Path) -> None:
    port = free_port()
    store = account_stores(tmp_path / "broker" / "jetstream")
    plain = EmbeddedBroker(tmp_path / "broker", port=port)
    await plain.start()
    try:
        async with Fleet.connect(plain.url, spool_dir=tmp_path / "spool") as fleet:  # creates the streams
            fleet.attempts.record(agent="alice", action="before", outcome="success", elapsed_s=1.0)
            token = await fleet.flush()
    finally:
        await plain.stop()
    before = token["FLEET_ATTEMPTS"]
    assert (store / "$G" / "streams" / "FLEET_ATTEMPTS").is_dir() and not (store / "FLEET").exists()

    secure = EmbeddedBroker(tmp_path / "broker", port=port, secure=True)
    await secure.start()  # the upgrade: `$G` becomes FLEET before nats-server starts
    server = Server(_settings(secure.url, tmp_path, secure.credentials_path("service-fleetlog")))
    try:
        assert (store / "FLEET" / "streams" / "FLEET_ATTEMPTS").is_dir() and not (store / "$G").exists()
    except BaseException:
        await secure.stop()
        raise
    await server.start()
    try:
        alice = await identity(secure, "agent", "alice")
        async with Fleet.connect(secure.url, credentials=secure.credentials_path("admin-fleetlog"),
                                 spool_dir=tmp_path / "spool", ensure=False) as admin:
            info = await (await admin.nats()).jetstream().stream_info("FLEET_ATTEMPTS")
            assert info.state.last_seq == before and info.state.messages == before  # the old record, all of it
            async with Fleet.connect(secure.url, credentials=alice, spool_dir=tmp_path / "spool-a",
                                     ensure=False) as f:
                f.attempts.record(agent="alice", action="after", outcome="success", elapsed_s=1.0)
                after = await f.flush()
            assert after["FLEET_ATTEMPTS"] == before + 1  # appended to the moved stream, through the import
            page = await admin.attempts.query(agent="alice", min_seq=after)
            assert sorted(a.action for a in page.items) == ["after", "before"]
    finally:
        await server.stop()
        await secure.stop()

    again = EmbeddedBroker(tmp_path / "broker", port=port)  # plain again: back to `$G`, still all there
    await again.start()
    try:
        assert (store / "$G").is_dir() and not (store / "FLEET").exists()
        nc = await nats.connect(again.url)
        try:
            assert (await nc.jetstream().stream_info("FLEET_ATTEMPTS")).state.messages == before + 1
        finally:
            await nc.close()
    finally:
        await again.stop()


@pytest.mark.asyncio
async def test_a_secure_cluster_over_a_global_account_store_is_refused(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", size=3, port=free_port(), secure=True)
    old = account_stores(cluster.nodes[1].data_dir / "jetstream") / "$G" / "streams" / "FLEET_ATTEMPTS"
    old.mkdir(parents=True)
    with pytest.raises(BrokerError, match=r"\$G.*cannot move to 'FLEET'.*move .*cluster away"):
        await cluster.start()
    assert old.is_dir() and all(n.process is None for n in cluster.nodes)  # nothing moved, nothing started


@pytest.mark.asyncio
async def test_a_request_nobody_answers_through_an_import_is_no_responders(tmp_path: Path) -> None:
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), secure=True)
    await broker.start()  # no query service: nothing in FLEET subscribes to `fleetlog.>`
    try:
        dash = await identity(broker, "reader", "dash")
        r = await raw(broker, dash)
        try:
            with pytest.raises(nats.errors.NoRespondersError):  # a 503 across the import, not a timeout
                await r.request("fleetlog.status", b"{}", timeout=WAIT_S)
        finally:
            await r.close()
        async with Fleet.connect(broker.url, credentials=dash, spool_dir=tmp_path / "spool", ensure=False) as f:
            with pytest.raises(FleetUnavailable, match=r"no fleetlog query service answers fleetlog\.status"):
                await f.status()
    finally:
        await broker.stop()


@pytest.mark.asyncio
async def test_a_reload_refuses_a_running_node_of_one_account(tmp_path: Path) -> None:
    """`identities add|revoke` on a node an older fleetlog started (its config has users in the
    global account, its streams in `$G`): rendering accounts into it would strand the streams,
    so the reload says to restart it; a stopped one is left for its next start."""
    node = tmp_path / "broker"
    node.mkdir()
    (node / "nats.conf").write_text('{"listen": "127.0.0.1:4222", "authorization": {"users": []}}')
    (node / "nats.pid").write_text(str(os.getpid()))  # a live process stands in for its nats-server
    with pytest.raises(BrokerError, match=r"before accounts .*start it again with `fleetlog up --secure`"):
        await reload_secure_broker(node)
    (node / "nats.pid").write_text("999999999")  # no such process: stopped
    assert not await reload_secure_broker(node)
    assert "authorization" in (node / "nats.conf").read_text()  # untouched until it starts


@pytest.mark.asyncio
async def test_a_ping_answer_later_than_the_window_is_not_carried_back(tmp_path: Path) -> None:
    """The ping export carries answers back for PING_ANSWER_WINDOW_S only (a reply mapping the
    broker would otherwise keep 2 min per ping: a reader pinging in a loop grew it without bound)."""
    import asyncio

    from fleetlog.services.client.nodes import PING_ANSWER_WINDOW_S
    broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), secure=True)
    await broker.start()
    try:
        responder = await raw(broker, broker.credentials_path("service-fleetlog"))  # in FLEET
        dash = await raw(broker, await identity(broker, "reader", "dash"))
        try:
            async def answer(msg: nats.aio.msg.Msg) -> None:
                await msg.respond(b"soon")
                # nats-server prunes expired reply mappings on a timer of the threshold's period:
                # one lives between 1 and 2 thresholds (a late answer 1.5 thresholds on came back at times).
                await asyncio.sleep(2 * PING_ANSWER_WINDOW_S + 1.0)
                await msg.respond(b"late")

            sub = await responder.subscribe("$SRV.PING.fleetlog", cb=answer)
            await responder.flush()
            inbox = dash.new_inbox()
            got = await dash.subscribe(inbox)
            await dash.publish("$SRV.PING.fleetlog", b"", reply=inbox)
            assert (await got.next_msg(timeout=WAIT_S)).data == b"soon"
            with pytest.raises(nats.errors.TimeoutError):  # the late answer is not carried back
                await got.next_msg(timeout=2 * PING_ANSWER_WINDOW_S + 3.0)
            await sub.unsubscribe()
        finally:
            await dash.close()
            await responder.close()
    finally:
        await broker.stop()


@pytest.mark.asyncio
async def test_a_store_with_streams_in_both_accounts_is_refused(tmp_path: Path) -> None:
    """After a downgrade (a fleetlog before accounts makes new streams in `$G` beside FLEET) and an
    upgrade again, either mode would serve half the record: both refuse, naming both dirs."""
    store = account_stores(tmp_path / "broker" / "jetstream")
    for account in ("$G", "FLEET"):
        (store / account / "streams" / "FLEET_ATTEMPTS").mkdir(parents=True)
    for secure in (True, False):
        broker = EmbeddedBroker(tmp_path / "broker", port=free_port(), secure=secure)
        with pytest.raises(BrokerError, match=r"\$G and .*FLEET both hold streams"):
            await broker.start()
        assert broker.process is None
    cluster = LocalCluster(tmp_path / "cluster", size=3, port=free_port(), secure=True)
    split = account_stores(cluster.nodes[2].data_dir / "jetstream")
    for account in ("$G", "FLEET"):
        (split / account / "streams" / "FLEET_STATE").mkdir(parents=True)
    with pytest.raises(BrokerError, match=r"both hold streams"):
        await cluster.start()
    assert all(n.process is None for n in cluster.nodes)
