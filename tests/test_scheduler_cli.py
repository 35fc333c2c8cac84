"""The scheduler wired in: `fleetlog scheduler run` as a real process, `scheduler status`,
`fleetlog status` showing the jobs, a Server (up/serve) running jobs, and bad jobs refused
with exit 2 naming the field, the variable or the tick."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import msgspec
import nats
import pytest
from fleetlog.schemas.scheduler import STREAM, JobState, job_subject
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.node.broker import die_with_parent
from fleetlog.services.node.server import Server
from fleetlog.services.reactors.scheduler_jobs import Job, JobsConfig
from nats.aio.msg import Msg

from fleetlog import Fleet, FleetSettings

from .helpers import cli_json, cli_runner, fleetlog_cmd, wait_until

JOBS = """
tick_seconds = 0.2
[[jobs]]
name = "ping"
schedule = "every 1m"
request = "fleetlog.test.ping"
timeout_seconds = 5
"""


async def _ping_counter(nc: nats.NATS) -> list[bytes]:
    calls: list[bytes] = []

    async def answer(msg: Msg) -> None:
        calls.append(msg.data)
        await msg.respond(b"{}")

    await nc.subscribe("fleetlog.test.ping", cb=answer)
    await nc.flush()
    return calls


async def test_scheduler_run_as_a_process_and_its_status(fleet: Fleet, server: Server, tmp_path: Path) -> None:
    calls = await _ping_counter(await fleet.nats())
    jobs = tmp_path / "jobs.toml"
    jobs.write_text(JOBS)
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "sched")}
    proc = await asyncio.create_subprocess_exec(
        *fleetlog_cmd(), "scheduler", "run", "--jobs", str(jobs), "--nats", fleet.settings.nats_url,
        env=env, stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent())  # dies with pytest
    run = cli_runner(fleet.settings.nats_url, tmp_path)
    try:
        assert proc.stderr is not None
        while "job(s), tick" not in (line := (await proc.stderr.readline()).decode()):
            assert line, "the scheduler ended before it started"

        async def ran() -> bool:
            status = cli_json(await run("scheduler", "status", "--json"))
            return bool(status["jobs"][0]["ok"])

        await wait_until(ran)
        assert calls == [b"{}"]  # every 1m, never run: once, and not again within the minute
        (job,) = cli_json(await run("scheduler", "status", "--json"))["jobs"]
        assert (job["job"], job["action"], job["in_flight"]) == ("ping", "request fleetlog.test.ping", False)
        assert job["last_run"] is not None and job["next_due"] > job["last_run"]
        whole = cli_json(await run("status", "--json"))
        assert [j["job"] for j in whole["scheduler"]["jobs"]] == ["ping"] and "streams" in whole
        human = await run("status")
        assert human.returncode == 0 and "scheduler jobs" in human.stdout and "ping" in human.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert await asyncio.wait_for(proc.wait(), 30) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    gone = await run("scheduler", "status")
    assert gone.returncode == 3 and "no scheduler answered" in gone.stderr
    plain = cli_json(await run("status", "--json"))
    assert "scheduler" not in plain  # no scheduler: the status answer's keys as they were


def _cli(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "cli"), **env}
    return subprocess.run([*fleetlog_cmd(), *args, "--nats", "nats://127.0.0.1:1"], capture_output=True, text=True,
                          env=full_env, timeout=60)


def test_bad_jobs_are_refused_before_anything_starts(tmp_path: Path) -> None:
    good = tmp_path / "jobs.toml"
    good.write_text(JOBS)
    bad = tmp_path / "bad.toml"
    bad.write_text(JOBS.replace("every 1m", "every 1s"))
    res = _cli(tmp_path, "scheduler", "run", "--jobs", str(bad))
    assert res.returncode == 2 and "not a valid schedule" in res.stderr
    res = _cli(tmp_path, "scheduler", "run", "--jobs", str(good), FLEETLOG_SCHEDULER_TICK_S="61")
    assert res.returncode == 2 and "tick" in res.stderr
    res = _cli(tmp_path, "scheduler", "run", "--jobs", str(good), FLEETLOG_SCHEDULER_PING_INTERVAL_MINUTES="-5")
    assert res.returncode == 2 and "FLEETLOG_SCHEDULER_PING_INTERVAL_MINUTES" in res.stderr
    res = _cli(tmp_path, "serve", "--jobs", str(bad))
    assert res.returncode == 2 and "not a valid schedule" in res.stderr
    res = _cli(tmp_path, "scheduler", "run")
    assert res.returncode == 2 and "no jobs" in res.stderr


async def test_a_server_runs_its_jobs(settings: FleetSettings) -> None:
    nc = await nats.connect(settings.nats_url)
    try:
        calls = await _ping_counter(nc)
        jobs = JobsConfig(jobs=[Job(name="ping", schedule="every 1m", request="fleetlog.test.ping")], tick_seconds=0.2)
        srv = Server(settings, jobs=jobs)
        await srv.start()
        try:
            await wait_until(lambda: _true(bool(calls)))
            assert srv.scheduler is not None
            (job,) = (await srv.scheduler.status()).jobs
            assert job.job == "ping" and job.last_run is not None
        finally:
            await srv.stop()
        with pytest.raises(ValueError, match="tick"):
            await Server(settings, jobs=JobsConfig(jobs=jobs.jobs, tick_seconds=61)).start()
    finally:
        await nc.drain()


async def _true(value: bool) -> bool:
    return value


async def _done(nc: nats.NATS, job: str) -> bool:
    stored = await Guarded(nc).last(STREAM, job_subject(job))
    return stored is not None and msgspec.json.decode(stored.data, type=JobState).ok is True


async def _start_scheduler(nats_url: str, jobs: Path, tmp_path: Path) -> asyncio.subprocess.Process:
    env = {**os.environ, "FLEETLOG_DATA_DIR": str(tmp_path / "sched")}
    proc = await asyncio.create_subprocess_exec(
        *fleetlog_cmd(), "scheduler", "run", "--jobs", str(jobs), "--nats", nats_url,
        env=env, stderr=asyncio.subprocess.PIPE, preexec_fn=die_with_parent())
    assert proc.stderr is not None
    while "job(s), tick" not in (line := (await proc.stderr.readline()).decode()):
        assert line, "the scheduler ended before it started"
    return proc


async def test_last_run_survives_a_killed_scheduler(settings: FleetSettings, tmp_path: Path) -> None:
    nc = await nats.connect(settings.nats_url)
    procs: list[asyncio.subprocess.Process] = []
    try:
        calls = await _ping_counter(nc)
        marks: list[bytes] = []

        async def mark(msg: Msg) -> None:
            marks.append(msg.data)
            await msg.respond(b"{}")

        await nc.subscribe("fleetlog.test.marker", cb=mark)
        hourly = JOBS.replace("every 1m", "every 1h")
        first_jobs, second_jobs = tmp_path / "first.toml", tmp_path / "second.toml"
        first_jobs.write_text(hourly)
        second_jobs.write_text(hourly + '[[jobs]]\nname = "marker"\nschedule = "every 1h"\n'
                                        'request = "fleetlog.test.marker"\n')
        procs.append(await _start_scheduler(settings.nats_url, first_jobs, tmp_path))
        await wait_until(lambda: _done(nc, "ping"))  # ran, and its outcome is stored: not in flight
        procs[0].kill()  # SIGKILL: nothing written on the way out
        await procs[0].wait()
        procs.append(await _start_scheduler(settings.nats_url, second_jobs, tmp_path))
        await wait_until(lambda: _true(bool(marks)))  # it ticked: "ping" came first in that tick
        assert len(calls) == 1  # ran an hour's slot once, before the kill; not again after the restart
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.wait()
        await nc.drain()
