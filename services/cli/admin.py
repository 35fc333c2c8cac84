"""`fleetlog status`, `schemas export`, `rejects`, `rebuild`."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import click
import msgspec
from fleetlog.schemas import export_schemas
from fleetlog.schemas.answers import RejectsAnswer, StatusAnswer
from fleetlog.schemas.scheduler import SchedulerStatus
from fleetlog.services.backbone.guarded import Guarded
from fleetlog.services.backbone.streams import StreamPlacement, stream_placements
from fleetlog.services.client.fleet import Fleet
from fleetlog.services.client.nodes import node_statuses
from fleetlog.services.client.rejects import RawReject, reject_raw
from rich.table import Table

from ._common import Exit, console, fail, json_option, nats_option, print_json, run_client, settings_from
from .deadletters import DeadLetters, dead_letters
from .progress import FoldProgress
from .scheduler import jobs_table, scheduler_status

__all__ = ["rebuild", "rejects", "schemas", "status"]


@click.command()
@click.option("--nodes", is_flag=True, help="every node's own status (one may be catching up, out of the query group)")
@nats_option
@json_option
def status(nodes: bool, nats_url: str | None, as_json: bool) -> None:
    """Streams, projections, checkpoints, lag and rejects; the scheduler's jobs when one runs; the events
    this machine's publishers set aside (the spool dir's dead letters: "permission denied" and others)."""
    if nodes:
        _node_table(nats_url, as_json)
        return

    async def go(fleet: Fleet) -> tuple[StatusAnswer, SchedulerStatus | None, dict[str, StreamPlacement]]:
        answer = await fleet.status()
        placed = {} if as_json else {p.name: p for p in await stream_placements(await fleet.nats())}
        return answer, await scheduler_status(fleet), placed

    answer, jobs, placed = run_client(nats_url, go)
    letters = dead_letters(settings_from(nats_url).resolved_spool_dir())
    if as_json:  # "scheduler" only when one answered: the status answer's own keys stay as they are
        extra = {"dead_letters": letters} if jobs is None else {"scheduler": jobs, "dead_letters": letters}
        print_json({**msgspec.to_builtins(answer), **msgspec.to_builtins(extra)})
        return
    # Where each stream lives comes from JetStream itself (stream info), beside the node's answer.
    streams = Table("stream", "messages", "bytes", "first", "last", "replicas", "leader", "lagging",
                    title="streams")
    for s in answer.streams:
        at = placed.get(s.name)
        streams.add_row(s.name, str(s.messages), str(s.bytes), str(s.first_seq), str(s.last_seq),
                        str(at.replicas) if at else "?", at.leader if at else "?",
                        (", ".join(at.lagging) or "-") if at else "?")
    console.print(streams)
    views = Table("projection", "v", "gen", "state", "checkpoints", "lag", "lag s", "rows", "rejects",
                  title="projections")
    for p in answer.projections:
        views.add_row(p.name, str(p.version), str(p.generation), p.state, _kv(p.checkpoints), _kv(p.lag),
                      _kv(p.lag_seconds), _kv(p.rows), str(p.rejects))
    console.print(views)
    console.print(f"rejects: {answer.rejects_total}")
    if answer.node_state != "serving":
        console.print(f"node {answer.node}: {answer.node_state} (not answering queries yet): {_progress(answer)}")
    if jobs is not None:
        console.print(jobs_table(jobs))
    _print_dead_letters(letters)


def _print_dead_letters(letters: DeadLetters) -> None:
    if not letters.count and not letters.unreadable:
        console.print(f"dead letters: none ({letters.file})", markup=False, highlight=False)
        return
    console.print(f"dead letters: {letters.count} in {letters.file}, {letters.permission_denied} permission denied"
                  + (f", {letters.unreadable} unreadable lines" if letters.unreadable else ""),
                  markup=False, highlight=False)
    for d in letters.newest:
        console.print(f"  {d.subject}: {d.reason}", markup=False, highlight=False)


def _node_table(nats_url: str | None, as_json: bool) -> None:
    async def go(fleet: Fleet) -> list[StatusAnswer]:
        return await node_statuses(fleet)

    answers = run_client(nats_url, go)
    if as_json:
        print_json(answers)
        return
    table = Table("node", "state", "as of", "lag", "lag s", "catch-up", title="nodes")
    for a in answers:
        table.add_row(a.node, a.node_state, _kv(a.as_of), _kv(a.lag), _kv(a.lag_s), _progress(a))
    console.print(table)
    if not answers:
        fail(Exit.UNAVAILABLE, "no fleetlog node answered (is `fleetlog up` or `fleetlog serve` running?)")


def _progress(answer: StatusAnswer) -> str:
    return ", ".join(f"{c.stream} {c.folded}/{c.target}" for c in answer.catch_up)


def _kv(d: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in d.items())


@click.group()
def schemas() -> None:
    """The event contract."""


@schemas.command("export")
@click.argument("directory", type=click.Path(file_okay=False))
def export_cmd(directory: str) -> None:
    """Write the JSON Schema of every event type into DIRECTORY."""
    paths = export_schemas(directory)
    console.print(f"wrote {len(paths)} schemas to {directory}")


@click.group(invoke_without_command=True)
@click.option("--projection")
@click.option("--limit", type=int, default=50, show_default=True)
@nats_option
@json_option
@click.pass_context
def rejects(ctx: click.Context, projection: str | None, limit: int, nats_url: str | None, as_json: bool) -> None:
    """Events the projections refused, with the reason (newest first)."""
    if ctx.invoked_subcommand is not None:
        return

    async def go(fleet: Fleet) -> RejectsAnswer:
        return await fleet.rejects(projection, limit)

    answer = run_client(nats_url, go)
    if as_json:
        print_json(answer)
        return
    table = Table("projection", "stream", "seq", "subject", "reason", "data")
    for r in answer.items:
        more = f" … ({r.data_bytes} bytes: rejects show {r.seq} --raw)" if r.data_truncated or len(r.data) > 60 else ""
        table.add_row(r.projection, r.stream, str(r.seq), r.subject, r.reason, r.data[:60] + more)
    console.print(table)
    if answer.has_more:
        console.print("[dim]more rejects than fit in one reply: ask for fewer (--limit)[/dim]")


@rejects.command("show")
@click.argument("seq", type=int)
@click.option("--stream", default=None, help="the stream SEQ is in (needed if several have a reject there)")
@click.option("--projection", default=None)
@click.option("--raw", is_flag=True, help="write the exact bytes to stdout, nothing else")
@nats_option
@json_option
def show(seq: int, stream: str | None, projection: str | None, raw: bool, nats_url: str | None,
         as_json: bool) -> None:
    """One reject by its stream SEQ: the reason, and the whole payload from JetStream."""

    async def go(fleet: Fleet) -> RawReject:
        return await reject_raw(fleet, seq, stream, projection)

    got = run_client(nats_url, go)
    if raw:
        sys.stdout.buffer.write(got.data)
        sys.stdout.buffer.flush()
        return
    r = got.row
    if as_json:
        print_json({"projection": r.projection, "stream": r.stream, "seq": r.seq, "subject": r.subject,
                    "reason": r.reason, "rejected_at": r.rejected_at, "data_bytes": len(got.data),
                    "source": got.source, "data": got.data.decode("utf-8", "replace")})
        return
    console.print(f"{r.projection}: {r.stream} seq {r.seq} on {r.subject}, rejected {r.rejected_at}")
    console.print(f"reason: {r.reason}")
    console.print(f"{len(got.data)} bytes (from {got.source}); the first 2000:", markup=False)
    console.print(got.data[:2000].decode("utf-8", "replace"), markup=False, highlight=False)


@rejects.command("redrive")
@click.option("--projection", required=True)
@click.option("--limit", type=int, default=1000, show_default=True)
@nats_option
@json_option
def redrive(projection: str, limit: int, nats_url: str | None, as_json: bool) -> None:
    """Publish rejected events again on their original subjects (after fixing what refused them)."""

    async def go(fleet: Fleet) -> dict[str, int]:
        answer = await fleet.rejects(projection, limit)
        nc = await fleet.nats()
        guarded, js = Guarded(nc), nc.jetstream()
        redriven = gone = 0
        for r in answer.items:
            # The original message, byte for byte, from its stream (the answer's `data` is text).
            original = await guarded.get(r.stream, r.seq)
            if original is None:
                gone += 1
                continue
            await js.publish(r.subject, original.data)
            redriven += 1
        return {"redriven": redriven, "gone": gone}

    result = run_client(nats_url, go)
    gone = f"; {result['gone']} no longer in their stream" if result["gone"] else ""
    print_json(result) if as_json else console.print(f"re-published {result['redriven']} events{gone}")


@click.command()
@click.argument("projection")
@click.option("--wait/--no-wait", default=True, help="follow progress until the new generation is live")
@nats_option
@json_option
def rebuild(projection: str, wait: bool, nats_url: str | None, as_json: bool) -> None:
    """Rebuild PROJECTION from sequence 1 beside the live view, then swap atomically."""

    async def go(fleet: Fleet) -> dict[str, Any]:
        started = await fleet.rebuild(projection)
        if not wait:
            return started
        with FoldProgress(f"rebuild {projection}", as_json=as_json) as progress:
            while True:
                answer = await fleet.status()
                gens = [p for p in answer.projections if p.name == projection]
                mine = next((p for p in gens if p.generation == started["generation"]), None)
                if mine is None:
                    break
                # The building generation's checkpoints against the streams' last seqs (lag is their gap);
                # reported once more when live, so even a rebuild done before the first look says so.
                done = sum(mine.checkpoints.values())
                progress.update(done, done + sum(mine.lag.values()))
                if mine.state == "live":
                    break
                await asyncio.sleep(0.2)
        return {**started, "state": "live"}

    result = run_client(nats_url, go)
    print_json(result) if as_json else console.print(f"{projection}: generation {result['generation']} is live")
