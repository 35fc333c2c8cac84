"""The run ledger's stats endpoints (`fleetlog.runs.run_stats|runner_stats|runtime_runs`).

Numbers follow the store fleetlog replaces, rule for rule (rounded in Python, as it did):
runs are counted by `created_at` in [start_time, end_time], both inclusive.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fleetlog.schemas import RUN_STATUSES
from fleetlog.schemas.run_stats import (
    RunnerStats,
    RunnerStatsList,
    RunnerStatsQuery,
    RunStats,
    RunStatsQuery,
    RuntimeRunCounts,
    RuntimeRuns,
    RuntimeRunsQuery,
)

from ._base import Endpoint, QueryContext

if TYPE_CHECKING:
    import duckdb

__all__ = ["ENDPOINTS"]


def _round(value: Any, places: int) -> float | None:
    return None if value is None else round(float(value), places)


def _rate(part: int, total: int) -> float | None:
    return round(part / total, 4) if total > 0 else None


async def _run_stats(ctx: QueryContext, req: RunStatsQuery) -> RunStats:
    where = "WHERE created_at >= ? AND created_at <= ?"
    params: list[Any] = [req.start_time, req.end_time]
    if req.runner_id is not None:
        where += " AND runner_id = ?"
        params.append(req.runner_id)

    def run(cur: duckdb.DuckDBPyConnection) -> RunStats:
        counts: dict[str, int] = dict.fromkeys(RUN_STATUSES, 0)
        for status, n in cur.execute(f"SELECT status, count(*) FROM runs {where} GROUP BY status", params).fetchall():
            counts[status] = int(n)
        # Durations: completed runs with both times (finished − started). Percentiles are
        # DuckDB's quantile_cont: linear interpolation between closest ranks.
        durations = cur.execute(
            f"""SELECT avg(d), quantile_cont(d, [0.5, 0.95, 0.99]) FROM (
                    SELECT CAST(finished_at - started_at AS DOUBLE) AS d FROM runs {where}
                    AND status = 'completed' AND started_at IS NOT NULL AND finished_at IS NOT NULL)""",
            params,
        ).fetchone()
        # Queue waits: started − created of every started run, negative waits left out.
        wait = cur.execute(
            f"""SELECT avg(w) FROM (SELECT CAST(started_at - created_at AS DOUBLE) AS w FROM runs {where}
                AND started_at IS NOT NULL) WHERE w >= 0""",
            params,
        ).fetchone()
        assert durations is not None and wait is not None
        avg_duration, quantiles = durations
        p50, p95, p99 = quantiles if quantiles is not None else (None, None, None)
        total = sum(counts.values())
        hours = max((req.end_time - req.start_time) / 3600, 0.001)
        return RunStats(
            start_time=int(req.start_time), end_time=int(req.end_time), total_count=total,
            created_count=counts["created"], queued_count=counts["queued"], claimed_count=counts["claimed"],
            running_count=counts["running"], completed_count=counts["completed"], failed_count=counts["failed"],
            cancelled_count=counts["cancelled"], timeout_count=counts["timeout"],
            throughput_per_hour=round(total / hours, 2) if total > 0 else 0.0,
            success_rate=_rate(counts["completed"], total),
            failure_rate=_rate(counts["failed"] + counts["timeout"], total),
            avg_duration_seconds=_round(avg_duration, 2),
            p50_duration_seconds=_round(p50, 2), p95_duration_seconds=_round(p95, 2),
            p99_duration_seconds=_round(p99, 2),
            avg_queue_wait_seconds=_round(wait[0], 2),
        )

    stats: RunStats = await ctx.read(run)
    return stats


async def _runner_stats(ctx: QueryContext, req: RunnerStatsQuery) -> RunnerStatsList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[RunnerStats]:
        rows = cur.execute(
            """SELECT runner_id, count(*) AS total,
                      count(*) FILTER (status IN ('queued', 'claimed', 'running')),
                      count(*) FILTER (status = 'completed'),
                      count(*) FILTER (status IN ('failed', 'timeout')),
                      avg(CAST(finished_at - started_at AS DOUBLE)) FILTER (
                          status = 'completed' AND started_at IS NOT NULL AND finished_at IS NOT NULL)
               FROM runs WHERE created_at >= ? AND created_at <= ? AND runner_id IS NOT NULL
               GROUP BY runner_id ORDER BY total DESC, runner_id ASC LIMIT ?""",
            [req.start_time, req.end_time, req.limit],
        ).fetchall()
        return [
            RunnerStats(
                runner_id=runner_id, runner_label=None, plugin_identity=None, total_runs=int(total),
                active_runs=int(active), completed_runs=int(completed), failed_runs=int(failed),
                success_rate=_rate(int(completed), int(total)), avg_duration_seconds=_round(duration, 2),
            )
            for runner_id, total, active, completed, failed, duration in rows
        ]

    return RunnerStatsList(items=await ctx.read(run))


async def _runtime_runs(ctx: QueryContext, req: RuntimeRunsQuery) -> RuntimeRunCounts:
    def run(cur: duckdb.DuckDBPyConnection) -> RuntimeRunCounts:
        totals = cur.execute(
            "SELECT count(*) FILTER (status IN ('running', 'claimed')), count(*) FILTER (status = 'claimed') FROM runs"
        ).fetchone()
        assert totals is not None
        held = cur.execute(
            """SELECT claimed_by_runtime_id, count(*), count(*) FILTER (status = 'claimed') FROM runs
               WHERE claimed_by_runtime_id IS NOT NULL AND status IN ('claimed', 'running')
               GROUP BY claimed_by_runtime_id ORDER BY claimed_by_runtime_id"""
        ).fetchall()
        return RuntimeRunCounts(
            active_runs=int(totals[0]), claimed_runs=int(totals[1]),
            by_runtime=[RuntimeRuns(runtime_id=r, active_runs=int(a), claimed_runs=int(c)) for r, a, c in held],
        )

    counts: RuntimeRunCounts = await ctx.read(run)
    return counts


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("run_stats", RunStatsQuery, _run_stats, "runs created in a window: counts, rates, durations"),
    Endpoint("runner_stats", RunnerStatsQuery, _runner_stats, "per runner in a window, most runs first"),
    Endpoint("runtime_runs", RuntimeRunsQuery, _runtime_runs, "runs running or claimed now, per runtime"),
)
