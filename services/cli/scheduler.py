"""`fleetlog scheduler run|status`: the scheduler reactor alone, and what it is doing."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import click
import msgspec
import nats.errors
from fleetlog.schemas.scheduler import SchedulerStatus
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.node.server import run_scheduler
from fleetlog.services.reactors.scheduler import STATUS_SUBJECT
from fleetlog.services.reactors.scheduler_jobs import JobsConfig, check_tick, load_jobs
from rich.markup import escape
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, settings_from

__all__ = ["jobs_option", "jobs_table", "load_jobs_or_fail", "scheduler", "scheduler_status"]

jobs_option = click.option(
    "--jobs", "jobs_path", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
    envvar="FLEETLOG_SCHEDULER_JOBS",
    help="run these scheduled jobs (TOML or YAML) [env FLEETLOG_SCHEDULER_JOBS; FLEETLOG_SCHEDULER_* add/override]",
)


def load_jobs_or_fail(path: Path | None) -> JobsConfig:
    """The jobs file with the environment applied; a bad one exits 2 naming the field or variable."""
    try:
        config = load_jobs(path)
        check_tick(config)
    except (ValueError, OSError) as exc:
        fail(Exit.USAGE, str(exc))
    return config


@click.group()
def scheduler() -> None:
    """Scheduled jobs: processors and fleetlog requests on a cadence, once per due slot across instances."""


@scheduler.command("run")
@jobs_option
@nats_option
@click.option("-v", "--verbose", is_flag=True)
def run_cmd(jobs_path: Path | None, nats_url: str | None, verbose: bool) -> None:
    """Run the scheduler alone against NATS until Ctrl-C (any number may run: each slot runs once)."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    config = load_jobs_or_fail(jobs_path)
    if not config.jobs:
        fail(Exit.USAGE, "no jobs: give --jobs FILE or FLEETLOG_SCHEDULER_PROCESSORS")
    settings = settings_from(nats_url)

    try:
        asyncio.run(run_scheduler(settings, config))
    except (OSError, TimeoutError) as exc:
        fail(Exit.UNAVAILABLE, f"cannot reach NATS at {settings.nats_url}: {exc}")
    except KeyboardInterrupt:
        pass


async def scheduler_status(fleet: Fleet, timeout: float = 2.0) -> SchedulerStatus | None:
    """What a running scheduler says (None: no scheduler runs)."""
    nc = await fleet.nats()
    try:
        reply = await nc.request(STATUS_SUBJECT, b"{}", timeout=timeout)
    except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
        return None
    if (reply.headers or {}).get("Nats-Service-Error-Code"):
        return None
    return msgspec.json.decode(reply.data, type=SchedulerStatus)


def jobs_table(status: SchedulerStatus) -> Table:
    table = Table("job", "schedule", "action", "last run", "next due", "in flight", "last ok", "error",
                  title=f"scheduler jobs (tick {status.tick_s:g}s)")
    for j in status.jobs:
        table.add_row(j.job, j.schedule, escape(j.action), j.last_run or "never", j.next_due or "",
                      "yes" if j.in_flight else "", "" if j.ok is None else str(j.ok), escape(j.error or ""))
    return table


@scheduler.command("status")
@nats_option
@json_option
def status_cmd(nats_url: str | None, as_json: bool) -> None:
    """The jobs of a running scheduler: last run, next due, in flight (exit 3: no scheduler runs)."""
    answer = run_client(nats_url, scheduler_status)
    if as_json:
        print_json(answer)
    elif answer is not None:
        console.print(jobs_table(answer))
    if answer is None:
        fail(Exit.NOT_FOUND, "no scheduler answered (run `fleetlog scheduler run --jobs FILE`, or up/serve --jobs)")
