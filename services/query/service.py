"""The query service (DESIGN §5): a `nats.micro` service in the projector's process.

Endpoints: `fleetlog.<projection>.<endpoint>` for every endpoint a projection
declares, plus `fleetlog.status` and `fleetlog.rejects`. Requests and replies are
msgspec JSON. Every reply carries `as_of` and `lag`; a request's `min_seq`
(consistency token) is waited for, bounded, else the reply is a "stale" error.
Errors travel as micro error headers *and* a JSON body `{"error": {code, message}}`.
Each request runs in its own task: a slow query or a read-your-writes wait never
holds up other requests. Concurrency is bounded where the work is: a request takes
one of `max_concurrent` slots only while it reads the view (`QueryService.read`),
never while it waits for `min_seq` — a burst of requests waiting for the fold must
not shut out everything else.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import duckdb
import msgspec
from fleetlog.projections import Endpoint, Projection, QueryContext
from fleetlog.schemas import Event, encode_event
from fleetlog.schemas.answers import (
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
from fleetlog.services.projector.runtime import Projector, StaleError
from fleetlog.services.projector.store import ViewStore
from fleetlog.services.query.sql import check_select, run_select
from nats.aio.client import Client
from nats.micro import add_service
from nats.micro.request import Request
from nats.micro.service import Service

__all__ = ["SERVICE_NAME", "QueryService", "endpoint_subject"]

log = logging.getLogger("fleetlog.query")

SERVICE_NAME = "fleetlog"
SERVICE_VERSION = "0.1.0"
QUEUE_GROUP = "fleetlog-query"

_encode = msgspec.json.Encoder().encode
T = TypeVar("T")


def endpoint_subject(projection: str, endpoint: str) -> str:
    return f"fleetlog.{projection}.{endpoint}"


class ReaderCursors:
    """One long-lived cursor per reader thread and generation schema: no cursor and `USE` per
    read (0.4 ms), and statements prepared on it stay prepared (`execute_prepared`)."""

    MAX_PER_THREAD = 16  # generations retire; past this many a thread starts afresh

    def __init__(self, store: ViewStore) -> None:
        self._store = store
        self._local = threading.local()

    def _mine(self) -> dict[str, duckdb.DuckDBPyConnection]:
        mine: dict[str, duckdb.DuckDBPyConnection] | None = getattr(self._local, "cursors", None)
        if mine is None:
            mine = self._local.cursors = {}
        return mine

    def get(self, schema: str) -> duckdb.DuckDBPyConnection:
        mine = self._mine()
        cur = mine.get(schema)
        if cur is None:
            if len(mine) >= self.MAX_PER_THREAD:
                for old in mine.values():
                    old.close()
                mine.clear()
            cur = mine[schema] = self._store.cursor(schema)
        return cur

    def drop(self, schema: str) -> None:
        cur = self._mine().pop(schema, None)
        if cur is not None:
            with contextlib.suppress(Exception):
                cur.close()


class _Context(QueryContext):
    def __init__(self, service: QueryService, projection: Projection) -> None:
        self._service = service
        self._projection = projection

    async def read(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        schema = self._service.projector.live(self._projection.name).gen.schema
        cursors = self._service.cursors

        def run() -> Any:
            cur = cursors.get(schema)
            try:
                return fn(cur)
            except duckdb.Error:
                cursors.drop(schema)  # its generation may be gone; a fresh cursor next time
                raise

        return await self._service.read(run)

    async def publish(self, event: Event) -> tuple[str, int]:
        ack = await self._service.nc.jetstream().publish(
            event.subject(), encode_event(event), headers={"Nats-Msg-Id": event.id}, timeout=5
        )
        return ack.stream, ack.seq

    async def wait_for(self, token: dict[str, int]) -> None:
        await self._service.projector.wait_for(self._projection.name, token, self._service.wait_max_s)


# Endpoints whose answer depends only on the request and the view's state: their answers
# are kept per (request without min_seq, generation, checkpoints) and reused until the
# view moves. Small answers only (a page of rows with panes could be megabytes).
CACHED_READS: frozenset[tuple[str, str]] = frozenset({("attempts", "stats"), ("attempts", "summary")})


class QueryService:
    def __init__(self, nc: Client, projector: Projector, *, wait_max_s: float = 5.0, max_concurrent: int = 64,
                 cached: frozenset[tuple[str, str]] = CACHED_READS, cache_entries: int = 256,
                 sql_max_rows: int = 10_000, sql_timeout_s: float = 10.0) -> None:
        self.nc = nc
        self.sql_max_rows = sql_max_rows
        self.sql_timeout_s = sql_timeout_s
        self.projector = projector
        self.wait_max_s = wait_max_s
        self._service: Service | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cached = cached
        self._cache: collections.OrderedDict[tuple[Any, ...], asyncio.Future[Any]] = collections.OrderedDict()
        self._cache_entries = cache_entries
        self.cache_hits = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Reads get their own threads: the default pool is shared with whatever else the
        # process runs (and with asyncio.to_thread callers), which must not starve queries.
        self.readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fleetlog-read")
        self.cursors = ReaderCursors(projector.store)

    async def start(self) -> None:
        svc = await add_service(
            self.nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="fleetlog views: attempts, runs, state, snapshots, processors",
            queue_group=QUEUE_GROUP,
        )
        self._service = svc
        for projection in self.projector.projections.values():
            group = svc.add_group(name=f"fleetlog.{projection.name}")
            for ep in projection.endpoints():
                await group.add_endpoint(
                    name=f"{projection.name}-{ep.name}",
                    subject=ep.name,
                    handler=self._spawn(self._projection_handler(projection, ep)),
                    metadata={"description": ep.description},
                )
        await svc.add_endpoint(name="status", subject="fleetlog.status", handler=self._spawn(self._status))
        await svc.add_endpoint(name="rejects", subject="fleetlog.rejects", handler=self._spawn(self._rejects))
        await svc.add_endpoint(name="rebuild", subject="fleetlog.rebuild", handler=self._spawn(self._rebuild))
        await svc.add_endpoint(name="sql", subject="fleetlog.sql", handler=self._spawn(self._sql))
        # The broker has every endpoint's subscription before start() returns: a request sent
        # right after (a test, a bench) must not get "no responders".
        await self.nc.flush()

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, 5)
        self.readers.shutdown(wait=False)

    # -- plumbing --------------------------------------------------------------
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking view read on the reader threads, holding a concurrency slot meanwhile."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self.readers, fn, *args)

    def _spawn(self, fn: Callable[[Request], Awaitable[None]]) -> Callable[[Request], Awaitable[None]]:
        async def handler(req: Request) -> None:
            task = asyncio.create_task(self._guarded(fn, req))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

        return handler

    async def _guarded(self, fn: Callable[[Request], Awaitable[None]], req: Request) -> None:
        try:
            await fn(req)
        except StaleError as exc:
            await _error(req, "stale", str(exc))
        except TimeoutError as exc:
            await _error(req, "408", str(exc))
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as exc:
            await _error(req, "400", f"bad request: {exc}")
        except KeyError as exc:
            await _error(req, "404", str(exc))
        except Exception as exc:
            log.exception("query %s failed", req.subject)
            await _error(req, "500", f"{type(exc).__name__}: {exc}")

    def _projection_handler(self, projection: Projection, ep: Endpoint) -> Callable[[Request], Awaitable[None]]:
        decoder = msgspec.json.Decoder(ep.request)
        ctx = _Context(self, projection)

        cached = (projection.name, ep.name) in self._cached

        async def handle(req: Request) -> None:
            request = decoder.decode(req.data or b"{}")
            token = getattr(request, "min_seq", None)
            await self.projector.wait_for(projection.name, token, self.wait_max_s)
            # Read before the query: the answer reflects at least this point (checkpoints move
            # only after their fold committed), so as_of never claims more than the answer holds.
            as_of, lag = self.projector.as_of(projection.name)
            if cached:
                answer = await self._cached_answer(projection, ep, ctx, request, as_of)
            else:
                answer = await ep.handler(ctx, request)
            answer.as_of = as_of
            answer.lag = lag
            await req.respond(_encode(answer))

        return handle

    async def _cached_answer(self, projection: Projection, ep: Endpoint, ctx: _Context, request: Any,
                             as_of: dict[str, int]) -> Any:
        """The answer for this request at this view state: computed once, shared by every
        request that asks the same while the view has not moved (also while it is computed)."""
        if hasattr(request, "min_seq"):
            request = msgspec.structs.replace(request, min_seq=None)
        gen = self.projector.live(projection.name).gen.schema
        key = (projection.name, ep.name, _encode(request), gen, tuple(sorted(as_of.items())))
        fut = self._cache.get(key)
        if fut is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._cache[key] = fut
        while len(self._cache) > self._cache_entries:
            self._cache.popitem(last=False)
        try:
            answer = await ep.handler(ctx, request)
        except asyncio.CancelledError:
            self._cache.pop(key, None)
            fut.cancel()
            raise
        except Exception as exc:
            self._cache.pop(key, None)
            fut.set_exception(exc)
            fut.exception()  # retrieved: whoever shares it gets it raised
            raise
        fut.set_result(answer)
        return answer

    # -- built-in endpoints ------------------------------------------------------
    async def _sql(self, req: Request) -> None:
        """`fleetlog sql`: one checked, read-only SELECT over every live view (services/query/sql.py)."""
        query = msgspec.json.decode(req.data or b"{}", type=SqlQuery)
        live = [self.projector.live(name) for name in self.projector.projections]
        check_select(query.sql, [t for r in live for t in r.projection.tables])
        for running in live:
            await self.projector.wait_for(running.projection.name, query.min_seq, self.wait_max_s)
        as_of: dict[str, int] = {}
        lag: dict[str, int] = {}
        for running in live:
            got, behind = self.projector.as_of(running.projection.name)
            for s, c in got.items():
                as_of[s] = min(as_of.get(s, c), c)
            for s, n in behind.items():
                lag[s] = max(lag.get(s, 0), n)
        store = self.projector.store
        path = ",".join(f"{store.catalog}.{r.gen.schema}" for r in live)
        max_rows = min(query.max_rows or self.sql_max_rows, self.sql_max_rows)

        def run() -> tuple[list[str], list[list[Any]], bool]:
            cur = store.cursor(None)
            try:
                cur.execute(f"SET search_path = '{path}'")
                return run_select(cur, query.sql, max_rows, self.sql_timeout_s)
            finally:
                cur.close()

        columns, rows, truncated = await self.read(run)
        await req.respond(_encode(SqlAnswer(columns=columns, rows=rows, truncated=truncated, as_of=as_of, lag=lag)))

    async def _status(self, req: Request) -> None:
        query = msgspec.json.decode(req.data or b"{}", type=StatusQuery)
        await req.respond(_encode(await self.status(query)))

    async def status(self, query: StatusQuery | None = None) -> StatusAnswer:
        js = self.nc.jetstream()
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
        lag_total: dict[str, int] = {}
        rejects_total = 0
        now_s = time.time()
        for running in self.projector.running():
            gen = running.gen
            checkpoints = {s: f.checkpoint for s, f in running.feeds.items()}
            lag = {s: max(0, last_seq.get(s, 0) - c) for s, c in checkpoints.items()}
            # Age of the lag: how old the last folded event is while more are waiting.
            lag_s = {
                s: (round(max(0.0, now_s - f.last_ts_ns / 1e9), 3) if lag[s] and f.last_ts_ns else 0.0)
                for s, f in running.feeds.items()
            }
            rows = await self.read(self._counts, gen.schema, running.projection.tables)
            if not rows:
                continue  # a promotion retired (dropped) this generation meanwhile
            rejects = rows.pop("_rejects")
            projections.append(ProjectionStatus(
                name=gen.name, version=gen.version, generation=gen.generation, state=gen.state,
                checkpoints=checkpoints, lag=lag, lag_seconds=lag_s, rejects=rejects, rows=rows,
            ))
            if gen.state == "live":
                rejects_total += rejects
                for s, c in checkpoints.items():
                    as_of[s] = min(as_of.get(s, c), c)
                    lag_total[s] = max(lag_total.get(s, 0), lag[s])
        return StatusAnswer(streams=streams, projections=projections, rejects_total=rejects_total,
                            as_of=as_of, lag=lag_total)

    def _counts(self, schema: str, tables: tuple[str, ...]) -> dict[str, int]:
        """Row counts of one generation; empty if a promotion retired (dropped) it meanwhile."""
        import duckdb

        try:
            cur = self.projector.store.cursor(schema)
        except duckdb.CatalogException:
            return {}
        try:
            out = {}
            for table in (*tables, "_rejects"):
                row = cur.execute(f"SELECT count(*) FROM {table}").fetchone()
                out[table] = int(row[0]) if row else 0
            return out
        except duckdb.CatalogException:
            return {}
        finally:
            cur.close()

    async def _rejects(self, req: Request) -> None:
        query = msgspec.json.decode(req.data or b"{}", type=RejectsQuery)
        items: list[RejectRow] = []
        names = [query.projection] if query.projection else list(self.projector.projections)
        for name in names:
            if name not in self.projector.projections:
                raise KeyError(f"unknown projection {name!r}")
            await self.projector.wait_for(name, query.min_seq, self.wait_max_s)
            schema = self.projector.live(name).gen.schema

            def run(schema: str = schema, name: str = name) -> list[RejectRow]:
                cur = self.projector.store.cursor(schema)
                try:
                    rows = cur.execute(
                        "SELECT stream, seq, subject, reason, data, CAST(rejected_at AS VARCHAR) FROM _rejects"
                        " ORDER BY rejected_at DESC, seq DESC LIMIT ?",
                        [query.limit],
                    ).fetchall()
                finally:
                    cur.close()
                return [
                    RejectRow(projection=name, stream=r[0], seq=r[1], subject=r[2], reason=r[3],
                              data=bytes(r[4]).decode("utf-8", "replace"), rejected_at=r[5])
                    for r in rows
                ]

            items.extend(await self.read(run))
        await req.respond(_encode(RejectsAnswer(items=items[: query.limit])))

    async def _rebuild(self, req: Request) -> None:
        body = msgspec.json.decode(req.data or b"{}", type=dict[str, str])
        name = body.get("projection", "")
        if name not in self.projector.projections:
            raise KeyError(f"unknown projection {name!r}")
        gen = await self.projector.rebuild(name)
        await req.respond(_encode({"projection": name, "generation": gen.generation, "schema": gen.schema}))


async def _error(req: Request, code: str, message: str) -> None:
    flat = " ".join(message.split())[:1000]
    with contextlib.suppress(Exception):
        await req.respond_error(code, flat, data=_encode({"error": {"code": code, "message": message}}))
