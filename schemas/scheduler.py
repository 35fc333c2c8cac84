"""The scheduler's shared state, its status answer, and the processor pipeline's health answer.

A scheduler job's state is one compacted subject per job (`fleet.sched.<job>.state` in
FLEET_SCHEDULER). It is a record, not an event of the tagged union: no view folds it; the
scheduler instances read its last message by direct get and decide every write with
`Nats-Expected-Last-Subject-Sequence`, so of any number of instances exactly one launches a
job for a due slot (the claim: last_run = the tick's time, in_flight) and only that launch
writes the outcome (finished_at, ok, error; guarded on the claim's seq).
"""

from __future__ import annotations

from typing import Final, Literal

import msgspec

from . import subjects

__all__ = ["HEALTH_STATES", "STREAM", "JobState", "JobStatus", "PipelineHealth", "ProcessorHealth",
           "SchedulerStatus", "job_subject"]

STREAM: Final = "FLEET_SCHEDULER"


def job_subject(job: str) -> str:
    return subjects.sched_job(job)


class JobState(msgspec.Struct, kw_only=True):
    """The last word on one job: its last launch (by any instance) and, once done, its outcome."""

    v: int = 1
    job: str
    schedule: str
    last_run: str  # the launching tick's time, ISO-8601 UTC; advanced whatever the outcome
    in_flight: bool
    holder: str  # the scheduler instance that launched it
    started_at: float  # unix seconds
    timeout_s: float  # after started_at + timeout_s (+ a margin) an unfinished launch counts as dead
    finished_at: float | None = None
    ok: bool | None = None
    error: str | None = None


class JobStatus(msgspec.Struct, kw_only=True):
    job: str
    schedule: str
    action: str  # "processor <name>" or "request <subject>"
    last_run: str | None
    next_due: str | None
    in_flight: bool
    ok: bool | None = None
    error: str | None = None


class SchedulerStatus(msgspec.Struct, kw_only=True):
    """`fleetlog.scheduler.status`: the jobs of the instance that answered (state is shared)."""

    holder: str
    tick_s: float
    jobs: list[JobStatus]


HEALTH_STATES: Final = ("ok", "warning", "info")


class ProcessorHealth(msgspec.Struct, kw_only=True):
    processor: str
    status: Literal["ok", "warning", "info"]
    reason: str
    interval_minutes: float
    grace_seconds: float
    newest_file: str | None = None
    newest_file_mtime: str | None = None
    last_processed_at: str | None = None
    stuck_file: str | None = None
    stuck_file_age_seconds: float | None = None


class PipelineHealth(msgspec.Struct, kw_only=True):
    """`processors.health`: "degraded" when any processor warns, else "ok"."""

    status: Literal["ok", "degraded"]
    processors: list[ProcessorHealth]
