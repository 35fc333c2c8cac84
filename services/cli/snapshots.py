"""`fleetlog snapshots take|collect|latest|history|show|diff|diffs|watch`."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import click
import msgspec
from fleetlog.services.client.collector import collect, host_facts
from fleetlog.services.client.fleet import Fleet
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, show
from .runs import json_value

__all__ = ["snapshots"]


async def _seq_token(fleet: Fleet) -> dict[str, Any]:
    token = await fleet.flush()  # a CLI process exits at once: wait for the ack
    return {"seq": token.get("FLEET_SNAPSHOTS"), "token": dict(token)}


@click.group()
def snapshots() -> None:
    """Host self-snapshots and the diffs between them."""


@snapshots.command("take")
@click.option("--agent", required=True)
@click.option("--host", help="default: this machine's hostname")
@click.option("--data", callback=json_value("data"), help="JSON object (default: this host's facts)")
@nats_option
@json_option
def take_cmd(agent: str, host: str | None, data: dict[str, Any] | None, nats_url: str | None, as_json: bool) -> None:
    """Publish one snapshot and wait for its ack."""

    async def go(fleet: Fleet) -> dict[str, Any]:
        fleet.snapshots.take(agent, host_facts() if data is None else data, host=host)
        return await _seq_token(fleet)

    show(run_client(nats_url, go), as_json)


@snapshots.command("collect")
@click.option("--agent", default="collector", show_default=True)
@click.option("--host", help="default: this machine's hostname")
@click.option("--every", "every_s", type=float, default=60.0, show_default=True, help="seconds between snapshots")
@click.option("--count", type=int, help="stop after this many (default: run until interrupted)")
@click.option("--disk", "disk_path", default="/", show_default=True, help="the file system to report")
@nats_option
@json_option
def collect_cmd(agent: str, host: str | None, every_s: float, count: int | None, disk_path: str,
                nats_url: str | None, as_json: bool) -> None:
    """Snapshot this host's facts (system, CPU, memory, disk, Python) periodically."""

    async def go(fleet: Fleet) -> dict[str, Any]:
        receipts = await collect(fleet.snapshots, agent, host=host, every_s=every_s, count=count, disk_path=disk_path)
        out = await _seq_token(fleet)
        return {"taken": len(receipts), **out}

    try:
        show(run_client(nats_url, go), as_json)
    except KeyboardInterrupt:
        pass


def _items_table(items: list[Any], title: str) -> None:
    table = Table(title=title)
    for col in ("seq", "host", "agent", "ts", "data"):
        table.add_column(col)
    for i in items:
        table.add_row(str(i.seq), i.host, i.agent, i.ts, _short(i.data))
    console.print(table)


def _short(value: Any, width: int = 80) -> str:
    text = json.dumps(value, ensure_ascii=False)
    return text if len(text) <= width else text[: width - 1] + "…"


@snapshots.command("latest")
@click.option("--host")
@click.option("--agent")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def latest_cmd(host: str | None, agent: str | None, limit: int, nats_url: str | None, as_json: bool) -> None:
    """The newest snapshot of every (host, agent)."""
    answer = run_client(nats_url, lambda f: f.snapshots.latest(host, agent, limit))
    if as_json:
        print_json(answer)
    else:
        _items_table(answer.items, "latest snapshots")


@snapshots.command("history")
@click.argument("host")
@click.argument("agent")
@click.option("--limit", type=int, default=10, show_default=True)
@click.option("--before", "before_seq", type=int, help="cursor: the next_cursor of the previous page")
@nats_option
@json_option
def history_cmd(host: str, agent: str, limit: int, before_seq: int | None, nats_url: str | None,
                as_json: bool) -> None:
    """One (host, agent)'s snapshots, newest first (exit 3: it has none)."""
    answer = run_client(nats_url, lambda f: f.snapshots.history(host, agent, limit, before_seq))
    # A first page that is empty: the pair has no snapshot. A later page past the end is an
    # answer (the cursor came from a page that had items).
    missing = not answer.items and before_seq is None
    if as_json:
        print_json(answer)
    elif not missing:
        _items_table(answer.items, f"snapshots of {host} / {agent}")
        if answer.next_cursor is not None:
            console.print(f"more: --before {answer.next_cursor}")
    if missing:
        fail(Exit.NOT_FOUND, f"no snapshot of {host} / {agent}")


@snapshots.command("show")
@click.argument("host")
@click.argument("agent")
@click.option("--seq", type=int, help="default: the newest")
@nats_option
@json_option
def show_cmd(host: str, agent: str, seq: int | None, nats_url: str | None, as_json: bool) -> None:
    """One snapshot (exit 3: none)."""
    where = f"{host} / {agent}" + ("" if seq is None else f" at seq {seq}")
    show(run_client(nats_url, lambda f: f.snapshots.get(host, agent, seq)), as_json, f"no snapshot of {where}")


@snapshots.command("diff")
@click.argument("host")
@click.argument("agent")
@click.option("--from", "from_seq", type=int, help="default: the snapshot before --to")
@click.option("--to", "to_seq", type=int, help="default: the newest")
@nats_option
@json_option
def diff_cmd(host: str, agent: str, from_seq: int | None, to_seq: int | None, nats_url: str | None,
             as_json: bool) -> None:
    """What changed between two stored snapshots, computed now (exit 3: no such snapshot)."""
    answer = run_client(nats_url, lambda f: f.snapshots.diff(host, agent, from_seq, to_seq))
    if as_json or answer.found:
        show(answer, as_json)
    if not answer.found:
        seqs = ", ".join(f"{k} {v}" for k, v in (("--from", from_seq), ("--to", to_seq)) if v is not None)
        fail(Exit.NOT_FOUND, f"no such snapshot of {host} / {agent}{f' ({seqs})' if seqs else ''}")


@snapshots.command("diffs")
@click.option("--host")
@click.option("--agent")
@click.option("--after", "after_seq", type=int, default=0, help="cursor: the next_cursor of the previous page")
@click.option("--limit", type=int, default=100, show_default=True)
@click.option("--changes-only", is_flag=True, help="leave out diffs of unchanged snapshots")
@nats_option
@json_option
def diffs_cmd(host: str | None, agent: str | None, after_seq: int, limit: int, changes_only: bool,
              nats_url: str | None, as_json: bool) -> None:
    """The diffs the snapshot differ published, oldest first."""
    answer = run_client(nats_url, lambda f: f.snapshots.diffs(host, agent, after_seq, limit, changes_only))
    if as_json:
        print_json(answer)
        return
    table = Table(title="snapshot diffs")
    for col in ("seq", "host", "agent", "from → to", "added", "removed", "changed"):
        table.add_column(col)
    for d in answer.items:
        table.add_row(str(d.seq), d.host, d.agent, f"{d.from_seq} → {d.to_seq}", _short(d.added, 30),
                      _short(d.removed, 30), _short(d.changed, 40))
    console.print(table)


@snapshots.command("watch")
@click.option("--host")
@click.option("--agent")
@click.option("--after", "after_seq", type=int, help="replay from this FLEET_DIFFS seq first (0: everything)")
@click.option("--all", "include_empty", is_flag=True, help="also diffs of unchanged snapshots")
@click.option("--count", type=int, help="exit after this many diffs")
@nats_option
@json_option
def watch_cmd(host: str | None, agent: str | None, after_seq: int | None, include_empty: bool, count: int | None,
              nats_url: str | None, as_json: bool) -> None:
    """Print diffs as the differ publishes them (one JSON object per line with --json)."""

    async def go(fleet: Fleet) -> int:
        seen = 0
        async for seq, diff in fleet.snapshots.watch(host, agent, after_seq=after_seq,
                                                     changes_only=not include_empty):
            if as_json:
                click.echo(msgspec.json.encode({"seq": seq, **msgspec.to_builtins(diff)}).decode(), nl=True)
            else:
                console.print(f"[bold]{diff.host}/{diff.agent}[/bold] #{diff.to_seq}: +{_short(diff.added, 60)} "
                              f"-{_short(diff.removed, 40)} ~{_short(diff.changed, 60)}")
            seen += 1
            if count is not None and seen >= count:
                break
        return seen

    try:
        run_client(nats_url, go)
    except (KeyboardInterrupt, asyncio.CancelledError):
        pass
