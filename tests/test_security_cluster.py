"""`up --secure --cluster N`'s brokers: a 3-node loopback cluster serving one registry's identities,
routes authenticated, `identities add|revoke` reloading every node."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import nats
import pytest
from fleetlog.services.node.broker import free_port, reload_secure_broker
from fleetlog.services.node.cluster import LocalCluster
from fleetlog.services.node.identities import Registry

from .security_helpers import errors_of, raw


async def _route_connect(host: str, port: int, password: str) -> bytes:
    """What a cluster node's route port answers a route CONNECT with this password."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        await reader.readline()  # INFO
        connect = {"user": "route", "pass": password, "verbose": False, "pedantic": False, "name": "intruder"}
        writer.write(b"CONNECT " + json.dumps(connect).encode() + b"\r\nPING\r\n")
        await writer.drain()
        return await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()


async def test_a_secure_cluster_serves_the_same_identities_on_every_node(tmp_path: Path) -> None:
    nodes = LocalCluster(tmp_path / "cluster", 3, free_port(), secure=True)
    await nodes.start()  # healthy: the nodes found each other over authenticated routes
    try:
        broker_dir = tmp_path / "broker"
        assert nodes.registry_dir == broker_dir
        admin = await raw(nodes.nodes[0], nodes.nodes[0].credentials_path("admin-fleetlog"))
        try:
            await admin.jetstream().add_stream(name="FLEET_ATTEMPTS", subjects=["fleet.attempt.>"], num_replicas=3)
        finally:
            await admin.close()
        seed = tmp_path / "alice.nk"
        Registry(broker_dir).add("agent", "alice", out=seed)
        assert await reload_secure_broker(broker_dir)  # every node reloads
        for node in nodes.nodes[1:]:  # alice is known on each node, as herself only
            nc = await raw(node, seed)
            try:
                js = nc.jetstream()
                ack = await js.publish("fleet.attempt.alice.probe", b"{}", timeout=10)
                assert ack.stream == "FLEET_ATTEMPTS"
                with pytest.raises(nats.errors.TimeoutError):
                    await js.publish("fleet.attempt.bob.probe", b"{}", timeout=2)
                await nc.flush()
                assert any('publish to "fleet.attempt.bob.probe"' in t for t in errors_of(nc)), errors_of(nc)
            finally:
                await nc.close()
        route = str(nodes.nodes[2].conf["cluster"]["listen"]).rsplit(":", 1)  # type: ignore[index]
        assert b"Authorization Violation" in await _route_connect(route[0], int(route[1]), "guessed")
        assert Registry(broker_dir).revoke("agent-alice")
        assert await reload_secure_broker(broker_dir)
        with pytest.raises(Exception, match=r"[Aa]uthorization"):
            await nats.connect(nodes.nodes[2].url, nkeys_seed=str(seed), allow_reconnect=False,
                               max_reconnect_attempts=0, connect_timeout=2)
    finally:
        await nodes.stop()
