"""The query service (DESIGN §5): a `nats.micro` service in the projector's process.

Endpoints: `fleetlog.<projection>.<endpoint>` for every endpoint a projection
declares, plus `fleetlog.status`, `fleetlog.rejects`, `fleetlog.sql`, `fleetlog.rebuild`.
Requests and replies are msgspec JSON. Every reply carries `as_of` (exactly what its
read saw, services/query/cursors.py) and `lag`/`lag_s` computed when it is made
(services/query/heads.py); a request's `min_seq` (consistency token) is waited for,
bounded, else the reply is a "stale" error. Errors travel as micro error headers *and* a
JSON body `{"error": {code, message}}`; each request runs in its own task and
`$SRV.STATS` counts what really happened (services/query/dispatch.py). Every reply fits
the connection's max_payload (dispatch.fit_reply).

A node answers queries only once its views have caught up with the streams as of its
start: until then it is out of the `fleetlog-query` queue group (a fresh node would
answer from a half-folded view), while `fleetlog.status` (group `fleetlog-status`) and
`fleetlog.node.<id>.status` answer from the start and say "catching up" with progress.
Concurrency is bounded where the work is: a request takes one of `max_concurrent`
slots only while it reads the view (`QueryService.read`), never while it waits for
`min_seq`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import duckdb
import msgspec
from fleetlog.projections import Endpoint, Projection, QueryContext
from fleetlog.schemas import Event, encode_event
from fleetlog.schemas.answers import CatchUp, node_status_subject
from fleetlog.services.projector.runtime import Projector
from fleetlog.services.query.builtins import Builtins
from fleetlog.services.query.cursors import ReaderCursors, merge_as_of, read_consistent
from fleetlog.services.query.dispatch import Dispatcher, HonestService, fit_reply, note_lag
from fleetlog.services.query.heads import StreamHeads
from nats.aio.client import Client
from nats.micro.request import Request
from nats.micro.service import ServiceConfig

__all__ = ["QUEUE_GROUP", "SERVICE_NAME", "STATUS_GROUP", "QueryService", "endpoint_subject"]

log = logging.getLogger("fleetlog.query")

SERVICE_NAME = "fleetlog"
SERVICE_VERSION = "0.1.0"
QUEUE_GROUP = "fleetlog-query"
STATUS_GROUP = "fleetlog-status"  # every node, serving or catching up

T = TypeVar("T")


def endpoint_subject(projection: str, endpoint: str) -> str:
    return f"fleetlog.{projection}.{endpoint}"


class _Context(QueryContext):
    """One request's access to the view; remembers what its reads saw (the answer's as_of)."""

    def __init__(self, service: QueryService, projection: Projection) -> None:
        self._service = service
        self._projection = projection
        self.as_of: dict[str, int] | None = None

    async def read(self, fn: Callable[[duckdb.DuckDBPyConnection], Any]) -> Any:
        projector = self._service.projector
        cursors = self._service.cursors

        def run(schema: str) -> tuple[dict[str, int], Any]:
            cur = cursors.get(schema)
            try:
                return read_consistent(cur, projector, [schema], fn)
            except duckdb.Error:
                cursors.drop(schema)  # its generation may be gone; a fresh cursor next time
                raise

        schema = projector.live(self._projection.name).gen.schema
        try:
            seen, out = await self._service.read(run, schema)
        except duckdb.CatalogException:
            # A rebuild was promoted between choosing the generation and reading it, and its
            # schema dropped: read the one that is live now (once; a second failure is real).
            again = projector.live(self._projection.name).gen.schema
            if again == schema:
                raise
            seen, out = await self._service.read(run, again)
        self.as_of = merge_as_of(self.as_of, seen)
        return out

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
        self.heads = StreamHeads(nc)
        self.node = ""
        self.targets: dict[str, int] = {}  # each stream's last seq as of this node's start
        self.serving = asyncio.Event()
        self._service: HonestService | None = None
        self._dispatch: Dispatcher | None = None
        self._slots = asyncio.Semaphore(max_concurrent)
        self._cached = cached
        self._cache: collections.OrderedDict[tuple[Any, ...], asyncio.Future[tuple[Any, dict[str, int]]]] = (
            collections.OrderedDict())
        self._cache_entries = cache_entries
        self.cache_hits = 0
        # Reads get their own threads: the default pool is shared with whatever else the
        # process runs (and with asyncio.to_thread callers), which must not starve queries.
        self.readers = ThreadPoolExecutor(max_workers=8, thread_name_prefix="fleetlog-read")
        self.cursors = ReaderCursors(projector.store)
        self.builtins = Builtins(self)

    @property
    def max_payload(self) -> int:
        return int(self.nc.max_payload)

    async def start(self) -> None:
        """Note the streams' ends (the catch-up target) and answer status; call before the
        projector starts, so anything it reports caught up is at least this recent."""
        svc = HonestService(self.nc, ServiceConfig(
            name=SERVICE_NAME, version=SERVICE_VERSION, queue_group=QUEUE_GROUP,
            description="fleetlog views: attempts, runs, state, snapshots, processors",
        ))
        await svc.start()
        self._service, self._dispatch = svc, Dispatcher(svc)
        self.node = svc.id
        status = self._dispatch.handler("status", self.builtins.status_endpoint)
        await svc.add_endpoint(name="status", subject="fleetlog.status", handler=status, queue_group=STATUS_GROUP)
        node_status = self._dispatch.handler("node-status", self.builtins.status_endpoint)
        await svc.add_endpoint(name="node-status", subject=node_status_subject(self.node), handler=node_status)
        await self.nc.flush()
        try:
            await self._note_targets()
        except BaseException:  # a signal while the broker does not answer: leave no service behind
            await self.stop()
            raise

    async def _note_targets(self, first_wait_s: float = 0.1, max_wait_s: float = 2.0) -> None:
        """Each stream's last seq as the broker gives it, asked again until it does.

        Never a stand-in: a lookup that timed out or got an error reply used to count as 0,
        and a node with target 0 joined the query group at once, answering from an empty
        view. Until every target is known the node stays "catching up" (status answers).
        """
        streams = {s for p in self.projector.projections.values() for s in p.streams}
        wait_s = first_wait_s
        while True:
            ends = await self.heads.last_seqs(streams - self.targets.keys(), time.monotonic_ns())
            self.targets.update({s: seq for s, seq in ends.items() if seq is not None})
            missing = sorted(streams - self.targets.keys())
            if not missing:
                return
            log.warning("the broker did not give the last seq of %s; asking again in %.1fs", missing, wait_s)
            await asyncio.sleep(wait_s)
            wait_s = min(wait_s * 2, max_wait_s)

    def catch_up(self) -> tuple[bool, list[CatchUp]]:
        """(caught up, progress per stream) of the live views towards `targets`."""
        progress: list[CatchUp] = []
        done = True
        for name, projection in self.projector.projections.items():
            try:
                live = self.projector.live(name)
            except KeyError:  # the projector has not started yet
                live = None
            feeds = live.feeds if live is not None else {}
            for stream in projection.streams:
                feed = feeds.get(stream)
                folded = feed.checkpoint if feed else 0
                target = self.targets.get(stream)  # None: the broker has not said yet
                # `caught_up`: the broker said nothing is left after a fold made after `targets`
                # were read (a deleted last message leaves last_seq unreachable). A live view
                # that does not fold (its code version is gone; the new one rebuilds beside it)
                # will never move: waiting for it would keep the node out for the whole
                # rebuild, so it serves as it stands, its lag saying how far behind it is.
                if target is None or feed is None or not (
                        folded >= target or feed.caught_up or (live is not None and not live.folds)):
                    done = False
                progress.append(CatchUp(stream=f"{name}:{stream}", folded=folded, target=target or 0))
        return done, progress

    async def join(self, progress: Callable[[list[CatchUp]], None] | None = None,
                   every_s: float = 2.0) -> None:
        """Wait until caught up (reporting progress), then join the query group."""
        said = time.monotonic() - every_s  # the first report at once, if there is a way to go
        while True:
            done, where = self.catch_up()
            if done:
                break
            if progress is not None and time.monotonic() - said >= every_s:
                said = time.monotonic()
                progress(where)
            await asyncio.sleep(0.05)
        log.info("caught up with the streams as of the start (%s): answering queries", self.targets)
        await self._add_query_endpoints()
        self.serving.set()

    async def _add_query_endpoints(self) -> None:
        svc, dispatch = self._service, self._dispatch
        assert svc is not None and dispatch is not None, "start() first"
        for projection in self.projector.projections.values():
            group = svc.add_group(name=f"fleetlog.{projection.name}")
            for ep in projection.endpoints():
                name = f"{projection.name}-{ep.name}"
                await group.add_endpoint(
                    name=name, subject=ep.name, metadata={"description": ep.description},
                    handler=dispatch.handler(name, self._projection_handler(projection, ep)),
                )
        b = self.builtins
        for name, fn in (("rejects", b.rejects), ("rebuild", b.rebuild), ("sql", b.sql)):
            await svc.add_endpoint(name=name, subject=f"fleetlog.{name}", handler=dispatch.handler(name, fn))
        # The broker has every endpoint's subscription before this returns: a request sent
        # right after (a test, a bench) must not get "no responders".
        await self.nc.flush()

    async def stop(self) -> None:
        if self._service is not None:
            with contextlib.suppress(Exception):
                await self._service.stop()
        if self._dispatch is not None:
            await self._dispatch.drain()
        self.readers.shutdown(wait=False)

    # -- plumbing --------------------------------------------------------------
    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        """Run a blocking view read on the reader threads, holding a concurrency slot meanwhile."""
        async with self._slots:
            return await asyncio.get_running_loop().run_in_executor(self.readers, fn, *args)

    async def stamp(self, answer: Any, as_of: dict[str, int], streams: Iterable[str], since_ns: int,
                    heads: asyncio.Future[dict[str, int | None]] | None = None) -> None:
        """Set as_of, lag and lag_s on an answer that saw `as_of`."""
        got = await heads if heads is not None else await self.heads.last_seqs(streams, since_ns)
        answer.as_of = as_of
        answer.lag, answer.lag_s = await self.heads.lag(as_of, got)
        note_lag(answer.lag, answer.lag_s)

    def _projection_handler(self, projection: Projection, ep: Endpoint) -> Callable[[Request], Awaitable[None]]:
        decoder = msgspec.json.Decoder(ep.request)
        cached = (projection.name, ep.name) in self._cached

        async def handle(req: Request) -> None:
            arrived = time.monotonic_ns()
            request = decoder.decode(req.data or b"{}")
            token = getattr(request, "min_seq", None)
            await self.projector.wait_for(projection.name, token, self.wait_max_s)
            # The streams' ends are looked up while the view is read: lag costs no extra wait.
            heads = asyncio.ensure_future(self.heads.last_seqs(projection.streams, arrived))
            self.heads.prefetch_ages(self.projector.checkpoints(projection.name))
            ctx = _Context(self, projection)
            if cached:
                answer, as_of = await self._cached_answer(projection, ep, ctx, request)
            else:
                answer = await ep.handler(ctx, request)
                # No read (a command that only publishes): what the view held when it answered.
                as_of = ctx.as_of if ctx.as_of is not None else self.projector.checkpoints(projection.name)
            await self.stamp(answer, as_of, projection.streams, arrived, heads)
            await req.respond(fit_reply(answer, self.max_payload, ep.cut, keep_at_least=ep.cut_min,
                                        count=ep.cut_count))

        return handle

    async def _cached_answer(self, projection: Projection, ep: Endpoint, ctx: _Context,
                             request: Any) -> tuple[Any, dict[str, int]]:
        """The answer for this request at this view state: computed once, shared by every
        request that asks the same while the view has not moved (also while it is computed)."""
        if hasattr(request, "min_seq"):
            request = msgspec.structs.replace(request, min_seq=None)
        gen = self.projector.live(projection.name).gen.schema
        position = tuple(sorted(self.projector.checkpoints(projection.name).items()))
        key = (projection.name, ep.name, msgspec.json.encode(request), gen, position)
        fut = self._cache.get(key)
        if fut is not None:
            self._cache.move_to_end(key)
            self.cache_hits += 1
            answer, as_of = await asyncio.shield(fut)
            return msgspec.structs.replace(answer), as_of  # stamped per request: a copy
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
        as_of = ctx.as_of if ctx.as_of is not None else dict(position)
        fut.set_result((answer, as_of))
        return msgspec.structs.replace(answer), as_of
