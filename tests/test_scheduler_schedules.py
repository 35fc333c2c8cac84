"""The schedule grammar, is_due and seconds_to_schedule, table-driven (issue 13's cases, exactly)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from fleetlog.scheduler import is_due, is_valid_schedule, next_due, parse_schedule, seconds_to_schedule

NOW = datetime(2026, 3, 4, 12, 0, 0, tzinfo=UTC)  # a Wednesday


@pytest.mark.parametrize("s", [
    "every 15m", "every 1h", "every 0m", "every 90m", "daily 07:00", "daily 00:00,12:30,23:59",
    "cron * * * * *", "cron */15 9-17 * * 1-5", "cron 0,30 8 1 1-12/2 0", "cron 5 4 * * 7", "cron 5/10 * * * *",
])
def test_valid(s: str) -> None:
    assert is_valid_schedule(s) and parse_schedule(s) is not None


@pytest.mark.parametrize("s", [
    "every 15", "every 15s", "every15m", "every  15m", "every -5m", "7:00", "25:00", "12:60", "daily 7:00",
    "daily 25:00", "daily 12:60", "daily 07:00,", "daily 07:00, 08:00", " every 15m", "every 15m ", "Every 15m",
    "every 1.5h", "cron * * * *", "cron 60 * * * *", "cron * 24 * * *", "cron * * 0 * *", "cron * * * 13 *",
    "cron * * * * 8", "cron */0 * * * *", "cron 5-1 * * * *", "cron  * * * * *", "", "hourly",
])
def test_invalid(s: str) -> None:
    assert not is_valid_schedule(s) and parse_schedule(s) is None


def test_not_a_string_is_invalid() -> None:
    assert parse_schedule(15) is None and not is_valid_schedule(None)


def test_every_nh_is_n_times_60_minutes() -> None:
    assert parse_schedule("every 2h") == parse_schedule("every 120m")


M = timedelta(minutes=1)
DUE_CASES = [
    # never run
    ("every 15m", None, NOW, True),
    ("every 15m", "", NOW, True),
    ("daily 23:00", None, NOW, True),
    # interval: elapsed >= interval
    ("every 15m", NOW - 15 * M, NOW, True),
    ("every 15m", NOW - 10 * M, NOW, False),
    ("every 15m", NOW - 15 * M + timedelta(seconds=1), NOW, False),
    ("every 1h", NOW - 60 * M, NOW, True),
    ("every 1h", NOW - 59 * M, NOW, False),
    ("every 0m", NOW, NOW, True),
    ("every 0m", NOW + M, NOW, True),
    # daily: now >= today's slot and last < that slot
    ("daily 11:00", NOW - 2 * 60 * M, NOW, True),           # ran 10:00, slot 11:00 passed
    ("daily 11:00", NOW - 30 * M, NOW, False),              # ran 11:30, after the slot
    ("daily 11:00", NOW - 60 * M, NOW, False),              # ran exactly at the slot
    ("daily 13:00", NOW - 24 * 60 * M, NOW, False),         # today's slot not reached yet
    ("daily 13:00", NOW - 24 * 60 * M, NOW + 60 * M, True),  # now exactly at the slot
    ("daily 08:00,11:30", NOW - 3 * 60 * M, NOW, True),     # ran 09:00, 11:30 slot passed
    ("daily 08:00,11:30", NOW - 20 * M, NOW, False),        # ran 11:40
    ("daily 08:00,13:00", NOW - 3 * 60 * M, NOW, False),    # ran 09:00, after 08:00; 13:00 to come
    # cron: a matching minute in (last, now]
    ("cron 0 * * * *", NOW - 30 * M, NOW, True),            # 12:00 in (11:30, 12:00]
    ("cron 0 * * * *", NOW, NOW + 30 * M, False),           # 12:00 not in (12:00, 12:30]
    ("cron 0 * * * *", NOW - 5 * 60 * M, NOW, True),        # missed ticks catch up (once)
    ("cron 30 * * * *", NOW - 20 * M, NOW, False),
    ("cron */15 * * * *", NOW - 16 * M, NOW - M, True),     # 11:45 in (11:44, 11:59]
    ("cron */15 * * * *", NOW - 14 * M, NOW - M, False),    # none in (11:46, 11:59]
    ("cron 0 12 * * 3", NOW - M, NOW, True),                # Wednesday
    ("cron 0 12 * * 4", NOW - M, NOW, False),               # Thursday
    ("cron 0 12 * * 0", NOW - 3 * 24 * 60 * M, NOW, False),  # Sunday 12:00 = Mar 1, 3 days ago exactly: not in
    ("cron 0 12 * * 0", NOW - 3 * 24 * 60 * M - M, NOW, True),
    ("cron 0 12 4 * 5", NOW - M, NOW, True),                # dom and dow both restricted: either
    ("cron 0 0 30 2 *", NOW - 400 * 24 * 60 * M, NOW, False),  # never matches
    # odd last values
    ("every 15m", "yesterday", NOW, True),                  # unparseable
    ("every 15m", (NOW - 15 * M).replace(tzinfo=None), NOW, True),           # naive is UTC
    ("every 15m", (NOW - 10 * M).replace(tzinfo=None).isoformat(), NOW, False),
    ("every 15m", (NOW - 20 * M).astimezone(timezone(timedelta(hours=5))).isoformat(), NOW, True),
    ("every 15m", (NOW - 10 * M).astimezone(timezone(timedelta(hours=-7))), NOW, False),
    ("every 15m", NOW + M, NOW, False),                     # in the future
    ("daily 11:00", NOW + M, NOW, False),
    ("cron * * * * *", NOW + M, NOW, False),
    # unknown schedule: due only when never run
    ("every 15s", None, NOW, True),
    ("every 15s", NOW - 24 * 60 * M, NOW, False),
]


@pytest.mark.parametrize(("schedule", "last", "now", "due"), DUE_CASES)
def test_is_due(schedule: str, last: str | datetime | None, now: datetime, due: bool) -> None:
    assert is_due(schedule, last, now) is due


def test_is_due_takes_an_iso_string_as_a_datetime() -> None:
    for schedule, last, now, due in DUE_CASES:
        if isinstance(last, datetime):
            assert is_due(schedule, last.isoformat(), now) is due, (schedule, last)


@pytest.mark.parametrize(("schedule", "last", "expected"), [
    ("every 15m", NOW - 10 * M, NOW + 5 * M),
    ("every 15m", NOW - 20 * M, NOW),
    ("daily 13:00", NOW - 60 * M, NOW + 60 * M),
    ("daily 11:00", NOW - 30 * M, NOW + 23 * 60 * M),
    ("cron */20 * * * *", NOW, NOW + 20 * M),
    ("cron 0 0 30 2 *", NOW, None),
    ("every 15s", NOW, None),
])
def test_next_due(schedule: str, last: datetime, expected: datetime | None) -> None:
    assert next_due(schedule, last, NOW) == expected


@pytest.mark.parametrize(("seconds", "schedule"), [
    (60, "every 1m"), (90, "every 2m"), (150, "every 3m"), (61, "every 2m"), (30, "every 1m"), (1, "every 1m"),
    (3600, "every 1h"), (7200, "every 2h"), (3601, "every 61m"), (0.5, "every 1m"),
])
def test_seconds_to_schedule(seconds: float, schedule: str) -> None:
    assert seconds_to_schedule(seconds) == schedule
    assert is_valid_schedule(schedule)


@pytest.mark.parametrize("seconds", [0, -5, float("nan"), float("inf"), True, "60"])
def test_seconds_to_schedule_refuses_what_is_no_interval(seconds: object) -> None:
    with pytest.raises(ValueError, match="seconds"):
        seconds_to_schedule(seconds)  # type: ignore[arg-type]
