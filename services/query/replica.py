"""`fleetlog replica` and `fleetlog export` (DESIGN §5): the views, folded privately.

A replica is a DuckDB file that this process folds from the streams with the same
projections and runtime as `serve`, and that other processes read while it runs.
DuckDB lets one process open a file for writing and then no other may open it at all,
so the fold never happens in that file: it happens in a private working file beside
it (`<file>.folding`), and the replica publishes a consistent read-only copy to
`<file>`: `COPY FROM DATABASE` into a temporary file (one transaction, so the copy is
one point of the fold, never half a batch), then `os.replace` onto `<file>`. A reader
opens `<file>` with `read_only=True`; one that has it open keeps reading the copy it
opened (the old inode), and the next open sees the newest. A copy is published once
caught up and, with `follow`, every `interval_s` while something new was folded.

Each copy carries `fleetlog_replica` (stream, seq, stream_last_seq, copy,
published_at): the stream sequences its tables contain. Each live table is reachable
unqualified through a view in `main` (`SELECT * FROM attempts`). A replica publishes
nothing to NATS: its rejects stay in its own `_rejects` tables.

An export folds a replica up to the streams' current end, then writes every table as
Parquet plus `watermark.json`: the stream sequences the files contain, so a later
export (or a consumer) knows exactly where they stop.
"""

from __future__ import annotations

import asyncio
import glob
import json
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import duckdb
from fleetlog.projections import ALL, Projection
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.link import connect_once
from fleetlog.services.projector.runtime import Projector
from fleetlog.services.projector.store import CATALOG, ViewStore
from nats.js import JetStreamContext

__all__ = ["ReplicaProgress", "export_views", "fold_replica", "working_path"]

_COPY = "fleetlog_replica_copy"  # the temporary file's catalog name while a copy is written


@dataclass
class ReplicaProgress:
    """One published copy: per stream (folded seq, the stream's last seq), rows per table."""

    path: Path
    copies: int
    streams: dict[str, tuple[int, int]] = field(default_factory=dict)
    rows: dict[str, int] = field(default_factory=dict)
    copy_s: float = 0.0

    @property
    def position(self) -> dict[str, int]:
        return {s: folded for s, (folded, _) in self.streams.items()}


def working_path(path: Path) -> Path:
    """The private file the replica folds into (DuckDB's `.wal` and `.tmp` sit beside it)."""
    return path.with_name(path.name + ".folding")


async def fold_replica(
    settings: FleetSettings, path: Path, *, follow: bool = False, projections: Sequence[Projection] = ALL,
    timeout_s: float | None = None, interval_s: float = 5.0,
    on_progress: Callable[[ReplicaProgress], None] | None = None,
    on_fold: Callable[[int, int], None] | None = None,
) -> dict[str, int]:
    """Fold the views up to the streams' end as of now and publish a copy at `path` (and on,
    with `follow`, until cancelled: a new copy every `interval_s` when something was folded);
    returns the folded position per stream of the last copy. `on_fold(folded, target)` is
    called while catching up (sequences summed over every generation's feeds)."""
    working = working_path(path)
    await asyncio.to_thread(_seed, path, working)
    nc = await connect_once(settings.servers(), "fleetlog-replica", timeout_s=5.0)
    store = ViewStore(working)
    projector = Projector(store, projections, settings.servers(), nc=nc, batch_max=settings.batch_max,
                          batch_wait_s=settings.batch_wait_s, max_event_bytes=settings.max_event_bytes,
                          publish_rejects=False, retention_interval_s=settings.retention_interval_s)
    copying: list[asyncio.Future[ReplicaProgress]] = []
    try:
        # The working file is ours now (DuckDB's lock): a copy left by a killed replica is garbage.
        await asyncio.to_thread(_remove_stale_copies, path)
        js = nc.jetstream()
        streams = sorted({s for p in projections for s in p.streams})
        ends = await _last_seqs(js, streams)
        await projector.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not _reached(projector, ends):
            if on_fold is not None:
                on_fold(*_fold_progress(projector, ends))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"replica: not caught up with {ends} within {timeout_s}s")
            await asyncio.sleep(0.05)
        if on_fold is not None:
            on_fold(*_fold_progress(projector, ends))

        async def publish(copies: int) -> ReplicaProgress:
            _publish_views(projector)  # a rebuild may have promoted a new generation
            job = asyncio.ensure_future(asyncio.to_thread(_publish_copy, store, projections, path, copies))
            copying[:] = [job]
            progress = await asyncio.shield(job)
            lasts = await _last_seqs(js, streams)  # read after the copy: never below what it holds
            progress.streams = {s: (folded, lasts.get(s, 0)) for s, (folded, _) in progress.streams.items()}
            if on_progress is not None:
                on_progress(progress)
            return progress

        published = _folded(projector)
        progress = await publish(1)
        while follow:
            await asyncio.sleep(interval_s)
            now = _folded(projector)
            if now != published:  # nothing new folded: the copy there is still exact
                published = now
                progress = await publish(progress.copies + 1)
        return progress.position
    finally:
        if copying:  # Ctrl-C during a copy: its thread cannot be cancelled, and it uses the store
            await asyncio.wait(copying)
        await projector.stop()
        store.close()
        await nc.drain()


async def export_views(settings: FleetSettings, directory: Path, *, replica: Path | None = None,
                       projections: Sequence[Projection] = ALL, timeout_s: float | None = None,
                       on_fold: Callable[[int, int], None] | None = None) -> dict[str, object]:
    """Fold (into `replica`, else a file in `directory`) and write each table as Parquet
    plus watermark.json; returns the watermark."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    path = replica or directory / ".replica.duckdb"
    position = await fold_replica(settings, path, projections=projections, timeout_s=timeout_s, on_fold=on_fold)
    return await asyncio.to_thread(_write_parquet, path, directory, projections, position)


def _write_parquet(
    path: Path, directory: Path, projections: Sequence[Projection], position: dict[str, int]
) -> dict[str, object]:
    files: dict[str, str] = {}
    con = duckdb.connect(str(path), read_only=True)  # the published copy; the fold goes on elsewhere
    try:
        for projection in projections:
            row = con.execute("SELECT schema_name FROM fleetlog_generations WHERE name = ? AND state = 'live'",
                              [projection.name]).fetchone()
            assert row is not None, f"no live generation of {projection.name} in {path}"
            for table in projection.tables:
                target = directory / f"{table}.parquet"
                quoted = str(target).replace("'", "''")
                con.execute(f'COPY (SELECT * FROM "{row[0]}"."{table}") TO \'{quoted}\' (FORMAT parquet)')
                files[table] = target.name
    finally:
        con.close()
    watermark: dict[str, object] = {"streams": position, "files": files, "exported_at": time.time()}
    (directory / "watermark.json").write_text(json.dumps(watermark, indent=2, sort_keys=True))
    return watermark


def _seed(path: Path, working: Path) -> None:
    """No working file but a replica at `path` (made before, or the working file deleted): go on
    from that replica (its WAL too, if it was written in place) rather than fold it all again."""
    if working.exists() or not path.exists():
        return
    shutil.copyfile(path, working)
    wal = Path(str(path) + ".wal")
    if wal.exists():
        shutil.copyfile(wal, Path(str(working) + ".wal"))


def _remove_stale_copies(path: Path) -> None:
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.copy*"):
        stale.unlink(missing_ok=True)


def _publish_copy(store: ViewStore, projections: Sequence[Projection], path: Path, number: int) -> ReplicaProgress:
    """Copy the working file's views to a temporary file and move it onto `path` atomically."""
    started = time.monotonic()
    tmp = path.with_name(f".{path.name}.{os.getpid()}.copy")
    for stale in (tmp, Path(str(tmp) + ".wal")):  # a copy of this run that failed half-way
        stale.unlink(missing_ok=True)
    cur = store.cursor(None)
    try:
        cur.execute(f"ATTACH '{_quoted(tmp)}' AS {_COPY}")
        try:
            # One statement, one transaction: the copy is the fold at one point, whatever commits meanwhile.
            cur.execute(f"COPY FROM DATABASE {CATALOG} TO {_COPY}")
            streams, rows = _watermark(cur, projections)
            cur.execute(f"""CREATE OR REPLACE TABLE {_COPY}.main.fleetlog_replica (
                stream VARCHAR, seq BIGINT, copy BIGINT, published_at TIMESTAMPTZ)""")
            names = sorted(streams)
            cur.execute(f"INSERT INTO {_COPY}.main.fleetlog_replica SELECT unnest(?), unnest(?), ?, now()",
                        [names, [streams[s] for s in names], number])
        finally:
            cur.execute(f"DETACH {_COPY}")  # checkpoints it: the copy is one file, no WAL
    finally:
        cur.close()
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the rename must never publish a file whose bytes are not on disk
    Path(str(path) + ".wal").unlink(missing_ok=True)  # a WAL left by a replica written in place
    os.replace(tmp, path)
    return ReplicaProgress(path=path, copies=number, streams={s: (seq, 0) for s, seq in streams.items()},
                           rows=rows, copy_s=time.monotonic() - started)


def _watermark(
    cur: duckdb.DuckDBPyConnection, projections: Sequence[Projection]
) -> tuple[dict[str, int], dict[str, int]]:
    """What the copy holds: per stream the lowest checkpoint of the live generations, rows per table."""
    live = dict(cur.execute(f"SELECT name, schema_name FROM {_COPY}.main.fleetlog_generations "
                            "WHERE state = 'live'").fetchall())
    streams: dict[str, int] = {}
    rows: dict[str, int] = {}
    for projection in projections:
        schema = live.get(projection.name)
        if schema is None:
            continue
        for stream, seq in cur.execute(f"SELECT stream, seq FROM {_COPY}.main.fleetlog_checkpoints "
                                       "WHERE schema_name = ?", [schema]).fetchall():
            streams[stream] = min(streams.get(stream, seq), int(seq))
        for table in projection.tables:
            count = cur.execute(f'SELECT count(*) FROM {_COPY}."{schema}"."{table}"').fetchone()
            rows[table] = int(count[0]) if count else 0
    return streams, rows


async def _last_seqs(js: JetStreamContext, streams: Sequence[str]) -> dict[str, int]:
    return {s: (await js.stream_info(s)).state.last_seq for s in streams}


def _quoted(path: Path) -> str:
    return str(path).replace("'", "''")


def _folded(projector: Projector) -> tuple[dict[str, int], list[str]]:
    """What a copy would hold: the position, and which generations are live."""
    return _position(projector), [r.gen.schema for r in projector.running() if r.gen.state == "live"]


def _reached(projector: Projector, ends: dict[str, int]) -> bool:
    running = projector.running()
    if any(r.gen.state == "building" for r in running):
        return False
    for r in running:
        if r.gen.state == "live" and any(f.checkpoint < ends.get(s, 0) for s, f in r.feeds.items()):
            return False
    return True


def _fold_progress(projector: Projector, ends: dict[str, int]) -> tuple[int, int]:
    """(folded, target): every running generation's checkpoints against the ends caught up to."""
    folded = target = 0
    for r in projector.running():
        for s, f in r.feeds.items():
            end = ends.get(s, 0)
            folded += min(f.checkpoint, end)
            target += end
    return folded, target


def _position(projector: Projector) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in projector.running():
        if r.gen.state == "live":
            for s, f in r.feeds.items():
                out[s] = min(out.get(s, f.checkpoint), f.checkpoint)
    return out


def _publish_views(projector: Projector) -> None:
    """`main.<table>` views onto the live generation's tables (names without the schema)."""
    store = projector.store
    with projector.folder.write_lock:
        cur = store.cursor(None)
        try:
            for r in projector.running():
                if r.gen.state != "live":
                    continue
                for table in r.projection.tables:
                    cur.execute(f'CREATE OR REPLACE VIEW main."{table}" AS SELECT * FROM "{r.gen.schema}"."{table}"')
        finally:
            cur.close()
