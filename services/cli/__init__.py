"""The `fleetlog` command: a thin layer over the library (noun verb, `--json` everywhere)."""

from __future__ import annotations

import click

from .admin import rebuild, rejects, schemas, status
from .attempts import attempts, emit_attempt
from .processors import processors
from .replica import export, replica
from .run import serve, up
from .runs import runs
from .runtimes import runtimes
from .snapshots import snapshots
from .spool import spool
from .sql import sql
from .state import state

__all__ = ["cli", "main"]


@click.group()
@click.version_option(package_name="fleetlog")
def cli() -> None:
    """fleetlog: the flight recorder and control ledger for fleets of AI agents."""


@cli.group()
def emit() -> None:
    """Publish one event (wait for its ack; with the broker away it is spooled for later)."""


emit.add_command(emit_attempt)
for command in (up, serve, status, attempts, runs, runtimes, state, snapshots, processors, sql, replica, export,
                schemas, rejects, rebuild, spool):
    cli.add_command(command)


def main() -> None:
    cli()
