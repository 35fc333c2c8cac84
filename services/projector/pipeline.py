"""The fold loop of one feed (generation × stream), pipelined: batch N+1 is prepared while N folds.

Per batch: read it (`OrderedReader.next_columns`), prepare it on the prepare thread
(`BatchFolder.prepare`: payloads into Arrow, the projection's decode into columns — Python,
holding the GIL), then fold it on the fold thread (`BatchFolder.apply`: INSERT, rejects and
checkpoint in the feed's transaction — DuckDB, mostly without the GIL). The fold of batch N
runs while batch N+1 is read and prepared, so the two threads overlap; folds still run one
at a time and in stream order on the one fold thread, and each batch writes its own
checkpoint in the transaction that holds its rows, so exactly-once is unchanged.

Live, each batch's transaction commits at once; a catch-up batch (more than `batch_max`
events behind it) may leave it open for the next ones (transactions.py). The in-memory
progress (`Feed`) of a batch moves in a callback as soon as its transaction commits, not
when the loop next looks: a query waiting for `min_seq` is woken at once, and never before
the rows it waits for are committed.

Measured (docs/benchmarks.md, issue 19, 1M replay with 2 KB panes): prepare ~8-10 µs of CPU
per event on the prepare thread (4-5 in isolation: in the replay every payload is fresh
memory), ~4.4 on the fold thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fleetlog.projections import Projection
from fleetlog.services.projector.fold import BatchFolder, Reject
from fleetlog.services.projector.fold_stats import FoldStats
from fleetlog.services.projector.store import Generation
from fleetlog.services.projector.stream_reader import OrderedReader, StreamBatch
from fleetlog.services.projector.transactions import CatchUpRolledBack

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

__all__ = ["CATCHUP_BATCH_BYTES", "CATCHUP_BATCH_EVENTS", "Feed", "FoldPipeline", "Running"]

log = logging.getLogger("fleetlog.projector")

# Batch limits while a feed is more than `batch_max` behind (a replay or a backlog). Two
# batches are in memory (one prepared, one folding): 8 MB and a 12 MB reader buffer keep the
# projector of a 1M replay of 2 KB panes under 400 MB (measured peak: 475 MB at 12 / 16 MB,
# 423 at 8 / 16, 382 at 8 / 12 with DuckDB's memory_limit at 128 MB).
CATCHUP_BATCH_EVENTS = 50_000
CATCHUP_BATCH_BYTES = 8 * 1024 * 1024
# Read ahead while a batch folds (with record overhead counted; see OrderedReader).
READER_BUFFER_BYTES = 12 * 1024 * 1024
# How often an idle feed not known to be caught up asks the broker (one STREAM.INFO each).
CHECK_IDLE_S = 0.5
# A failed fold loop starts again after this, doubling while it fails without progress.
RESTART_FIRST_S = 0.5
RESTART_MAX_S = 30.0


@dataclass
class Feed:
    """Progress of one generation on one stream (in memory; the durable copy is the checkpoint)."""

    checkpoint: int
    pending: int | None = None  # events after the checkpoint the broker reported, None = unknown
    last_ts_ns: int = 0
    caught_up: bool = False
    checked_at: float = 0.0  # monotonic time the broker was last asked (`_check_caught_up`)


@dataclass
class Running:
    projection: Projection
    gen: Generation
    feeds: dict[str, Feed] = field(default_factory=dict)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)
    folds: bool = True  # False for a live generation whose code version is gone


class _InFlight:
    """A batch handed to the fold thread: what the loop must know of it once it committed.

    `future` is the loop's view of the fold and is cancelled with the task awaiting it
    (a promotion cancels the retired generation's loop), while the fold thread goes on with
    the batch; `landed` is set only once the fold thread is done with it (folded, failed,
    or dropped from the queue unstarted), whatever happened to `future`. `committed` completes
    when the transaction holding the batch commits (with its rejects) or is undone: at once
    while live, later for a batch of a held catch-up transaction (transactions.py).
    """

    __slots__ = ("committed", "events", "future", "landed", "last_seq", "pending", "started", "ts_ns")

    def __init__(self, batch: StreamBatch) -> None:
        self.events = len(batch)
        self.last_seq = batch.last_seq
        self.pending = batch.pending()
        self.ts_ns = batch.ts_ns()
        self.started = time.perf_counter()
        loop = asyncio.get_running_loop()
        self.landed = asyncio.Event()
        self.committed: asyncio.Future[list[Reject]] = loop.create_future()
        self.future: asyncio.Future[list[Reject]] = loop.create_future()

    def submit(self, fold_thread: ThreadPoolExecutor, apply: Callable[..., list[Reject]], *args: object,
               hold: bool) -> None:
        loop = asyncio.get_running_loop()

        def on_commit(rejects: list[Reject], error: BaseException | None) -> None:  # on the fold thread
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile: nobody waits
                loop.call_soon_threadsafe(_settle, self.committed, rejects, error)

        work = fold_thread.submit(apply, *args, hold=hold, landed=on_commit)
        self.future = asyncio.wrap_future(work, loop=loop)
        # Read by `_landed`, unless the loop leaves first (a promotion, a cancellation): the
        # error is raised there or not at all, never logged at GC as "never retrieved".
        self.future.add_done_callback(_retrieved)

        def landed(done: concurrent.futures.Future[list[Reject]]) -> None:  # fold thread, or the loop's cancel
            with contextlib.suppress(RuntimeError):
                if done.cancelled():  # cancelled in the queue (the loop's task was): nothing was written
                    loop.call_soon_threadsafe(self.committed.cancel)
                elif done.exception() is not None:  # no commit will come
                    loop.call_soon_threadsafe(_settle, self.committed, [], done.exception())
                loop.call_soon_threadsafe(self.landed.set)

        # After `wrap_future`'s own callback: on the loop, `future` completes before a task
        # waiting on `landed` resumes.
        work.add_done_callback(landed)


def _retrieved(future: asyncio.Future[list[Reject]]) -> None:
    if not future.cancelled():
        future.exception()


def _settle(future: asyncio.Future[list[Reject]], rejects: list[Reject], error: BaseException | None) -> None:
    if future.done():
        return
    if error is None:
        future.set_result(rejects)
    else:
        future.set_exception(error)


async def _to_the_end(awaitable: Awaitable[object]) -> None:
    """Await `awaitable` to its end even if this task is cancelled meanwhile; a cancellation
    that arrived is raised afterwards. For the clean-up of a fold loop: `stop_tasks` cancels
    it again every few seconds (backbone/tasks.py), and a clean-up cut short leaks a reader.
    """
    inner = asyncio.ensure_future(awaitable)
    cancelled = False
    while True:
        try:
            await asyncio.shield(inner)
            break
        except asyncio.CancelledError:
            if inner.done():
                raise  # `inner` itself was cancelled, not this task
            cancelled = True
    if cancelled:
        raise asyncio.CancelledError


class FoldPipeline:
    """The projector's fold loop (a mixin of `Projector`, which provides what is declared here)."""

    servers: list[str]
    folder: BatchFolder
    fold_stats: FoldStats
    folded_events: int
    batch_max: int
    catchup_batch_max: int
    batch_wait_s: float
    publish_rejects: bool
    _fold_thread: ThreadPoolExecutor
    _prepare_thread: ThreadPoolExecutor
    _stopping: asyncio.Event
    _folding: asyncio.Event
    _advanced: asyncio.Event
    _reject_queue: asyncio.Queue[tuple[str, Reject]]

    async def _check_caught_up(self, running: Running, stream: str) -> None:
        raise NotImplementedError  # Projector's

    async def _maybe_promote(self, running: Running) -> None:
        raise NotImplementedError  # Projector's

    async def _fold_feed(self, running: Running, stream: str) -> None:
        """Fold one feed until the node stops or the generation retires; a fold loop that fails
        (an error nobody foresaw: the view's disk full, a bug in a projection's bulk path) is
        logged with its traceback, counted (`fleetlog_fold_restarts`) and started again from the
        feed's checkpoint after a backoff, never left dead without a word: before, the task
        ended and the view stopped folding, silent until the node stopped. Exactly-once is
        unchanged: a batch either committed with its checkpoint or is read again."""
        backoff = RESTART_FIRST_S
        while not self._stopping.is_set() and running.gen.state != "retired":
            folded = running.feeds[stream].checkpoint
            try:
                await self._consume(running, stream)
                return
            except asyncio.CancelledError:
                raise
            except CatchUpRolledBack:
                # A failure undid a held catch-up transaction (logged where it happened): read
                # again from the checkpoint at once; up to the failed batch each batch commits
                # alone, so the failed one meets its own fallbacks.
                self.fold_stats.restarted(running.projection.name, stream)
                continue
            except Exception:
                feed = running.feeds[stream]
                backoff = RESTART_FIRST_S if feed.checkpoint > folded else min(backoff * 2, RESTART_MAX_S)
                self.fold_stats.restarted(running.projection.name, stream)
                log.exception("fold of %s (%s) on %s failed after checkpoint %d; starting again from it in %.1f s",
                              running.projection.name, running.gen.schema, stream, feed.checkpoint, backoff)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stopping.wait(), backoff)

    async def _consume(self, running: Running, stream: str) -> None:
        feed = running.feeds[stream]
        reader = OrderedReader(
            self.servers, stream, feed.checkpoint + 1, name=f"fleetlog-{running.gen.schema}",
            max_buffer_bytes=READER_BUFFER_BYTES, keep_headers=False,
        )
        loop = asyncio.get_running_loop()
        projection, schema = running.projection, running.gen.schema
        # A catch-up batch may stay in an open transaction for the next ones (transactions.py),
        # unless the generation reads several streams: their feeds' transactions could then
        # touch the same rows, and only one transaction is open at a time anyway.
        may_hold = len(projection.streams) == 1
        folding: _InFlight | None = None
        uncommitted: list[_InFlight] = []  # folded or folding, their transaction not yet committed
        try:
            await reader.start()
            await self._check_caught_up(running, stream)
            while not self._stopping.is_set():
                uncommitted = _undone_raised(uncommitted)
                # Far behind (a replay, a backlog already delivered): bigger batches, bounded by
                # bytes. Each costs a few statements and ms whatever its size.
                behind = reader.buffered > self.batch_max or (
                    feed.pending is not None and feed.pending > self.batch_max)
                batch = await reader.next_columns(
                    self.catchup_batch_max if behind else self.batch_max,
                    self.batch_wait_s,
                    CATCHUP_BATCH_BYTES if behind else None,
                )
                if running.gen.state == "retired":
                    return
                if batch is None:
                    if folding is not None:
                        await self._landed(running, stream, folding)
                        folding = None
                    await self._commit_held(schema, stream, uncommitted)
                    # Idle and not known caught up (live or building): ask the broker, at most
                    # every CHECK_IDLE_S. A live view restarted after its last messages were
                    # deleted is delivered nothing, so only the broker can say it is done.
                    if not feed.caught_up and time.monotonic() - feed.checked_at >= CHECK_IDLE_S:
                        await self._check_caught_up(running, stream)
                    continue
                if not self._folding.is_set():  # held (`pause`): what was folded commits, the batch in hand waits
                    if folding is not None:
                        await self._landed(running, stream, folding)
                        folding = None
                    await self._commit_held(schema, stream, uncommitted)
                    await self._folding.wait()
                prepare = self.folder.prepare
                staged = await loop.run_in_executor(self._prepare_thread, prepare, projection, stream, batch)
                if folding is not None:
                    await self._landed(running, stream, folding)
                # More than a batch still to come (in the broker or already in the reader's buffer).
                hold = may_hold and batch.pending() + reader.buffered > self.batch_max
                folding = _InFlight(batch)
                folding.submit(self._fold_thread, self.folder.apply, projection, schema, stream, batch, staged,
                               hold=hold)
                folding.committed.add_done_callback(self._progress(running, stream, folding))
                uncommitted.append(folding)
                del batch, staged  # the fold thread holds them; not kept while the next is read
        finally:
            # Cancelled (a promotion retires this generation; `stop_tasks`) or not, the batch in
            # flight is folded (or fails) and what is held commits before the loop ends, and the
            # reader is closed: its socket, its consumer on the stream and its buffer are not left
            # behind. A cancellation may have cancelled `folding.future` already (it lands in
            # `_landed` as often as not), so wait for the fold thread itself, not that future.
            try:
                if folding is not None:
                    await _to_the_end(folding.landed.wait())
                # A failure here was raised already (the batch's fold) or logged (an undone
                # catch-up transaction); the next start reads from the committed checkpoint.
                with contextlib.suppress(Exception):
                    await _to_the_end(self._commit_held(schema, stream, uncommitted))
            finally:
                await _to_the_end(reader.close())

    async def _commit_held(self, schema: str, stream: str, uncommitted: list[_InFlight]) -> None:
        """Commit the feed's held catch-up transaction, and wait for its batches' progress.
        Raises CatchUpRolledBack if it was undone."""
        waiting = [f.committed for f in uncommitted if not f.committed.done()]
        if waiting:
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(self._fold_thread, self.folder.tx.commit_feed, schema, stream)
            await asyncio.wait(waiting)
        uncommitted[:] = _undone_raised(uncommitted)

    def _progress(
        self, running: Running, stream: str, done: _InFlight
    ) -> Callable[[asyncio.Future[list[Reject]]], None]:
        """Move the feed's progress once the batch's transaction committed (on the loop, straight away)."""

        def moved(future: asyncio.Future[list[Reject]]) -> None:
            if future.cancelled() or future.exception() is not None:
                return  # raised to the loop by `_undone_raised`
            rejects = future.result()
            feed = running.feeds[stream]
            live = running.gen.state == "live"
            self.fold_stats.observe(running.projection.name, done.events, time.perf_counter() - done.started,
                                    [r.reason for r in rejects] if live else [])
            feed.checkpoint = max(feed.checkpoint, done.last_seq)
            feed.pending = done.pending
            feed.last_ts_ns = done.ts_ns
            feed.caught_up = feed.pending == 0
            self.folded_events += done.events
            self._advanced.set()
            if rejects and live and self.publish_rejects:
                for r in rejects:
                    with contextlib.suppress(asyncio.QueueFull):
                        self._reject_queue.put_nowait((running.projection.name, r))

        return moved

    async def _landed(self, running: Running, stream: str, done: _InFlight) -> None:
        """Wait for the batch in flight (its progress moved in `_progress`); promote if it finished a rebuild."""
        await done.future
        if running.gen.state == "building" and running.feeds[stream].caught_up:
            await self._maybe_promote(running)


def _undone_raised(inflight: list[_InFlight]) -> list[_InFlight]:
    """The batches whose transaction has not committed yet; raises CatchUpRolledBack if one was undone
    (every undone one's error is retrieved: none is left to the loop's "never retrieved" warning)."""
    errors = [f.committed.exception() for f in inflight if f.committed.done() and not f.committed.cancelled()]
    first = next((e for e in errors if e is not None), None)
    if first is not None:
        raise first
    return [f for f in inflight if not f.committed.done()]
