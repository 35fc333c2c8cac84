"""The processor pipeline's health: is each processor keeping up with the session files?

The pipeline's own check, kept: per processor, grace = 2 x its interval (cadence_minutes).
  ok       no session files; or the newest file's mtime <= latest processed_at + grace;
  warning  the newest file is newer than that; or files exist and the processor never
           processed any;
  info     (not degraded) otherwise ok, but an old file has no row while a newer file was
           processed, and that file is older than the stuck-file grace (default 4 x grace):
           `stuck_file` and `stuck_file_age_seconds` name the oldest such file.
Overall "degraded" when any processor warns, else "ok".

The files are on the machine that holds the sessions, so this is computed there: `serve_runs`
(runner.py) answers `fleetlog.processors.health` beside `processors.run`.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

import msgspec
from fleetlog.schemas.scheduler import PipelineHealth, ProcessorHealth
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.client.processors.files import SessionFile, list_session_files, mtime_utc, utcnow
from fleetlog.services.client.processors.registry import get_processor, list_processor_names

__all__ = ["HEALTH_SUBJECT", "STUCK_GRACE_ENV", "HealthRequest", "check_processor_health", "pipeline_health"]

HEALTH_SUBJECT = "fleetlog.processors.health"
STUCK_GRACE_ENV = "FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S"
STUCK_FACTOR = 4.0  # the stuck-file grace, in graces, when not configured


class HealthRequest(msgspec.Struct, kw_only=True):
    """`fleetlog.processors.health`: which processors (None: every registered one) and the
    stuck-file grace in seconds (None: FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S, else 4 x grace)."""

    processors: list[str] | None = None
    stuck_file_grace_seconds: float | None = None


class RowsAPI(Protocol):
    async def get_states_for_session_files(self, processor: str, session_files: Iterable[str],
                                           ) -> dict[str, dict[str, Any]]: ...

    async def max_processed_at(self, processor: str) -> datetime | None: ...


def _iso(d: datetime | None) -> str | None:
    return None if d is None else d.isoformat()


def check_processor_health(processor: str, interval_minutes: float, mtimes: Mapping[str, datetime],
                           rows: Mapping[str, Mapping[str, Any]], last_processed_at: datetime | None,
                           now: datetime, stuck_grace_s: float | None = None) -> ProcessorHealth:
    """One processor's health from its files' mtimes and rows (naive UTC throughout)."""
    grace = timedelta(minutes=2 * interval_minutes)
    stuck_grace = timedelta(seconds=stuck_grace_s) if stuck_grace_s is not None else STUCK_FACTOR * grace
    out = ProcessorHealth(processor=processor, status="ok", reason="no sessions", interval_minutes=interval_minutes,
                          grace_seconds=grace.total_seconds(), last_processed_at=_iso(last_processed_at))
    if not mtimes:
        return out
    newest = max(mtimes, key=lambda k: mtimes[k])
    out.newest_file, out.newest_file_mtime = newest, _iso(mtimes[newest])
    if last_processed_at is None:
        out.status, out.reason = "warning", f"{len(mtimes)} session file(s) exist but {processor} never processed any"
        return out
    if mtimes[newest] > last_processed_at + grace:
        behind = (mtimes[newest] - last_processed_at).total_seconds()
        out.status = "warning"
        out.reason = (f"newest session {newest} changed {behind:.0f}s after the latest processing "
                      f"({last_processed_at.isoformat()}), more than the grace of {grace.total_seconds():.0f}s")
        return out
    processed = [mtimes[k] for k in mtimes if k in rows]
    newest_processed = max(processed) if processed else None
    stuck = [k for k in mtimes if k not in rows and newest_processed is not None and mtimes[k] < newest_processed
             and now - mtimes[k] > stuck_grace]
    if stuck:
        oldest = min(stuck, key=lambda k: mtimes[k])
        out.status, out.stuck_file = "info", oldest
        out.stuck_file_age_seconds = (now - mtimes[oldest]).total_seconds()
        out.reason = (f"{oldest} has no row although newer sessions were processed; it is "
                      f"{out.stuck_file_age_seconds:.0f}s old (stuck-file grace {stuck_grace.total_seconds():.0f}s)")
        return out
    out.reason = "the newest session is within the latest processing + grace"
    return out


def _mtimes(files: list[SessionFile]) -> dict[str, datetime]:
    out = {}
    for f in files:
        try:
            out[f.key] = mtime_utc(f.path)
        except OSError:  # gone since the listing: not a session any more
            continue
    return out


def _stuck_grace(given: float | None, env: Mapping[str, str]) -> float | None:
    if given is not None:
        if not given >= 0:
            raise FleetValidationError("stuck_file_grace_seconds", f"must be a number >= 0, got {given!r}")
        return given
    raw = env.get(STUCK_GRACE_ENV)
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise FleetValidationError(STUCK_GRACE_ENV, f"must be a number >= 0, got {raw!r}")
    return value


async def pipeline_health(api: RowsAPI, session_dir: str | Path, *, processors: list[str] | None = None,
                          stuck_file_grace_seconds: float | None = None, env: Mapping[str, str] | None = None,
                          now: Callable[[], datetime] = utcnow) -> PipelineHealth:
    """Every named (default: registered) processor's health over session_dir."""
    names = list_processor_names() if processors is None else processors
    stuck = _stuck_grace(stuck_file_grace_seconds, os.environ if env is None else env)
    mtimes = await asyncio.to_thread(lambda: _mtimes(list_session_files(Path(session_dir))))
    checked = []
    for name in names:
        p = get_processor(name)
        if p is None:
            raise FleetValidationError("processors", f"unknown processor {name!r}; known: "
                                       f"{', '.join(list_processor_names())}")
        rows = await api.get_states_for_session_files(name, list(mtimes)) if mtimes else {}
        last = await api.max_processed_at(name)
        checked.append(check_processor_health(name, float(p.cadence_minutes), mtimes, rows, last, now(), stuck))
    degraded = any(h.status == "warning" for h in checked)
    return PipelineHealth(status="degraded" if degraded else "ok", processors=checked)
