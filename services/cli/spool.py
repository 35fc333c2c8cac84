"""`fleetlog spool status|drain`: what waits in the local spool, and delivering it now.

The spool holds events recorded while the broker was away or not yet acked when a process
ended (docs/architecture.md, "Write path 1"). Any fleetlog client drains it when it connects;
`drain` is that, on demand, for spools of the fleet behind --nats only.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import click
from fleetlog.services.backbone.errors import FleetUnavailable
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.writepath.spool import survey
from rich.table import Table

from ._common import (
    Exit,
    cli_options,
    console,
    exit_code_of,
    fail,
    json_option,
    nats_option,
    print_json,
    settings_from,
)

__all__ = ["spool"]

_spool_dir_option = click.option(
    "--spool-dir", type=click.Path(path_type=Path), default=None,
    help="the spool directory [env FLEETLOG_SPOOL_DIR; default <data_dir>/spool]",
)


@click.group()
def spool() -> None:
    """The local spool: events waiting to be delivered."""


@spool.command("status")
@_spool_dir_option
@json_option
def status_cmd(spool_dir: Path | None, as_json: bool) -> None:
    """Each spool: for which fleet and identity, how many events, whether a live process holds it."""
    settings = settings_from(None, spool_dir=spool_dir)
    root = settings.resolved_spool_dir()
    dirs = survey(root)
    if as_json:
        print_json({"spool_dir": str(root), "spools": [d._asdict() for d in dirs]})
        return
    table = Table("spool", "fleet", "identity", "urls", "events", "bytes", "state")
    for d in dirs:
        table.add_row(d.name, d.fleet or "(not connected yet)", d.identity or "-", ",".join(d.urls), str(d.records),
                      str(d.bytes), "live" if d.live else "orphaned")
    console.print(table)
    console.print(f"[dim]{root} · {sum(d.records for d in dirs)} events waiting[/dim]")


@spool.command("drain")
@click.option("--timeout", type=float, default=None,
              help="seconds to connect and deliver [default: the global --timeout, else 30]")
@click.option("--adopt", "adopt", metavar="NAME", default=None,
              help="also deliver this orphaned spool, whatever fleet it was recorded for (its own is gone)")
@_spool_dir_option
@nats_option
@json_option
def drain_cmd(timeout: float | None, adopt: str | None, spool_dir: Path | None, nats_url: str | None,
              as_json: bool) -> None:
    """Deliver the orphaned spools of the fleet behind --nats, in order; another fleet's are left
    (unless named by --adopt)."""
    settings = settings_from(nats_url, spool_dir=spool_dir)
    if timeout is None:
        timeout = cli_options().timeout_s or 30.0
    bound = timeout
    if adopt is not None and not (settings.resolved_spool_dir() / adopt).is_dir():
        fail(Exit.NOT_FOUND, f"--adopt: no spool named {adopt!r} in {settings.resolved_spool_dir()}")

    async def main() -> tuple[int, int, list[str]]:
        fleet = await Fleet.connect(settings=settings, name="fleetlog-spool-drain", connect_wait_s=bound)
        try:
            if not fleet.connected:
                raise FleetUnavailable(f"NATS at {settings.nats_url} did not answer within {bound:g}s")
            if adopt is not None:
                await fleet.adopt_spool(adopt)  # 0 when a live process holds it, or it was this fleet's
            await fleet.flush(bound)
            stats = fleet.publisher_stats()
            return stats.acked, stats.dead_lettered, [n for n in fleet.foreign_spools if n != adopt]
        finally:
            await fleet.close(bound)  # bounded too: what is not delivered stays spooled

    try:
        delivered, dead, foreign = asyncio.run(main())
    except (FleetUnavailable, TimeoutError) as exc:
        fail(exit_code_of(exc), f"{exc} (what is spooled stays spooled)")
    if as_json:
        print_json({"delivered": delivered, "dead_lettered": dead, "left_other_fleets": foreign})
    else:
        console.print(f"delivered {delivered} spooled events")
        if foreign:
            console.print(f"left spools of another fleet: {', '.join(foreign)}")
    if dead:
        fail(Exit.ERROR, f"{dead} events refused by the broker were set aside (dead-letter.jsonl)")
