"""`fleetlog runtimes register|heartbeat|list|show`."""

from __future__ import annotations

from typing import Any

import click
from fleetlog.services.client.fleet import Fleet
from rich.table import Table

from ._common import console, json_option, nats_option, print_json, run_client, show
from .runs import json_value

__all__ = ["runtimes"]


def _labels(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> dict[str, str] | None:
    out: dict[str, str] = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE")
        out[key] = val
    return out or None


@click.group()
def runtimes() -> None:
    """The runtime registry: runner runtimes, their heartbeats and status."""


@runtimes.command("register")
@click.argument("runtime_id")
@click.option("--name", "display_name")
@click.option("--endpoint")
@click.option("--version")
@click.option("--capability", "capabilities", multiple=True, help="repeatable")
@click.option("--label", "labels", multiple=True, callback=_labels, help="KEY=VALUE, repeatable")
@click.option("--metadata", callback=json_value("metadata"), help="JSON object")
@click.option("--deadline", "heartbeat_deadline_s", type=float, default=60, show_default=True,
              help="seconds without a heartbeat before the runtime is marked stale")
@nats_option
@json_option
def register_cmd(runtime_id: str, capabilities: tuple[str, ...], nats_url: str | None, as_json: bool,
                 **kw: Any) -> None:
    """Register (upsert) a runtime: status online; capabilities, labels and metadata replaced."""
    show(run_client(nats_url, lambda f: f.runtimes.register(runtime_id, capabilities=list(capabilities), **kw)),
         as_json)


@runtimes.command("heartbeat")
@click.argument("runtime_id")
@click.option("--status", default="online", show_default=True)
@click.option("--metadata", callback=json_value("metadata"), help="JSON object, merged")
@click.option("--active-runs", "active_runs", type=int)
@nats_option
@json_option
def heartbeat_cmd(runtime_id: str, nats_url: str | None, as_json: bool, **kw: Any) -> None:
    """Send a heartbeat (exit 3: the runtime is not registered)."""

    async def go(fleet: Fleet) -> Any:
        view = await fleet.runtimes.heartbeat(runtime_id, **kw)
        await fleet.flush()  # a CLI process exits at once: wait for the ack
        return view

    show(run_client(nats_url, go), as_json, f"no such runtime: {runtime_id} (register it first)")


@runtimes.command("list")
@click.option("--status", "statuses", multiple=True, help="repeatable")
@click.option("--label", "labels", multiple=True, callback=_labels, help="KEY=VALUE, repeatable; all must match")
@click.option("--limit", type=int, default=100, show_default=True)
@nats_option
@json_option
def list_cmd(statuses: tuple[str, ...], labels: dict[str, str] | None, limit: int, nats_url: str | None,
             as_json: bool) -> None:
    """Runtimes by id."""
    answer = run_client(nats_url, lambda f: f.runtimes.list(list(statuses) or None, labels, limit))
    if as_json:
        print_json(answer)
        return
    table = Table("runtime_id", "status", "display_name", "last_heartbeat_at", "labels")
    for r in answer.items:
        table.add_row(r.runtime_id, r.status, r.display_name or "", str(r.last_heartbeat_at),
                      ", ".join(f"{k}={v}" for k, v in r.labels.items()))
    console.print(table)
    console.print(f"[dim]{len(answer.items)} of {answer.total}[/dim]")


@runtimes.command("show")
@click.argument("runtime_id")
@nats_option
@json_option
def show_cmd(runtime_id: str, nats_url: str | None, as_json: bool) -> None:
    """One runtime (exit 3: no such runtime)."""
    show(run_client(nats_url, lambda f: f.runtimes.get(runtime_id)), as_json, f"no such runtime: {runtime_id}")
