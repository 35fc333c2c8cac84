"""Helpers for the cluster tests: a real 3-node nats-server cluster on loopback (services/node/cluster.py)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

from fleetlog.services.backbone.link import connect_once
from fleetlog.services.backbone.streams import stream_placements
from fleetlog.services.node.broker import free_port
from fleetlog.services.node.cluster import LocalCluster

from fleetlog import FleetSettings


@contextlib.asynccontextmanager
async def running_cluster(root: Path, size: int = 3) -> AsyncIterator[LocalCluster]:
    nodes = LocalCluster(root / "cluster", size, free_port())
    await nodes.start(timeout_s=120)
    try:
        yield nodes
    finally:
        await nodes.stop()


def cluster_settings(nodes: LocalCluster, root: Path, name: str = "data", **extra: object) -> FleetSettings:
    return FleetSettings(
        nats_url=nodes.nats_url, data_dir=root / name, spool_dir=root / f"{name}-spool", stream_replicas=3,
        batch_wait_s=0.01, reactors=False, **extra,  # type: ignore[arg-type]
    )


async def leader_index(nodes: LocalCluster, stream: str) -> int:
    """Which node leads `stream` now."""
    nc = await connect_once(nodes.urls, "leader-probe")
    try:
        for p in await stream_placements(nc):
            if p.name == stream:
                return [n.name for n in nodes.nodes].index(p.leader)
    finally:
        await nc.close()
    raise AssertionError(f"stream {stream} not found")
