"""The run ledger's stats, number for number as the store it replaces reported them
(issue 14), plus fleetlog's percentiles; through the API and the CLI. Real broker, real DuckDB."""

from __future__ import annotations

import time
from pathlib import Path

import msgspec
import pytest
from fleetlog.schemas.run_stats import RunnerStats, RunStats, RuntimeStats
from fleetlog.services.node.server import Server

from fleetlog import Fleet, FleetSettings

from .helpers import CliRun, cli_json, cli_runner
from .test_runs_api import Clock


@pytest.fixture
def clock(fleet: Fleet) -> Clock:
    c = Clock()
    fleet.runs.clock = c
    fleet.runtimes.clock = c
    return c


async def _completed(fleet: Fleet, clock: Clock, run_id: str, runner: str, wait: float, duration: float) -> None:
    """A run queued `wait` s before it starts and completed `duration` s later."""
    await fleet.runs.create(run_id, runner, status="queued")
    clock.now += wait
    claim = await fleet.runs.claim_next("rt-1", lease_s=10**6)
    assert claim is not None and claim.run_id == run_id
    await fleet.runs.finalize(run_id, "running", claim_token=claim.claim_token)
    clock.now += duration
    await fleet.runs.finalize(run_id, "completed", claim_token=claim.claim_token)


async def test_run_stats_in_a_window(fleet: Fleet, clock: Clock) -> None:
    t0 = clock.now
    clock.now = t0 - 1
    await fleet.runs.create("early", "runner-a", status="cancelled")  # before the window
    clock.now = t0
    for i, d in enumerate([10, 20, 30, 40, 100]):
        await _completed(fleet, clock, f"ok{i}", "runner-a", 5, d)
    await fleet.runs.create("bad", "runner-c", status="running")  # waited 0 s
    await fleet.runs.finalize("bad", "failed")
    await fleet.runs.create("held", "runner-b", status="queued")
    assert await fleet.runs.claim_next("rt-2", lease_s=10**6) is not None  # claimed, never started
    clock.now = t0 + 7200
    await fleet.runs.create("edge", "runner-a", status="queued")  # created at the end: inclusive
    clock.now += 1
    await fleet.runs.create("late", "runner-a", status="queued")

    stats = await fleet.runs.get_run_stats(t0, t0 + 7200)
    assert isinstance(stats, RunStats)
    counts = {k: v for k, v in msgspec.to_builtins(stats).items() if k.endswith("_count")}
    assert counts == {"total_count": 8, "created_count": 0, "queued_count": 1, "claimed_count": 1,
                      "running_count": 0, "completed_count": 5, "failed_count": 1, "cancelled_count": 0,
                      "timeout_count": 0}
    assert (stats.start_time, stats.end_time) == (int(t0), int(t0) + 7200)
    assert stats.throughput_per_hour == 4.0  # 8 runs / 2 h
    assert (stats.success_rate, stats.failure_rate) == (0.625, 0.125)
    assert stats.avg_duration_seconds == 40.0  # completed runs: finished - started
    assert stats.avg_queue_wait_seconds == 4.17  # (5 * 5 + 0) / 6 started runs, 2 places
    # linear interpolation over [10, 20, 30, 40, 100]: ranks 2, 3.8, 3.96
    assert (stats.p50_duration_seconds, stats.p95_duration_seconds, stats.p99_duration_seconds) == (30.0, 88.0, 97.6)

    one_failed = await fleet.runs.get_run_stats(t0, t0 + 7200, runner_id="runner-c")
    assert (one_failed.total_count, one_failed.failed_count) == (1, 1)
    assert one_failed.success_rate == 0.0 and one_failed.failure_rate == 1.0  # 0.0, not None
    assert one_failed.avg_duration_seconds is None and one_failed.avg_queue_wait_seconds == 0.0

    empty = await fleet.runs.get_run_stats(t0 + 10**6, t0 + 10**6)  # a zero-length window: 0.001 h
    assert (empty.total_count, empty.throughput_per_hour) == (0, 0.0)
    assert (empty.success_rate, empty.failure_rate) == (None, None)
    assert (empty.avg_duration_seconds, empty.p50_duration_seconds, empty.avg_queue_wait_seconds) == (None, None, None)
    point = await fleet.runs.get_run_stats(t0 + 7200, t0 + 7200)
    assert point.total_count == 1 and point.throughput_per_hour == 1000.0


async def test_runner_stats(fleet: Fleet, clock: Clock) -> None:
    t0 = clock.now
    await _completed(fleet, clock, "a1", "runner-a", 1, 10)
    await _completed(fleet, clock, "a2", "runner-a", 1, 20)
    await fleet.runs.create("a3", "runner-a", status="running")
    await fleet.runs.finalize("a3", "timeout")
    await fleet.runs.create("a4", "runner-a", status="queued")
    await fleet.runs.create("b1", "runner-b", status="running")
    await fleet.runs.finalize("b1", "failed")
    await fleet.runs.create("b2", "runner-b", status="created")
    await fleet.runs.create("c1", "runner-c", status="cancelled")
    rows = await fleet.runs.get_runner_stats(t0, clock.now)
    assert all(isinstance(r, RunnerStats) for r in rows)
    got = [(r.runner_id, r.total_runs, r.active_runs, r.completed_runs, r.failed_runs, r.success_rate) for r in rows]
    assert got == [
        ("runner-a", 4, 1, 2, 1, 0.5),  # most runs first; timeout counts as failed
        ("runner-b", 2, 0, 0, 1, 0.0),  # created is not active
        ("runner-c", 1, 0, 0, 0, 0.0),
    ]
    assert rows[0].avg_duration_seconds == 15.0 and rows[1].avg_duration_seconds is None
    assert (rows[0].runner_label, rows[0].plugin_identity) == (None, None)
    assert [r.runner_id for r in await fleet.runs.get_runner_stats(t0, clock.now, limit=0)] == ["runner-a"]  # 1..100
    assert len(await fleet.runs.get_runner_stats(t0, clock.now, limit=10**6)) == 3
    assert await fleet.runs.get_runner_stats(t0 + 10**6, t0 + 10**7) == []


async def test_runtime_stats(fleet: Fleet, clock: Clock) -> None:
    await fleet.runs.create("running", "runner", status="running")  # created running: active
    await fleet.runs.create("queued", "runner", status="queued")
    claimed = await fleet.runs.claim_next("rt-1", lease_s=60)
    assert claimed is not None
    await fleet.runs.create("queued-2", "runner", status="queued")
    await fleet.runs.create("done", "runner", status="completed")
    a = await fleet.runtimes.register("rt-1", heartbeat_deadline_s=10**6)
    b = await fleet.runtimes.register("rt-2", heartbeat_deadline_s=1)
    assert len(await fleet.runtimes.mark_stale_runtimes(now=b.last_heartbeat_at + 2)) == 1
    clock.now = max(a.last_heartbeat_at, b.last_heartbeat_at) + 10.5
    ages = [clock.now - a.last_heartbeat_at, clock.now - b.last_heartbeat_at]
    stats = await fleet.runs.get_runtime_stats()
    assert isinstance(stats, RuntimeStats)
    assert (stats.total_count, stats.online_count, stats.stale_count) == (2, 1, 1)
    assert stats.avg_heartbeat_age_seconds == round(sum(ages) / 2, 2)
    assert stats.max_heartbeat_age_seconds == round(max(ages), 2)
    assert (stats.active_runs, stats.claimed_runs) == (2, 1)  # one running, one claimed
    assert [(r.runtime_id, r.active_runs, r.claimed_runs) for r in stats.by_runtime] == [("rt-1", 1, 1)]


@pytest.fixture
def cli(settings: FleetSettings, server: Server, tmp_path: Path) -> CliRun:
    return cli_runner(settings.nats_url, tmp_path)


def keys(struct: type[msgspec.Struct]) -> set[str]:
    return set(struct.__struct_fields__)


async def test_stats_and_reconcile_through_the_cli(cli: CliRun, fleet: Fleet) -> None:
    await fleet.runs.create("r1", "runner-a", status="running")
    await fleet.runs.finalize("r1", "failed")
    await fleet.runs.create("r2", "runner-b", status="queued")
    fleet.runs.clock = lambda: time.time() - 1000  # claimed "1000 s ago": the lease is over for the CLI
    claim = await fleet.runs.claim_next("rt-1", lease_s=60)
    fleet.runs.clock = time.time
    assert claim is not None
    await fleet.runtimes.register("rt-1", heartbeat_deadline_s=0.001)  # silent from the start

    stats = cli_json(await cli("runs", "stats", "--since", "1h", "--runner", "runner-a", "--json"))
    assert set(stats) == keys(RunStats) | {"as_of", "lag"}
    assert (stats["total_count"], stats["failed_count"], stats["success_rate"]) == (1, 1, 0.0)
    human = await cli("runs", "stats", "--since", "1h")
    assert human.returncode == 0 and "total_count" in human.stdout
    bad = await cli("runs", "stats", "--since", "yesterday-ish")
    assert bad.returncode == 2 and "start_time" in bad.stderr

    runners = cli_json(await cli("runs", "runner-stats", "--since", "1h", "--limit", "1", "--json"))
    assert len(runners) == 1 and set(runners[0]) == keys(RunnerStats)
    table = await cli("runs", "runner-stats", "--since", "1h")
    assert table.returncode == 0 and "runner-a" in table.stdout and "runner-b" in table.stdout

    runtime = cli_json(await cli("runs", "runtime-stats", "--json"))
    assert set(runtime) == keys(RuntimeStats)
    assert (runtime["total_count"], runtime["online_count"], runtime["active_runs"], runtime["claimed_runs"]) == (
        1, 1, 1, 1)

    assert await fleet.runs.validate_active_claim("r2", claim.claim_token) is False
    result = cli_json(await cli("runs", "reconcile", "--json"))
    assert result == {"stale_count": 1, "released_claim_count": 1}
    human = await cli("runs", "reconcile")
    assert human.returncode == 0 and "stale_count: 0" in human.stdout and "released_claim_count: 0" in human.stdout
    run = await fleet.runs.get("r2")
    assert run is not None and (run.status, run.status_reason) == ("queued", "claim lease expired")
