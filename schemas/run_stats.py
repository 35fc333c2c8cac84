"""The run ledger's stats and reconcile answers, with the keys of the store fleetlog replaces
(queries to `fleetlog.runs.run_stats|runner_stats|runtime_runs`; docs/architecture.md)."""

from __future__ import annotations

from typing import Annotated

import msgspec

from .answers import Answer

__all__ = [
    "Reconciled",
    "RunStats",
    "RunStatsQuery",
    "RunnerStats",
    "RunnerStatsList",
    "RunnerStatsQuery",
    "RuntimeRunCounts",
    "RuntimeRuns",
    "RuntimeRunsQuery",
    "RuntimeStats",
]


class RunStatsQuery(msgspec.Struct, kw_only=True):
    start_time: float  # epoch seconds; runs created in [start_time, end_time], both inclusive
    end_time: float
    runner_id: str | None = None
    min_seq: dict[str, int] | None = None


class RunStats(Answer, kw_only=True):
    """The store's run stats, key for key. fleetlog fills the percentiles the store left None:
    linear interpolation between closest ranks (DuckDB `quantile_cont`, numpy's default) over
    the same durations as `avg_duration_seconds`, rounded to 2 places."""

    start_time: int
    end_time: int
    total_count: int
    created_count: int
    queued_count: int
    claimed_count: int
    running_count: int
    completed_count: int
    failed_count: int
    cancelled_count: int
    timeout_count: int
    throughput_per_hour: float
    success_rate: float | None
    failure_rate: float | None
    avg_duration_seconds: float | None
    p50_duration_seconds: float | None
    p95_duration_seconds: float | None
    p99_duration_seconds: float | None
    avg_queue_wait_seconds: float | None


class RunnerStatsQuery(msgspec.Struct, kw_only=True):
    start_time: float
    end_time: float
    limit: Annotated[int, msgspec.Meta(ge=1, le=100)] = 20
    min_seq: dict[str, int] | None = None


class RunnerStats(msgspec.Struct, kw_only=True):
    """One runner's runs in a window, the store's keys. `runner_label` and `plugin_identity`
    are None as in the store (no runner descriptors here); fleetlog fills
    `avg_duration_seconds` (completed runs, finished − started, 2 places)."""

    runner_id: str
    runner_label: str | None
    plugin_identity: str | None
    total_runs: int
    active_runs: int  # queued + claimed + running
    completed_runs: int
    failed_runs: int  # failed + timeout
    success_rate: float | None
    avg_duration_seconds: float | None


class RunnerStatsList(Answer, kw_only=True):
    items: list[RunnerStats]


class RuntimeRunsQuery(msgspec.Struct, kw_only=True):
    min_seq: dict[str, int] | None = None


class RuntimeRuns(msgspec.Struct, kw_only=True):
    """Runs a runtime holds now (fleetlog's own, beside the store's totals)."""

    runtime_id: str
    active_runs: int  # running + claimed
    claimed_runs: int


class RuntimeRunCounts(Answer, kw_only=True):
    active_runs: int  # every run running or claimed (a run created as running counts)
    claimed_runs: int
    by_runtime: list[RuntimeRuns]


class RuntimeStats(msgspec.Struct, kw_only=True):
    """The store's runtime stats, key for key; `by_runtime` is fleetlog's."""

    total_count: int
    online_count: int
    stale_count: int
    avg_heartbeat_age_seconds: float | None
    max_heartbeat_age_seconds: float | None
    active_runs: int
    claimed_runs: int
    by_runtime: list[RuntimeRuns]


class Reconciled(msgspec.Struct, kw_only=True):
    stale_count: int
    released_claim_count: int
