"""`fleetlog processors list|names|mark|hash|scan|state|delete|run|serve|runs|lock|acquire|release|health`."""

from __future__ import annotations

import asyncio
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

import click
from fleetlog.schemas.scheduler import PipelineHealth
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.processors.api import ProcessorLock, ProcessorLockBusy
from fleetlog.services.client.processors.files import compute_file_hash
from fleetlog.services.client.processors.health import HEALTH_SUBJECT, HealthRequest, pipeline_health
from fleetlog.services.client.processors.registry import list_processor_names
from fleetlog.services.client.processors.runner import UnknownProcessor
from rich.markup import escape
from rich.table import Table

from ._common import Exit, console, err_console, fail, json_option, nats_option, print_json, run_client, show

__all__ = ["processors"]

# `processors run`'s exit codes are the session-processor store's contract (its scheduler
# reads them), not the Exit table's: 1 = the run had errors, 2 = unknown processor,
# 75 = already running (EX_TEMPFAIL: try again later). docs/cli.md lists them beside the table.
RUN_HAD_ERRORS = 1
RUN_UNKNOWN = 2
RUN_ALREADY_RUNNING = 75


@click.group()
def processors() -> None:
    """Session processors: per-(processor, session file) bookkeeping, the runner, the lock."""


@processors.command("list")
@nats_option
@json_option
def list_cmd(nats_url: str | None, as_json: bool) -> None:
    """Every processor with bookkeeping: sessions, items, last run, who holds the lock."""
    answer = run_client(nats_url, lambda f: f.processors.summary())
    if as_json:
        print_json(answer)
        return
    table = Table(title="processors")
    for col in ("processor", "sessions", "items", "last processed", "runs", "last run ok", "lock"):
        table.add_column(col)
    for s in answer.items:
        table.add_row(s.processor, str(s.sessions), str(s.items_extracted), str(s.last_processed_at or ""),
                      str(s.runs), "" if s.last_run is None else str(s.last_run.ok), s.lock_holder or "")
    console.print(table)


@processors.command("names")
@json_option
def names_cmd(as_json: bool) -> None:
    """The registered processors (code and the `fleetlog.processors` entry points), sorted."""
    names = list_processor_names()
    if as_json:
        print_json(names)
    else:
        for name in names:
            click.echo(name)


@processors.command("mark")
@click.argument("processor")
@click.argument("session_file")
@click.option("--username", required=True)
@click.option("--items", "items_count", type=int, required=True)
@click.option("--hash", "file_hash", help="the file's MD5 (default: computed from --file)")
@click.option("--file", "path", type=click.Path(exists=True, dir_okay=False), help="the session file to hash")
@click.option("--read-at", "read_at", type=click.DateTime(["%Y-%m-%dT%H:%M:%S.%f", "%Y-%m-%dT%H:%M:%S"]),
              help="naive UTC (default: now)")
@nats_option
@json_option
def mark_cmd(processor: str, session_file: str, username: str, items_count: int, file_hash: str | None,
             path: str | None, read_at: datetime | None, nats_url: str | None, as_json: bool) -> None:
    """Record that PROCESSOR processed SESSION_FILE ("<user dir>/<file>.jsonl"); prints the token."""
    if file_hash is None and path is None:
        fail(Exit.USAGE, "give --hash or --file")
    h = file_hash if file_hash is not None else compute_file_hash(str(path))
    token = run_client(nats_url, lambda f: f.processors.mark_processed(processor, session_file, username,
                                                                       items_count, h, read_at))
    show({"file_hash": h, "token": dict(token)}, as_json)


@processors.command("hash")
@click.argument("file_path", type=click.Path(exists=True, dir_okay=False))
def hash_cmd(file_path: str) -> None:
    """Print the MD5 of a file's content (the bookkeeping's file_hash)."""
    click.echo(compute_file_hash(file_path))


@processors.command("scan")
@click.argument("processor")
@click.option("--sessions", "session_dir", required=True, type=click.Path(file_okay=False))
@nats_option
@json_option
def scan_cmd(processor: str, session_dir: str, nats_url: str | None, as_json: bool) -> None:
    """The session files PROCESSOR would process now (username and path)."""
    found = run_client(nats_url, lambda f: f.processors.scan_unprocessed_for(processor, session_dir))
    rows = [{"username": u, "path": str(p)} for u, p in found]
    if as_json:
        print_json(rows)
    else:
        for r in rows:
            click.echo(f"{r['username']}\t{r['path']}")


@processors.command("state")
@click.argument("processor")
@click.argument("session_files", nargs=-1, required=True)
@nats_option
@json_option
def state_cmd(processor: str, session_files: tuple[str, ...], nats_url: str | None, as_json: bool) -> None:
    """The rows of the given session files (exit 3 when any has none)."""
    states = run_client(nats_url, lambda f: f.processors.get_states_for_session_files(processor, session_files))
    show(states, as_json)
    missing = [s for s in dict.fromkeys(session_files) if s not in states]
    if missing:
        more = " ..." if len(missing) > 10 else ""
        fail(Exit.NOT_FOUND, f"no row in {processor} for {', '.join(missing[:10])}{more}")


@processors.command("delete")
@click.argument("names", nargs=-1, required=True)
@click.option("--yes", is_flag=True, help="do not ask")
@nats_option
@json_option
def delete_cmd(names: tuple[str, ...], yes: bool, nats_url: str | None, as_json: bool) -> None:
    """Delete every bookkeeping row of the named processors (their sessions are processed again)."""
    if not yes and not click.confirm(f"delete the bookkeeping of {', '.join(names)}?"):
        fail(Exit.ERROR, "not confirmed")
    show({"deleted": run_client(nats_url, lambda f: f.processors.delete_for_processors(list(names)))}, as_json)


@processors.command("run")
@click.argument("name")
@click.option("--sessions", "session_dir", type=click.Path(file_okay=False),
              help="run here over this session dir (default: ask the machine that serves runs)")
@click.option("--max", "max_sessions", type=int,
              help="attempts cap (default FLEETLOG_PROCESSOR_MAX_PER_RUN, 50; <= 0: none)")
@click.option("--budget", "budget_s", type=float, default=150.0, show_default=True, help="time budget, seconds")
@nats_option
@json_option
def run_cmd(name: str, session_dir: str | None, max_sessions: int | None, budget_s: float, nats_url: str | None,
            as_json: bool) -> None:
    """Run processor NAME once. Exit 0: ok; 1: some sessions failed; 2: unknown processor;
    75: already running."""

    async def go(fleet: Fleet) -> tuple[int, Any]:
        try:
            if session_dir is not None:
                stats = await fleet.processors.run(name, session_dir, max_sessions_per_run=max_sessions,
                                                   time_budget_seconds=budget_s)
            else:
                stats = await fleet.processors.request_run(name, max_sessions_per_run=max_sessions,
                                                           time_budget_seconds=budget_s)
        except UnknownProcessor as exc:
            return RUN_UNKNOWN, str(exc)
        except ProcessorLockBusy as exc:
            return RUN_ALREADY_RUNNING, str(exc)
        return (RUN_HAD_ERRORS if stats["errors"] else 0), stats

    if session_dir is not None and name not in list_processor_names():
        err_console.print(f"[red]error:[/red] {escape(str(UnknownProcessor(name)))}", highlight=False)
        sys.exit(RUN_UNKNOWN)
    code, result = run_client(nats_url, go)
    if isinstance(result, str):
        err_console.print(f"[red]error:[/red] {escape(result)}", highlight=False)
    else:
        show(result, as_json)
    sys.exit(code)


@processors.command("serve")
@click.option("--sessions", "session_dir", required=True, type=click.Path(file_okay=False))
@nats_option
def serve_cmd(session_dir: str, nats_url: str | None) -> None:
    """Answer `processors.run` requests (fleetlog.processors.run) over this session dir, until stopped."""

    async def go(fleet: Fleet) -> None:
        ready = asyncio.Event()
        serving = asyncio.create_task(fleet.processors.serve_runs(Path(session_dir), ready=ready))
        await asyncio.wait([serving, asyncio.create_task(ready.wait())], return_when=asyncio.FIRST_COMPLETED)
        if ready.is_set():
            # one plain line (no wrapping): a supervisor or a test waits for it
            click.echo(f"serving processors.run over {session_dir}: {', '.join(list_processor_names())}", err=True)
        await serving

    try:
        run_client(nats_url, go)
    except KeyboardInterrupt:
        pass


@processors.command("runs")
@click.argument("processor")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--before", "before_seq", type=int, help="cursor: the next_cursor of the previous page")
@click.option("--run-id", "run_id", help="that run only")
@nats_option
@json_option
def runs_cmd(processor: str, limit: int, before_seq: int | None, run_id: str | None, nats_url: str | None,
             as_json: bool) -> None:
    """A processor's run records, newest first."""
    answer = run_client(nats_url, lambda f: f.processors.runs(processor, limit, before_seq, run_id=run_id))
    if as_json:
        print_json(answer)
        return
    table = Table(title=f"runs of {processor}")
    for col in ("run_id", "ok", "scanned", "processed", "skipped", "capped", "errors", "items", "unhandled"):
        table.add_column(col)
    for r in answer.items:
        table.add_row(r.run_id, str(r.ok), str(r.scanned), str(r.processed), str(r.skipped), str(r.capped),
                      str(r.errors), str(r.items_extracted), r.unhandled_error or "")
    console.print(table)


@processors.command("lock")
@click.argument("processor")
@nats_option
@json_option
def lock_cmd(processor: str, nats_url: str | None, as_json: bool) -> None:
    """Who holds a processor's lock, its fence and lease."""
    show(run_client(nats_url, lambda f: f.processors.lock(processor)), as_json)


@processors.command("acquire")
@click.argument("processor")
@click.option("--holder", help="default: host:pid:random")
@click.option("--lease", "lease_s", type=float, default=60, show_default=True)
@nats_option
@json_option
def acquire_cmd(processor: str, holder: str | None, lease_s: float, nats_url: str | None, as_json: bool) -> None:
    """Take the lock (exit 4: someone else holds it). Prints holder, fence and lease."""
    show(run_client(nats_url, lambda f: f.processors.acquire(processor, holder, lease_s)), as_json,
         f"lock busy: the lock of {processor} is held by someone else", Exit.REFUSED)


@processors.command("release")
@click.argument("processor")
@click.option("--holder", required=True)
@click.option("--fence", type=int, required=True)
@nats_option
@json_option
def release_cmd(processor: str, holder: str, fence: int, nats_url: str | None, as_json: bool) -> None:
    """Give the lock up (exit 4, {"released": false}: it was not this holder's tenure)."""

    async def go(fleet: Fleet) -> dict[str, bool]:
        lock = ProcessorLock(processor, holder, fence, 0, float("inf"))
        return {"released": await fleet.processors.release(lock)}

    result = run_client(nats_url, go)
    if as_json or result["released"]:
        show(result, as_json)
    if not result["released"]:
        fail(Exit.REFUSED, f"not released: the lock of {processor} is not held by {holder} under fence {fence}")


@processors.command("health")
@click.option("--sessions", "session_dir", type=click.Path(file_okay=False),
              help="check here over this session dir (default: ask the machine that serves runs)")
@click.option("--processor", "names", multiple=True, help="only these processors (default: every registered one)")
@click.option("--stuck-grace", "stuck_grace_s", type=float, default=None,
              help="seconds before an unprocessed old file counts as stuck [env FLEETLOG_PROCESSOR_STUCK_FILE_GRACE_S;"
                   " default 4 x grace]")
@nats_option
@json_option
def health_cmd(session_dir: str | None, names: tuple[str, ...], stuck_grace_s: float | None, nats_url: str | None,
               as_json: bool) -> None:
    """Per processor ok / warning / info with the reason; overall "degraded" when any warns.
    Exit 0 whenever the check ran (the status is in the output)."""
    chosen = list(names) or None

    async def go(fleet: Fleet) -> PipelineHealth:
        if session_dir is not None:
            return await pipeline_health(fleet.processors, session_dir, processors=chosen,
                                         stuck_file_grace_seconds=stuck_grace_s)
        req = HealthRequest(processors=chosen, stuck_file_grace_seconds=stuck_grace_s)
        return await fleet.request(HEALTH_SUBJECT, req, PipelineHealth)

    answer = run_client(nats_url, go)
    if as_json:
        print_json(answer)
        return
    console.print(f"[bold]pipeline[/bold]: {answer.status}")
    table = Table()
    for col in ("processor", "status", "reason", "stuck file", "stuck age s"):
        table.add_column(col)
    for h in answer.processors:
        age = "" if h.stuck_file_age_seconds is None else f"{h.stuck_file_age_seconds:.0f}"
        table.add_row(h.processor, h.status, escape(h.reason), escape(h.stuck_file or ""), age)
    console.print(table)
