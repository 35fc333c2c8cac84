"""Scheduler jobs from a TOML or YAML file and from the environment: strict numbers naming the
variable, a schedule override used when valid and ignored with a warning when not."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from fleetlog.services.reactors.scheduler_jobs import Job, JobsConfig, jobs_from_env, load_jobs, load_jobs_file

from fleetlog.processors import register, unregister

TOML = """
tick_seconds = 5
startup_grace_seconds = 0
[[jobs]]
name = "extract"
schedule = "every 15m"
processor = "extract"
max_sessions_per_run = 20
[[jobs]]
name = "probe"
schedule = "daily 03:00,15:00"
request = "fleetlog.status"
payload = {}
timeout_seconds = 10
"""

YAML = """
tick_seconds: 5
jobs:
  - name: extract
    schedule: every 15m
    processor: extract
    max_sessions_per_run: 20
  - name: probe
    schedule: "daily 03:00,15:00"
    request: fleetlog.status
    payload: {}
    timeout_seconds: 10
"""


def test_toml_and_yaml_files_give_the_same_jobs(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text(TOML)
    (tmp_path / "jobs.yaml").write_text(YAML)
    a, b = load_jobs_file(tmp_path / "jobs.toml"), load_jobs_file(tmp_path / "jobs.yaml")
    assert a == b and a.tick_seconds == 5 and [j.name for j in a.jobs] == ["extract", "probe"]
    extract, probe = a.jobs
    assert (extract.subject, extract.timeout_s, extract.action) == ("fleetlog.processors.run", 210.0,
                                                                     "processor extract")
    assert (probe.subject, probe.timeout_s, probe.body()) == ("fleetlog.status", 10.0, b"{}")


@pytest.mark.parametrize(("text", "message"), [
    ('[[jobs]]\nname = "a"\nschedule = "every 15s"\nprocessor = "p"\n', "not a valid schedule"),
    ('[[jobs]]\nname = "a b"\nschedule = "every 1m"\nprocessor = "p"\n', "jobs.name"),
    ('[[jobs]]\nname = "a"\nschedule = "every 1m"\n', "exactly one of processor or request"),
    ('[[jobs]]\nname = "a"\nschedule = "every 1m"\nprocessor = "p"\nrequest = "fleetlog.x"\n', "exactly one"),
    ('[[jobs]]\nname = "a"\nschedule = "every 1m"\nrequest = "other.x"\n', "fleetlog endpoint"),
    ('[[jobs]]\nname = "a"\nschedule = "every 1m"\nprocessor = "p"\nlater = 1\n', "later"),
    ('[[jobs]]\nname = "a"\nschedule = "every 1m"\nprocessor = "p"\n[[jobs]]\nname = "a"\nschedule = "every 1m"\n'
     'processor = "q"\n', "repeated: a"),
    ("tick_seconds = 0\n", "tick_seconds"),
    ("startup_grace_seconds = -1\n", "startup_grace_seconds"),
])
def test_a_bad_jobs_file_names_the_rule(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        load_jobs_file(path)


def test_a_jobs_file_is_toml_or_yaml(tmp_path: Path) -> None:
    (tmp_path / "jobs.json").write_text("{}")
    with pytest.raises(ValueError, match=r"\.toml, \.yaml or \.yml"):
        load_jobs_file(tmp_path / "jobs.json")


@pytest.mark.parametrize("value", ["0", "-5", "abc", "", "1.5", "nan"])
def test_interval_variables_are_strict(value: str) -> None:
    config = JobsConfig(jobs=[Job(name="ex-tract", schedule="every 15m", processor="p")])
    with pytest.raises(ValueError, match="FLEETLOG_SCHEDULER_EX_TRACT_INTERVAL_MINUTES"):
        jobs_from_env(config, {"FLEETLOG_SCHEDULER_EX_TRACT_INTERVAL_MINUTES": value})


@pytest.mark.parametrize("value", ["0", "-5", "abc", ""])
def test_the_tick_variable_is_strict(value: str) -> None:
    with pytest.raises(ValueError, match="FLEETLOG_SCHEDULER_TICK_S"):
        jobs_from_env(JobsConfig(), {"FLEETLOG_SCHEDULER_TICK_S": value})


@pytest.mark.parametrize("value", ["-5", "abc", ""])
def test_the_grace_variable_is_strict_but_may_be_zero(value: str) -> None:
    with pytest.raises(ValueError, match="FLEETLOG_SCHEDULER_STARTUP_GRACE_S"):
        jobs_from_env(JobsConfig(), {"FLEETLOG_SCHEDULER_STARTUP_GRACE_S": value})
    assert jobs_from_env(JobsConfig(), {"FLEETLOG_SCHEDULER_STARTUP_GRACE_S": "0"}).startup_grace_seconds == 0


def test_environment_jobs_interval_and_override(caplog: pytest.LogCaptureFixture) -> None:
    class Ingest:
        name = "ingest"
        cadence_minutes = 1.5

        def process_session(self, *args: object, **kwargs: object) -> None:
            return None

    register(Ingest())
    try:
        env = {"FLEETLOG_SCHEDULER_PROCESSORS": "ingest, remote", "FLEETLOG_SCHEDULER_REMOTE_INTERVAL_MINUTES": "7",
               "FLEETLOG_SCHEDULER_TICK_S": "2.5", "FLEETLOG_SCHEDULER_STARTUP_GRACE_S": "0"}
        config = jobs_from_env(JobsConfig(), env)
        assert {j.name: (j.schedule, j.processor) for j in config.jobs} == {
            "ingest": ("every 2m", "ingest"),  # the registered cadence, rounded up to whole minutes
            "remote": ("every 7m", "remote")}
        assert (config.tick_seconds, config.startup_grace_seconds) == (2.5, 0)
        with caplog.at_level(logging.WARNING, logger="fleetlog.scheduler"):
            overridden = jobs_from_env(config, {"FLEETLOG_SCHEDULER_INGEST_SCHEDULE": "cron */5 * * * *",
                                                "FLEETLOG_SCHEDULER_REMOTE_SCHEDULE": "every 5s"})
        assert {j.name: j.schedule for j in overridden.jobs} == {"ingest": "cron */5 * * * *", "remote": "every 7m"}
        assert "FLEETLOG_SCHEDULER_REMOTE_SCHEDULE='every 5s' is not a valid schedule" in caplog.text
        with pytest.raises(ValueError, match="FLEETLOG_SCHEDULER_GHOST_INTERVAL_MINUTES"):
            jobs_from_env(JobsConfig(), {"FLEETLOG_SCHEDULER_PROCESSORS": "ghost"})
    finally:
        unregister("ingest")


def test_load_jobs_applies_the_environment_to_the_file(tmp_path: Path) -> None:
    (tmp_path / "jobs.toml").write_text(TOML)
    config = load_jobs(tmp_path / "jobs.toml", {"FLEETLOG_SCHEDULER_PROBE_INTERVAL_MINUTES": "60"})
    assert [j.schedule for j in config.jobs] == ["every 15m", "every 60m"]
    assert load_jobs(None, {}).jobs == []
