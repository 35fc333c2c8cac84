"""Processor bookkeeping views: files, runs and locks, each the last message of its subject.

FLEET_PROCESSORS keeps one message per subject (a file of a processor, a run, the
lock), so each table mirrors the stream: a batch is reduced to the last event per
subject, and each table gets one bulk upsert from Arrow. A message rejected before
the fold replaced its subject's message in the stream, so `forget` drops the row
(a rebuild sees only the rejected message).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import Event
from fleetlog.schemas.processors import (
    ProcessorFileMarked,
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcFile,
    ProcFileList,
    ProcFileQuery,
    ProcFilesQuery,
    ProcLock,
    ProcLockQuery,
    ProcRun,
    ProcRunList,
    ProcRunQuery,
    ProcRunsQuery,
    ProcSeen,
    ProcSeenQuery,
    ProcSummary,
    ProcSummaryList,
    ProcSummaryQuery,
)

from ._base import Endpoint, Projection, QueryContext, StoredEvent

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "ProcessorsProjection"]

_json = msgspec.json.Encoder()
_loads = msgspec.json.decode
_FILE_COLS = "processor, file_hash, file_path, status, size, detail, run_id, CAST(epoch(ts_utc) AS BIGINT), seq"
_RUN_COLS = ("processor, run_id, status, started_at, finished_at, files_total, files_ok, files_failed, detail,"
             " holder, seq")
_HELD = "state IN ('acquired', 'renewed') AND lease_expires_at > ?"


class ProcessorsProjection(Projection):
    name: ClassVar[str] = "processors"
    version: ClassVar[int] = 1
    streams: ClassVar[tuple[str, ...]] = ("FLEET_PROCESSORS",)
    event_types: ClassVar[tuple[type[Event], ...]] = (ProcessorFileMarked, ProcessorRunRecorded,
                                                      ProcessorLockChanged)
    tables: ClassVar[tuple[str, ...]] = ("proc_files", "proc_runs", "proc_locks")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS proc_files (
                processor VARCHAR NOT NULL,
                file_hash VARCHAR NOT NULL,
                file_path VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                size BIGINT,
                detail JSON NOT NULL,
                run_id VARCHAR,
                ts_utc TIMESTAMPTZ NOT NULL,
                seq BIGINT NOT NULL,
                subject VARCHAR NOT NULL,
                PRIMARY KEY (processor, file_hash)
            )""",
            """CREATE TABLE IF NOT EXISTS proc_runs (
                processor VARCHAR NOT NULL,
                run_id VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                started_at BIGINT,
                finished_at BIGINT,
                files_total BIGINT NOT NULL,
                files_ok BIGINT NOT NULL,
                files_failed BIGINT NOT NULL,
                detail JSON NOT NULL,
                holder VARCHAR,
                seq BIGINT NOT NULL,
                subject VARCHAR NOT NULL,
                PRIMARY KEY (processor, run_id)
            )""",
            """CREATE TABLE IF NOT EXISTS proc_locks (
                processor VARCHAR NOT NULL PRIMARY KEY,
                holder VARCHAR,
                state VARCHAR NOT NULL,
                fence BIGINT NOT NULL,             -- seq of the acquired message of this tenure
                lease_expires_at DOUBLE,
                seq BIGINT NOT NULL,
                subject VARCHAR NOT NULL
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> None:
        last: dict[str, StoredEvent] = {}
        for stored in batch:
            last.pop(stored.subject, None)  # keep stream order of the survivors
            last[stored.subject] = stored
        files = [s for s in last.values() if isinstance(s.event, ProcessorFileMarked)]
        runs = [s for s in last.values() if isinstance(s.event, ProcessorRunRecorded)]
        locks = [s for s in last.values() if isinstance(s.event, ProcessorLockChanged)]
        for table, rows in (("proc_files", _file_rows(files)), ("proc_runs", _run_rows(runs)),
                            ("proc_locks", _lock_rows(locks))):
            if rows is None:
                continue
            con.register("_fleetlog_proc_rows", rows)
            try:
                # one row per key in the batch: INSERT OR REPLACE is the whole upsert
                con.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM _fleetlog_proc_rows")
            finally:
                con.unregister("_fleetlog_proc_rows")

    def forget(self, con: duckdb.DuckDBPyConnection, rejected: Sequence[tuple[str, int]]) -> None:
        con.register("_fleetlog_proc_forget", pa.table({"subject": pa.array([s for s, _ in rejected], pa.string())}))
        try:
            for table in self.tables:
                con.execute(f"DELETE FROM {table} USING _fleetlog_proc_forget f WHERE {table}.subject = f.subject")
        finally:
            con.unregister("_fleetlog_proc_forget")

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("file", ProcFileQuery, _file_endpoint, "one file's marker (empty when none)"),
            Endpoint("files", ProcFilesQuery, _files, "a processor's files by hash, filtered, paged"),
            Endpoint("seen", ProcSeenQuery, _seen, "the status of each of up to 10,000 file hashes"),
            Endpoint("run", ProcRunQuery, _run, "one run (empty when none)"),
            Endpoint("runs", ProcRunsQuery, _runs, "a processor's runs, most recently updated first"),
            Endpoint("lock", ProcLockQuery, _lock, "a processor's lock"),
            Endpoint("summary", ProcSummaryQuery, _summary, "every processor: file counts, last run, lock"),
        )


def _file_rows(items: list[StoredEvent]) -> pa.Table | None:
    if not items:
        return None
    ev: list[ProcessorFileMarked] = [s.event for s in items]  # type: ignore[misc]
    return pa.table({
        "processor": pa.array([e.processor for e in ev], pa.string()),
        "file_hash": pa.array([e.file_hash for e in ev], pa.string()),
        "file_path": pa.array([e.file_path for e in ev], pa.string()),
        "status": pa.array([e.status for e in ev], pa.string()),
        "size": pa.array([e.size for e in ev], pa.int64()),
        "detail": pa.array([_json.encode(e.detail).decode() for e in ev], pa.string()),
        "run_id": pa.array([e.run_id for e in ev], pa.string()),
        "ts_utc": pa.array([s.at for s in items], pa.timestamp("us", tz="UTC")),
        "seq": pa.array([s.seq for s in items], pa.int64()),
        "subject": pa.array([s.subject for s in items], pa.string()),
    })


def _run_rows(items: list[StoredEvent]) -> pa.Table | None:
    if not items:
        return None
    ev: list[ProcessorRunRecorded] = [s.event for s in items]  # type: ignore[misc]
    return pa.table({
        "processor": pa.array([e.processor for e in ev], pa.string()),
        "run_id": pa.array([e.run_id for e in ev], pa.string()),
        "status": pa.array([e.status for e in ev], pa.string()),
        "started_at": pa.array([e.started_at for e in ev], pa.int64()),
        "finished_at": pa.array([e.finished_at for e in ev], pa.int64()),
        "files_total": pa.array([e.files_total for e in ev], pa.int64()),
        "files_ok": pa.array([e.files_ok for e in ev], pa.int64()),
        "files_failed": pa.array([e.files_failed for e in ev], pa.int64()),
        "detail": pa.array([_json.encode(e.detail).decode() for e in ev], pa.string()),
        "holder": pa.array([e.holder for e in ev], pa.string()),
        "seq": pa.array([s.seq for s in items], pa.int64()),
        "subject": pa.array([s.subject for s in items], pa.string()),
    })


def _lock_rows(items: list[StoredEvent]) -> pa.Table | None:
    if not items:
        return None
    ev: list[ProcessorLockChanged] = [s.event for s in items]  # type: ignore[misc]
    return pa.table({
        "processor": pa.array([e.processor for e in ev], pa.string()),
        "holder": pa.array([e.holder for e in ev], pa.string()),
        "state": pa.array([e.state for e in ev], pa.string()),
        "fence": pa.array([s.seq if e.fence is None else e.fence for s, e in zip(items, ev, strict=True)],
                          pa.int64()),
        "lease_expires_at": pa.array([e.lease_expires_at for e in ev], pa.float64()),
        "seq": pa.array([s.seq for s in items], pa.int64()),
        "subject": pa.array([s.subject for s in items], pa.string()),
    })


def _file(r: tuple[Any, ...]) -> ProcFile:
    return ProcFile(processor=r[0], file_hash=r[1], file_path=r[2], status=r[3], size=r[4], detail=_loads(r[5]),
                    run_id=r[6], updated_at=r[7], seq=r[8])


def _run_view(r: tuple[Any, ...]) -> ProcRun:
    return ProcRun(processor=r[0], run_id=r[1], status=r[2], started_at=r[3], finished_at=r[4], files_total=r[5],
                   files_ok=r[6], files_failed=r[7], detail=_loads(r[8]), holder=r[9], seq=r[10])


async def _file_endpoint(ctx: QueryContext, req: ProcFileQuery) -> ProcFileList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(f"SELECT {_FILE_COLS} FROM proc_files WHERE processor = ? AND file_hash = ?",
                           [req.processor, req.file_hash]).fetchall()

    items = [_file(r) for r in await ctx.read(run)]
    return ProcFileList(items=items, total_count=len(items))


async def _files(ctx: QueryContext, req: ProcFilesQuery) -> ProcFileList:
    where = ["processor = ?"]
    params: list[Any] = [req.processor]
    if req.statuses:
        where.append(f"status IN ({', '.join('?' for _ in req.statuses)})")
        params += req.statuses
    if req.run_id is not None:
        where.append("run_id = ?")
        params.append(req.run_id)
    filters = " AND ".join(where)

    def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[tuple[Any, ...]], int]:
        page_where = filters + (" AND file_hash > ?" if req.after is not None else "")
        page_params = params + ([req.after] if req.after is not None else [])
        rows = cur.execute(f"SELECT {_FILE_COLS} FROM proc_files WHERE {page_where} ORDER BY file_hash LIMIT ?",
                           [*page_params, req.limit + 1]).fetchall()
        total = cur.execute(f"SELECT count(*) FROM proc_files WHERE {filters}", params).fetchone()
        return rows, int(total[0]) if total else 0

    rows, total = await ctx.read(run)
    items = [_file(r) for r in rows[: req.limit]]
    return ProcFileList(items=items, next_cursor=items[-1].file_hash if len(rows) > req.limit else None,
                        total_count=total)


async def _seen(ctx: QueryContext, req: ProcSeenQuery) -> ProcSeen:
    hashes = list(dict.fromkeys(req.file_hashes))

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        if not hashes:
            return []
        # A list parameter, not a registered Arrow table: the query service's long-lived
        # reader cursors may still hold a previous result, which `register` refuses.
        return cur.execute(
            "SELECT file_hash, status FROM proc_files WHERE processor = ? AND file_hash IN (SELECT unnest(?))",
            [req.processor, hashes]).fetchall()

    return ProcSeen(statuses=dict(await ctx.read(run)))


async def _run(ctx: QueryContext, req: ProcRunQuery) -> ProcRunList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(f"SELECT {_RUN_COLS} FROM proc_runs WHERE processor = ? AND run_id = ?",
                           [req.processor, req.run_id]).fetchall()

    return ProcRunList(items=[_run_view(r) for r in await ctx.read(run)])


async def _runs(ctx: QueryContext, req: ProcRunsQuery) -> ProcRunList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT {_RUN_COLS} FROM proc_runs WHERE processor = ? AND seq < ? ORDER BY seq DESC LIMIT ?",
            [req.processor, req.before_seq or (1 << 62), req.limit + 1]).fetchall()

    rows = await ctx.read(run)
    items = [_run_view(r) for r in rows[: req.limit]]
    return ProcRunList(items=items, next_cursor=items[-1].seq if len(rows) > req.limit else None)


async def _lock(ctx: QueryContext, req: ProcLockQuery) -> ProcLock:
    now = time.time() if req.now is None else req.now

    def run(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
        return cur.execute(
            f"SELECT holder, state, fence, lease_expires_at, seq, {_HELD} FROM proc_locks WHERE processor = ?",
            [now, req.processor]).fetchone()

    row = await ctx.read(run)
    if row is None:
        return ProcLock(processor=req.processor)
    return ProcLock(processor=req.processor, holder=row[0], state=row[1], fence=row[2], lease_expires_at=row[3],
                    seq=row[4], held=bool(row[5]))


async def _summary(ctx: QueryContext, req: ProcSummaryQuery) -> ProcSummaryList:
    now = time.time() if req.now is None else req.now

    def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[tuple[Any, ...]], ...]:
        names = cur.execute("SELECT processor FROM proc_files UNION SELECT processor FROM proc_runs"
                            " UNION SELECT processor FROM proc_locks ORDER BY 1").fetchall()
        files = cur.execute("SELECT processor, status, count(*) FROM proc_files GROUP BY ALL ORDER BY ALL").fetchall()
        runs = cur.execute(f"SELECT count(*) OVER (PARTITION BY processor), {_RUN_COLS} FROM proc_runs"
                           " QUALIFY row_number() OVER (PARTITION BY processor ORDER BY seq DESC) = 1").fetchall()
        locks = cur.execute(f"SELECT processor, holder FROM proc_locks WHERE {_HELD}", [now]).fetchall()
        return names, files, runs, locks

    names, files, runs, locks = await ctx.read(run)
    counts: dict[str, dict[str, int]] = {}
    for processor, status, n in files:
        counts.setdefault(processor, {})[status] = n
    last = {r[1]: (r[0], _run_view(r[1:])) for r in runs}
    holders = dict(locks)
    return ProcSummaryList(items=[
        ProcSummary(processor=p, files=counts.get(p, {}), runs=last[p][0] if p in last else 0,
                    last_run=last[p][1] if p in last else None, lock_holder=holders.get(p))
        for (p,) in names
    ])


PROJECTION = ProcessorsProjection()
