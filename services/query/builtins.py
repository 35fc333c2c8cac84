"""The query service's own endpoints: `fleetlog.status`, `fleetlog.rejects`, `fleetlog.sql`,
`fleetlog.rebuild` (the projections declare the rest)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any, Protocol, TypeVar

import duckdb
import msgspec
from fleetlog.schemas.answers import (
    CatchUp,
    ProjectionStatus,
    RejectRow,
    RejectsAnswer,
    RejectsQuery,
    SqlAnswer,
    SqlQuery,
    StatusAnswer,
    StatusQuery,
    StreamStatus,
)
from fleetlog.schemas.streams import STREAMS
from fleetlog.services.projector.runtime import Projector
from fleetlog.services.query.cursors import merge_as_of, read_at_snapshot, read_consistent
from fleetlog.services.query.dispatch import ReplyTooBig, fit_reply
from fleetlog.services.query.heads import StreamHeads
from fleetlog.services.query.sql import check_select, run_select
from nats.aio.client import Client
from nats.micro.request import Request

__all__ = ["REJECT_PREVIEW_BYTES", "Builtins", "Host"]

log = logging.getLogger("fleetlog.query")

T = TypeVar("T")

# A reject's payload can be up to the broker's max_payload (a 900 kB garbage message made
# every `rejects` answer fail): answers carry this much of it, and say so.
REJECT_PREVIEW_BYTES = 2048

_encode = msgspec.json.Encoder().encode


class Host(Protocol):
    """What these endpoints use of the QueryService (which builds them)."""

    nc: Client
    projector: Projector
    heads: StreamHeads
    node: str
    serving: asyncio.Event
    wait_max_s: float
    sql_max_rows: int
    sql_timeout_s: float

    @property
    def max_payload(self) -> int: ...

    async def read(self, fn: Callable[..., T], *args: Any) -> T: ...

    async def stamp(self, answer: Any, as_of: dict[str, int], streams: Iterable[str], since_ns: int,
                    heads: asyncio.Future[dict[str, int | None]] | None = None) -> None: ...

    def catch_up(self) -> tuple[bool, list[CatchUp]]: ...


class Builtins:
    def __init__(self, service: Host) -> None:
        self.q = service

    # -- sql -------------------------------------------------------------------
    async def sql(self, req: Request) -> None:
        """`fleetlog sql`: one checked, read-only SELECT over every live view (services/query/sql.py)."""
        arrived = time.monotonic_ns()
        q, projector = self.q, self.q.projector
        query = msgspec.json.decode(req.data or b"{}", type=SqlQuery)
        names = list(projector.projections)
        check_select(query.sql, [t for name in names for t in projector.projections[name].tables])
        for name in names:
            await projector.wait_for(name, query.min_seq, q.wait_max_s)
        store = projector.store
        max_rows = min(query.max_rows or q.sql_max_rows, q.sql_max_rows)

        def run(schemas: list[str]) -> tuple[dict[str, int], tuple[list[str], list[list[Any]], bool]]:
            cur = store.cursor(None)
            try:
                path = ",".join(f"{store.catalog}.{s}" for s in schemas)
                cur.execute(f"SET search_path = '{path}'")
                # Straight into a transaction: an ad-hoc statement may run for seconds, likely
                # across a fold's commit, and running it twice would double that.
                return read_at_snapshot(cur, schemas, lambda c: run_select(c, query.sql, max_rows, q.sql_timeout_s))
            finally:
                cur.close()

        streams = {s for name in names for s in projector.projections[name].streams}
        heads = asyncio.ensure_future(q.heads.last_seqs(streams, arrived))  # looked up while the query runs
        # The live generations are chosen after the min_seq wait (a rebuild promoted during it
        # dropped the schemas chosen before), and chosen again if one is promoted meanwhile.
        schemas = [projector.live(name).gen.schema for name in names]
        try:
            as_of, (columns, rows, truncated) = await q.read(run, schemas)
        except duckdb.CatalogException:
            again = [projector.live(name).gen.schema for name in names]
            if again == schemas:
                raise
            as_of, (columns, rows, truncated) = await q.read(run, again)
        answer = SqlAnswer(columns=columns, rows=rows, truncated=truncated,
                           truncated_by="max_rows" if truncated else "")
        await q.stamp(answer, as_of, streams, arrived, heads)
        await req.respond(_fit_sql(answer, q.max_payload))

    # -- status ----------------------------------------------------------------
    async def status_endpoint(self, req: Request) -> None:
        msgspec.json.decode(req.data or b"{}", type=StatusQuery)
        await req.respond(fit_reply(await self.status(), self.q.max_payload))

    async def status(self) -> StatusAnswer:
        q = self.q
        js = q.nc.jetstream()
        streams: list[StreamStatus] = []
        last_seq: dict[str, int] = {}
        for spec in STREAMS:
            try:
                info = await js.stream_info(spec.name)
            except Exception:
                continue
            st = info.state
            last_seq[spec.name] = st.last_seq
            streams.append(StreamStatus(
                name=spec.name, messages=st.messages, bytes=st.bytes, first_seq=st.first_seq,
                last_seq=st.last_seq, subjects=list(spec.subjects),
            ))
        projections: list[ProjectionStatus] = []
        as_of: dict[str, int] = {}
        rejects_total = 0
        for running in q.projector.running():
            gen = running.gen
            # The counts and the checkpoints they reflect come from one transaction: the
            # in-memory feeds move on after a commit, and counts taken apart from them could
            # exceed the as_of the answer claimed.
            counted = await q.read(self._counts, gen.schema, running.projection.tables)
            if counted is None:
                continue  # a promotion retired (dropped) this generation meanwhile
            checkpoints, rows = counted
            # A stream whose last seq the broker did not give has no lag figure (not 0).
            lag = {s: max(0, last_seq[s] - c) for s, c in checkpoints.items() if s in last_seq}
            # Age of the lag: how long the oldest event not folded has waited.
            lag_s = {s: (await q.heads.age(s, checkpoints[s]) if n else 0.0) for s, n in lag.items()}
            rejects = rows.pop("_rejects")
            projections.append(ProjectionStatus(
                name=gen.name, version=gen.version, generation=gen.generation, state=gen.state,
                checkpoints=checkpoints, lag=lag, lag_seconds=lag_s, rejects=rejects, rows=rows,
            ))
            if gen.state == "live":
                rejects_total += rejects
                for s, c in checkpoints.items():
                    as_of[s] = min(as_of.get(s, c), c)
        _, progress = q.catch_up()
        serving = q.serving.is_set()
        answer = StatusAnswer(streams=streams, projections=projections, rejects_total=rejects_total, node=q.node,
                              node_state="serving" if serving else "catching up",
                              catch_up=[] if serving else progress)
        answer.as_of = as_of
        answer.lag, answer.lag_s = await q.heads.lag(as_of, {s: last_seq.get(s) for s in as_of})
        return answer

    def _counts(self, schema: str, tables: tuple[str, ...]) -> tuple[dict[str, int], dict[str, int]] | None:
        """(checkpoints, row counts) of one generation as one transaction sees them; None if
        a promotion retired (dropped) it meanwhile."""
        try:
            cur = self.q.projector.store.cursor(schema)
        except duckdb.CatalogException:
            return None

        def count(c: duckdb.DuckDBPyConnection) -> dict[str, int]:
            out = {}
            for table in (*tables, "_rejects"):
                row = c.execute(f"SELECT count(*) FROM {table}").fetchone()
                out[table] = int(row[0]) if row else 0
            return out

        try:
            return read_at_snapshot(cur, [schema], count)
        except duckdb.CatalogException:
            return None
        finally:
            cur.close()

    # -- rejects ---------------------------------------------------------------
    async def rejects(self, req: Request) -> None:
        arrived = time.monotonic_ns()
        q, projector = self.q, self.q.projector
        query = msgspec.json.decode(req.data or b"{}", type=RejectsQuery)
        if query.limit < 1:
            raise ValueError(f"limit: must be at least 1, got {query.limit}")
        found: list[tuple[str, Any]] = []
        as_of: dict[str, int] | None = None
        names = [query.projection] if query.projection else list(projector.projections)
        where, params = _rejects_where(query)
        for name in names:
            if name not in projector.projections:
                raise KeyError(f"unknown projection {name!r}")
            await projector.wait_for(name, query.min_seq, q.wait_max_s)
            sql = (f"SELECT stream, seq, subject, reason, data[1:{REJECT_PREVIEW_BYTES}], octet_length(data),"
                   f" CAST(rejected_at AS VARCHAR), epoch_us(rejected_at) FROM _rejects {where}"
                   " ORDER BY rejected_at DESC, seq DESC LIMIT ?")

            def run(schema: str, sql: str = sql) -> tuple[dict[str, int], list[Any]]:
                cur = projector.store.cursor(schema)
                try:
                    # One more than asked: whether there are more (`has_more`).
                    return read_consistent(cur, projector, [schema],
                                           lambda c: c.execute(sql, [*params, query.limit + 1]).fetchall())
                finally:
                    cur.close()

            schema = projector.live(name).gen.schema
            try:
                seen, rows = await q.read(run, schema)
            except duckdb.CatalogException:  # promoted meanwhile: its schema is gone, read the new one
                if projector.live(name).gen.schema == schema:
                    raise
                seen, rows = await q.read(run, projector.live(name).gen.schema)
            as_of = merge_as_of(as_of, seen)
            found.extend((name, r) for r in rows)
        # Newest first across projections (each view's newest `limit`, merged): concatenating
        # them hid newer rejects of later projections behind [:limit].
        found.sort(key=lambda f: (f[1][7], f[1][1]), reverse=True)
        items = [
            RejectRow(projection=name, stream=r[0], seq=r[1], subject=r[2], reason=r[3],
                      data=bytes(r[4]).decode("utf-8", "replace"), rejected_at=r[6], data_bytes=int(r[5]),
                      data_truncated=int(r[5]) > len(bytes(r[4])))
            for name, r in found[: query.limit]
        ]
        answer = RejectsAnswer(items=items, has_more=len(found) > query.limit)
        await q.stamp(answer, as_of or {}, (as_of or {}).keys(), arrived)
        await req.respond(fit_reply(answer, q.max_payload, _cut_rejects))

    # -- rebuild ---------------------------------------------------------------
    async def rebuild(self, req: Request) -> None:
        body = msgspec.json.decode(req.data or b"{}", type=dict[str, str])
        name = body.get("projection", "")
        if name not in self.q.projector.projections:
            raise KeyError(f"unknown projection {name!r}")
        gen = await self.q.projector.rebuild(name)
        log.info("rebuild of %s started: generation %d folds from the streams' start beside the live one",
                 name, gen.generation)
        reply = {"projection": name, "generation": gen.generation, "schema": gen.schema}
        await req.respond(fit_reply(reply, self.q.max_payload))


def _rejects_where(query: RejectsQuery) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    if query.stream is not None:
        clauses.append("stream = ?")
        params.append(query.stream)
    if query.seq is not None:
        clauses.append("seq = ?")
        params.append(query.seq)
    return ("WHERE " + " AND ".join(clauses) if clauses else ""), params


def _cut_rejects(answer: RejectsAnswer, n: int) -> RejectsAnswer:
    return msgspec.structs.replace(answer, items=answer.items[:n], has_more=True)


def _cut_rows(answer: SqlAnswer, n: int) -> SqlAnswer:
    return msgspec.structs.replace(answer, rows=answer.rows[:n], truncated=True, truncated_by="max_payload")


def _fit_sql(answer: SqlAnswer, limit: int) -> bytes:
    """Rows are cut from the end to fit (`truncated_by: max_payload`); a first row that cannot
    fit on its own is an error naming its biggest value and the limit."""
    try:
        return fit_reply(answer, limit, _cut_rows, items="rows", keep_at_least=1)
    except ReplyTooBig:
        if not answer.rows:
            raise
    sizes = [len(_encode(v)) for v in answer.rows[0]]
    col = max(range(len(sizes)), key=sizes.__getitem__)
    raise ReplyTooBig(
        f"row 1 cannot be sent: its value in column {answer.columns[col]!r} is {sizes[col]} bytes encoded, and a"
        f" reply must fit the connection's max_payload of {limit} bytes; select less of it (e.g. left(x, n))"
    )
