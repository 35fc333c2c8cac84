"""`fleetlog snapshots gather|take|tick|daemon|latest|prev|status|history|all|diffs|watch`."""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
from pathlib import Path
from typing import Any

import click
import msgspec
from fleetlog.schemas.snapshots import SnapshotDiff
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.snapshots.gather import gather
from fleetlog.services.client.snapshots.hooks import load_hooks_file
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, show
from .runs import json_value

__all__ = ["snapshots"]


def _hooks(path: Path | None) -> dict[str, Any] | None:
    if path is None:
        return None
    try:
        return load_hooks_file(path)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--hooks") from None


hooks_option = click.option("--hooks", "hooks_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                             help='YAML or JSON: {"hooks": {"on_diff": ["cmd ...", "https://..."]}}')


@click.group()
def snapshots() -> None:
    """Agent snapshots, their take-time diffs and on_diff hooks."""


@snapshots.command("gather")
@click.option("--agent", required=True)
@click.option("--session", help="the agent's tmux session (default: the agent's name)")
@click.option("--host-facts", is_flag=True, help="add the general host facts (disk, python, uptime) under host_facts")
@json_option
def gather_cmd(agent: str, session: str | None, host_facts: bool, as_json: bool) -> None:
    """Print this agent's snapshot as gathered now (no broker needed)."""
    snap = gather(agent, session)
    if host_facts:
        from fleetlog.services.client.snapshots.collector import host_facts as facts

        snap["host_facts"] = facts()
    click.echo(json.dumps(snap, indent=None if as_json else 2))


@snapshots.command("take")
@click.option("--agent", required=True)
@click.option("--host", help="default: this machine's hostname")
@click.option("--session", help="the agent's tmux session (default: the agent's name)")
@click.option("--data", callback=json_value("data"), help="JSON object: the snapshot as is (default: gather)")
@click.option("--no-diff", is_flag=True, help="store without diffing (diff_fields [])")
@nats_option
@json_option
def take_cmd(agent: str, host: str | None, session: str | None, data: dict[str, Any] | None, no_diff: bool,
             nats_url: str | None, as_json: bool) -> None:
    """Take one snapshot; print it with has_diff and diff_fields."""

    async def go(fleet: Fleet) -> dict[str, Any]:
        snap = await fleet.snapshots.take(agent, data, host=host, session=session, with_diff=not no_diff)
        await fleet.flush()  # a CLI process exits at once: the diff record acked (or spooled) first
        return snap

    show(run_client(nats_url, go), as_json)


@snapshots.command("tick")
@click.option("--agent", required=True)
@click.option("--session")
@click.option("--host", help="default: this machine's hostname")
@hooks_option
@nats_option
@json_option
def tick_cmd(agent: str, session: str | None, host: str | None, hooks_file: Path | None, nats_url: str | None,
             as_json: bool) -> None:
    """Take a snapshot and fire on_diff hooks if it has a diff (never fails on the snapshot; logs)."""
    hooks = _hooks(hooks_file)

    async def go(fleet: Fleet) -> dict[str, Any] | None:
        snap = await fleet.snapshots.tick(agent, session=session, hooks=hooks, host=host)
        await fleet.flush()
        return snap

    snap = run_client(nats_url, go)
    if snap is None:
        fail(Exit.ERROR, f"snapshot tick for {agent} failed (see the log)")
    show(snap, as_json)


@snapshots.command("daemon")
@click.option("--agent", required=True)
@click.option("--every", "every_s", type=click.FloatRange(min=0.01), required=True, help="seconds between ticks")
@click.option("--session")
@click.option("--host", help="default: this machine's hostname")
@hooks_option
@nats_option
def daemon_cmd(agent: str, every_s: float, session: str | None, host: str | None, hooks_file: Path | None,
               nats_url: str | None) -> None:
    """Tick forever, every SECONDS; SIGTERM or SIGINT stops it cleanly (after the current tick)."""
    hooks = _hooks(hooks_file)

    async def go(fleet: Fleet) -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        ticks = 0
        while not stop.is_set():
            await fleet.snapshots.tick(agent, session=session, hooks=hooks, host=host)
            ticks += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), every_s)
        return ticks

    ticks = run_client(nats_url, go)
    click.echo(f"stopped after {ticks} ticks", err=True)


def _read(which: str) -> Any:
    @snapshots.command(which)
    @click.option("--agent", required=True)
    @click.option("--host", help="default: this machine's hostname")
    @nats_option
    @json_option
    def cmd(agent: str, host: str | None, nats_url: str | None, as_json: bool) -> None:
        snap = run_client(nats_url, lambda f: getattr(f.snapshots, which)(agent, host))
        show(snap, as_json, f"no {'previous ' if which == 'prev' else ''}snapshot of {agent}")

    cmd.__doc__ = ("The newest stored snapshot of the agent (exit 3: none)." if which == "latest"
                   else "The stored snapshot before the newest (exit 3: none).")
    return cmd


latest_cmd = _read("latest")
prev_cmd = _read("prev")


@snapshots.command("status")
@click.option("--agent", required=True)
@click.option("--host", help="default: this machine's hostname")
@hooks_option
@nats_option
@json_option
def status_cmd(agent: str, host: str | None, hooks_file: Path | None, nats_url: str | None, as_json: bool) -> None:
    """The newest stored snapshot and how many on_diff hooks are configured (never gathers)."""
    hooks = _hooks(hooks_file)
    show(run_client(nats_url, lambda f: f.snapshots.status(agent, host=host, hooks=hooks)), as_json)


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


@snapshots.command("history")
@click.option("--agent", required=True)
@click.option("--host", help="default: this machine's hostname")
@click.option("--limit", type=int, default=10, show_default=True)
@click.option("--before", "before_seq", type=int, help="cursor: the next_cursor of the previous page")
@nats_option
@json_option
def history_cmd(agent: str, host: str | None, limit: int, before_seq: int | None, nats_url: str | None,
                as_json: bool) -> None:
    """One agent's stored snapshots, newest first (exit 3: it has none)."""
    answer = run_client(nats_url, lambda f: f.snapshots.history(agent, host, limit, before_seq))
    missing = not answer.items and before_seq is None
    if as_json:
        print_json(answer)
    elif not missing:
        table = Table(title=f"snapshots of {agent}")
        for col in ("seq", "host", "ts", "diff_fields"):
            table.add_column(col)
        for i in answer.items:
            table.add_row(str(i.seq), i.host, i.ts, _short(i.diff_fields, 60))
        console.print(table)
        if answer.next_cursor is not None:
            console.print(f"more: --before {answer.next_cursor}")
    if missing:
        fail(Exit.NOT_FOUND, f"no snapshot of {agent}")


@snapshots.command("all")
@click.option("--host")
@click.option("--agent")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def all_cmd(host: str | None, agent: str | None, limit: int, nats_url: str | None, as_json: bool) -> None:
    """The newest snapshot of every (host, agent)."""
    answer = run_client(nats_url, lambda f: f.snapshots.all_latest(host, agent, limit))
    if as_json:
        print_json(answer)
        return
    table = Table(title="latest snapshots")
    for col in ("seq", "host", "agent", "ts", "diff_fields"):
        table.add_column(col)
    for i in answer.items:
        table.add_row(str(i.seq), i.host, i.agent, i.ts, _short(i.diff_fields, 60))
    console.print(table)


@snapshots.command("diffs")
@click.option("--host")
@click.option("--agent")
@click.option("--after", "after_seq", type=int, default=0, help="cursor: the next_cursor of the previous page")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def diffs_cmd(host: str | None, agent: str | None, after_seq: int, limit: int, nats_url: str | None,
              as_json: bool) -> None:
    """The diff records, oldest first."""
    answer = run_client(nats_url, lambda f: f.snapshots.diffs(host, agent, after_seq, limit))
    if as_json:
        print_json(answer)
        return
    table = Table(title="snapshot diffs")
    for col in ("seq", "host", "agent", "timestamp", "diff_fields"):
        table.add_column(col)
    for d in answer.items:
        table.add_row(str(d.seq), d.host, d.agent, d.timestamp or "", _short(d.diff_fields, 60))
    console.print(table)


def _line(seq: int, diff: SnapshotDiff, as_json: bool) -> None:
    if as_json:
        click.echo(msgspec.json.encode({"seq": seq, **msgspec.to_builtins(diff)}).decode())
    else:
        console.print(f"[bold]{diff.host}/{diff.agent}[/bold] {diff.timestamp}: {', '.join(diff.diff_fields)}")


@snapshots.command("watch")
@click.option("--host")
@click.option("--agent")
@click.option("--after", "after_seq", type=int, help="start after this FLEET_DIFFS seq (0: everything kept)")
@click.option("--count", type=int, help="exit after this many diffs")
@click.option("--exec", "commands", multiple=True, help="on_diff command for every diff (repeatable)")
@click.option("--post", "urls", multiple=True, help="on_diff URL to POST every diff to (repeatable)")
@click.option("--durable", help="consumer name for --exec/--post (default: derived from the subjects)")
@nats_option
@json_option
def watch_cmd(host: str | None, agent: str | None, after_seq: int | None, count: int | None,
              commands: tuple[str, ...], urls: tuple[str, ...], durable: str | None, nats_url: str | None,
              as_json: bool) -> None:
    """Print diffs as they are published; with --exec/--post, run the on_diff hooks for each.

    With hooks it follows a durable consumer: restarted, it continues after the last diff
    it acked (--after only positions a new one). A hook run is at-least-once."""
    hooks = [*commands, *urls]

    async def go(fleet: Fleet) -> int:
        if hooks:
            async def echo(seq: int, diff: SnapshotDiff) -> None:
                _line(seq, diff, as_json)

            return await fleet.snapshots.serve_hooks(hooks, host, agent, durable=durable, after_seq=after_seq,
                                                     count=count, on_diff=echo)
        seen = 0
        async for seq, diff in fleet.snapshots.watch(host, agent, after_seq=after_seq):
            _line(seq, diff, as_json)
            seen += 1
            if count is not None and seen >= count:
                break
        return seen

    with contextlib.suppress(KeyboardInterrupt, asyncio.CancelledError):
        run_client(nats_url, go)
