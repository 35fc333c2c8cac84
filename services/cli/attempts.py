"""`fleetlog attempts query|stats|summary|purge` and `fleetlog emit attempt`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys

import click
from fleetlog.schemas.attempts import AttemptPage, AttemptStats, AttemptSummary, PurgeResult
from fleetlog.services.backbone.errors import FleetValidationError
from fleetlog.services.backbone.link import reachable
from fleetlog.services.client.fleet import Fleet
from rich.table import Table

from ._common import (
    Exit,
    cli_options,
    console,
    err_console,
    exit_code_of,
    fail,
    json_option,
    nats_option,
    print_json,
    run_client,
    settings_from,
)

__all__ = ["attempts", "emit_attempt"]


@click.group()
def attempts() -> None:
    """The action-attempt log."""


@attempts.command("query")
@click.option("--agent")
@click.option("--action")
@click.option("--outcome")
@click.option("--since", help="ISO-8601 time or relative: 30s, 15m, 24h, 7d")
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--offset", type=int, default=0, show_default=True)
@nats_option
@json_option
def query_cmd(agent: str | None, action: str | None, outcome: str | None, since: str | None, limit: int,
              offset: int, nats_url: str | None, as_json: bool) -> None:
    """Attempts, newest first."""

    async def go(fleet: Fleet) -> AttemptPage:
        return await fleet.attempts.query(agent=agent, action=action, outcome=outcome, since=since,
                                          limit=limit, offset=offset)

    page = run_client(nats_url, go)
    if as_json:
        print_json(page)
        return
    table = Table("ts", "agent", "action", "outcome", "elapsed_s", "id")
    for row in page.items:
        table.add_row(row.ts, row.agent, row.action, row.outcome, f"{row.elapsed_s:.3f}", row.id)
    console.print(table)
    console.print(f"[dim]{len(page.items)} rows · as of {page.as_of} · lag {page.lag}[/dim]")
    if page.has_more:
        console.print(f"[yellow]the page was cut to fit the connection's max payload: --offset {page.next_offset} "
                      "for the rest[/yellow]")


@attempts.command("stats")
@click.option("--agent")
@click.option("--since", help="ISO-8601 time or relative: 30s, 15m, 24h, 7d")
@nats_option
@json_option
def stats_cmd(agent: str | None, since: str | None, nats_url: str | None, as_json: bool) -> None:
    """count, mean and p95 elapsed per (action, outcome)."""

    async def go(fleet: Fleet) -> AttemptStats:
        return await fleet.attempts.stats(agent=agent, since=since)

    stats = run_client(nats_url, go)
    if as_json:
        print_json(stats)
        return
    table = Table("action", "outcome", "count", "mean_elapsed_s", "p95_elapsed_s")
    for s in stats.items:
        table.add_row(s.action, s.outcome, str(s.count), f"{s.mean_elapsed_s:.3f}", f"{s.p95_elapsed_s:.3f}")
    console.print(table)


@attempts.command("summary")
@click.argument("agent")
@nats_option
@json_option
def summary_cmd(agent: str, nats_url: str | None, as_json: bool) -> None:
    """An agent's newest 100 attempts summarised (exit 3: none recorded)."""

    async def go(fleet: Fleet) -> AttemptSummary:
        return await fleet.attempts.summarize(agent)

    summary = run_client(nats_url, go)
    if as_json:
        print_json(summary)
    if not summary.last_action_name:
        fail(Exit.NOT_FOUND, f"no attempts recorded for {agent!r}")
    if as_json:
        return
    console.print(f"[bold]{agent}[/bold] last: {summary.last_action_name} → {summary.last_action_outcome} "
                  f"({summary.last_action_elapsed_s}s) at {summary.last_action_at}")
    table = Table("action:outcome", "count")
    for key, n in summary.counts.items():
        table.add_row(key, str(n))
    console.print(table)
    for action, p95 in summary.p95_elapsed_s_by_action.items():
        console.print(f"p95 {action}: {p95:.3f}s")


@attempts.command("purge")
@click.option("--days", type=float, required=True, help="delete attempts older than this many days")
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
@nats_option
@json_option
def purge_cmd(days: float, yes: bool, nats_url: str | None, as_json: bool) -> None:
    """Delete old attempts from the view (recorded as a fact, so rebuilds agree)."""
    if not yes and not click.confirm(f"Delete attempts older than {days} days from the view?"):
        fail(Exit.ERROR, "not purged: not confirmed (--yes skips the question)")

    async def go(fleet: Fleet) -> PurgeResult:
        return await fleet.attempts.purge(days)

    result = run_client(nats_url, go)
    if as_json:
        print_json(result)
    else:
        console.print(f"deleted {result.deleted} attempts older than {result.before}")


@click.command("attempt")
@click.option("--agent", required=True)
@click.option("--action", required=True)
@click.option("--outcome", required=True)
@click.option("--elapsed", "elapsed_s", type=float, required=True, help="seconds")
@click.option("--ts", help="event time, ISO-8601 (default: now)")
@click.option("--extras", help="JSON object")
@click.option("--pane-before", help="pane text before")
@click.option("--pane-after", help="pane text after")
@nats_option
@json_option
def emit_attempt(agent: str, action: str, outcome: str, elapsed_s: float, ts: str | None, extras: str | None,
                 pane_before: str | None, pane_after: str | None, nats_url: str | None, as_json: bool) -> None:
    """Record one attempt and wait for its ack; with the broker away, spool it and return (exit 0)."""
    try:
        extras_obj = json.loads(extras) if extras else None
    except json.JSONDecodeError as exc:
        err_console.print(f"[red]error:[/red] --extras: not valid JSON ({exc})")
        sys.exit(2)
    settings = settings_from(nats_url)
    # --timeout bounds the wait to connect and for the ack; past it the event is spooled (exit 0).
    wait_s = cli_options().timeout_s or settings.publish_ack_timeout_s

    async def main() -> dict[str, object]:
        # A broker that refuses connections is away: spool at once rather than wait to connect.
        up = await reachable(settings.servers())
        fleet = await Fleet.connect(settings=settings, name="fleetlog-cli", ensure=False,
                                    connect_wait_s=min(2.0, wait_s) if up else 0.0)
        try:
            receipt = fleet.attempts.record(agent=agent, action=action, outcome=outcome, elapsed_s=elapsed_s,
                                            ts=ts, extras=extras_obj, pane_before=pane_before,
                                            pane_after=pane_after)
            token: dict[str, int] = {}
            if fleet.connected:
                with contextlib.suppress(TimeoutError):  # not acked in time: spooled by close()
                    token = await fleet.flush(wait_s)
        finally:
            await fleet.close(0.0)  # whatever is not acked now goes to the spool
        pos = receipt.position
        return {"id": receipt.id, "stream": pos.stream if pos else None, "seq": pos.seq if pos else None,
                "token": token, "spooled": pos is None}

    try:
        result = asyncio.run(main())
    except FleetValidationError as exc:
        fail(exit_code_of(exc), str(exc))
    if as_json:
        print_json(result)
    elif result["spooled"]:
        console.print(f"spooled {result['id']} (the broker is away; the next fleetlog client or "
                      f"`fleetlog spool drain` delivers it)")
    else:
        console.print(f"recorded {result['id']} at {result['stream']}#{result['seq']}")
