"""The attempt log view: one row per attempt, newest-first queries, stats and summaries.

Behaviour kept from the attempt store this replaces: p95 = the sorted sample at
index max(0, floor(0.95·(n−1))); stats ordered by action asc then count desc;
summaries over an agent's newest 100 rows; an explicit `ts` stored as given.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar

import msgspec
from fleetlog.schemas import AttemptRecorded, AttemptsPurged, Event, new_event_id, now_iso
from fleetlog.schemas.attempts import (
    ActionStats,
    AttemptPage,
    AttemptRow,
    AttemptsPurgeRequest,
    AttemptsQuery,
    AttemptStats,
    AttemptStatsQuery,
    AttemptSummary,
    AttemptSummaryQuery,
    PurgeResult,
)

from ._base import (
    DecodeRows,
    Endpoint,
    FoldReject,
    Projection,
    QueryContext,
    RawBatch,
    StoredEvent,
)
from .attempts_raw import another_body, attempts_table, fold_attempts_raw, insert_attempts, prepare_attempts

if TYPE_CHECKING:
    import duckdb

__all__ = ["PROJECTION", "AttemptsProjection", "p95_index"]

_loads = msgspec.json.decode

def p95_index(n: int) -> int:
    """Index of the p95 sample in a sorted list of n (the replaced store's formula)."""
    return max(0, math.floor(0.95 * (n - 1)))


class AttemptsProjection(Projection):
    name: ClassVar[str] = "attempts"
    # v2: attempt_purged_ids (a purged attempt delivered again stays purged, whatever the batching)
    # v3: panes are VARCHAR holding msgspec's JSON of the pane (the payload's own bytes on the
    # bulk path), extras msgspec's JSON: no JSON re-serialisation in DuckDB (attempts_raw)
    version: ClassVar[int] = 3
    streams: ClassVar[tuple[str, ...]] = ("FLEET_ATTEMPTS",)
    event_types: ClassVar[tuple[type[Event], ...]] = (AttemptRecorded, AttemptsPurged)
    tables: ClassVar[tuple[str, ...]] = ("attempts", "attempt_purges", "attempt_purged_ids")

    def ddl(self) -> Sequence[str]:
        return (
            """CREATE TABLE IF NOT EXISTS attempts (
                id UUID NOT NULL,
                seq BIGINT NOT NULL,          -- stream sequence: arrival order
                ts VARCHAR NOT NULL,          -- event time exactly as given
                ts_utc TIMESTAMPTZ NOT NULL,  -- the same, parsed, for order and filters
                agent VARCHAR NOT NULL,
                action VARCHAR NOT NULL,
                outcome VARCHAR NOT NULL,
                elapsed_s DOUBLE NOT NULL,
                -- JSON text of the pane, KBs each. VARCHAR, not JSON: DuckDB would parse every
                -- pane again to check it (+2.4 µs per 2 KB pane, measured); the fold already
                -- checked it. zstd: half the file, and cheaper to checkpoint than the default.
                pane_before VARCHAR USING COMPRESSION zstd,
                pane_after VARCHAR USING COMPRESSION zstd,
                extras JSON NOT NULL
            )""",
            """CREATE TABLE IF NOT EXISTS attempt_purges (
                event_id UUID NOT NULL,
                seq BIGINT NOT NULL,
                before TIMESTAMPTZ NOT NULL,
                deleted BIGINT NOT NULL
            )""",
            # The ids a purge deleted, so that a copy of one delivered after the purge (a
            # spool replay beyond the broker's dedupe window) is a duplicate, not a new row.
            # Without them the outcome depended on whether both copies fell in one batch.
            # seq is the purge's: the ids go when the purge ages out of the stream.
            """CREATE TABLE IF NOT EXISTS attempt_purged_ids (
                id UUID NOT NULL,
                seq BIGINT NOT NULL
            )""",
        )

    def fold(self, con: duckdb.DuckDBPyConnection, batch: Sequence[StoredEvent]) -> Sequence[FoldReject]:
        run: list[StoredEvent] = []
        refused: list[FoldReject] = []
        for stored in batch:
            if isinstance(stored.event, AttemptsPurged):
                refused += self._insert(con, run)
                run = []
                self._purge(con, stored, stored.event)
            else:
                run.append(stored)
        return refused + self._insert(con, run)

    def prepare_raw(self, batch: RawBatch) -> Any:
        """The decode into columns, on another thread while the previous batch folds."""
        return prepare_attempts(batch)

    def fold_raw(
        self, con: duckdb.DuckDBPyConnection, batch: RawBatch, decode: DecodeRows
    ) -> Sequence[FoldReject] | None:
        """Every batch: payloads decoded into columns, panes kept as bytes (see attempts_raw)."""
        return fold_attempts_raw(self, con, batch, decode)

    def _insert(self, con: duckdb.DuckDBPyConnection, run: list[StoredEvent]) -> list[FoldReject]:
        """Insert a run of attempts; a copy of an id with another body is refused (the first stays)."""
        if not run:
            return []
        rows = attempts_table([(st.seq, st.event, st.at) for st in run])  # type: ignore[misc]
        by_seq = {st.seq: st for st in run}
        return [(by_seq[seq], another_body(seq, i, kept)) for seq, i, kept in insert_attempts(con, rows)]

    def _purge(self, con: duckdb.DuckDBPyConnection, stored: StoredEvent, event: AttemptsPurged) -> None:
        from fleetlog.schemas import parse_ts

        cutoff = parse_ts(event.before)
        # fetchall: no result is left open on the fold's cursor (one once failed the batch's next statement)
        rows = con.execute("SELECT count(*) FROM attempt_purges WHERE event_id = ?", [event.id]).fetchall()
        if rows and rows[0][0]:
            return  # the same purge delivered twice
        con.execute("INSERT INTO attempt_purged_ids SELECT id, ? FROM attempts WHERE ts_utc < ?", [stored.seq, cutoff])
        deleted = con.execute("DELETE FROM attempts WHERE ts_utc < ?", [cutoff]).fetchone()
        n = int(deleted[0]) if deleted else 0
        con.execute(
            "INSERT INTO attempt_purges VALUES (?, ?, ?, ?)", [event.id, stored.seq, cutoff, n]
        )

    def trim(self, con: duckdb.DuckDBPyConnection, stream: str, first_seq: int) -> int:
        """Attempts (and purge records) that aged out of FLEET_ATTEMPTS."""
        row = con.execute("DELETE FROM attempts WHERE seq < ?", [first_seq]).fetchone()
        con.execute("DELETE FROM attempt_purges WHERE seq < ?", [first_seq])
        con.execute("DELETE FROM attempt_purged_ids WHERE seq < ?", [first_seq])
        return int(row[0]) if row else 0

    def endpoints(self) -> Sequence[Endpoint]:
        return (
            Endpoint("query", AttemptsQuery, _query, "attempts, newest first, filtered and paged", cut=_cut_page),
            Endpoint("stats", AttemptStatsQuery, _stats, "count, mean and p95 elapsed per (action, outcome)"),
            Endpoint("summary", AttemptSummaryQuery, _summary, "an agent's newest attempts summarised"),
            Endpoint("purge", AttemptsPurgeRequest, _purge, "delete attempts older than N days (a fact)"),
        )


def _where(agent: str | None, since: str | None, **eq: str | None) -> tuple[str, list[Any]]:
    from fleetlog.schemas import parse_ts

    clauses: list[str] = []
    params: list[Any] = []
    if agent is not None:
        clauses.append("agent = ?")
        params.append(agent)
    for column, value in eq.items():
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        clauses.append("ts_utc >= ?")
        params.append(parse_ts(since))
    return ("WHERE " + " AND ".join(clauses)) if clauses else "", params


def _pane(text: str | None) -> dict[str, Any] | None:
    return None if text is None else _loads(text)


def _cut_page(page: AttemptPage, n: int) -> AttemptPage:
    """The first n rows of a page too big to send; the rest from offset + n."""
    return msgspec.structs.replace(page, items=page.items[:n], has_more=True, next_offset=page.offset + n)


async def _query(ctx: QueryContext, req: AttemptsQuery) -> AttemptPage:
    where, params = _where(req.agent, req.since, action=req.action, outcome=req.outcome)

    def run(cur: duckdb.DuckDBPyConnection) -> list[AttemptRow]:
        rows = cur.execute(
            f"""SELECT CAST(id AS VARCHAR), ts, agent, action, outcome, elapsed_s, pane_before, pane_after, extras
                FROM attempts {where} ORDER BY ts_utc DESC, seq DESC LIMIT ? OFFSET ?""",
            [*params, req.limit, req.offset],
        ).fetchall()
        return [
            AttemptRow(
                id=r[0], ts=r[1], agent=r[2], action=r[3], outcome=r[4], elapsed_s=r[5],
                pane_before=_pane(r[6]), pane_after=_pane(r[7]), extras=_loads(r[8]),
            )
            for r in rows
        ]

    return AttemptPage(items=await ctx.read(run), offset=req.offset)


async def _stats(ctx: QueryContext, req: AttemptStatsQuery) -> AttemptStats:
    where, params = _where(req.agent, req.since)
    hint_key = ("agent", req.agent)  # not `since`: a relative `since` is a new instant on every call
    return AttemptStats(items=await ctx.read(lambda cur: _stats_rows(cur, where, params, hint_key=hint_key)))


# p95 = the sorted sample at index k = max(0, floor(0.95·(n−1))), exactly. Sorting every
# group's whole sample is what made stats slow (a single-threaded list_sort of every value).
# The sample at index k is among the values >= t for any t <= it, so one pass counts each
# group (n) and its values >= t (c) and sorts only those: the answer is at index k − (n − c)
# of that sorted tail, provided k − (n − c) >= 0, which the query checks per group. t comes
# from a 5 % sample (vectors of the table): the smallest per-group 0.93-quantile. Should any
# group's sample sit below t after all, the query runs again with t = −inf (every value).
# A selection the sample puts under _TAIL_MIN_ROWS rows is sorted whole (t = −inf) at once.
# After an answer, its row count and 0.9 × its smallest p95 are kept per `hint_key` (the
# agent filter) and the next query starts from them instead of a sample. Any t is safe:
# a tail too short for some group is caught and the query runs again over every value.
_TAIL_MIN_ROWS = 100_000
_tail_hints: dict[object, tuple[int, float]] = {}
_P95_INDEX = "CAST(greatest(0, floor(0.95 * (count(*) - 1))) AS BIGINT)"
_TAIL_INDEX = f"({_P95_INDEX} - count(*) + count(*) FILTER (WHERE elapsed_s >= ?))"


def _stats_rows(cur: duckdb.DuckDBPyConnection, where: str, params: list[Any],
                tail_from: float | None = None, hint_key: object = None) -> list[ActionStats]:
    """count, mean and exact p95 per (action, outcome); `tail_from` overrides the sampled t."""
    hint = None if tail_from is not None or hint_key is None else _tail_hints.get(hint_key)
    if hint is not None:
        tail_from = -math.inf if hint[0] < _TAIL_MIN_ROWS else hint[1]
    elif tail_from is None:
        row = cur.execute(
            f"""SELECT min(q), sum(n) FROM (SELECT quantile_disc(elapsed_s, 0.93) AS q, count(*) AS n
                FROM attempts TABLESAMPLE 5% (system) {where} GROUP BY action, outcome)""",
            params,
        ).fetchone()
        # Below ~100k rows sorting everything is as cheap as the tail's bookkeeping.
        if row is None or row[0] is None or row[1] * 20 < _TAIL_MIN_ROWS:
            tail_from = -math.inf
        else:
            tail_from = float(row[0])
    if tail_from == -math.inf:
        p95, p95_params = f"list_sort(list(elapsed_s))[{_P95_INDEX} + 1]", []
    else:
        p95 = (f"CASE WHEN {_TAIL_INDEX} >= 0 THEN"
               f" list_sort(list(elapsed_s) FILTER (WHERE elapsed_s >= ?))[{_TAIL_INDEX} + 1] END")
        p95_params = [tail_from, tail_from, tail_from]
    rows = cur.execute(
        f"""SELECT action, outcome, count(*) AS n, avg(elapsed_s), {p95}
            FROM attempts {where}
            GROUP BY action, outcome
            ORDER BY action ASC, n DESC, outcome ASC""",
        [*p95_params, *params],
    ).fetchall()
    if tail_from != -math.inf and any(r[4] is None for r in rows):
        items = _stats_rows(cur, where, params, -math.inf)
    else:
        items = [
            ActionStats(action=r[0], outcome=r[1], count=r[2], mean_elapsed_s=r[3], p95_elapsed_s=r[4])
            for r in rows
        ]
    if hint_key is not None and items:
        if len(_tail_hints) >= 1024:
            _tail_hints.clear()
        _tail_hints[hint_key] = (sum(i.count for i in items), 0.9 * min(i.p95_elapsed_s for i in items))
    return items


async def _summary(ctx: QueryContext, req: AttemptSummaryQuery) -> AttemptSummary:
    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            """SELECT ts, action, outcome, elapsed_s FROM attempts WHERE agent = ?
               ORDER BY ts_utc DESC, seq DESC LIMIT ?""",
            [req.agent, req.limit],
        ).fetchall()

    rows = await ctx.read(run)
    if not rows:
        return AttemptSummary(
            agent=req.agent, last_action_at="", last_action_name="", last_action_outcome="",
            last_action_elapsed_s=None, counts={}, p95_elapsed_s_by_action={},
        )
    counts: dict[str, int] = {}
    by_action: dict[str, list[float]] = {}
    for _ts, action, outcome, elapsed in rows:
        key = f"{action}:{outcome}"
        counts[key] = counts.get(key, 0) + 1
        by_action.setdefault(action, []).append(elapsed)
    p95 = {a: sorted(v)[p95_index(len(v))] for a, v in by_action.items()}
    ts, action, outcome, elapsed = rows[0]
    return AttemptSummary(
        agent=req.agent, last_action_at=ts, last_action_name=action, last_action_outcome=outcome,
        last_action_elapsed_s=elapsed, counts=counts, p95_elapsed_s_by_action=p95,
    )


async def _purge(ctx: QueryContext, req: AttemptsPurgeRequest) -> PurgeResult:
    before = (datetime.now(UTC) - timedelta(days=req.days)).isoformat()
    event = AttemptsPurged(id=new_event_id(), ts=now_iso(), before=before, days=req.days)
    stream, seq = await ctx.publish(event)
    await ctx.wait_for({stream: seq})

    def run(cur: duckdb.DuckDBPyConnection) -> int:
        row = cur.execute("SELECT deleted FROM attempt_purges WHERE event_id = ?", [event.id]).fetchone()
        return int(row[0]) if row else 0

    return PurgeResult(deleted=await ctx.read(run), before=before)


PROJECTION = AttemptsProjection()
