"""Schedules: the cadence grammar and when a job is due. Pure functions, no I/O.

Grammar (strict; anything else is invalid and `parse_schedule` returns None):
  `every Nm`, `every Nh` (N x 60 minutes; `every 0m` is always due),
  `daily HH:MM` and `daily HH:MM,HH:MM,...` (two digits each, 00-23, 00-59),
  `cron m h dom mon dow` (`*`, numbers, ranges, `/step`, comma lists; dow 0 = Sunday, 7 too).
Every time is UTC: a naive datetime or ISO string is read as UTC.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

__all__ = ["Cron", "Daily", "Every", "Schedule", "is_due", "is_valid_schedule", "next_due", "parse_schedule",
           "seconds_to_schedule"]

_EVERY = re.compile(r"every ([0-9]+)([mh])")
_DAILY = re.compile(r"daily ([0-9]{2}:[0-9]{2}(?:,[0-9]{2}:[0-9]{2})*)")
_CRON = re.compile(r"cron (\S+) (\S+) (\S+) (\S+) (\S+)")
_FIELD = re.compile(r"(\*|[0-9]+(?:-[0-9]+)?)(?:/([0-9]+))?")
# (low, high) per cron field: minute, hour, day of month, month, day of week (7 = Sunday again)
_BOUNDS = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
# How far back a cron search looks: a valid expression that never matched in 5 years (Feb 30) never will.
_CRON_HORIZON = timedelta(days=5 * 366)


@dataclass(frozen=True)
class Every:
    minutes: int


@dataclass(frozen=True)
class Daily:
    slots: tuple[tuple[int, int], ...]  # (hour, minute), sorted, distinct


@dataclass(frozen=True)
class Cron:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]  # 0 = Sunday
    any_day: bool  # dom was `*`
    any_weekday: bool  # dow was `*`

    def day_matches(self, d: datetime) -> bool:
        if d.month not in self.months:
            return False
        dom = d.day in self.days
        dow = (d.isoweekday() % 7) in self.weekdays
        if self.any_day or self.any_weekday:  # one side unrestricted: both must hold (cron's rule)
            return dom and dow
        return dom or dow  # both restricted: either one (cron's rule)


Schedule = Every | Daily | Cron


def _cron_field(text: str, low: int, high: int) -> frozenset[int] | None:
    values: set[int] = set()
    for part in text.split(","):
        m = _FIELD.fullmatch(part)
        if m is None:
            return None
        base, step_text = m.group(1), m.group(2)
        if base == "*":
            start, end = low, high
        elif "-" in base:
            a, b = base.split("-")
            start, end = int(a), int(b)
        else:
            start = end = int(base)
            if step_text is not None:
                end = high  # `5/15`: from 5 on, every 15
        step = 1 if step_text is None else int(step_text)
        if step < 1 or start < low or end > high or start > end:
            return None
        values.update(range(start, end + 1, step))
    return frozenset(values)


def parse_schedule(s: object) -> Schedule | None:
    """The parsed schedule, or None when `s` is not exactly one of the grammar's forms."""
    if not isinstance(s, str):
        return None
    if m := _EVERY.fullmatch(s):
        n = int(m.group(1))
        return Every(n * 60 if m.group(2) == "h" else n)
    if m := _DAILY.fullmatch(s):
        slots = []
        for slot in m.group(1).split(","):
            h, mi = int(slot[:2]), int(slot[3:])
            if h > 23 or mi > 59:
                return None
            slots.append((h, mi))
        return Daily(tuple(sorted(set(slots))))
    if m := _CRON.fullmatch(s):
        fields = [_cron_field(text, lo, hi) for text, (lo, hi) in zip(m.groups(), _BOUNDS, strict=True)]
        if any(f is None for f in fields):
            return None
        mins, hours, days, months, dows = (f or frozenset() for f in fields)
        weekdays = frozenset(d % 7 for d in dows)
        return Cron(mins, hours, days, months, weekdays, any_day=m.group(3) == "*", any_weekday=m.group(5) == "*")
    return None


def is_valid_schedule(s: object) -> bool:
    return parse_schedule(s) is not None


def _utc(d: datetime) -> datetime:
    return d.replace(tzinfo=UTC) if d.tzinfo is None else d.astimezone(UTC)


_UNPARSEABLE = object()


def _last(last: str | datetime | None) -> datetime | object | None:
    """None for never run, a UTC datetime, or _UNPARSEABLE."""
    if last is None or last == "":
        return None
    if isinstance(last, datetime):
        return _utc(last)
    if isinstance(last, str):
        try:
            return _utc(datetime.fromisoformat(last))
        except ValueError:
            return _UNPARSEABLE
    return _UNPARSEABLE


def _daily_slot_at_or_before(d: Daily, now: datetime) -> datetime | None:
    """Today's latest slot that is <= now, or None before the first."""
    today = now.replace(hour=0, minute=0, second=0, microsecond=0)
    past = [today + timedelta(hours=h, minutes=m) for h, m in d.slots]
    past = [t for t in past if t <= now]
    return past[-1] if past else None


def _cron_next_after(c: Cron, after: datetime, until: datetime | None) -> datetime | None:
    """The first matching minute strictly after `after` (and <= until when given), or None."""
    start = after.replace(second=0, microsecond=0) + timedelta(minutes=1)
    day = start.replace(hour=0, minute=0)
    end = (until if until is not None else start + _CRON_HORIZON)
    hours, minutes = sorted(c.hours), sorted(c.minutes)
    while day <= end:
        if c.day_matches(day):
            for h in hours:
                for mi in minutes:
                    t = day + timedelta(hours=h, minutes=mi)
                    if t >= start:
                        return t if t <= end else None
        day += timedelta(days=1)
    return None


def is_due(schedule: str | Schedule, last: str | datetime | None, now: datetime) -> bool:
    """Whether a job on `schedule` that last ran at `last` is due at `now`.

    last None or "" -> due; an unknown schedule -> due only when never run; an unparseable
    last -> due; a last in the future -> not due. Interval: elapsed >= interval. Daily: now is
    at or past today's latest slot and last is before that slot. Cron: a matching minute lies
    in (last, now] (missed ticks catch up once)."""
    when = _last(last)
    if when is None:
        return True
    parsed = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    if parsed is None:
        return False
    if isinstance(parsed, Every) and parsed.minutes == 0:
        return True
    if not isinstance(when, datetime):
        return True
    now = _utc(now)
    if when > now:
        return False
    if isinstance(parsed, Every):
        return now - when >= timedelta(minutes=parsed.minutes)
    if isinstance(parsed, Daily):
        slot = _daily_slot_at_or_before(parsed, now)
        return slot is not None and when < slot
    lower = max(when, now - _CRON_HORIZON)
    return _cron_next_after(parsed, lower, now) is not None


def next_due(schedule: str | Schedule, last: str | datetime | None, now: datetime) -> datetime | None:
    """When the job is next due: `now` if due now, else the coming slot (None: never, or unknown)."""
    now = _utc(now)
    if is_due(schedule, last, now):
        return now
    parsed = parse_schedule(schedule) if isinstance(schedule, str) else schedule
    when = _last(last)
    if parsed is None or not isinstance(when, datetime):
        return None
    if isinstance(parsed, Every):
        return when + timedelta(minutes=parsed.minutes)
    base = max(when, now)
    if isinstance(parsed, Daily):
        day = base.replace(hour=0, minute=0, second=0, microsecond=0)
        for offset in (0, 1):
            for h, m in parsed.slots:
                t = day + timedelta(days=offset, hours=h, minutes=m)
                if t > base:
                    return t
        return None
    return _cron_next_after(parsed, base, None)


def seconds_to_schedule(seconds: float) -> str:
    """The schedule for an interval in seconds, rounded up to whole minutes (never more often than
    configured): 90 -> "every 2m", 3600 -> "every 1h", 3601 -> "every 61m"."""
    if isinstance(seconds, bool) or not isinstance(seconds, int | float) or not seconds > 0 \
            or not math.isfinite(seconds):
        raise ValueError(f"seconds must be a number > 0, got {seconds!r}")
    minutes = max(1, math.ceil(seconds / 60))
    return f"every {minutes // 60}h" if minutes % 60 == 0 else f"every {minutes}m"
