"""`fleetlog replica` and `fleetlog export` (DESIGN §5): the views, folded privately.

A replica is a DuckDB file that this process folds from the streams with the same
projections and runtime as `serve`, but that nobody else writes: any tool can open it
(`duckdb PATH`, pandas, a notebook) while fleetlog keeps running. Each live table is
also reachable unqualified through a view in `main` (`SELECT * FROM attempts`). A
replica publishes nothing: its rejects stay in its own `_rejects` tables.

An export folds a replica up to the streams' current end, then writes every table as
Parquet plus `watermark.json`: the stream sequences the files contain, so a later
export (or a consumer) knows exactly where they stop.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from pathlib import Path

from fleetlog.projections import ALL, Projection
from fleetlog.services.backbone.config import FleetSettings
from fleetlog.services.backbone.link import connect_once
from fleetlog.services.projector.runtime import Projector
from fleetlog.services.projector.store import ViewStore

__all__ = ["export_views", "fold_replica"]


async def fold_replica(
    settings: FleetSettings, path: Path, *, follow: bool = False, projections: Sequence[Projection] = ALL,
    timeout_s: float | None = None,
) -> dict[str, int]:
    """Fold the views into the DuckDB file at `path` up to the streams' end as of now (and on,
    with `follow`, until cancelled); returns the folded position per stream."""
    nc = await connect_once(settings.servers(), "fleetlog-replica", timeout_s=5.0)
    store = ViewStore(path)
    projector = Projector(store, projections, settings.servers(), nc=nc, batch_max=settings.batch_max,
                          batch_wait_s=settings.batch_wait_s, max_event_bytes=settings.max_event_bytes,
                          publish_rejects=False, retention_interval_s=settings.retention_interval_s)
    try:
        js = nc.jetstream()
        ends = {s: (await js.stream_info(s)).state.last_seq for p in projections for s in p.streams}
        await projector.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while not _reached(projector, ends):
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"replica: not caught up with {ends} within {timeout_s}s")
            await asyncio.sleep(0.05)
        _publish_views(projector)
        if follow:
            while True:
                await asyncio.sleep(1.0)
                _publish_views(projector)  # a rebuild may have promoted a new generation
        return _position(projector)
    finally:
        await projector.stop()
        store.close()
        await nc.drain()


async def export_views(settings: FleetSettings, directory: Path, *, replica: Path | None = None,
                       projections: Sequence[Projection] = ALL, timeout_s: float | None = None) -> dict[str, object]:
    """Fold (into `replica`, else a file in `directory`) and write each table as Parquet
    plus watermark.json; returns the watermark."""
    await asyncio.to_thread(directory.mkdir, parents=True, exist_ok=True)
    path = replica or directory / ".replica.duckdb"
    position = await fold_replica(settings, path, projections=projections, timeout_s=timeout_s)
    return await asyncio.to_thread(_write_parquet, path, directory, projections, position)


def _write_parquet(
    path: Path, directory: Path, projections: Sequence[Projection], position: dict[str, int]
) -> dict[str, object]:
    store = ViewStore(path)
    files: dict[str, str] = {}
    try:
        cur = store.cursor(None)
        try:
            for projection in projections:
                gen = next(g for g in store.generations(projection.name) if g.state == "live")
                for table in projection.tables:
                    target = directory / f"{table}.parquet"
                    quoted = str(target).replace("'", "''")
                    cur.execute(f'COPY (SELECT * FROM "{gen.schema}"."{table}") TO \'{quoted}\' (FORMAT parquet)')
                    files[table] = target.name
        finally:
            cur.close()
    finally:
        store.close()
    watermark: dict[str, object] = {"streams": position, "files": files, "exported_at": time.time()}
    (directory / "watermark.json").write_text(json.dumps(watermark, indent=2, sort_keys=True))
    return watermark


def _reached(projector: Projector, ends: dict[str, int]) -> bool:
    running = projector.running()
    if any(r.gen.state == "building" for r in running):
        return False
    for r in running:
        if r.gen.state == "live" and any(f.checkpoint < ends.get(s, 0) for s, f in r.feeds.items()):
            return False
    return True


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
