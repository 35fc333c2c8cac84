"""The `fleetlog` command: a thin layer over the library (noun verb, `--json` everywhere)."""

from __future__ import annotations

import click

from ._common import CliOptions
from .admin import rebuild, rejects, schemas, status
from .attempts import attempts, emit_attempt
from .identities import identities
from .processors import processors
from .replica import export, replica
from .run import serve, up
from .runs import runs
from .runtimes import runtimes
from .scheduler import scheduler
from .snapshots import snapshots
from .spool import spool
from .sql import sql
from .state import state

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="fleetlog")
@click.option("--timeout", "timeout_s", type=click.FloatRange(min=0, min_open=True), default=None,
              envvar="FLEETLOG_TIMEOUT", metavar="SECONDS",
              help="bound connecting and each request (past it: exit 5) [env FLEETLOG_TIMEOUT]")
@click.pass_context
def cli(ctx: click.Context, timeout_s: float | None) -> None:
    """fleetlog: the flight recorder and control ledger for fleets of AI agents.

    Exit codes: 0 ok, 1 error, 2 bad input, 3 not found, 4 refused, 5 unavailable, 6 stale (docs/cli.md).
    """
    ctx.obj = CliOptions(timeout_s=timeout_s)


@cli.group()
def emit() -> None:
    """Publish one event (wait for its ack; with the broker away it is spooled for later)."""


emit.add_command(emit_attempt)
for command in (up, serve, status, attempts, runs, runtimes, state, snapshots, processors, scheduler, sql, replica,
                export, schemas, rejects, rebuild, spool, identities):
    cli.add_command(command)


def main() -> None:
    cli()
