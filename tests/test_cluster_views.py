"""Cluster fault tests 3 and 4 (issue 17): two `fleetlog serve` nodes folding the same R3
streams agree table by table, also after one was SIGKILLed mid-fold (queries answered
meanwhile); and a whole-cluster restart loses nothing that was acked."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fleetlog.projections import ALL
from fleetlog.services.client.nodes import node_statuses
from fleetlog.services.node.server import Server

from fleetlog import Fleet

from .cluster_helpers import cluster_settings, running_cluster, start_cluster_serve
from .helpers import view_digest, wait_until

pytestmark = pytest.mark.timeout(1200)


async def _emit(fleet: Fleet, start: int, n: int) -> None:
    for i in range(start, start + n):
        fleet.attempts.record(agent=f"agent-{i % 11}", action=f"act{i % 5}", outcome="success",
                              elapsed_s=i % 97, extras={"i": i})
        if i % 500 == 0:
            await asyncio.sleep(0)


async def _both_caught_up(fleet: Fleet, token: dict[str, int]) -> bool:
    answers = await node_statuses(fleet, wait_s=2.0, expect=2)
    if len(answers) != 2 or any(a.node_state != "serving" for a in answers):
        return False
    for a in answers:
        for p in a.projections:
            for stream, seq in token.items():
                if stream in p.checkpoints and p.checkpoints[stream] < seq:
                    return False
    return True


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(60)


async def test_two_serve_nodes_agree_also_after_one_was_sigkilled_mid_fold(tmp_path: Path) -> None:
    """3. Identical views (a content checksum per table), one node SIGKILLed mid-fold and
    restarted; queries with a `min_seq` token are answered correctly while it is down."""
    total = 100_000
    async with running_cluster(tmp_path) as nodes:
        fleet = await Fleet.connect(settings=cluster_settings(nodes, tmp_path, "client"), name="cluster-fault-3")
        dirs = [tmp_path / "serve-a", tmp_path / "serve-b"]
        procs = [start_cluster_serve(nodes, d, tmp_path / f"{d.name}.log") for d in dirs]
        try:
            await wait_until(lambda: _both_caught_up(fleet, {}), timeout_s=300, interval_s=0.5)
            await _emit(fleet, 0, total // 2)
            for i in range(50):
                await fleet.runs.create(f"run-{i:03d}", "runner", status="queued", priority=i % 3)
            await fleet.flush(timeout=600)
            await _emit(fleet, total // 2, total // 2)
            procs[1].send_signal(signal.SIGKILL)  # while it folds what keeps arriving
            procs[1].wait()
            killed_at = time.perf_counter()
            token = await fleet.flush(timeout=600)
            answered = 0
            for _ in range(20):  # every answer from the node that is left, at the token
                page = await fleet.attempts.stats(min_seq=token)
                assert sum(s.count for s in page.items) == total
                answered += 1
            procs[1] = start_cluster_serve(nodes, dirs[1], tmp_path / "serve-b.log")
            await wait_until(lambda: _both_caught_up(fleet, token), timeout_s=600, interval_s=0.5)
            down_s = time.perf_counter() - killed_at
            for _ in range(20):  # whichever node answers, at the token
                page = await fleet.attempts.stats(min_seq=token)
                assert sum(s.count for s in page.items) == total
        finally:
            await fleet.close()
            for proc in procs:
                await asyncio.to_thread(_stop, proc)
    digests = [{p.name: view_digest(d / "views" / "fleetlog.duckdb", p.name, p.tables) for p in ALL} for d in dirs]
    rows = {f"{name}.{t}": v[0] for name, tables in digests[0].items() for t, v in tables.items() if v[0]}
    print(f"\n[cluster fault 3] {total} attempts + 50 runs; node B SIGKILLed mid-fold, back and caught up after "
          f"{down_s:.1f}s; {answered} queries at the token answered while it was down; rows per table {rows}; "
          f"checksums equal: {digests[0] == digests[1]}")
    assert digests[0]["attempts"]["attempts"][0] == total
    assert digests[0] == digests[1]


async def test_whole_cluster_restart_loses_nothing_acked(tmp_path: Path) -> None:
    """4. All three nodes SIGTERMed at once, then started: every acked event is still there."""
    attempts, runs = 20_000, 200
    async with running_cluster(tmp_path) as nodes:
        settings = cluster_settings(nodes, tmp_path, "client")
        fleet = await Fleet.connect(settings=settings, name="cluster-fault-4")
        try:
            await _emit(fleet, 0, attempts)
            created = [await fleet.runs.create(f"run-{i:04d}", "runner", status="queued") for i in range(runs)]
            token = await fleet.flush(timeout=600)
        finally:
            await fleet.close()
        acked = fleet.publisher_stats().acked
        t0 = time.perf_counter()
        await asyncio.gather(*(nodes.terminate(i) for i in range(3)))
        assert not any(nodes.running(i) for i in range(3))
        await asyncio.gather(*(n.start(120) for n in nodes.nodes))
        await nodes.wait_healthy(300)
        restart_s = time.perf_counter() - t0
        srv = Server(cluster_settings(nodes, tmp_path, "fresh-view"))
        await srv.start()
        try:
            fleet = await Fleet.connect(settings=settings, name="cluster-fault-4-after")
            try:
                js = (await fleet.nats()).jetstream()
                stored = (await js.stream_info("FLEET_ATTEMPTS")).state.messages
                page = await fleet.attempts.stats(min_seq=token)
                runs_page = await fleet.runs.list(statuses=["queued"], min_seq=token, limit=1)
                got = await fleet.runs.get(created[-1].run_id)
            finally:
                await fleet.close()
        finally:
            await srv.stop()
    folded = sum(s.count for s in page.items)
    print(f"\n[cluster fault 4] {acked} attempts acked + {runs} runs created; whole cluster SIGTERMed and "
          f"healthy again in {restart_s:.1f}s; FLEET_ATTEMPTS holds {stored}; a fresh view folds {folded} "
          f"attempts and {runs_page.total_count} queued runs")
    assert acked == attempts
    assert stored == attempts and folded == attempts
    assert runs_page.total_count == runs
    assert got is not None and got.status == "queued"
