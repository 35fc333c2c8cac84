"""The run ledger's stats, with the keys and numbers of the store fleetlog replaces:
`get_run_stats`, `get_runner_stats`, `get_runtime_stats` (mixed into `RunsAPI`).

The runs view answers the run counts; the runtimes view answers the runtime counts and
heartbeat ages; `get_runtime_stats` asks both (each read waits for this client's own
writes to its stream).
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

from fleetlog.schemas import parse_ts
from fleetlog.schemas.run_stats import (
    RunnerStats,
    RunnerStatsList,
    RunnerStatsQuery,
    RunStats,
    RunStatsQuery,
    RuntimeRunCounts,
    RuntimeRunsQuery,
    RuntimeStats,
)
from fleetlog.schemas.runtimes import RuntimeCounts, RuntimeCountsQuery
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.timeparse import parse_since
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["RunStatsReads", "RuntimeRegistry", "epoch_seconds"]


class RuntimeRegistry(Protocol):
    """What the runs API needs of the client's runtimes API (`fleet.runtimes`; the family APIs
    do not import each other): its clock, its session token, the stale marker."""

    clock: Callable[[], float]

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None: ...

    async def mark_stale_runtimes(self) -> list[Any]: ...

When = float | str | datetime


def epoch_seconds(field: str, value: When) -> float:
    """Epoch seconds from a number, a datetime, ISO-8601 text or a relative age (`24h`, `7d`)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    try:
        text = parse_since(value) if isinstance(value, str | datetime) else None
    except FleetValidationError:
        text = None
    if text is None:
        raise FleetValidationError(field, f"must be epoch seconds, a datetime, ISO-8601 or relative, got {value!r}")
    return parse_ts(text).timestamp()


class RunStatsReads:
    """Mixed into RunsAPI: the stats half of `fleet.runs`."""

    _fleet: FleetClient
    _runtimes: RuntimeRegistry | None

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        raise NotImplementedError

    def _registry(self) -> RuntimeRegistry:
        if self._runtimes is None:
            raise RuntimeError("this RunsAPI was built without the runtimes API: use Fleet's `fleet.runs`")
        return self._runtimes

    async def get_run_stats(
        self, start_time: When, end_time: When, runner_id: str | None = None, *,
        min_seq: Token | Receipt | None = None,
    ) -> RunStats:
        """Runs created in [start_time, end_time] (inclusive): a count per status, throughput per
        hour, success and failure rates, average duration and queue wait, p50/p95/p99 durations."""
        req = RunStatsQuery(start_time=epoch_seconds("start_time", start_time),
                            end_time=epoch_seconds("end_time", end_time), runner_id=runner_id,
                            min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.runs.run_stats", req, RunStats)

    async def get_runner_stats(
        self, start_time: When, end_time: When, limit: int = 20, *, min_seq: Token | Receipt | None = None,
    ) -> list[RunnerStats]:
        """Per runner, runs created in the window; most runs first; limit clamped to 1..100."""
        if isinstance(limit, bool) or not isinstance(limit, int):
            raise FleetValidationError("limit", f"must be an integer, got {limit!r}")
        req = RunnerStatsQuery(start_time=epoch_seconds("start_time", start_time),
                               end_time=epoch_seconds("end_time", end_time), limit=max(1, min(100, limit)),
                               min_seq=self._token(min_seq))
        return (await self._fleet.request("fleetlog.runs.runner_stats", req, RunnerStatsList)).items

    async def get_runtime_stats(self) -> RuntimeStats:
        """Runtime counts (total, online, stale), heartbeat ages now (average, maximum; 2 places),
        runs running or claimed (`active_runs`) and claimed (`claimed_runs`)."""
        rt = self._registry()
        counts = await self._fleet.request(
            "fleetlog.runtimes.counts", RuntimeCountsQuery(now=rt.clock(), min_seq=rt._token(None)), RuntimeCounts
        )
        runs = await self._fleet.request(
            "fleetlog.runs.runtime_runs", RuntimeRunsQuery(min_seq=self._token(None)), RuntimeRunCounts
        )
        return RuntimeStats(
            total_count=counts.total_count, online_count=counts.online_count, stale_count=counts.stale_count,
            avg_heartbeat_age_seconds=counts.avg_heartbeat_age_seconds,
            max_heartbeat_age_seconds=counts.max_heartbeat_age_seconds,
            active_runs=runs.active_runs, claimed_runs=runs.claimed_runs, by_runtime=runs.by_runtime,
        )
