"""The scoped-state view: one row per live (scope_key, key), exactly the stream's last message.

FLEET_STATE keeps one message per subject and the subject is unique per
(scope_key, key), so the stream *is* the compacted table; this view mirrors it.
A fold reduces its batch to the last event per key (stream order), deletes the
keys whose last event is a tombstone and upserts the rest, with two bulk
statements from Arrow. Every column comes from that last event alone (the set
event carries `created_at`), so a rebuild after compaction gives the same rows.

Rules the decoder cannot express (policy, scope key, alias, value size) are
checked by the fold, in the replaced store's order and with its words: a raw
publish breaking one becomes a reject, and its key holds no value.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
import pyarrow as pa
from fleetlog.schemas import Event
from fleetlog.schemas.state import (
    ElidedValue,
    StateDeleted,
    StateEntry,
    StateEvent,
    StateGetQuery,
    StateList,
    StateListQuery,
    StateSet,
    StateSnapshot,
    StateSnapshotQuery,
    elided_marker,
    normalize_state_key,
    rule_violation,
    value_json,
)

from ._base import Endpoint, FoldReject, Projection, QueryContext, StoredEvent

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "StateProjection"]

_loads = msgspec.json.decode

_CONTEXT = ("runner_id", "bot_id", "workspace_id", "conversation_id", "thread_id", "actor_type", "actor_id",
            "subject_type", "subject_id")
_UPDATED = ("scope", "binding_identity", *_CONTEXT, "value", "created_at", "updated_at", "seq", "event_id", "subject")
_COLUMNS = ("scope_key", "key", *_UPDATED)


class StateProjection(Projection):
    name: ClassVar[str] = "state"
    version: ClassVar[int] = 2  # 2: the subject column (`forget`)
    streams: ClassVar[tuple[str, ...]] = ("FLEET_STATE",)
    event_types: ClassVar[tuple[type[Event], ...]] = (StateSet, StateDeleted)
    tables: ClassVar[tuple[str, ...]] = ("state",)

    def ddl(self) -> Sequence[str]:
        context = ",\n".join(f"                {c} VARCHAR" for c in _CONTEXT)
        return (
            f"""CREATE TABLE IF NOT EXISTS state (
                scope_key VARCHAR NOT NULL,        -- "<scope>:v2:<sha256>"
                key VARCHAR NOT NULL,              -- aliases applied (conversation_id -> external.conversation_id)
                scope VARCHAR NOT NULL,
                binding_identity VARCHAR NOT NULL,
{context},
                value JSON NOT NULL,               -- json.dumps(value, ensure_ascii=False), as the old store kept it
                created_at VARCHAR NOT NULL,       -- first write's event time (ISO-8601)
                updated_at VARCHAR NOT NULL,       -- this write's event time
                seq BIGINT NOT NULL,               -- FLEET_STATE sequence of this write
                event_id VARCHAR NOT NULL,
                subject VARCHAR NOT NULL,          -- the key's FLEET_STATE subject
                PRIMARY KEY (scope_key, key)
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> list[FoldReject]:
        """Rules are checked here rather than in `validate`: a rule-breaking message still
        replaced the key's last message in the compacted stream, so the key must lose its
        value here too, or a rebuild (which sees only that message) would disagree."""
        rejects: list[FoldReject] = []
        last: dict[tuple[str, str], tuple[StoredEvent, bool]] = {}
        for stored in batch:
            e: StateEvent = stored.event  # type: ignore[assignment]
            reason = rule_violation(e)
            if reason is not None:
                rejects.append((stored, reason))
            last[(e.scope_key, e.key)] = (stored, reason is None)
        gone = [k for k, (s, ok) in last.items() if not ok or isinstance(s.event, StateDeleted)]
        kept = [s for s, ok in last.values() if ok and isinstance(s.event, StateSet)]
        if gone:
            keys = pa.table({"scope_key": [k[0] for k in gone], "key": [k[1] for k in gone]})
            # read by name in the SQL below (a replacement scan: projections/_base.py)
            _fleetlog_state_gone = keys
            con.execute("DELETE FROM state USING _fleetlog_state_gone g"
                        " WHERE state.scope_key = g.scope_key AND state.key = g.key")
        if kept:
            # read by name in the SQL below (a replacement scan: projections/_base.py)
            _fleetlog_state_set = self._rows(kept)
            # = ON CONFLICT (scope_key, key) DO UPDATE SET every other column; measured about
            # twice as fast here (the batch holds each key once, so there is no ambiguity)
            con.execute(f"INSERT OR REPLACE INTO state SELECT {', '.join(_COLUMNS)} FROM _fleetlog_state_set")
        return rejects

    @staticmethod
    def _rows(kept: list[StoredEvent]) -> pa.Table:
        cols: dict[str, list[Any]] = {c: [] for c in _COLUMNS}
        for stored in kept:
            e: StateSet = stored.event  # type: ignore[assignment]
            cols["scope_key"].append(e.scope_key)
            cols["key"].append(e.key)
            cols["scope"].append(e.scope)
            cols["binding_identity"].append(e.binding_identity)
            for c in _CONTEXT:
                cols[c].append(None if e.context is None else getattr(e.context, c))
            cols["value"].append(value_json(e.value))
            cols["created_at"].append(e.created_at or e.ts)
            cols["updated_at"].append(e.ts)
            cols["seq"].append(stored.seq)
            cols["event_id"].append(e.id)
            cols["subject"].append(stored.subject)
        return pa.table({c: pa.array(v, pa.int64() if c == "seq" else pa.string()) for c, v in cols.items()})

    def forget(self, con: duckdb.DuckDBPyConnection, rejected: Sequence[tuple[str, int]]) -> None:
        """A message rejected before the fold (undecodable, oversize, wrong subject) replaced
        the key's message in the compacted stream: the key holds no value, as after a rebuild."""
        subjects = [subject for subject, _seq in rejected]
        # read by name in the SQL below (a replacement scan: projections/_base.py)
        _fleetlog_state_forget = pa.table({"subject": pa.array(subjects, pa.string())})
        con.execute("DELETE FROM state USING _fleetlog_state_forget f WHERE state.subject = f.subject")

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("get", StateGetQuery, _get, "one key of one scope (found false when missing)"),
            Endpoint("list", StateListQuery, _list, "keys of one scope, ordered, by plain prefix, paged (≤ 100)"),
            Endpoint("snapshot", StateSnapshotQuery, _snapshot, "every key of up to four scopes, as dicts",
                     cut=_cut_snapshot, cut_count=_values_in, cut_min=0),
        )


async def _get(ctx: QueryContext, req: StateGetQuery) -> StateEntry:
    key = normalize_state_key(req.key)

    def run(cur: duckdb.DuckDBPyConnection) -> tuple[Any, ...] | None:
        return cur.execute(
            "SELECT value, created_at, updated_at, seq FROM state WHERE scope_key = ? AND key = ?",
            [req.scope_key, key],
        ).fetchone()

    row = await ctx.read(run)
    if row is None:
        return StateEntry(scope_key=req.scope_key, key=key, found=False)
    return StateEntry(scope_key=req.scope_key, key=key, found=True, value=_loads(row[0]), created_at=row[1],
                      updated_at=row[2], seq=row[3])


async def _list(ctx: QueryContext, req: StateListQuery) -> StateList:
    clauses = ["scope_key = ?"]
    params: list[Any] = [req.scope_key]
    if req.prefix:  # an empty prefix lists everything, as before
        clauses.append("starts_with(key, ?)")  # plain prefix: % and _ are literal
        params.append(normalize_state_key(req.prefix))
    if req.after is not None:
        clauses.append("key > ?")
        params.append(req.after)

    def run(cur: duckdb.DuckDBPyConnection) -> list[str]:
        rows = cur.execute(
            f"SELECT key FROM state WHERE {' AND '.join(clauses)} ORDER BY key LIMIT ?", [*params, req.limit + 1]
        ).fetchall()
        return [r[0] for r in rows]

    keys = await ctx.read(run)
    return StateList(scope_key=req.scope_key, keys=keys[: req.limit], has_more=len(keys) > req.limit)


async def _snapshot(ctx: QueryContext, req: StateSnapshotQuery) -> StateSnapshot:
    by_key = {v: s for s, v in req.scope_keys.items() if s in ("conversation", "actor", "subject", "runner")}

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        if not by_key:
            return []
        marks = ", ".join("?" for _ in by_key)
        return cur.execute(
            f"SELECT scope_key, key, value FROM state WHERE scope_key IN ({marks}) ORDER BY key", list(by_key)
        ).fetchall()

    out: dict[str, dict[str, Any]] = {"conversation": {}, "actor": {}, "subject": {}, "runner": {}}
    for scope_key, key, value in await ctx.read(run):
        out[by_key[scope_key]][key] = _loads(value)
    conversation = out["conversation"]
    if "conversation" in req.scope_keys and req.conversation_id and "external.conversation_id" not in conversation:
        conversation["external.conversation_id"] = req.conversation_id
    return StateSnapshot(conversation=conversation, actor=out["actor"], subject=out["subject"], runner=out["runner"])


_SCOPES = ("conversation", "actor", "subject", "runner")
_encode = msgspec.json.Encoder().encode


def _values_in(answer: StateSnapshot) -> int:
    return sum(len(getattr(answer, scope)) for scope in _SCOPES)


def _cut_snapshot(answer: StateSnapshot, n: int) -> StateSnapshot:
    """The snapshot with only its n smallest values whole; the others are replaced by
    `elided_marker(size)` and listed in `elided` (read each with state get). Five 250 kB
    values (each under the value limit) made every snapshot of their scope a 413 that no
    request could avoid: a snapshot has no page or limit to ask for."""
    sized = sorted(
        (len(_encode(value)), scope, key)
        for scope in _SCOPES for key, value in getattr(answer, scope).items()
    )
    out = {scope: dict(getattr(answer, scope)) for scope in _SCOPES}
    elided = []
    for size, scope, key in sized[n:]:
        out[scope][key] = elided_marker(size)
        elided.append(ElidedValue(scope=scope, key=key, bytes=size))
    elided.sort(key=lambda e: (e.scope, e.key))
    return msgspec.structs.replace(answer, **out, elided=elided)


PROJECTION = StateProjection()
