"""Drop-in for agnes' schedule helpers, backed by `fleetlog.scheduler`'s pure functions.

`is_table_due(schedule, last_sync_iso, now=None)` is `is_due` with the original's names and its
default `now` (the current UTC time); `is_valid_schedule` and `_seconds_to_schedule` are
fleetlog's `is_valid_schedule` and `seconds_to_schedule` under the original's names.
"""

from __future__ import annotations

from datetime import UTC, datetime

from fleetlog.scheduler import is_due, is_valid_schedule, seconds_to_schedule

__all__ = ["is_table_due", "is_valid_schedule"]

_seconds_to_schedule = seconds_to_schedule


def is_table_due(schedule: str, last_sync_iso: str | None, now: datetime | None = None) -> bool:
    """Whether something on `schedule`, last run at `last_sync_iso` (None or "": never), is due."""
    return is_due(schedule, last_sync_iso, datetime.now(UTC) if now is None else now)
