"""The run ledger view: the current state of every run, and every run's result events.

Lifecycle events are state-carrying, so a run's row is simply its last lifecycle
message (with `fence` = the stream sequence of the claim that produced it): the
same thing a guarded command reads with a direct get. Result events are kept
first-write-wins on (run_id, sequence). A runner's result event is refused when,
at its stream position, the run is claimed under a different fence than the one
it carries: a stale holder's late writes never reach the view, on live folds and
rebuilds alike (the fold sees lifecycle and result events in one stream order).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import msgspec
import pyarrow as pa
from fleetlog.schemas import (
    Event,
    RunCancelRequested,
    RunClaimed,
    RunCreated,
    RunEventAppended,
    RunFinalized,
    RunLeaseExpired,
    RunReleased,
    RunRenewed,
    RunState,
)
from fleetlog.schemas.runs import RunLifecycle, state_at

from . import run_queries
from ._base import Endpoint, FoldReject, Projection, StoredEvent

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "RunsProjection"]

_encode = msgspec.json.Encoder().encode
_state_decoder = msgspec.json.Decoder(RunState)

# Column -> RunState field: the columns carry the keys of the run views (and of the store
# fleetlog replaces); `id` is the creation's stream sequence (RunState.created_seq).
_STATE_COLUMNS = {
    "id": "created_seq", "run_id": "run_id", "status": "status", "status_reason": "reason",
    "queue_name": "queue", "priority": "priority", "runner_id": "runner_id",
    "requested_runtime_id": "requested_runtime_id", "conversation_id": "conversation_id",
    "thread_id": "thread_id", "workspace_id": "workspace_id", "bot_id": "bot_id", "agent_id": "agent_id",
    "binding_id": "binding_id", "claimed_by_runtime_id": "claimed_by", "created_at": "created_at",
    "started_at": "started_at", "finished_at": "finished_at", "updated_at": "updated_at",
    "claim_lease_expires_at": "lease_expires_at", "last_claimed_at": "last_claimed_at",
    "cancel_requested_at": "cancel_requested_at", "fence": "fence",
}
RUN_COLUMNS = (*_STATE_COLUMNS, "state", "state_seq")
_INT_COLUMNS = frozenset({
    "id", "priority", "created_at", "started_at", "finished_at", "updated_at", "last_claimed_at",
    "cancel_requested_at", "fence",
})


class _Current(NamedTuple):
    state: RunState  # created_seq always filled in
    state_seq: int


class RunsProjection(Projection):
    name: ClassVar[str] = "runs"
    # 2: the store's keys as columns (id, status_reason, queue_name, claimed_by_runtime_id,
    # claim_lease_expires_at, updated_at, agent_id, binding_id); run_events.id = stream sequence
    version: ClassVar[int] = 2
    streams: ClassVar[tuple[str, ...]] = ("FLEET_RUNS",)
    event_types: ClassVar[tuple[type[Event], ...]] = (
        RunCreated, RunClaimed, RunRenewed, RunReleased, RunLeaseExpired, RunFinalized, RunCancelRequested,
        RunEventAppended,
    )
    tables: ClassVar[tuple[str, ...]] = ("runs", "run_events")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS runs (
                id BIGINT NOT NULL,           -- stream sequence of the creation: creation order
                run_id VARCHAR NOT NULL,
                status VARCHAR NOT NULL,
                status_reason VARCHAR,
                queue_name VARCHAR,
                priority BIGINT NOT NULL,
                runner_id VARCHAR NOT NULL,
                requested_runtime_id VARCHAR,
                conversation_id VARCHAR,
                thread_id VARCHAR,
                workspace_id VARCHAR,
                bot_id VARCHAR,
                agent_id VARCHAR,
                binding_id VARCHAR,
                claimed_by_runtime_id VARCHAR,
                created_at BIGINT NOT NULL,
                started_at BIGINT,
                finished_at BIGINT,
                updated_at BIGINT NOT NULL,
                claim_lease_expires_at DOUBLE,  -- exact (the views round it up)
                last_claimed_at BIGINT,
                cancel_requested_at BIGINT,
                fence BIGINT,
                state JSON NOT NULL,          -- the whole RunState (created_seq and fence filled in)
                state_seq BIGINT NOT NULL     -- stream sequence of the last lifecycle message
            )""",
            """CREATE TABLE IF NOT EXISTS run_events (
                run_id VARCHAR NOT NULL,
                sequence BIGINT NOT NULL,
                type VARCHAR NOT NULL,
                data JSON NOT NULL,
                usage JSON,
                source VARCHAR NOT NULL,
                artifact_refs JSON NOT NULL,
                metadata JSON NOT NULL,
                created_at BIGINT NOT NULL,
                fence BIGINT,
                id BIGINT NOT NULL,           -- the event's stream sequence
                event_uuid UUID NOT NULL
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> list[FoldReject]:
        run_ids = {
            e.state.run_id if isinstance(e, RunLifecycle) else e.run_id  # type: ignore[attr-defined]
            for e in (s.event for s in batch)
        }
        current = _load_runs(con, run_ids)
        appended = [s for s in batch if isinstance(s.event, RunEventAppended)]
        taken = _load_event_keys(con, appended)
        changed: set[str] = set()
        accepted: list[StoredEvent] = []
        refused: list[FoldReject] = []
        for stored in batch:
            event = stored.event
            if isinstance(event, RunLifecycle):
                run_id = event.state.run_id
                prev = current.get(run_id)
                state = state_at(event, stored.seq)
                if state.created_seq is None:  # a pre-v2 event: carry the creation's sequence forward
                    created = prev.state.created_seq if prev is not None else None
                    state = msgspec.structs.replace(state, created_seq=created if created is not None else stored.seq)
                current[run_id] = _Current(state, stored.seq)
                changed.add(run_id)
                continue
            assert isinstance(event, RunEventAppended)
            key = (event.run_id, event.sequence)
            if key in taken:
                continue  # first write wins, forever
            held = current.get(event.run_id)
            if (
                held is not None
                and held.state.claim_token_sha256 is not None  # held: claimed, or running under the claim
                and event.source != "host"
                and event.fence != held.state.fence
            ):
                refused.append((stored, (
                    f"fence: run {event.run_id!r} is claimed by {held.state.claimed_by!r} under fence "
                    f"{held.state.fence}; the event carries fence {event.fence} (a stale or missing claim)"
                )))
                continue
            taken.add(key)
            accepted.append(stored)
        _write_runs(con, [current[r] for r in changed])
        _write_events(con, accepted)
        return refused

    def endpoints(self) -> Sequence[Endpoint]:
        return run_queries.ENDPOINTS


def _load_runs(con: duckdb.DuckDBPyConnection, run_ids: set[str]) -> dict[str, _Current]:
    if not run_ids:
        return {}
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_ids = pa.table({"run_id": pa.array(sorted(run_ids), pa.string())})
    rows = con.execute(
        "SELECT r.state, r.state_seq FROM runs r SEMI JOIN _fleetlog_ids i USING (run_id)"
    ).fetchall()
    out: dict[str, _Current] = {}
    for state_json, state_seq in rows:
        state = _state_decoder.decode(state_json)
        out[state.run_id] = _Current(state, state_seq)
    return out


def _load_event_keys(con: duckdb.DuckDBPyConnection, appended: list[StoredEvent]) -> set[tuple[str, int]]:
    if not appended:
        return set()
    events: list[RunEventAppended] = [s.event for s in appended]  # type: ignore[misc]
    keys = pa.table({
        "run_id": pa.array([e.run_id for e in events], pa.string()),
        "sequence": pa.array([e.sequence for e in events], pa.int64()),
    })
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_keys = keys
    rows = con.execute(
        "SELECT e.run_id, e.sequence FROM run_events e SEMI JOIN _fleetlog_keys k USING (run_id, sequence)"
    ).fetchall()
    return {(r, int(s)) for r, s in rows}


def _column(values: list[Any], kind: pa.DataType) -> pa.Array:
    return pa.array(values, kind)


def _write_runs(con: duckdb.DuckDBPyConnection, rows: list[_Current]) -> None:
    if not rows:
        return
    states = [c.state for c in rows]
    text, i64, f64 = pa.string(), pa.int64(), pa.float64()
    columns: dict[str, pa.Array] = {}
    for name, field in _STATE_COLUMNS.items():
        kind = f64 if name == "claim_lease_expires_at" else i64 if name in _INT_COLUMNS else text
        columns[name] = _column([getattr(s, field) for s in states], kind)
    columns["state"] = _column([_encode(s).decode() for s in states], text)
    columns["state_seq"] = _column([c.state_seq for c in rows], i64)
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_runs = pa.table(columns)
    con.execute("DELETE FROM runs WHERE run_id IN (SELECT run_id FROM _fleetlog_runs)")
    con.execute(f"INSERT INTO runs ({', '.join(RUN_COLUMNS)}) SELECT {', '.join(RUN_COLUMNS)} FROM _fleetlog_runs")



def _write_events(con: duckdb.DuckDBPyConnection, accepted: list[StoredEvent]) -> None:
    if not accepted:
        return
    events: list[RunEventAppended] = [s.event for s in accepted]  # type: ignore[misc]
    text, i64 = pa.string(), pa.int64()
    table = pa.table({
        "run_id": _column([e.run_id for e in events], text),
        "sequence": _column([e.sequence for e in events], i64),
        "type": _column([e.event_type for e in events], text),
        "data": _column([_encode(e.data).decode() for e in events], text),
        "usage": _column([None if e.usage is None else _encode(e.usage).decode() for e in events], text),
        "source": _column([e.source for e in events], text),
        "artifact_refs": _column([_encode(e.artifact_refs).decode() for e in events], text),
        "metadata": _column([_encode(e.metadata).decode() for e in events], text),
        "created_at": _column([int(s.at.timestamp()) for s in accepted], i64),
        "fence": _column([e.fence for e in events], i64),
        "id": _column([s.seq for s in accepted], i64),
        "event_uuid": _column([e.id for e in events], text),
    })
    # read by name in the SQL below (a replacement scan: projections/_base.py)
    _fleetlog_events = table
    con.execute(
        "INSERT INTO run_events SELECT run_id, sequence, type, data, usage, source, artifact_refs, metadata,"
        " created_at, fence, id, CAST(event_uuid AS UUID) FROM _fleetlog_events"
    )


PROJECTION = RunsProjection()
