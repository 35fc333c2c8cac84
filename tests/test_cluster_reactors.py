"""Reactors on two fleetlog nodes of a cluster do each effect once (they are guarded), also while
the FLEET_RUNS leader's node is SIGKILLed under them."""

from __future__ import annotations

from pathlib import Path

import pytest
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .cluster_helpers import cluster_settings, leader_index, running_cluster
from .helpers import wait_until

pytestmark = pytest.mark.timeout(900)

RUNS = 20


async def test_two_nodes_reactors_sweep_and_mark_once_through_a_leader_loss(tmp_path: Path) -> None:
    async with running_cluster(tmp_path) as nodes:
        servers = [Server(cluster_settings(nodes, tmp_path, f"node{i}", reactors=True, reactor_interval_s=0.2))
                   for i in range(2)]
        for srv in servers:
            await srv.start()
        fleet = await Fleet.connect(settings=cluster_settings(nodes, tmp_path, "client"))
        try:
            for i in range(RUNS):
                await fleet.runs.create(f"r{i}", "runner", status="queued")
            claims = [await fleet.runs.claim_next(f"rt{i}", lease_s=3) for i in range(RUNS)]
            assert all(c is not None for c in claims)
            await fleet.runtimes.register("quiet", heartbeat_deadline_s=3)
            victim = await leader_index(nodes, "FLEET_RUNS")
            nodes.kill(victim)  # while the leases run out

            async def all_requeued() -> bool:
                try:
                    runs = [await fleet.runs.get(f"r{i}") for i in range(RUNS)]
                except Exception:
                    return False
                return all(r is not None and r.status == "queued" for r in runs)

            await wait_until(all_requeued, timeout_s=300, interval_s=0.5)
            await nodes.restart(victim, timeout_s=300)
            for i in range(RUNS):
                run = await fleet.runs.get(f"r{i}")
                assert run is not None and run.status_reason == "claim lease expired"

            async def stale() -> bool:
                rt = await fleet.runtimes.get("quiet")
                return rt is not None and rt.status == "stale"

            await wait_until(stale, timeout_s=300, interval_s=0.5)
            # exactly one lease_expired per run, and one stale mark, however many reactors ran
            swept = [s.reactors.swept for s in servers if s.reactors is not None]
            marked = [s.reactors.marked for s in servers if s.reactors is not None]
        finally:
            await fleet.close()
            for srv in servers:
                await srv.stop()
    print(f"\n[cluster reactors] {RUNS} expired leases swept per node {swept}, stale marks per node {marked}, "
          f"with {nodes.nodes[victim].name} (FLEET_RUNS leader) SIGKILLed meanwhile")
    assert (sum(swept), sum(marked)) == (RUNS, 1)
