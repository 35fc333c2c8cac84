"""fleetlog.compat.schedule exercised the way agnes' own schedule tests do (table-driven)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from fleetlog.compat.schedule import _seconds_to_schedule, is_table_due, is_valid_schedule

NOW = datetime(2026, 3, 4, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize(("schedule", "last", "due"), [
    ("every 15m", None, True),
    ("every 15m", "", True),
    ("every 15m", (NOW - timedelta(minutes=15)).isoformat(), True),
    ("every 15m", (NOW - timedelta(minutes=10)).isoformat(), False),
    ("every 1h", (NOW - timedelta(minutes=59)).isoformat(), False),
    ("daily 11:00", (NOW - timedelta(days=1)).isoformat(), True),
    ("daily 11:00", NOW.replace(hour=11).isoformat(), False),
    ("daily 13:00", (NOW - timedelta(days=1)).isoformat(), False),
    ("every 15m", "not a time", True),
    ("every 15m", (NOW + timedelta(hours=1)).isoformat(), False),
])
def test_is_table_due(schedule: str, last: str | None, due: bool) -> None:
    assert is_table_due(schedule, last, NOW) is due


def test_is_table_due_defaults_now_to_the_current_time() -> None:
    assert is_table_due("every 1h", (datetime.now(UTC) - timedelta(hours=2)).isoformat()) is True
    assert is_table_due("every 1h", datetime.now(UTC).isoformat()) is False


@pytest.mark.parametrize(("schedule", "valid"), [
    ("every 15m", True), ("every 2h", True), ("daily 07:00,13:00", True), ("cron */5 * * * 1-5", True),
    ("every 15", False), ("every 15s", False), ("every15m", False), ("7:00", False), ("daily 25:00", False),
])
def test_is_valid_schedule(schedule: str, valid: bool) -> None:
    assert is_valid_schedule(schedule) is valid


@pytest.mark.parametrize(("seconds", "schedule"), [
    (60, "every 1m"), (90, "every 2m"), (61, "every 2m"), (1, "every 1m"), (3600, "every 1h"), (3601, "every 61m"),
])
def test_seconds_to_schedule(seconds: int, schedule: str) -> None:
    assert _seconds_to_schedule(seconds) == schedule
