"""Helpers for the cluster tests: a real 3-node nats-server cluster on loopback (services/node/cluster.py)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

from fleetlog.services.backbone.link import connect_once
from fleetlog.services.backbone.streams import stream_placements
from fleetlog.services.node.broker import die_with_parent, free_port
from fleetlog.services.node.cluster import LocalCluster

from fleetlog import FleetSettings

from .helpers import fleetlog_cmd, wait_until


@contextlib.asynccontextmanager
async def running_cluster(root: Path, size: int = 3) -> AsyncIterator[LocalCluster]:
    nodes = LocalCluster(root / "cluster", size, free_port())
    await nodes.start(timeout_s=120)
    try:
        yield nodes
    finally:
        await nodes.stop()


def cluster_settings(nodes: LocalCluster, root: Path, name: str = "data", **extra: object) -> FleetSettings:
    given: dict[str, object] = {"batch_wait_s": 0.01, "reactors": False, **extra}
    return FleetSettings(
        nats_url=nodes.nats_url, data_dir=root / name, spool_dir=root / f"{name}-spool", stream_replicas=3,
        **given,  # type: ignore[arg-type]
    )


async def leader_index(nodes: LocalCluster, stream: str) -> int:
    """Which node leads `stream` now (waits while it has none: an election)."""
    names = [n.name for n in nodes.nodes]
    nc = await connect_once(nodes.urls, "leader-probe")
    try:
        async def led() -> int | None:
            for p in await stream_placements(nc):
                if p.name == stream and p.leader in names:
                    return names.index(p.leader) + 1  # wait_until wants a true value
            return None

        return int(await wait_until(led, timeout_s=120, interval_s=0.2)) - 1
    finally:
        await nc.close()


def start_cluster_serve(nodes: LocalCluster, data_dir: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """`fleetlog serve --nats a,b,c` in its own process (R3 streams), dying with the test."""
    env = {**os.environ, "FLEETLOG_BATCH_WAIT_S": "0.01", "FLEETLOG_STREAM_REPLICAS": "3",
           "FLEETLOG_REACTORS": "false"}
    with open(log_path, "ab") as log:
        return subprocess.Popen([*fleetlog_cmd(), "serve", "--nats", nodes.nats_url, "--data-dir", str(data_dir)],
                                stdout=log, stderr=subprocess.STDOUT, env=env, preexec_fn=die_with_parent())
