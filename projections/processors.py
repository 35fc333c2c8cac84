"""Processor bookkeeping views: sessions, runs and locks, each the last message of its subject.

FLEET_PROCESSORS keeps one message per subject (a (processor, session file) row or its
tombstone, a run record, the lock), so each table mirrors the stream: a batch is
reduced to the last event per subject; rows get one bulk upsert from Arrow per table
and tombstones one bulk delete. A message rejected before the fold replaced its
subject's message in the stream, so `forget` drops the row (a rebuild sees only the
rejected message).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import Event
from fleetlog.schemas.processors import (
    ProcActivity,
    ProcActivityQuery,
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcessorSessionDeleted,
    ProcessorSessionMarked,
    ProcLock,
    ProcLockQuery,
    ProcRun,
    ProcRunList,
    ProcRunsQuery,
    ProcSession,
    ProcSessionList,
    ProcSessionsQuery,
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
_SESSION_COLS = "processor, session_file, username, processed_at, items_extracted, file_hash, seq"
_RUN_COLS = ("processor, run_id, session_dir, started_at, finished_at, scanned, processed, skipped, capped, errors,"
             " items_extracted, errors_detail, ok, unhandled_error, holder, seq")
_HELD = "state IN ('acquired', 'renewed') AND lease_expires_at > ?"


class ProcessorsProjection(Projection):
    name: ClassVar[str] = "processors"
    version: ClassVar[int] = 2  # 2: (processor, session file) rows and run audit records replace file markers
    streams: ClassVar[tuple[str, ...]] = ("FLEET_PROCESSORS",)
    event_types: ClassVar[tuple[type[Event], ...]] = (ProcessorSessionMarked, ProcessorSessionDeleted,
                                                      ProcessorRunRecorded, ProcessorLockChanged)
    tables: ClassVar[tuple[str, ...]] = ("proc_sessions", "proc_runs", "proc_locks")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS proc_sessions (
                processor VARCHAR NOT NULL,
                session_file VARCHAR NOT NULL,
                username VARCHAR NOT NULL,
                processed_at TIMESTAMP,              -- naive UTC, as the store compared it
                items_extracted BIGINT NOT NULL,
                file_hash VARCHAR NOT NULL,
                fence BIGINT,
                seq BIGINT NOT NULL,
                subject VARCHAR NOT NULL,
                PRIMARY KEY (processor, session_file)
            )""",
            """CREATE TABLE IF NOT EXISTS proc_runs (
                processor VARCHAR NOT NULL,
                run_id VARCHAR NOT NULL,
                session_dir VARCHAR NOT NULL,
                started_at DOUBLE,
                finished_at DOUBLE,
                scanned BIGINT NOT NULL,
                processed BIGINT NOT NULL,
                skipped BIGINT NOT NULL,
                capped BIGINT NOT NULL,
                errors BIGINT NOT NULL,
                items_extracted BIGINT NOT NULL,
                errors_detail JSON NOT NULL,
                ok BOOLEAN NOT NULL,
                unhandled_error VARCHAR,
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
        marks = [s for s in last.values() if isinstance(s.event, ProcessorSessionMarked)]
        tombstones = [s.subject for s in last.values() if isinstance(s.event, ProcessorSessionDeleted)]
        runs = [s for s in last.values() if isinstance(s.event, ProcessorRunRecorded)]
        locks = [s for s in last.values() if isinstance(s.event, ProcessorLockChanged)]
        if tombstones:
            _delete_subjects(con, ("proc_sessions",), tombstones)
        for table, rows in (("proc_sessions", _session_rows(marks)), ("proc_runs", _run_rows(runs)),
                            ("proc_locks", _lock_rows(locks))):
            if rows is None:
                continue
            # read by name in the SQL below (a replacement scan: projections/_base.py)
            _fleetlog_proc_rows = rows
            # one row per key in the batch: INSERT OR REPLACE is the whole upsert
            con.execute(f"INSERT OR REPLACE INTO {table} SELECT * FROM _fleetlog_proc_rows")

    def forget(self, con: duckdb.DuckDBPyConnection, rejected: Sequence[tuple[str, int]]) -> None:
        _delete_subjects(con, self.tables, [s for s, _ in rejected])

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("sessions", ProcSessionsQuery, _sessions,
                     "a processor's bookkeeping rows: the named session files, or all of them, paged"),
            Endpoint("activity", ProcActivityQuery, _activity, "last processed_at and items extracted since a time"),
            Endpoint("runs", ProcRunsQuery, _runs, "a processor's run records, newest first"),
            Endpoint("lock", ProcLockQuery, _lock, "a processor's lock"),
            Endpoint("summary", ProcSummaryQuery, _summary, "every processor: sessions, last run, lock"),
        )


def _delete_subjects(con: duckdb.DuckDBPyConnection, tables: Sequence[str], subjects: list[str]) -> None:
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_proc_forget = pa.table({"subject": pa.array(subjects, pa.string())})
    for table in tables:
        con.execute(f"DELETE FROM {table} USING _fleetlog_proc_forget f WHERE {table}.subject = f.subject")


def _session_rows(items: list[StoredEvent]) -> pa.Table | None:
    if not items:
        return None
    ev: list[ProcessorSessionMarked] = [s.event for s in items]  # type: ignore[misc]
    return pa.table({
        "processor": pa.array([e.processor for e in ev], pa.string()),
        "session_file": pa.array([e.session_file for e in ev], pa.string()),
        "username": pa.array([e.username for e in ev], pa.string()),
        "processed_at": pa.array([_naive(e.processed_at) for e in ev], pa.timestamp("us")),
        "items_extracted": pa.array([e.items_extracted for e in ev], pa.int64()),
        "file_hash": pa.array([e.file_hash for e in ev], pa.string()),
        "fence": pa.array([e.fence for e in ev], pa.int64()),
        "seq": pa.array([s.seq for s in items], pa.int64()),
        "subject": pa.array([s.subject for s in items], pa.string()),
    })


def _naive(at: datetime | None) -> datetime | None:
    """The store compared naive UTC; an event from a foreign writer may carry an offset."""
    if at is None or at.tzinfo is None:
        return at
    return at.astimezone(UTC).replace(tzinfo=None)


def _run_rows(items: list[StoredEvent]) -> pa.Table | None:
    if not items:
        return None
    ev: list[ProcessorRunRecorded] = [s.event for s in items]  # type: ignore[misc]
    return pa.table({
        "processor": pa.array([e.processor for e in ev], pa.string()),
        "run_id": pa.array([e.run_id for e in ev], pa.string()),
        "session_dir": pa.array([e.session_dir for e in ev], pa.string()),
        "started_at": pa.array([e.started_at for e in ev], pa.float64()),
        "finished_at": pa.array([e.finished_at for e in ev], pa.float64()),
        **{k: pa.array([getattr(e, k) for e in ev], pa.int64())
           for k in ("scanned", "processed", "skipped", "capped", "errors", "items_extracted")},
        "errors_detail": pa.array([_json.encode(e.errors_detail).decode() for e in ev], pa.string()),
        "ok": pa.array([e.ok for e in ev], pa.bool_()),
        "unhandled_error": pa.array([e.unhandled_error for e in ev], pa.string()),
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


def _session(r: tuple[Any, ...]) -> ProcSession:
    return ProcSession(processor=r[0], session_file=r[1], username=r[2], processed_at=r[3], items_extracted=r[4],
                       file_hash=r[5], seq=r[6])


def _run_view(r: tuple[Any, ...]) -> ProcRun:
    return ProcRun(processor=r[0], run_id=r[1], session_dir=r[2], started_at=r[3], finished_at=r[4], scanned=r[5],
                   processed=r[6], skipped=r[7], capped=r[8], errors=r[9], items_extracted=r[10],
                   errors_detail=_loads(r[11]), ok=r[12], unhandled_error=r[13], holder=r[14], seq=r[15])


async def _sessions(ctx: QueryContext, req: ProcSessionsQuery) -> ProcSessionList:
    files = list(dict.fromkeys(req.session_files)) if req.session_files is not None else None

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        if files is not None:
            if not files:
                return []
            # A list parameter, not a registered Arrow table: the query service's long-lived
            # reader cursors may still hold a previous result, which `register` refuses.
            return cur.execute(f"SELECT {_SESSION_COLS} FROM proc_sessions WHERE processor = ?"
                               " AND session_file IN (SELECT unnest(?)) ORDER BY session_file",
                               [req.processor, files]).fetchall()
        return cur.execute(f"SELECT {_SESSION_COLS} FROM proc_sessions WHERE processor = ? AND session_file > ?"
                           " ORDER BY session_file LIMIT ?", [req.processor, req.after or "", req.limit + 1]).fetchall()

    rows = await ctx.read(run)
    if files is not None:
        return ProcSessionList(items=[_session(r) for r in rows])
    items = [_session(r) for r in rows[: req.limit]]
    return ProcSessionList(items=items, next_cursor=items[-1].session_file if len(rows) > req.limit else None)


async def _activity(ctx: QueryContext, req: ProcActivityQuery) -> ProcActivity:
    since = _naive(req.since)

    def run(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
        return cur.execute("SELECT max(processed_at), coalesce(sum(items_extracted), 0), count(*) FROM proc_sessions"
                           " WHERE processor = ? AND (CAST(? AS TIMESTAMP) IS NULL OR processed_at >= ?)",
                           [req.processor, since, since]).fetchone()

    row = await ctx.read(run)
    assert row is not None  # an aggregate always has its one row
    return ProcActivity(last_processed_at=row[0], items_extracted=int(row[1]), sessions=int(row[2]))


async def _runs(ctx: QueryContext, req: ProcRunsQuery) -> ProcRunList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT {_RUN_COLS} FROM proc_runs WHERE processor = ? AND seq < ? AND (? IS NULL OR run_id = ?)"
            " ORDER BY seq DESC LIMIT ?",
            [req.processor, req.before_seq or (1 << 62), req.run_id, req.run_id, req.limit + 1]).fetchall()

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
        names = cur.execute("SELECT processor FROM proc_sessions UNION SELECT processor FROM proc_runs"
                            " UNION SELECT processor FROM proc_locks ORDER BY 1").fetchall()
        sessions = cur.execute("SELECT processor, count(*), coalesce(sum(items_extracted), 0), max(processed_at)"
                               " FROM proc_sessions GROUP BY ALL").fetchall()
        runs = cur.execute(f"SELECT count(*) OVER (PARTITION BY processor), {_RUN_COLS} FROM proc_runs"
                           " QUALIFY row_number() OVER (PARTITION BY processor ORDER BY seq DESC) = 1").fetchall()
        locks = cur.execute(f"SELECT processor, holder FROM proc_locks WHERE {_HELD}", [now]).fetchall()
        return names, sessions, runs, locks

    names, sessions, runs, locks = await ctx.read(run)
    rows = {r[0]: r[1:] for r in sessions}
    last = {r[1]: (r[0], _run_view(r[1:])) for r in runs}
    holders = dict(locks)
    return ProcSummaryList(items=[
        ProcSummary(processor=p, sessions=int(rows[p][0]) if p in rows else 0,
                    items_extracted=int(rows[p][1]) if p in rows else 0,
                    last_processed_at=rows[p][2] if p in rows else None,
                    runs=last[p][0] if p in last else 0, last_run=last[p][1] if p in last else None,
                    lock_holder=holders.get(p))
        for (p,) in names
    ])


PROJECTION = ProcessorsProjection()
