"""`fleetlog.scheduler`: the cadence grammar and the scheduler reactor.

`parse_schedule(s)` (None when invalid), `is_valid_schedule(s)`, `is_due(schedule, last, now)`,
`next_due(...)` and `seconds_to_schedule(seconds)` are pure (services/reactors/schedules.py).
"""

from fleetlog.services.reactors.schedules import (
    is_due,
    is_valid_schedule,
    next_due,
    parse_schedule,
    seconds_to_schedule,
)

__all__ = [
    "is_due",
    "is_valid_schedule",
    "next_due",
    "parse_schedule",
    "seconds_to_schedule",
]
