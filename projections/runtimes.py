"""The runtime registry view: one row per runner runtime, its registration, heartbeat and status.

FLEET_RUNTIMES keeps only the last message per subject (registration, heartbeat,
status of each runtime), so every event is state-carrying: a heartbeat holds the
runtime's whole merged metadata. Folding what the stream still holds in stream
order therefore gives the same rows as the live fold did.

`runtime_messages` keeps each subject's last folded event. When a subject's last message
is rejected before the fold (`forget`), its event leaves that table and the runtime's
row is folded again from the others, as a rebuild (which sees only the rejected message
on that subject) would fold it; `last_seq` still moves to the rejected message, which is
the runtime's latest on the wire (the stale marker's guard).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import (
    Event,
    RuntimeHeartbeat,
    RuntimeRegistered,
    RuntimeStatusChanged,
    decode_event,
    encode_event,
    parse_ts,
    subjects,
)
from fleetlog.schemas.runtimes import (
    RuntimeCounts,
    RuntimeCountsQuery,
    RuntimeGetQuery,
    RuntimeList,
    RuntimesListQuery,
    RuntimeView,
    StaleQuery,
    StaleRuntime,
    StaleRuntimes,
    capabilities_of,
)

from ._base import Endpoint, FoldReject, Projection, QueryContext, StoredEvent

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "RuntimesProjection"]

_encode = msgspec.json.Encoder().encode

COLUMNS = (
    "id", "runtime_id", "display_name", "endpoint", "version", "capabilities", "labels", "metadata", "status",
    "status_reason", "heartbeat_deadline_s", "created_at", "last_heartbeat_at", "updated_at", "active_runs",
    "last_seq",
)


class RuntimesProjection(Projection):
    name: ClassVar[str] = "runtimes"
    # 2: last_seq (any message of the runtime) guards the stale marker; 3: runtime_messages (`forget`);
    # 4: the store's keys (id, created_at, updated_at; capabilities a JSON object)
    version: ClassVar[int] = 4
    streams: ClassVar[tuple[str, ...]] = ("FLEET_RUNTIMES",)
    event_types: ClassVar[tuple[type[Event], ...]] = (RuntimeRegistered, RuntimeHeartbeat, RuntimeStatusChanged)
    tables: ClassVar[tuple[str, ...]] = ("runtimes", "runtime_messages")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS runtimes (
                id BIGINT NOT NULL,           -- stream sequence of its first registration
                runtime_id VARCHAR NOT NULL,
                display_name VARCHAR,
                endpoint VARCHAR,
                version VARCHAR,
                capabilities JSON NOT NULL,
                labels JSON NOT NULL,
                metadata JSON NOT NULL,
                status VARCHAR NOT NULL,
                status_reason VARCHAR,
                heartbeat_deadline_s DOUBLE NOT NULL,
                created_at BIGINT NOT NULL,   -- its first registration
                last_heartbeat_at BIGINT NOT NULL,
                updated_at BIGINT NOT NULL,   -- its latest message
                active_runs BIGINT,
                last_seq BIGINT NOT NULL   -- stream sequence of its latest message: guards the stale marker
            )""",
            """CREATE TABLE IF NOT EXISTS runtime_messages (
                subject VARCHAR NOT NULL,     -- fleet.runtime.<id>.<registration|heartbeat|status>
                runtime_id VARCHAR NOT NULL,
                seq BIGINT NOT NULL,
                event JSON NOT NULL           -- the subject's last folded event
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> list[FoldReject]:
        ids = sorted({e.event.runtime_id for e in batch})  # type: ignore[attr-defined]
        rows = _load(con, ids)
        changed: set[str] = set()
        refused: list[FoldReject] = []
        last: dict[str, StoredEvent | None] = {}  # subject -> its last event, None if refused
        for stored in batch:
            reason = _apply(rows, stored)
            if reason is not None:
                refused.append((stored, reason))
                last[stored.subject] = None  # it replaced the subject's message in the stream too
                continue
            last[stored.subject] = stored
            changed.add(stored.event.runtime_id)  # type: ignore[attr-defined]
        _write(con, [rows[r] for r in sorted(changed)])
        _keep_messages(con, last)
        return refused

    def forget(self, con: duckdb.DuckDBPyConnection, rejected: Sequence[tuple[str, int]]) -> None:
        """Each subject's event leaves `runtime_messages`; its runtime is folded again from the
        rest (as a rebuild folds it), and its `last_seq` moves to the rejected message."""
        latest: dict[str, int] = {}
        for subject, seq in rejected:
            runtime_id = _runtime_of(subject)
            if runtime_id is not None:
                latest[runtime_id] = max(latest.get(runtime_id, 0), seq)
        if not latest:
            return
        gone = pa.table({"subject": pa.array([s for s, _ in rejected], pa.string())})
        # read by name in the SQL below (a replacement scan: projections/_base.py)
        _fleetlog_forget = gone
        con.execute("DELETE FROM runtime_messages WHERE subject IN (SELECT subject FROM _fleetlog_forget)")
        ids = sorted(latest)
        # read by name in the SQL below (a replacement scan: projections/_base.py)
        _fleetlog_ids = pa.table({"runtime_id": pa.array(ids, pa.string())})
        messages = con.execute(
            "SELECT subject, seq, event FROM runtime_messages SEMI JOIN _fleetlog_ids USING (runtime_id)"
            " ORDER BY seq"
        ).fetchall()
        con.execute("DELETE FROM runtimes WHERE runtime_id IN (SELECT runtime_id FROM _fleetlog_ids)")
        rows: dict[str, dict[str, Any]] = {}
        for subject, seq, event_json in messages:
            event = decode_event(event_json.encode())
            _apply(rows, StoredEvent("FLEET_RUNTIMES", seq, subject, event, parse_ts(event.ts)))
        for runtime_id, row in rows.items():
            row["last_seq"] = max(row["last_seq"], latest[runtime_id])
        _write(con, [rows[r] for r in sorted(rows)])

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("list", RuntimesListQuery, _list, "runtimes by status and labels, paged by id",
                     cut=_cut_list),
            Endpoint("get", RuntimeGetQuery, _get, "one runtime"),
            Endpoint("stale", StaleQuery, _stale, "runtimes whose heartbeat deadline passed (proposals)"),
            Endpoint("counts", RuntimeCountsQuery, _counts, "runtime counts and heartbeat ages"),
        )


_JSON_COLUMNS = ("capabilities", "labels", "metadata")
_SELECT = ", ".join(COLUMNS)


def _row(values: Sequence[Any]) -> dict[str, Any]:
    row = dict(zip(COLUMNS, values, strict=True))
    for c in _JSON_COLUMNS:
        row[c] = json.loads(row[c])
    return row


def _apply(rows: dict[str, dict[str, Any]], stored: StoredEvent) -> str | None:
    """Fold one event into `rows`; the reason when a rule refuses it."""
    e = stored.event
    at = int(stored.at.timestamp())
    if isinstance(e, RuntimeRegistered):
        # A re-registration carries the first one's sequence and time; one stored before v2
        # does not, and the row it replaces (if any) still knows them.
        prev = rows.get(e.runtime_id)
        first_seq = e.first_seq if e.first_seq is not None else prev["id"] if prev else stored.seq
        first_at = e.first_registered_at if e.first_registered_at is not None else prev["created_at"] if prev else at
        rows[e.runtime_id] = {
            "id": first_seq, "runtime_id": e.runtime_id, "display_name": e.display_name, "endpoint": e.endpoint,
            "version": e.version, "capabilities": capabilities_of(e.capabilities), "labels": dict(e.labels),
            "metadata": dict(e.metadata), "status": "online", "status_reason": None,
            "heartbeat_deadline_s": e.heartbeat_deadline_s, "created_at": first_at, "last_heartbeat_at": at,
            "updated_at": at, "active_runs": None, "last_seq": stored.seq,
        }
        return None
    assert isinstance(e, RuntimeHeartbeat | RuntimeStatusChanged)
    row = rows.get(e.runtime_id)
    if row is None:
        return f"runtime_id: {e.runtime_id!r} is not registered"
    if isinstance(e, RuntimeHeartbeat):
        row.update(status=e.status, status_reason=None, metadata=dict(e.metadata),
                   last_heartbeat_at=at, active_runs=e.active_runs)
    else:
        row.update(status=e.status, status_reason=e.reason)
    row["updated_at"] = at
    row["last_seq"] = stored.seq
    return None


def _keep_messages(con: duckdb.DuckDBPyConnection, last: dict[str, StoredEvent | None]) -> None:
    """Each subject's last event replaces the one kept for it (a refused one leaves none)."""
    if not last:
        return
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_subjects = pa.table({"subject": pa.array(list(last), pa.string())})
    con.execute("DELETE FROM runtime_messages WHERE subject IN (SELECT subject FROM _fleetlog_subjects)")
    kept = [s for s in last.values() if s is not None]
    if not kept:
        return
    table = pa.table({
        "subject": pa.array([s.subject for s in kept], pa.string()),
        "runtime_id": pa.array([s.event.runtime_id for s in kept], pa.string()),  # type: ignore[attr-defined]
        "seq": pa.array([s.seq for s in kept], pa.int64()),
        "event": pa.array([encode_event(s.event).decode() for s in kept], pa.string()),
    })
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_messages = table
    con.execute("INSERT INTO runtime_messages SELECT subject, runtime_id, seq, event FROM _fleetlog_messages")


def _runtime_of(subject: str) -> str | None:
    parts = subject.split(".")
    if len(parts) != 4 or parts[:2] != ["fleet", "runtime"]:
        return None
    try:
        return subjects.unescape_token(parts[2])
    except ValueError:  # "%%", "%C3": no token escape_token writes, so no runtime's (its event was refused)
        return None


def _load(con: duckdb.DuckDBPyConnection, ids: list[str]) -> dict[str, dict[str, Any]]:
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_ids = pa.table({"runtime_id": pa.array(ids, pa.string())})
    rows = con.execute(f"SELECT {_SELECT} FROM runtimes SEMI JOIN _fleetlog_ids USING (runtime_id)").fetchall()
    return {row["runtime_id"]: row for row in map(_row, rows)}


def _write(con: duckdb.DuckDBPyConnection, rows: list[dict[str, Any]]) -> None:
    if not rows:
        return
    kinds = {"id": pa.int64(), "heartbeat_deadline_s": pa.float64(), "created_at": pa.int64(),
             "last_heartbeat_at": pa.int64(), "updated_at": pa.int64(), "active_runs": pa.int64(),
             "last_seq": pa.int64()}
    table = pa.table({
        c: pa.array(
            [_encode(r[c]).decode() if c in _JSON_COLUMNS else r[c] for r in rows], kinds.get(c, pa.string())
        )
        for c in COLUMNS
    })
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_runtimes = table
    con.execute("DELETE FROM runtimes WHERE runtime_id IN (SELECT runtime_id FROM _fleetlog_runtimes)")
    con.execute(f"INSERT INTO runtimes ({_SELECT}) SELECT {_SELECT} FROM _fleetlog_runtimes")


def _to_view(values: Sequence[Any]) -> RuntimeView:
    row = _row(values)
    row.pop("last_seq")
    row["heartbeat_deadline_at"] = math.ceil(row["last_heartbeat_at"] + row["heartbeat_deadline_s"])
    return msgspec.convert(row, RuntimeView)


async def _list(ctx: QueryContext, req: RuntimesListQuery) -> RuntimeList:
    clauses: list[str] = []
    params: list[Any] = []
    if req.statuses:
        clauses.append(f"status IN ({', '.join('?' * len(req.statuses))})")
        params.extend(req.statuses)
    for key, value in (req.labels or {}).items():
        clauses.append("json_extract_string(labels, ?) = ?")
        params.extend(["$." + json.dumps(key), value])
    where = ("WHERE " + " AND ".join(clauses)) if clauses else ""
    page = f"{where} {'AND' if where else 'WHERE'} id > ?" if req.after is not None else where
    page_params = [*params, req.after] if req.after is not None else params

    def run(cur: duckdb.DuckDBPyConnection) -> RuntimeList:
        total = cur.execute(f"SELECT count(*) FROM runtimes {where}", params).fetchone()
        rows = cur.execute(f"SELECT {_SELECT} FROM runtimes {page} ORDER BY id LIMIT ?",
                           [*page_params, req.limit + 1]).fetchall()
        items = [_to_view(r) for r in rows[: req.limit]]
        more = len(rows) > req.limit
        return RuntimeList(items=items, total=int(total[0]) if total else 0, has_more=more,
                           next_after=items[-1].id if more else None)

    answer: RuntimeList = await ctx.read(run)
    return answer


def _cut_list(answer: RuntimeList, n: int) -> RuntimeList:
    """The first n runtimes, continuing after the last (labels and metadata are of any size,
    so up to 500 of them could be megabytes)."""
    items = answer.items[:n]
    return msgspec.structs.replace(answer, items=items, has_more=True, next_after=items[-1].id)


async def _get(ctx: QueryContext, req: RuntimeGetQuery) -> RuntimeList:
    def run(cur: duckdb.DuckDBPyConnection) -> RuntimeList:
        rows = cur.execute(f"SELECT {_SELECT} FROM runtimes WHERE runtime_id = ?", [req.runtime_id]).fetchall()
        return RuntimeList(items=[_to_view(r) for r in rows], total=len(rows))

    answer: RuntimeList = await ctx.read(run)
    return answer


async def _stale(ctx: QueryContext, req: StaleQuery) -> StaleRuntimes:
    # The store's rule: the deadline passed, or (given stale_after_seconds) the last heartbeat
    # is older than that; rows already in stale_status are left alone.
    older = "OR last_heartbeat_at < ?" if req.stale_after_seconds is not None else ""
    params: list[Any] = [req.stale_status, req.now]
    if req.stale_after_seconds is not None:
        params.append(req.now - req.stale_after_seconds)

    def run(cur: duckdb.DuckDBPyConnection) -> list[StaleRuntime]:
        rows = cur.execute(
            f"""SELECT {_SELECT} FROM runtimes
                WHERE status <> ? AND (last_heartbeat_at + heartbeat_deadline_s < ? {older})
                ORDER BY last_heartbeat_at, id LIMIT 500""",
            params,
        ).fetchall()
        return [StaleRuntime(runtime=_to_view(r), last_seq=r[-1]) for r in rows]

    return StaleRuntimes(items=await ctx.read(run))


async def _counts(ctx: QueryContext, req: RuntimeCountsQuery) -> RuntimeCounts:
    def run(cur: duckdb.DuckDBPyConnection) -> RuntimeCounts:
        row = cur.execute(
            """SELECT count(*), count(*) FILTER (status = 'online'), count(*) FILTER (status = 'stale'),
                      avg(? - last_heartbeat_at) FILTER (? - last_heartbeat_at >= 0),
                      max(? - last_heartbeat_at) FILTER (? - last_heartbeat_at >= 0)
               FROM runtimes""",
            [req.now] * 4,
        ).fetchone()
        assert row is not None
        total, online, stale, avg_age, max_age = row
        return RuntimeCounts(
            total_count=int(total), online_count=int(online), stale_count=int(stale),
            avg_heartbeat_age_seconds=None if avg_age is None else round(float(avg_age), 2),
            max_heartbeat_age_seconds=None if max_age is None else round(float(max_age), 2),
        )

    counts: RuntimeCounts = await ctx.read(run)
    return counts


PROJECTION = RuntimesProjection()
