"""`fleetlog.scheduler`: the cadence grammar and the scheduler reactor.

`parse_schedule(s)` (None when invalid), `is_valid_schedule(s)`, `is_due(schedule, last, now)`,
`next_due(...)` and `seconds_to_schedule(seconds)` are pure (services/reactors/schedules.py).
`Scheduler(nc, load_jobs(path))` runs jobs once per due slot across any number of instances
(services/reactors/scheduler.py); `Job`, `JobsConfig`, `load_jobs` describe and load them.
"""

from fleetlog.services.reactors.scheduler import Scheduler
from fleetlog.services.reactors.scheduler_jobs import Job, JobsConfig, load_jobs
from fleetlog.services.reactors.schedules import (
    is_due,
    is_valid_schedule,
    next_due,
    parse_schedule,
    seconds_to_schedule,
)

__all__ = [
    "Job",
    "JobsConfig",
    "Scheduler",
    "is_due",
    "is_valid_schedule",
    "load_jobs",
    "next_due",
    "parse_schedule",
    "seconds_to_schedule",
]
