"""`fleetlog processors list|mark|hash|file|files|seen|start|finish|run|runs|lock|acquire|release`."""

from __future__ import annotations

from typing import Any

import click
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.processors import ProcessorLock, hash_file, path_hash
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, show
from .runs import json_value

__all__ = ["processors"]


@click.group()
def processors() -> None:
    """Batch-processor bookkeeping: per-file markers, runs, and one lock per processor."""


@processors.command("list")
@nats_option
@json_option
def list_cmd(nats_url: str | None, as_json: bool) -> None:
    """Every processor: file counts by status, runs, last run, who holds the lock."""
    answer = run_client(nats_url, lambda f: f.processors.summary())
    if as_json:
        print_json(answer)
        return
    table = Table(title="processors")
    for col in ("processor", "files", "runs", "last run", "lock"):
        table.add_column(col)
    for s in answer.items:
        last = f"{s.last_run.run_id} {s.last_run.status}" if s.last_run else ""
        files = ", ".join(f"{k} {v}" for k, v in s.files.items())
        table.add_row(s.processor, files, str(s.runs), last, s.lock_holder or "")
    console.print(table)


@processors.command("mark")
@click.argument("processor")
@click.argument("file_path")
@click.argument("status")
@click.option("--hash", "file_hash", help="the file's identity (default: sha256 of the path; see `hash`)")
@click.option("--content-hash", is_flag=True, help="use the sha256 of the file's content as its identity")
@click.option("--size", type=int)
@click.option("--detail", callback=json_value("detail"), help="JSON object")
@click.option("--run", "run_id")
@nats_option
@json_option
def mark_cmd(processor: str, file_path: str, status: str, file_hash: str | None, content_hash: bool,
             nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Record a file's status, and wait for its ack."""

    async def go(fleet: Fleet) -> dict[str, Any]:
        h = hash_file(file_path) if content_hash else file_hash if file_hash is not None else path_hash(file_path)
        fleet.processors.mark(processor, file_path, status, file_hash=h, **kw)
        token = await fleet.flush()
        return {"file_hash": h, "seq": token.get("FLEET_PROCESSORS"), "token": dict(token)}

    show(run_client(nats_url, go), as_json)


@processors.command("hash")
@click.argument("file_path", type=click.Path(exists=True, dir_okay=False))
def hash_cmd(file_path: str) -> None:
    """Print the sha256 of a file's content (a content identity for --hash)."""
    click.echo(hash_file(file_path))


@processors.command("file")
@click.argument("processor")
@click.argument("file_hash")
@nats_option
@json_option
def file_cmd(processor: str, file_hash: str, nats_url: str | None, as_json: bool) -> None:
    """One file's marker (exit 3: none)."""
    show(run_client(nats_url, lambda f: f.processors.file(processor, file_hash)), as_json,
         f"no marker for {file_hash} in {processor}")


@processors.command("files")
@click.argument("processor")
@click.option("--status", "statuses", multiple=True, help="repeatable")
@click.option("--run", "run_id")
@click.option("--after", help="cursor: the next_cursor of the previous page")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def files_cmd(processor: str, statuses: tuple[str, ...], run_id: str | None, after: str | None, limit: int,
              nats_url: str | None, as_json: bool) -> None:
    """A processor's files, by hash."""
    answer = run_client(nats_url, lambda f: f.processors.files(processor, list(statuses) or None, run_id, after,
                                                               limit))
    if as_json:
        print_json(answer)
        return
    table = Table(title=f"files of {processor} ({answer.total_count})")
    for col in ("file_hash", "status", "file_path", "size", "run"):
        table.add_column(col)
    for i in answer.items:
        table.add_row(i.file_hash[:16], i.status, i.file_path, "" if i.size is None else str(i.size), i.run_id or "")
    console.print(table)


@processors.command("seen")
@click.argument("processor")
@click.argument("file_hashes", nargs=-1, required=True)
@nats_option
@json_option
def seen_cmd(processor: str, file_hashes: tuple[str, ...], nats_url: str | None, as_json: bool) -> None:
    """The status of each given file hash (those with a marker; exit 3 when any has none)."""
    statuses = run_client(nats_url, lambda f: f.processors.seen(processor, list(file_hashes)))
    show(statuses, as_json)
    unseen = [h for h in dict.fromkeys(file_hashes) if h not in statuses]
    if unseen:
        # Every known one is printed above; the exit code says "not all of them were seen".
        fail(Exit.NOT_FOUND, f"no marker in {processor} for {len(unseen)} of {len(set(file_hashes))} hashes: "
                             f"{', '.join(unseen[:10])}{' ...' if len(unseen) > 10 else ''}")


@processors.command("start")
@click.argument("processor")
@click.option("--run-id", "run_id")
@click.option("--total", "files_total", type=int, default=0)
@click.option("--detail", callback=json_value("detail"), help="JSON object")
@nats_option
@json_option
def start_cmd(processor: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Record a run as running (idempotent by run id)."""
    show(run_client(nats_url, lambda f: f.processors.start_run(processor, **kw)), as_json)


@processors.command("finish")
@click.argument("processor")
@click.argument("run_id")
@click.option("--status", default="completed", show_default=True)
@click.option("--ok", "files_ok", type=int)
@click.option("--failed", "files_failed", type=int)
@click.option("--detail", callback=json_value("detail"), help="JSON object, merged")
@nats_option
@json_option
def finish_cmd(processor: str, run_id: str, status: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Finish a run (exit 3: no such run; 4: already finished with another status)."""
    show(run_client(nats_url, lambda f: f.processors.finish_run(processor, run_id, status, **kw)), as_json,
         f"no such run of {processor}: {run_id}")


@processors.command("run")
@click.argument("processor")
@click.argument("run_id")
@nats_option
@json_option
def run_cmd(processor: str, run_id: str, nats_url: str | None, as_json: bool) -> None:
    """One run (exit 3: none)."""
    show(run_client(nats_url, lambda f: f.processors.run(processor, run_id)), as_json,
         f"no such run of {processor}: {run_id}")


@processors.command("runs")
@click.argument("processor")
@click.option("--limit", type=int, default=20, show_default=True)
@click.option("--before", "before_seq", type=int, help="cursor: the next_cursor of the previous page")
@nats_option
@json_option
def runs_cmd(processor: str, limit: int, before_seq: int | None, nats_url: str | None, as_json: bool) -> None:
    """A processor's runs, newest first."""
    answer = run_client(nats_url, lambda f: f.processors.runs(processor, limit, before_seq))
    if as_json:
        print_json(answer)
        return
    table = Table(title=f"runs of {processor}")
    for col in ("run_id", "status", "started_at", "finished_at", "total", "ok", "failed"):
        table.add_column(col)
    for r in answer.items:
        table.add_row(r.run_id, r.status, str(r.started_at or ""), str(r.finished_at or ""), str(r.files_total),
                      str(r.files_ok), str(r.files_failed))
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
