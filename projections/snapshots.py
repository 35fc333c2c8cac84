"""The host snapshot views: every snapshot still in FLEET_SNAPSHOTS, and every diff record in FLEET_DIFFS.

Both streams only grow (max age, no per-subject limit), so both tables are
append-only: a bulk insert per batch, deduplicated on the event id, and rows
trimmed by stream sequence when their messages age out. Diffs are *folded*
here, never made: the taker computed them at take time (has_diff, diff_fields on
the snapshot; a `snapshot.diff` record when something changed), so a rebuild of
this view re-reads them and emits nothing. A v1 snapshot is folded as it was
(has_diff false, diff_fields []); a v1 (JSON Pointer) diff is rejected with a reason.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import Event
from fleetlog.schemas.snapshots import (
    EVENT_VERSION,
    DiffList,
    DiffRow,
    DiffsQuery,
    HostSnapshot,
    SnapshotDiff,
    SnapshotHistoryQuery,
    SnapshotList,
    SnapshotRow,
    SnapshotsLatestQuery,
)

from ._base import Endpoint, Projection, QueryContext, RejectEvent, StoredEvent, insert_new_by_id

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "SnapshotsProjection"]

SNAPSHOTS = "FLEET_SNAPSHOTS"
DIFFS = "FLEET_DIFFS"

_json = msgspec.json.Encoder()
_loads = msgspec.json.decode
_SNAPSHOT_COLUMNS = "CAST(id AS UUID), seq, host, agent, ts, ts_utc, json(data), has_diff, json(diff_fields)"
_DIFF_COLUMNS = "CAST(id AS UUID), seq, host, agent, timestamp, json(diff_fields), json(changes)"
_ROW = "host, agent, seq, CAST(id AS VARCHAR), ts, CAST(epoch(ts_utc) AS BIGINT), data, has_diff, diff_fields"


class SnapshotsProjection(Projection):
    name: ClassVar[str] = "snapshots"
    version: ClassVar[int] = 3  # 2: snapshot_diffs.truncated; 3: take-time dotted-key diffs (issue 11)
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
                data JSON NOT NULL,
                has_diff BOOLEAN NOT NULL,    -- set by the taker (false for a v1 snapshot)
                diff_fields JSON NOT NULL     -- sorted dotted keys
            )""",
            """CREATE TABLE IF NOT EXISTS snapshot_diffs (
                id UUID NOT NULL,
                seq BIGINT NOT NULL,          -- FLEET_DIFFS sequence
                host VARCHAR NOT NULL,
                agent VARCHAR NOT NULL,
                timestamp VARCHAR,            -- the snapshot's timestamp
                diff_fields JSON NOT NULL,
                changes JSON NOT NULL         -- field -> {from, to}
            )""",
        )

    def validate(self, stored: StoredEvent) -> None:
        event = stored.event
        if isinstance(event, SnapshotDiff) and event.v < EVENT_VERSION:
            raise RejectEvent(f"snapshot.diff v{event.v} (JSON Pointer added/removed/changed) is no longer "
                              f"folded: diffs are v{EVENT_VERSION} records (diff_fields, changes) made at take time")

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
            Endpoint("diffs", DiffsQuery, _diffs, "the diff records, oldest first", cut=_cut_diffs),
        )


def _snapshot_rows(batch: list[StoredEvent]) -> pa.Table:
    events: list[HostSnapshot] = [s.event for s in batch]  # type: ignore[misc]
    enc = _json.encode
    return pa.table({
        "id": pa.array([e.id for e in events], pa.string()),
        "seq": pa.array([s.seq for s in batch], pa.int64()),
        "host": pa.array([e.host for e in events], pa.string()),
        "agent": pa.array([e.agent for e in events], pa.string()),
        "ts": pa.array([e.ts for e in events], pa.string()),
        "ts_utc": pa.array([s.at for s in batch], pa.timestamp("us", tz="UTC")),
        "data": pa.array([enc(e.data).decode() for e in events], pa.string()),
        "has_diff": pa.array([e.has_diff for e in events], pa.bool_()),
        "diff_fields": pa.array([enc(e.diff_fields).decode() for e in events], pa.string()),
    })


def _diff_rows(batch: list[StoredEvent]) -> pa.Table:
    events: list[SnapshotDiff] = [s.event for s in batch]  # type: ignore[misc]
    enc = _json.encode
    return pa.table({
        "id": pa.array([e.id for e in events], pa.string()),
        "seq": pa.array([s.seq for s in batch], pa.int64()),
        "host": pa.array([e.host for e in events], pa.string()),
        "agent": pa.array([e.agent for e in events], pa.string()),
        "timestamp": pa.array([e.timestamp for e in events], pa.string()),
        "diff_fields": pa.array([enc(e.diff_fields).decode() for e in events], pa.string()),
        "changes": pa.array([enc(e.changes).decode() for e in events], pa.string()),
    })


def _row(r: tuple[Any, ...]) -> SnapshotRow:
    return SnapshotRow(host=r[0], agent=r[1], seq=r[2], id=r[3], ts=r[4], taken_at=r[5], data=_loads(r[6]),
                       has_diff=r[7], diff_fields=_loads(r[8]))


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


async def _diffs(ctx: QueryContext, req: DiffsQuery) -> DiffList:
    clauses, params = _who(req.host, req.agent, "seq > ?")

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT host, agent, seq, timestamp, diff_fields, changes FROM snapshot_diffs {clauses}"
            " ORDER BY seq LIMIT ?", [*params, req.after_seq, req.limit + 1],
        ).fetchall()

    rows = await ctx.read(run)
    items = [DiffRow(host=r[0], agent=r[1], seq=r[2], timestamp=r[3], diff_fields=_loads(r[4]), changes=_loads(r[5]))
             for r in rows[: req.limit]]
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
