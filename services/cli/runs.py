"""`fleetlog runs create|claim|renew|release|finalize|cancel|append|show|list|events|stats|sweep`."""

from __future__ import annotations

import json
from collections.abc import Awaitable
from typing import Any, TypeVar

import click
from fleetlog.schemas import RUN_STATUSES
from fleetlog.schemas.runs import RunEventPage, RunView
from fleetlog.services.client.fleet import Fleet
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, show

__all__ = ["json_value", "runs"]

_status = click.Choice(RUN_STATUSES)
T = TypeVar("T")


def json_value(name: str) -> Any:
    """A click callback: the option's text parsed as JSON (a dict), with a clear error."""

    def parse(ctx: click.Context, param: click.Parameter, value: str | None) -> Any:
        if value is None:
            return None
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError as exc:
            raise click.BadParameter(f"not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise click.BadParameter("must be a JSON object")
        return parsed

    return parse


async def _or_exists(fleet: Fleet, run_id: str, command: Awaitable[T]) -> tuple[T, bool]:
    """A guarded command's result, and whether the run exists: renew and release return None both
    for an unknown run and for a claim this token does not hold; the exit code tells them apart."""
    result = await command
    return result, result is not None or await fleet.runs.get(run_id) is not None


def _held(view: RunView | None, exists: bool, as_json: bool, run_id: str, done: str) -> None:
    if exists:
        show(view, as_json, f"not {done}: run {run_id} is not held by this token (or its lease has passed)",
             Exit.REFUSED)
    else:
        show(view, as_json, f"no such run: {run_id}")


@click.group()
def runs() -> None:
    """The run ledger: runs claimed under fenced leases, their result events."""


@runs.command("create")
@click.argument("run_id")
@click.option("--runner", "runner_id", required=True)
@click.option("--status", type=_status, default="running", show_default=True)
@click.option("--queue")
@click.option("--priority", type=int, default=0, show_default=True)
@click.option("--requested-runtime", "requested_runtime_id")
@click.option("--conversation", "conversation_id")
@click.option("--thread", "thread_id")
@click.option("--workspace", "workspace_id")
@click.option("--bot", "bot_id")
@click.option("--agent", "agent_id")
@click.option("--binding", "binding_id")
@click.option("--event-id", "event_id")
@click.option("--deadline-at", "deadline_at", type=int, help="epoch seconds")
@click.option("--authorization", callback=json_value("authorization"), help="JSON object")
@click.option("--metadata", callback=json_value("metadata"), help="JSON object")
@nats_option
@json_option
def create_cmd(run_id: str, nats_url: str | None, as_json: bool, **fields: Any) -> None:
    """Create a run (idempotent by RUN_ID: an existing run is shown unchanged)."""
    show(run_client(nats_url, lambda f: f.runs.create(run_id, **fields)), as_json)


def _claim_filters(fn: Any) -> Any:
    for option in reversed((
        click.option("--queue"),
        click.option("--runner", "runner_ids", multiple=True, help="eligible runner ids (repeatable)"),
        click.option("--conversation", "conversation_id"),
        click.option("--bot", "bot_id"),
        click.option("--workspace", "workspace_id"),
        click.option("--thread", "thread_id"),
        click.option("--strict-thread", is_flag=True, help="without --thread: only runs that have no thread"),
    )):
        fn = option(fn)
    return fn


@runs.command("claim")
@click.option("--runtime", "runtime_id", required=True)
@click.option("--lease", "lease_s", type=float, default=60, show_default=True, help="seconds")
@_claim_filters
@nats_option
@json_option
def claim_cmd(runtime_id: str, lease_s: float, runner_ids: tuple[str, ...], nats_url: str | None, as_json: bool,
              **filters: Any) -> None:
    """Claim the best eligible run; prints the claim token and fencing token (exit 3: nothing eligible)."""
    claim = run_client(
        nats_url, lambda f: f.runs.claim_next(runtime_id, lease_s=lease_s, runner_ids=list(runner_ids), **filters)
    )
    show(claim, as_json, "nothing to claim: no eligible run")


@runs.command("renew")
@click.argument("run_id")
@click.option("--token", "claim_token", required=True)
@click.option("--lease", "lease_s", type=float, default=60, show_default=True)
@click.option("--runtime", "runtime_id")
@nats_option
@json_option
def renew_cmd(run_id: str, claim_token: str, lease_s: float, runtime_id: str | None, nats_url: str | None,
              as_json: bool) -> None:
    """Extend a held lease (exit 4: not held by this token, or the lease passed; 3: no such run)."""

    async def go(fleet: Fleet) -> tuple[RunView | None, bool]:
        return await _or_exists(fleet, run_id, fleet.runs.renew(run_id, claim_token, lease_s, runtime_id))

    _held(*run_client(nats_url, go), as_json, run_id, "renewed")


@runs.command("release")
@click.argument("run_id")
@click.option("--token", "claim_token", required=True)
@click.option("--status", type=_status, default="queued", show_default=True)
@click.option("--reason")
@click.option("--runtime", "runtime_id")
@nats_option
@json_option
def release_cmd(run_id: str, claim_token: str, status: str, reason: str | None, runtime_id: str | None,
                nats_url: str | None, as_json: bool) -> None:
    """Give a claim up (exit 4: not held by this token, or the lease passed; 3: no such run)."""

    async def go(fleet: Fleet) -> tuple[RunView | None, bool]:
        return await _or_exists(fleet, run_id, fleet.runs.release(run_id, claim_token, status, reason, runtime_id))

    _held(*run_client(nats_url, go), as_json, run_id, "released")


@runs.command("finalize")
@click.argument("run_id")
@click.argument("status", type=_status)
@click.option("--reason")
@click.option("--usage", callback=json_value("usage"), help="JSON object")
@click.option("--cost", type=float)
@click.option("--metadata", callback=json_value("metadata"), help="JSON object (shallow-merged)")
@click.option("--token", "claim_token", help="the holder's claim token (while the run is claimed)")
@click.option("--fence", type=int, help="the holder's fencing token (instead of --token)")
@click.option("--runtime", "runtime_id")
@nats_option
@json_option
def finalize_cmd(run_id: str, status: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Set a run's status; a terminal status sets finished_at once and clears the claim.

    Exit 3: no such run; 4: stale claim, the run is claimed by another, or it is already terminal."""
    show(run_client(nats_url, lambda f: f.runs.finalize(run_id, status, **kw)), as_json, f"no such run: {run_id}")


@runs.command("cancel")
@click.argument("run_id")
@click.option("--reason")
@nats_option
@json_option
def cancel_cmd(run_id: str, reason: str | None, nats_url: str | None, as_json: bool) -> None:
    """Ask the holder to stop (sets cancel_requested_at; records admin.run_cancel). Exit 3: no such run."""
    show(run_client(nats_url, lambda f: f.runs.request_cancel(run_id, reason)), as_json, f"no such run: {run_id}")


@runs.command("append")
@click.argument("run_id")
@click.argument("sequence", type=int)
@click.argument("type_")
@click.option("--data", callback=json_value("data"), help="JSON object")
@click.option("--usage", callback=json_value("usage"), help="JSON object")
@click.option("--source", default="runner", show_default=True)
@click.option("--metadata", callback=json_value("metadata"), help="JSON object")
@click.option("--token", "claim_token")
@click.option("--fence", type=int)
@nats_option
@json_option
def append_cmd(run_id: str, sequence: int, type_: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Store a result event (idempotent on RUN_ID + SEQUENCE: a duplicate shows the stored one).

    Exit 3: no such run; 4: the run is claimed and this is not its holder (stale claim)."""
    show(run_client(nats_url, lambda f: f.runs.append_event(run_id, sequence, type_, **kw)), as_json,
         f"no such run: {run_id}")


@runs.command("show")
@click.argument("run_id")
@nats_option
@json_option
def show_cmd(run_id: str, nats_url: str | None, as_json: bool) -> None:
    """One run, as its last lifecycle message says (exit 3: no such run)."""
    show(run_client(nats_url, lambda f: f.runs.get(run_id)), as_json, f"no such run: {run_id}")


@runs.command("list")
@click.option("--conversation", "conversation_id")
@click.option("--status", "statuses", type=_status, multiple=True, help="repeatable")
@click.option("--runner", "runner_id")
@click.option("--bot", "bot_id")
@click.option("--workspace", "workspace_id")
@click.option("--thread", "thread_id")
@click.option("--strict-thread", is_flag=True)
@click.option("--before", "before_id", help="cursor: the next_cursor of the previous page")
@click.option("--limit", type=int, default=50, show_default=True)
@nats_option
@json_option
def list_cmd(statuses: tuple[str, ...], nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Runs, newest first, with a cursor."""

    async def go(fleet: Fleet) -> Any:
        return await fleet.runs.list(statuses=list(statuses) or None, **kw)

    page = run_client(nats_url, go)
    if as_json:
        print_json(page)
        return
    table = Table("run_id", "status", "runner", "priority", "claimed_by", "fence", "created_at")
    for r in page.items:
        table.add_row(r.run_id, r.status, r.runner_id, str(r.priority), r.claimed_by or "", str(r.fence or ""),
                      str(r.created_at))
    console.print(table)
    more = f" · next: --before {page.next_cursor}" if page.has_more else ""
    console.print(f"[dim]{len(page.items)} of {page.total_count}{more}[/dim]")


@runs.command("events")
@click.argument("run_id")
@click.option("--before", "before_sequence", type=int)
@click.option("--after", "after_sequence", type=int)
@click.option("--limit", type=int, default=50, show_default=True)
@click.option("--backward", is_flag=True, help="newest first")
@nats_option
@json_option
def events_cmd(run_id: str, backward: bool, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """A run's result events by sequence (bounds exclusive; exit 3: no such run)."""
    direction = "backward" if backward else "forward"

    async def go(fleet: Fleet) -> tuple[RunEventPage, bool]:
        page = await fleet.runs.events(run_id, direction=direction, **kw)
        # An empty page of an unknown run is "not found", not "no events": ask the stream.
        return page, bool(page.items) or await fleet.runs.get(run_id) is not None

    page, exists = run_client(nats_url, go)
    if as_json:
        print_json(page)
    elif exists:
        table = Table("sequence", "type", "source", "data", "created_at")
        for e in page.items:
            table.add_row(str(e.sequence), e.type, e.source, json.dumps(e.data), str(e.created_at))
        console.print(table)
    if not exists:
        fail(Exit.NOT_FOUND, f"no such run: {run_id}")


@runs.command("stats")
@click.option("--since", help="epoch seconds, ISO-8601 or relative: 24h, 7d")
@click.option("--until")
@click.option("--runner", "runner_id")
@nats_option
@json_option
def stats_cmd(since: str | None, until: str | None, runner_id: str | None, nats_url: str | None,
              as_json: bool) -> None:
    """Counts, success rates, throughput, durations (p50/p95/p99) and queue waits."""

    def when(value: str | None) -> float | str | None:
        try:
            return float(value) if value is not None else None
        except ValueError:
            return value

    show(run_client(nats_url, lambda f: f.runs.stats(when(since), when(until), runner_id)), as_json)


@runs.command("sweep")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def sweep_cmd(limit: int, nats_url: str | None, as_json: bool) -> None:
    """Put claims whose lease passed back to queued (what the lease-sweeper reactor does)."""
    released = run_client(nats_url, lambda f: f.runs.release_expired(limit))
    if as_json:
        print_json(released)
        return
    console.print(f"released {len(released)}: {', '.join(r.run_id for r in released)}")
