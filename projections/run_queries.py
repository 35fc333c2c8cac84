"""Read endpoints of the run ledger view (`fleetlog.runs.<name>`).

`candidates` and `expired` only *propose*: the caller's guarded publish decides.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import RunState
from fleetlog.schemas.runs import (
    Candidate,
    Candidates,
    CandidatesQuery,
    ExpiredQuery,
    FoldedStateQuery,
    MaxSequence,
    MaxSequenceQuery,
    Proposal,
    Proposals,
    RunEventPage,
    RunEventsQuery,
    RunEventView,
    RunPage,
    RunsListQuery,
    run_view,
)

from . import run_stats
from ._base import Endpoint, QueryContext, execute_prepared

if TYPE_CHECKING:
    import duckdb

__all__ = ["ENDPOINTS"]

# How far down the exact order striped proposals reach (see `_candidates`).
STRIPE_WINDOW = 1024

_state = msgspec.json.Decoder(RunState).decode
_loads = msgspec.json.decode


class _Where:
    """AND-ed clauses with their parameters."""

    def __init__(self) -> None:
        self.clauses: list[str] = []
        self.params: list[Any] = []

    def add(self, clause: str, *params: Any) -> None:
        self.clauses.append(clause)
        self.params.extend(params)

    def eq(self, column: str, value: Any) -> None:
        if value is not None:
            self.add(f"{column} = ?", value)

    def thread(self, thread_id: str | None, strict: bool) -> None:
        if thread_id is not None:
            self.add("thread_id = ?", thread_id)
        elif strict:
            self.add("thread_id IS NULL")

    def sql(self) -> str:
        return ("WHERE " + " AND ".join(self.clauses)) if self.clauses else ""


async def _candidates(ctx: QueryContext, req: CandidatesQuery) -> Proposals:
    w = _Where()
    w.add("(status = 'queued' OR (claimed_by_runtime_id IS NOT NULL AND claim_lease_expires_at <= ?))", req.now)
    w.add("(requested_runtime_id IS NULL OR requested_runtime_id = '' OR requested_runtime_id = ?)", req.runtime_id)
    w.eq("queue_name", req.queue)
    if req.runner_ids:
        w.add(f"runner_id IN ({', '.join('?' * len(req.runner_ids))})", *req.runner_ids)
    w.eq("conversation_id", req.conversation_id)
    w.eq("bot_id", req.bot_id)
    w.eq("workspace_id", req.workspace_id)
    w.thread(req.thread_id, req.strict_thread)

    exact = "priority DESC, id ASC"
    if req.stripe is None:
        sql = f"SELECT run_id, priority, state_seq, state, 0 FROM runs {w.sql()} ORDER BY {exact} LIMIT ?"
        params = [*w.params, req.limit]
    else:
        # The oldest STRIPE_WINDOW candidates in the exact order; of those the caller's stripe
        # first, then the other stripes in an order of the caller's own (its salt): racing
        # claimers work on different runs, and every run still reaches the head within
        # STRIPE_WINDOW claims (no stripe starves).
        k, n, salt = req.stripe
        sql = (
            f"SELECT run_id, priority, state_seq, state, stripe FROM ("
            f"  SELECT run_id, priority, state_seq, state, id, (hash(run_id) % ?)::INTEGER AS stripe"
            f"  FROM runs {w.sql()} ORDER BY {exact} LIMIT ?"
            f") ORDER BY priority DESC, stripe = ? DESC, hash(stripe, ?), id ASC LIMIT ?"
        )
        params = [n, *w.params, STRIPE_WINDOW, k, salt, req.limit]

    def run(cur: duckdb.DuckDBPyConnection) -> list[Proposal]:
        rows = execute_prepared(cur, sql, params).fetchall()  # asked ~50 times a second in a race
        return [Proposal(run_id=r, priority=p, state_seq=q, state=msgspec.Raw(s.encode()), stripe=k)
                for r, p, q, s, k in rows]

    return Proposals(items=await ctx.read(run))


async def _expired(ctx: QueryContext, req: ExpiredQuery) -> Candidates:
    def run(cur: duckdb.DuckDBPyConnection) -> list[Candidate]:
        rows = cur.execute(
            "SELECT state, state_seq FROM runs WHERE claimed_by_runtime_id IS NOT NULL AND claim_lease_expires_at <= ?"
            " ORDER BY claim_lease_expires_at ASC, id ASC LIMIT ?",
            [req.now, req.limit],
        ).fetchall()
        return [Candidate(state=_state(s), state_seq=q) for s, q in rows]

    return Candidates(items=await ctx.read(run))


async def _list(ctx: QueryContext, req: RunsListQuery) -> RunPage:
    w = _Where()
    w.eq("conversation_id", req.conversation_id)
    if req.statuses:
        w.add(f"status IN ({', '.join('?' * len(req.statuses))})", *req.statuses)
    w.eq("runner_id", req.runner_id)
    w.eq("bot_id", req.bot_id)
    w.eq("workspace_id", req.workspace_id)
    w.thread(req.thread_id, req.strict_thread)
    w.eq("binding_id", req.binding_id)
    if req.agent_id is not None:
        w.add("(agent_id = ? OR (agent_id IS NULL AND (starts_with(binding_id, ?) OR starts_with(binding_id, ?))))",
              req.agent_id, f"agent_{req.agent_id}_", f"debug:{req.agent_id}:")

    def run(cur: duckdb.DuckDBPyConnection) -> RunPage:
        total = cur.execute(f"SELECT count(*) FROM runs {w.sql()}", w.params).fetchone()
        page = _Where()
        page.clauses, page.params = list(w.clauses), list(w.params)
        if req.before_id is not None:
            page.add("id < ?", req.before_id)
        rows = cur.execute(
            f"SELECT state FROM runs {page.sql()} ORDER BY id DESC LIMIT ?", [*page.params, req.limit + 1]
        ).fetchall()
        # Any identity may ask: the runs' credentials stay out (RunView.authorization).
        items = [run_view(_state(r[0]), public=True) for r in rows[: req.limit]]
        more = len(rows) > req.limit
        return RunPage(
            items=items,
            next_cursor=items[-1].id if more and items else None,
            has_more=more,
            total_count=int(total[0]) if total else 0,
        )

    page: RunPage = await ctx.read(run)
    return page


_EVENT_COLUMNS = "id, run_id, sequence, type, data, usage, source, artifact_refs, metadata, created_at, fence"


def event_view(row: Sequence[Any]) -> RunEventView:
    id_, run_id, sequence, type_, data, usage, source, refs, metadata, created_at, fence = row
    return RunEventView(
        id=id_, run_id=run_id, sequence=sequence, type=type_, data=_loads(data),
        usage=None if usage is None else _loads(usage), created_at=created_at, source=source,
        artifact_refs=_loads(refs), metadata=_loads(metadata), fence=fence,
    )


async def _events(ctx: QueryContext, req: RunEventsQuery) -> RunEventPage:
    w = _Where()
    w.add("run_id = ?", req.run_id)
    if req.after_sequence is not None:
        w.add("sequence > ?", req.after_sequence)
    if req.before_sequence is not None:
        w.add("sequence < ?", req.before_sequence)
    order = "ASC" if req.direction == "forward" else "DESC"

    def run(cur: duckdb.DuckDBPyConnection) -> list[tuple[Any, ...]]:
        return cur.execute(
            f"SELECT {_EVENT_COLUMNS} FROM run_events {w.sql()} ORDER BY sequence {order} LIMIT ?",
            [*w.params, req.limit + 1],
        ).fetchall()

    rows = await ctx.read(run)
    items = [event_view(r) for r in rows[: req.limit]]
    more = len(rows) > req.limit
    return RunEventPage(
        items=items,
        next_cursor=items[-1].sequence if more and items else None,
        prev_cursor=items[0].sequence if items else None,
        has_more=more,
    )


async def _max_sequence(ctx: QueryContext, req: MaxSequenceQuery) -> MaxSequence:
    def run(cur: duckdb.DuckDBPyConnection) -> int | None:
        row = cur.execute("SELECT max(sequence) FROM run_events WHERE run_id = ?", [req.run_id]).fetchone()
        return None if row is None or row[0] is None else int(row[0])

    return MaxSequence(sequence=await ctx.read(run))


async def _folded_state(ctx: QueryContext, req: FoldedStateQuery) -> Candidates:
    def run(cur: duckdb.DuckDBPyConnection) -> list[Candidate]:
        rows = cur.execute("SELECT state, state_seq FROM runs WHERE run_id = ?", [req.run_id]).fetchall()
        return [Candidate(state=_state(s), state_seq=q) for s, q in rows]

    return Candidates(items=await ctx.read(run))


# A page too big for the connection's max_payload is cut to its first n items (n >= 1), the
# cursor continuing right after them (services/query/dispatch.py fit_reply).
def _cut_runs(page: RunPage, n: int) -> RunPage:
    return msgspec.structs.replace(page, items=page.items[:n], next_cursor=page.items[n - 1].id, has_more=True)


def _cut_events(page: RunEventPage, n: int) -> RunEventPage:
    return msgspec.structs.replace(page, items=page.items[:n], next_cursor=page.items[n - 1].sequence, has_more=True)


# Proposals and expired leases are work lists the caller takes from the front and asks for
# again (the claimer each round, the sweeper after marking): the front of the list is the
# answer that fits. Proposals carry each run's state JSON, of any size: 500 of them could
# be megabytes, and a 413 there would stop every claim.
def _cut_front(answer: Proposals | Candidates, n: int) -> Proposals | Candidates:
    return msgspec.structs.replace(answer, items=answer.items[:n])


ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint("list", RunsListQuery, _list, "runs newest first, filtered, cursor-paged", cut=_cut_runs),
    Endpoint("events", RunEventsQuery, _events, "a run's result events by sequence, cursor-paged", cut=_cut_events),
    Endpoint("candidates", CandidatesQuery, _candidates, "runs the view believes claimable (proposals)",
             cut=_cut_front),
    Endpoint("expired", ExpiredQuery, _expired, "claimed runs whose lease passed, oldest lease first",
             cut=_cut_front),
    Endpoint("max_sequence", MaxSequenceQuery, _max_sequence, "highest result-event sequence of a run"),
    Endpoint("state", FoldedStateQuery, _folded_state, "a run's folded state (a guarded reader's fallback)"),
    *run_stats.ENDPOINTS,
)
