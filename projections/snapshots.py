"""The host snapshot views: every snapshot still in FLEET_SNAPSHOTS, and every diff in FLEET_DIFFS.

Both streams only grow (max age, no per-subject limit), so both tables are
append-only: a bulk insert per batch, deduplicated on the event id, and rows
trimmed by stream sequence when their messages age out. Diffs are *folded*
here, never made: the snapshot differ reactor publishes them, so a rebuild of
this view re-reads them and emits nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import Event
from fleetlog.schemas.snapshots import (
    DiffList,
    DiffRow,
    DiffsQuery,
    HostSnapshot,
    SnapshotDiff,
    SnapshotDiffAnswer,
    SnapshotDiffQuery,
    SnapshotGetQuery,
    SnapshotHistoryQuery,
    SnapshotList,
    SnapshotRow,
    SnapshotsLatestQuery,
    diff_data,
)

from ._base import Endpoint, Projection, QueryContext, StoredEvent, insert_new_by_id

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "SnapshotsProjection"]

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"

_json = msgspec.json.Encoder()
_loads = msgspec.json.decode
_SNAPSHOT_COLUMNS = "CAST(id AS UUID), seq, host, agent, ts, ts_utc, json(data)"
_DIFF_COLUMNS = ("CAST(id AS UUID), seq, host, agent, from_seq, to_seq, snapshot_ts, json(added), json(removed),"
                 " json(changed), changes, truncated")
_ROW = "host, agent, seq, CAST(id AS VARCHAR), ts, CAST(epoch(ts_utc) AS BIGINT), data"


class SnapshotsProjection(Projection):
    name: ClassVar[str] = "snapshots"
    version: ClassVar[int] = 2  # 2: snapshot_diffs.truncated
    streams: ClassVar[tuple[str, ...]] = (SNAPSHOTS, DIFFS)
    event_types: ClassVar[tuple[type[Event], ...]] = (HostSnapshot, SnapshotDiff)
    tables: ClassVar[tuple[str, ...]] = ("snapshots", "snapshot_diffs")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS snapshots (
                id UUID NOT NULL,
                seq BIGINT NOT NULL,          -- FLEET_SNAPSHOTS sequence
                host VARCHAR NOT NULL,
                agent VARCHAR NOT NULL,
                ts VARCHAR NOT NULL,          -- as published
                ts_utc TIMESTAMPTZ NOT NULL,
                data JSON NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS snapshot_diffs (
                id UUID NOT NULL,
                seq BIGINT NOT NULL,          -- FLEET_DIFFS sequence
                host VARCHAR NOT NULL,
                agent VARCHAR NOT NULL,
                from_seq BIGINT,              -- base snapshot (FLEET_SNAPSHOTS seq); NULL: none
                to_seq BIGINT NOT NULL,
                snapshot_ts VARCHAR,
                added JSON NOT NULL,
                removed JSON NOT NULL,
                changed JSON NOT NULL,
                changes INTEGER NOT NULL,     -- paths added + removed + changed
                truncated BOOLEAN NOT NULL    -- too large to publish: the lists are empty
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> None:
        # The runtime folds one stream's batch at a time: all snapshots or all diffs.
        snaps = [s for s in batch if isinstance(s.event, HostSnapshot)]
        diffs = [s for s in batch if isinstance(s.event, SnapshotDiff)]
        if snaps:
            insert_new_by_id(con, "snapshots", _snapshot_rows(snaps), _SNAPSHOT_COLUMNS)
        if diffs:
            insert_new_by_id(con, "snapshot_diffs", _diff_rows(diffs), _DIFF_COLUMNS)

    def trim(self, con: duckdb.DuckDBPyConnection, stream: str, first_seq: int) -> int:
        table = "snapshots" if stream == SNAPSHOTS else "snapshot_diffs"
        row = con.execute(f"DELETE FROM {table} WHERE seq < ?", [first_seq]).fetchone()
        return int(row[0]) if row else 0

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("latest", SnapshotsLatestQuery, _latest, "the newest snapshot of every (host, agent)",
                     cut=_cut_latest),
            Endpoint("history", SnapshotHistoryQuery, _history, "one (host, agent)'s snapshots, newest first",
                     cut=_cut_history),
            Endpoint("get", SnapshotGetQuery, _get, "one snapshot, by seq or the newest"),
            Endpoint("diff", SnapshotDiffQuery, _diff, "a diff between two stored snapshots, computed now"),
            Endpoint("diffs", DiffsQuery, _diffs, "the diffs the differ published, oldest first", cut=_cut_diffs),
        )


def _snapshot_rows(batch: list[StoredEvent]) -> pa.Table:
    events: list[HostSnapshot] = [s.event for s in batch]  # type: ignore[misc]
    return pa.table({
        "id": pa.array([e.id for e in events], pa.string()),
        "seq": pa.array([s.seq for s in batch], pa.int64()),
        "host": pa.array([e.host for e in events], pa.string()),
        "agent": pa.array([e.agent for e in events], pa.string()),
        "ts": pa.array([e.ts for e in events], pa.string()),
        "ts_utc": pa.array([s.at for s in batch], pa.timestamp("us", tz="UTC")),
        "data": pa.array([_json.encode(e.data).decode() for e in events], pa.string()),
    })


def _diff_rows(batch: list[StoredEvent]) -> pa.Table:
    events: list[SnapshotDiff] = [s.event for s in batch]  # type: ignore[misc]
    enc = _json.encode
    return pa.table({
        "id": pa.array([e.id for e in events], pa.string()),
        "seq": pa.array([s.seq for s in batch], pa.int64()),
        "host": pa.array([e.host for e in events], pa.string()),
        "agent": pa.array([e.agent for e in events], pa.string()),
        "from_seq": pa.array([e.from_seq for e in events], pa.int64()),
        "to_seq": pa.array([e.to_seq for e in events], pa.int64()),
        "snapshot_ts": pa.array([e.snapshot_ts for e in events], pa.string()),
        "added": pa.array([enc(e.added).decode() for e in events], pa.string()),
        "removed": pa.array([enc(e.removed).decode() for e in events], pa.string()),
        "changed": pa.array([enc(e.changed).decode() for e in events], pa.string()),
        "changes": pa.array([e.paths if e.truncated and e.paths is not None
                             else len(e.added) + len(e.removed) + len(e.changed) for e in events], pa.int32()),
        "truncated": pa.array([e.truncated for e in events], pa.bool_()),
    })


def _row(r: tuple[Any, ...]) -> SnapshotRow:
    return SnapshotRow(host=r[0], agent=r[1], seq=r[2], id=r[3], ts=r[4], taken_at=r[5], data=_loads(r[6]))


async def _latest(ctx: QueryContext, req: SnapshotsLatestQuery) -> SnapshotList:
    after = "(host, agent) > (?, ?)" if req.after is not None and len(req.after) == 2 else None
    clauses, params = _who(req.host, req.agent, after)
    if after is not None:
        assert req.after is not None
        params += list(req.after)

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT {_ROW} FROM snapshots {clauses}"
            " QUALIFY row_number() OVER (PARTITION BY host, agent ORDER BY seq DESC) = 1"
            " ORDER BY host, agent LIMIT ?", [*params, req.limit + 1],
        ).fetchall()

    rows = await ctx.read(run)
    items = [_row(r) for r in rows[: req.limit]]
    more = len(rows) > req.limit
    return SnapshotList(items=items, next_after=[items[-1].host, items[-1].agent] if more else None)


async def _history(ctx: QueryContext, req: SnapshotHistoryQuery) -> SnapshotList:
    params: list[Any] = [req.host, req.agent, req.before_seq or (1 << 62), req.limit + 1]

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT {_ROW} FROM snapshots WHERE host = ? AND agent = ? AND seq < ? ORDER BY seq DESC LIMIT ?", params
        ).fetchall()

    rows = await ctx.read(run)
    items = [_row(r) for r in rows[: req.limit]]
    return SnapshotList(items=items, next_cursor=items[-1].seq if len(rows) > req.limit else None)


async def _get(ctx: QueryContext, req: SnapshotGetQuery) -> SnapshotList:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return _pick(cur, req.host, req.agent, req.seq)

    return SnapshotList(items=[_row(r) for r in await ctx.read(run)])


def _pick(cur: duckdb.DuckDBPyConnection, host: str, agent: str, seq: int | None,
          before: bool = False) -> list[tuple[Any, ...]]:
    """The snapshot at `seq`, the newest one (seq None), or the newest before `seq` (before)."""
    where = "host = ? AND agent = ?"
    params: list[Any] = [host, agent]
    if seq is not None:
        where += " AND seq < ?" if before else " AND seq = ?"
        params.append(seq)
    return cur.execute(f"SELECT {_ROW} FROM snapshots WHERE {where} ORDER BY seq DESC LIMIT 1", params).fetchall()


async def _diff(ctx: QueryContext, req: SnapshotDiffQuery) -> SnapshotDiffAnswer:
    def run(cur: duckdb.DuckDBPyConnection) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
        to = _pick(cur, req.host, req.agent, req.to_seq)
        if not to:
            return to, []
        if req.from_seq is not None:
            return to, _pick(cur, req.host, req.agent, req.from_seq)
        return to, _pick(cur, req.host, req.agent, to[0][2], before=True)

    to, base = await ctx.read(run)
    if not to or (req.from_seq is not None and not base):
        return SnapshotDiffAnswer(host=req.host, agent=req.agent, found=False)
    new, old = _row(to[0]), (_row(base[0]) if base else None)
    added, removed, changed = diff_data(old.data if old else None, new.data)
    return SnapshotDiffAnswer(host=req.host, agent=req.agent, found=True, from_seq=old.seq if old else None,
                              to_seq=new.seq, added=added, removed=removed, changed=changed)


async def _diffs(ctx: QueryContext, req: DiffsQuery) -> DiffList:
    clauses, params = _who(req.host, req.agent, "seq > ?" + (" AND changes > 0" if req.changes_only else ""))

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            "SELECT host, agent, seq, from_seq, to_seq, snapshot_ts, added, removed, changed, truncated"
            " FROM snapshot_diffs"
            f" {clauses} ORDER BY seq LIMIT ?", [*params, req.after_seq, req.limit + 1],
        ).fetchall()

    rows = await ctx.read(run)
    items = [
        DiffRow(host=r[0], agent=r[1], seq=r[2], from_seq=r[3], to_seq=r[4], snapshot_ts=r[5], added=_loads(r[6]),
                removed=_loads(r[7]), changed=_loads(r[8]), truncated=r[9])
        for r in rows[: req.limit]
    ]
    return DiffList(items=items, next_cursor=items[-1].seq if len(rows) > req.limit else None)


def _who(host: str | None, agent: str | None, last: str | None = None) -> tuple[str, list[Any]]:
    """WHERE clause for the optional host/agent filters, then `last` (its placeholders come after)."""
    clauses: list[str] = []
    params: list[Any] = []
    if host is not None:
        clauses.append("host = ?")
        params.append(host)
    if agent is not None:
        clauses.append("agent = ?")
        params.append(agent)
    if last is not None:
        clauses.append(last)
    return (f"WHERE {' AND '.join(clauses)}" if clauses else ""), params


PROJECTION = SnapshotsProjection()


# A page too big for the connection's max_payload is cut to its first n items (n >= 1), the
# cursor continuing right after them (services/query/dispatch.py fit_reply).
def _cut_latest(page: SnapshotList, n: int) -> SnapshotList:
    last = page.items[n - 1]
    return msgspec.structs.replace(page, items=page.items[:n], next_after=[last.host, last.agent])


def _cut_history(page: SnapshotList, n: int) -> SnapshotList:
    return msgspec.structs.replace(page, items=page.items[:n], next_cursor=page.items[n - 1].seq)


def _cut_diffs(page: DiffList, n: int) -> DiffList:
    return msgspec.structs.replace(page, items=page.items[:n], next_cursor=page.items[n - 1].seq)
