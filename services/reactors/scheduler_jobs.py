"""Scheduler jobs: what they are, and where they come from (a TOML/YAML file, the environment).

A jobs file (`--jobs FILE`, `.toml`, or `.yaml`/`.yml`):

    tick_seconds = 10              # how often the scheduler looks (default 10)
    startup_grace_seconds = 0      # wait this long after start before the first tick
    [[jobs]]
    name = "extract"               # [A-Za-z0-9_-]+: a subject token and an env variable part
    schedule = "every 15m"         # the grammar of services/reactors/schedules.py
    processor = "extract"          # run a registered processor (the processors.run endpoint) ...
    max_sessions_per_run = 50
    time_budget_seconds = 150
    [[jobs]]
    name = "status-probe"
    schedule = "daily 03:00"
    request = "fleetlog.q.status"  # ... or send a request to a fleetlog endpoint
    payload = {}
    timeout_seconds = 30

Environment (read at start; each job's variables use its name upper-cased, `-` -> `_`):
  FLEETLOG_SCHEDULER_TICK_S, FLEETLOG_SCHEDULER_STARTUP_GRACE_S (the grace may be 0),
  FLEETLOG_SCHEDULER_PROCESSORS=a,b  one job per processor, named after it,
  FLEETLOG_SCHEDULER_<JOB>_INTERVAL_MINUTES  the job runs `every Nm` (strict: an integer > 0),
  FLEETLOG_SCHEDULER_<JOB>_SCHEDULE  overrides the schedule when valid; ignored with a warning when not.
Numbers are strict: "0", "-5", "abc" or "" raise a ValueError naming the variable, because a
typo there would otherwise run a job every tick or never.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec
from fleetlog.services.client.processors.registry import get_processor
from fleetlog.services.reactors.schedules import Every, is_valid_schedule, parse_schedule, seconds_to_schedule

__all__ = ["DEFAULT_TICK_S", "Job", "JobsConfig", "check_tick", "jobs_from_env", "load_jobs", "load_jobs_file",
           "smallest_interval_s"]

log = logging.getLogger("fleetlog.scheduler")

DEFAULT_TICK_S = 10.0
ENV_PREFIX = "FLEETLOG_SCHEDULER_"
PROCESSOR_RUN_SUBJECT = "fleetlog.processors.run"  # services/client/processors/runner.RUN_SUBJECT
_NAME = re.compile(r"[A-Za-z0-9_-]{1,128}")


class Job(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """One job: a name, a schedule, and one action (a processor run or a request)."""

    name: str
    schedule: str
    processor: str | None = None
    max_sessions_per_run: int | None = None
    time_budget_seconds: float = 150.0
    request: str | None = None
    payload: Any = msgspec.field(default_factory=dict)
    timeout_seconds: float | None = None  # default: a processor's budget + 60 s; a request's 30 s

    def __post_init__(self) -> None:
        where = f"job {self.name!r}"
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"jobs.name: {self.name!r} must match [A-Za-z0-9_-]{{1,128}}")
        if not is_valid_schedule(self.schedule):
            raise ValueError(f"{where}: schedule {self.schedule!r} is not a valid schedule "
                             "(every Nm | every Nh | daily HH:MM[,HH:MM...] | cron m h dom mon dow)")
        if (self.processor is None) == (self.request is None):
            raise ValueError(f"{where}: give exactly one of processor or request")
        if self.request is not None and not self.request.startswith("fleetlog."):
            raise ValueError(f"{where}: request {self.request!r} must name a fleetlog endpoint (fleetlog.*)")
        if self.timeout_seconds is not None and not self.timeout_seconds > 0:
            raise ValueError(f"{where}: timeout_seconds must be > 0, got {self.timeout_seconds!r}")

    @property
    def subject(self) -> str:
        return PROCESSOR_RUN_SUBJECT if self.processor is not None else str(self.request)

    @property
    def timeout_s(self) -> float:
        if self.timeout_seconds is not None:
            return self.timeout_seconds
        return self.time_budget_seconds + 60.0 if self.processor is not None else 30.0

    @property
    def action(self) -> str:
        return f"processor {self.processor}" if self.processor is not None else f"request {self.request}"

    def body(self) -> bytes:
        if self.processor is not None:
            return msgspec.json.encode({"processor": self.processor, "max_sessions_per_run": self.max_sessions_per_run,
                                        "time_budget_seconds": self.time_budget_seconds})
        return msgspec.json.encode(self.payload)


class JobsConfig(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    jobs: list[Job] = msgspec.field(default_factory=list)
    tick_seconds: float = DEFAULT_TICK_S
    startup_grace_seconds: float = 0.0


def load_jobs_file(path: str | Path) -> JobsConfig:
    """A jobs file, TOML or YAML by its suffix; a ValueError names the file and the bad field."""
    p = Path(path)
    data = p.read_bytes()
    try:
        if p.suffix == ".toml":
            config = msgspec.toml.decode(data, type=JobsConfig)
        elif p.suffix in (".yaml", ".yml"):
            config = msgspec.yaml.decode(data, type=JobsConfig)
        else:
            raise ValueError(f"{p}: a jobs file is .toml, .yaml or .yml")
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ValueError(f"{p}: {exc}") from None
    names = [j.name for j in config.jobs]
    if dupes := sorted({n for n in names if names.count(n) > 1}):
        raise ValueError(f"{p}: jobs.name repeated: {', '.join(dupes)}")
    if not config.tick_seconds > 0:
        raise ValueError(f"{p}: tick_seconds must be > 0, got {config.tick_seconds!r}")
    if not config.startup_grace_seconds >= 0:
        raise ValueError(f"{p}: startup_grace_seconds must be >= 0, got {config.startup_grace_seconds!r}")
    return config


def _number(env: Mapping[str, str], var: str, *, allow_zero: bool, integer: bool = False) -> float | None:
    raw = env.get(var)
    if raw is None:
        return None
    rule = ("an integer" if integer else "a number") + (" >= 0" if allow_zero else " > 0")
    try:
        value = float(int(raw.strip())) if integer else float(raw.strip())
    except ValueError:
        raise ValueError(f"{var}={raw!r}: must be {rule}") from None
    if value != value or value < 0 or (value == 0 and not allow_zero) or value == float("inf"):
        raise ValueError(f"{var}={raw!r}: must be {rule}")
    return value


def _env_key(job: str) -> str:
    return job.upper().replace("-", "_")


def jobs_from_env(config: JobsConfig, env: Mapping[str, str] | None = None) -> JobsConfig:
    """`config` with the environment applied: tick, grace, processor jobs, per-job interval and
    schedule override (module docstring)."""
    env = os.environ if env is None else env
    tick = _number(env, ENV_PREFIX + "TICK_S", allow_zero=False)
    grace = _number(env, ENV_PREFIX + "STARTUP_GRACE_S", allow_zero=True)
    jobs = {j.name: j for j in config.jobs}
    for name in filter(None, (n.strip() for n in env.get(ENV_PREFIX + "PROCESSORS", "").split(","))):
        if name in jobs:
            continue
        var = f"{ENV_PREFIX}{_env_key(name)}_INTERVAL_MINUTES"
        registered = get_processor(name)
        if var not in env and registered is None:
            raise ValueError(f"{ENV_PREFIX}PROCESSORS names {name!r}, which is not registered here: set {var}")
        cadence = float(registered.cadence_minutes) if registered is not None else 1.0
        jobs[name] = Job(name=name, schedule=seconds_to_schedule(cadence * 60), processor=name)
    for name, job in list(jobs.items()):
        var = f"{ENV_PREFIX}{_env_key(name)}_INTERVAL_MINUTES"
        minutes = _number(env, var, allow_zero=False, integer=True)
        schedule = job.schedule if minutes is None else f"every {int(minutes)}m"
        override_var = f"{ENV_PREFIX}{_env_key(name)}_SCHEDULE"
        override = env.get(override_var)
        if override is not None:
            if is_valid_schedule(override):
                schedule = override
            else:
                log.warning("%s=%r is not a valid schedule: ignored, job %s keeps %r", override_var, override, name,
                            schedule)
        if schedule != job.schedule:
            jobs[name] = msgspec.structs.replace(job, schedule=schedule)
    return JobsConfig(jobs=list(jobs.values()),
                      tick_seconds=config.tick_seconds if tick is None else tick,
                      startup_grace_seconds=config.startup_grace_seconds if grace is None else grace)


def load_jobs(path: str | Path | None = None, env: Mapping[str, str] | None = None) -> JobsConfig:
    """The jobs file (if any) with the environment applied."""
    return jobs_from_env(load_jobs_file(path) if path is not None else JobsConfig(), env)


def smallest_interval_s(jobs: list[Job]) -> float | None:
    """The shortest positive `every` interval among the jobs, in seconds (None: no such job)."""
    intervals = [s.minutes * 60.0 for j in jobs if isinstance(s := parse_schedule(j.schedule), Every) and s.minutes]
    return min(intervals) if intervals else None


def check_tick(config: JobsConfig) -> None:
    """Refuse a tick longer than the smallest interval job's interval (its due slots would be missed)."""
    smallest = smallest_interval_s(config.jobs)
    if smallest is not None and config.tick_seconds > smallest:
        raise ValueError(f"scheduler tick of {config.tick_seconds:g}s is longer than the smallest job interval "
                         f"({smallest:g}s): due slots would be missed; lower the tick")
