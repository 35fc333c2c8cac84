"""Cluster fault tests 1 and 2 (issue 17): a stream leader's node really SIGKILLed mid-way
and restarted later, on a 3-node loopback cluster with R3 streams. Each prints its figures."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from fleetlog.services.node.broker import die_with_parent
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .cluster_helpers import cluster_settings, leader_index, running_cluster
from .helpers import wait_until

pytestmark = pytest.mark.timeout(1200)


def _attempt_rows(server: Server) -> tuple[int, int]:
    con = server.store.cursor(server.projector.live("attempts").gen.schema)
    try:
        row = con.execute("SELECT count(*), count(DISTINCT id) FROM attempts").fetchone()
    finally:
        con.close()
    assert row is not None
    return int(row[0]), int(row[1])


async def test_leader_node_sigkilled_while_emitting_50k(tmp_path: Path) -> None:
    """1. One client emits 50,000 attempts; the FLEET_ATTEMPTS leader's node is SIGKILLed at
    20,000 and restarted at 35,000: after flush both fleetlog nodes' views hold exactly 50,000."""
    total = 50_000
    async with running_cluster(tmp_path) as nodes:
        servers = [Server(cluster_settings(nodes, tmp_path, f"node{i}")) for i in range(2)]
        for srv in servers:
            await srv.start()
        try:
            victim = await leader_index(nodes, "FLEET_ATTEMPTS")
            # The publisher's wire takes the URLs in order: on a surviving node, it sees the leader
            # change itself (503s, ack timeouts: retried in memory), not a lost connection (spooled).
            order = [u for i, u in enumerate(nodes.urls) if i != victim] + [nodes.urls[victim]]
            client = cluster_settings(nodes, tmp_path, "client").model_copy(update={"nats_url": ",".join(order)})
            fleet = await Fleet.connect(settings=client, name="cluster-fault-1")
            t0 = time.perf_counter()
            try:
                for i in range(total):
                    fleet.attempts.record(agent=f"agent-{i % 7}", action="probe", outcome="success",
                                          elapsed_s=i / 1000)
                    if i % 500 == 0:
                        await asyncio.sleep(0)  # an agent doing other work: the sender gets the loop
                    if i == 20_000:
                        nodes.kill(victim)
                        killed_at = time.perf_counter()
                    if i == 35_000:
                        await nodes.restart(victim, timeout_s=300)
                        down_s = time.perf_counter() - killed_at
                token = await fleet.flush(timeout=600)
                emitted_s = time.perf_counter() - t0
                stats = fleet.publisher_stats()
            finally:
                await fleet.close()
            new_leader = nodes.nodes[await leader_index(nodes, "FLEET_ATTEMPTS")].name

            async def folded(srv: Server) -> bool:
                return _attempt_rows(srv)[0] >= total

            for srv in servers:
                await wait_until(lambda s=srv: folded(s), timeout_s=600, interval_s=0.5)
            counts = [_attempt_rows(srv) for srv in servers]
        finally:
            for srv in servers:
                await srv.stop()
    print(f"\n[cluster fault 1] {total} attempts in {emitted_s:.1f}s; leader {nodes.nodes[victim].name} "
          f"SIGKILLed at 20,000, down {down_s:.1f}s (restarted at 35,000), leader now {new_leader}; "
          f"publisher retried={stats.retried} spooled={stats.spooled} acked={stats.acked} "
          f"broker-dedup={stats.duplicates} dropped={stats.dropped_spool_full}; "
          f"token {token}; views (rows, distinct ids) per node: {counts}")
    assert stats.dropped_spool_full == 0 and stats.dead_lettered == 0
    assert counts == [(total, total), (total, total)]


CLAIMERS = 8
RUNS = 2_000


async def test_eight_runtimes_claim_2000_runs_while_a_node_is_killed(tmp_path: Path) -> None:
    """2. 8 runtimes (processes) race to claim 2,000 runs; the FLEET_RUNS leader's node is
    SIGKILLed while they do and restarted: every run claimed exactly once, fences increasing."""
    async with running_cluster(tmp_path) as nodes:
        srv = Server(cluster_settings(nodes, tmp_path, "node"))
        await srv.start()
        try:
            fleet = await Fleet.connect(settings=cluster_settings(nodes, tmp_path, "client"), name="cluster-fault-2")
            try:
                created: dict[str, int] = {}
                for start in range(0, RUNS, 200):
                    views = await asyncio.gather(*(
                        fleet.runs.create(f"run-{i:05d}", "runner", status="queued", priority=i % 3)
                        for i in range(start, min(start + 200, RUNS))))
                    created.update({v.run_id: v.id for v in views})  # id: the seq of the creation
                victim = await leader_index(nodes, "FLEET_RUNS")
                start_at = time.time() + 3.0
                script = Path(__file__).with_name("run_claimer.py")
                procs = [subprocess.Popen(  # noqa: ASYNC220 - waited for in threads
                    [sys.executable, str(script), nodes.nats_url, f"rt-{n}", str(tmp_path / f"c{n}.json"),
                     str(tmp_path / f"spool{n}"), str(start_at)], preexec_fn=die_with_parent())
                    for n in range(CLAIMERS)]

                async def claimed_at_least(n: int) -> bool:
                    try:
                        page = await fleet.runs.list(statuses=["claimed"], limit=1)
                    except Exception:
                        return False
                    return page.total_count >= n

                await wait_until(lambda: claimed_at_least(RUNS // 4), timeout_s=300, interval_s=0.2)
                nodes.kill(victim)
                killed_at = time.perf_counter()
                await asyncio.sleep(5.0)  # claims go on (or wait) without that node for a while
                await nodes.restart(victim, timeout_s=300)
                down_s = time.perf_counter() - killed_at
                codes = [await asyncio.to_thread(p.wait, 900) for p in procs]
                assert codes == [0] * CLAIMERS
                results = [json.loads((tmp_path / f"c{n}.json").read_text()) for n in range(CLAIMERS)]
                claims = [(run_id, fence, r["runtime_id"]) for r in results for run_id, fence, _, _ in r["claims"]]
                fences = [c[1] for c in claims]
                claimed = await fleet.runs.list(statuses=["claimed"], min_seq={"FLEET_RUNS": max(fences)}, limit=1)
                queued = await fleet.runs.list(statuses=["queued"], min_seq={"FLEET_RUNS": max(fences)}, limit=1)
            finally:
                await fleet.close()
        finally:
            await srv.stop()
    ids = [c[0] for c in claims]
    conflicts = sum(r["conflicts"] for r in results)
    rate = RUNS / max(r["elapsed_s"] for r in results)
    print(f"\n[cluster fault 2] {RUNS} runs, {CLAIMERS} claimers at {rate:.0f} claims/s overall; node "
          f"{nodes.nodes[victim].name} (FLEET_RUNS leader) SIGKILLed after {RUNS // 4} claims, down {down_s:.1f}s; "
          f"conflicts {conflicts}; claims per runtime {sorted(len(r['claims']) for r in results)}")
    assert len(ids) == RUNS and set(ids) == set(created)  # every run, exactly once
    assert len(set(fences)) == RUNS
    assert all(fence > created[run_id] for run_id, fence, _ in claims)  # the claim follows the creation
    assert claimed.total_count == RUNS and queued.total_count == 0  # the view agrees


async def test_an_outage_longer_than_the_retry_window_spools_then_drains(tmp_path: Path) -> None:
    """A leader change is retried in memory; an outage that outlasts `publish_retry_s` (two of
    three nodes gone: no quorum) goes to the spool, and drains once the nodes are back."""
    total = 2_000
    async with running_cluster(tmp_path) as nodes:
        srv = Server(cluster_settings(nodes, tmp_path, "node"))
        await srv.start()
        try:
            client = cluster_settings(nodes, tmp_path, "client", publish_retry_s=1.0, publish_ack_timeout_s=1.0)
            fleet = await Fleet.connect(settings=client, name="cluster-outage")  # wire: 1st URL, kept
            try:
                fleet.attempts.record(agent="a", action="warm", outcome="success", elapsed_s=0.0)
                await fleet.flush(timeout=120)
                nodes.kill(1)
                nodes.kill(2)
                for i in range(total):
                    fleet.attempts.record(agent="a", action="probe", outcome="success", elapsed_s=i / 1000)

                async def spooled() -> bool:
                    s = fleet.publisher_stats()
                    return s.retried > 0 and s.spooled > 0

                await wait_until(spooled, timeout_s=300, interval_s=0.2)
                during = fleet.publisher_stats()
                await asyncio.gather(nodes.restart(1, timeout_s=300), nodes.restart(2, timeout_s=300))
                token = await fleet.flush(timeout=600)
                stats = fleet.publisher_stats()
                page = await fleet.attempts.stats(min_seq=token)
            finally:
                await fleet.close()
        finally:
            await srv.stop()
    print(f"\n[cluster outage] {total} attempts with 2 of 3 nodes down: retried {during.retried}, spooled "
          f"{during.spooled} while down; after the nodes came back: acked {stats.acked}, "
          f"broker-dedup {stats.duplicates}, spool pending {stats.spool_pending}")
    assert stats.spool_pending == 0 and stats.dropped_spool_full == 0 and stats.dead_lettered == 0
    assert sum(s.count for s in page.items) == total + 1
