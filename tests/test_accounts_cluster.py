"""`fleetlog status --nodes` on `up --secure --cluster 3`: a client's `$SRV.PING.fleetlog` crosses
from CLIENTS into FLEET through a service import, and every node's query service answers it;
the import's `stream` response type lets each answer back (a `singleton` import would deliver
the first only). Raw responders in FLEET stand in for the three query services."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from fleetlog.services.node.broker import free_port, reload_secure_broker
from fleetlog.services.node.cluster import LocalCluster
from fleetlog.services.node.identities import Registry

from .security_helpers import raw

WAIT_S = 20.0  # a bound on the answers, never a measured time


@pytest.mark.asyncio
async def test_every_nodes_ping_answer_crosses_the_import(tmp_path: Path) -> None:
    cluster = LocalCluster(tmp_path / "cluster", 3, free_port(), secure=True)
    await cluster.start()
    responders: list[nats.NATS] = []
    try:
        for i, node in enumerate(cluster.nodes):
            nc = await raw(node, node.credentials_path("service-fleetlog"))
            responders.append(nc)

            async def pong(msg: nats.aio.msg.Msg, i: int = i) -> None:
                await msg.respond(b'{"name":"fleetlog","id":"node-%d"}' % (i + 1))

            await nc.subscribe("$SRV.PING.fleetlog", cb=pong)
            await nc.flush()
        dash = tmp_path / "dash.nk"
        Registry(cluster.registry_dir).add("reader", "dash", out=dash)
        assert await reload_secure_broker(cluster.registry_dir)
        r = await raw(cluster.nodes[0], dash)
        try:
            ids: set[bytes] = set()
            deadline = asyncio.get_running_loop().time() + WAIT_S
            # A node's subscription may reach the others a moment after it is made: ask again
            # until all three answered one ping (each on an inbox of its own: answers to
            # several pings never add up).
            while len(ids) < 3:
                assert asyncio.get_running_loop().time() < deadline, f"answers from {sorted(ids)} only"
                inbox = r.new_inbox()
                sub = await r.subscribe(inbox)
                await r.publish("$SRV.PING.fleetlog", b"", reply=inbox)
                got: set[bytes] = set()
                while len(got) < 3:
                    try:
                        got.add((await sub.next_msg(timeout=2)).data)
                    except nats.errors.TimeoutError:
                        break
                await sub.unsubscribe()
                ids = got
            assert {i.split(b'"id":"')[1][:6] for i in ids} == {b"node-1", b"node-2", b"node-3"}
        finally:
            await r.close()
    finally:
        for nc in responders:
            await nc.close()
        await cluster.stop()
