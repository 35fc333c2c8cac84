"""The projector runtime (DESIGN §4): any projection, exactly once, bulk only.

Per generation and stream, an `OrderedReader` delivers the stream in order from
checkpoint + 1. Each batch (by count or time) is decoded and validated, then
folded and its checkpoint written in ONE DuckDB transaction: a crash at any
point resumes exactly where the last commit left off, with no acks needed.
The loop (services/projector/pipeline.py) prepares batch N+1 while batch N folds.
Events that cannot be decoded or break a rule go to `_rejects` (same
transaction) and to FLEET_REJECTS; nothing blocks the stream.

The runtime knows nothing about any family: it only uses the `Projection`
interface (name, version, streams, event types, DDL, validate, fold).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from fleetlog.projections import Projection
from fleetlog.schemas import subjects
from fleetlog.services.backbone.errors import StaleError
from fleetlog.services.backbone.tasks import stop_tasks
from fleetlog.services.projector.committed import Committed
from fleetlog.services.projector.fold import BatchFolder, Reject
from fleetlog.services.projector.fold_stats import FoldStats
from fleetlog.services.projector.pipeline import CATCHUP_BATCH_EVENTS, FoldPipeline
from fleetlog.services.projector.pipeline import Feed as _Feed
from fleetlog.services.projector.pipeline import Running as _Running
from fleetlog.services.projector.retention import keep_to_streams
from fleetlog.services.projector.store import Generation, ViewStore
from nats.aio.client import Client

__all__ = ["Projector", "Reject", "StaleError"]

log = logging.getLogger("fleetlog.projector")

class Projector(FoldPipeline):
    def __init__(
        self,
        store: ViewStore,
        projections: Sequence[Projection],
        servers: list[str],
        *,
        nc: Client | None = None,
        batch_max: int = 5000,
        batch_wait_s: float = 0.02,
        max_event_bytes: int = 512 * 1024,
        idle_checkpoint_s: float = 1.0,
        retention_interval_s: float = 60.0,
        publish_rejects: bool = True,
        paused: bool = False,
    ) -> None:
        self.store = store
        self.projections = {p.name: p for p in projections}
        self.servers = servers
        self.nc = nc  # for publishing rejects and reading stream info
        self.batch_max = batch_max
        self.catchup_batch_max = max(batch_max, CATCHUP_BATCH_EVENTS)
        self.batch_wait_s = batch_wait_s
        self.max_event_bytes = max_event_bytes
        self.idle_checkpoint_s = idle_checkpoint_s
        self.retention_interval_s = retention_interval_s
        self.publish_rejects = publish_rejects  # False for a private replica: it publishes nothing
        self.folder = BatchFolder(store, max_event_bytes)
        # One thread does every write (they are serialised by the write lock anyway): DuckDB's
        # allocator then keeps one thread cache warm instead of one per pool thread.
        self._fold_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetlog-fold")
        # Decodes batch N+1 while the fold thread folds batch N (services/projector/pipeline.py).
        self._prepare_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fleetlog-prepare")
        self._running: dict[tuple[str, int], _Running] = {}
        self._write_lock = self.folder.write_lock
        self._stopping = asyncio.Event()
        self._advanced = asyncio.Event()
        # Cleared while the fold is held (`pause`): a view that is behind on purpose (tests of
        # lag and catch-up, an operator holding the file still).
        self._folding = asyncio.Event()
        if not paused:
            self._folding.set()
        self._reject_queue: asyncio.Queue[tuple[str, Reject]] = asyncio.Queue(maxsize=100_000)
        self._aux: list[asyncio.Task[None]] = []
        self.folded_events = 0
        self.fold_stats = FoldStats()  # batch sizes, fold times, rejects by kind: for /metrics
        self.committed = Committed()  # which checkpoints a read saw, without a transaction
        self.folder.tx.around_commit = self.committed.committing

    # -- lifecycle -----------------------------------------------------------
    async def start(self) -> None:
        for projection in self.projections.values():
            gens = self.store.generations(projection.name)
            live = next((g for g in gens if g.state == "live"), None)
            building = [g for g in gens if g.state == "building"]
            if live is None:
                live = self.store.create_generation(projection, "live")
            for g in building:
                if g.version != projection.version:
                    self.store.retire(g)  # built by code that is gone
            building = [g for g in building if g.version == projection.version]
            live_folds = live.version == projection.version
            await self._launch(projection, live, folds=live_folds)
            if not live_folds and not building:
                log.warning(
                    "projection %s: version %d -> %d, rebuilding beside the live view",
                    projection.name, live.version, projection.version,
                )
                building = [self.store.create_generation(projection, "building")]
            for g in building:
                await self._launch(projection, g, folds=True)
        if self.publish_rejects:
            self._aux.append(asyncio.create_task(self._publish_rejects(), name="fleetlog-rejects"))
        self._aux.append(asyncio.create_task(self._checkpoint_when_idle(), name="fleetlog-checkpoint"))
        retention = keep_to_streams(self, self.retention_interval_s)
        self._aux.append(asyncio.create_task(retention, name="fleetlog-retention"))

    async def rebuild(self, name: str) -> Generation:
        """Build a fresh generation of `name` from sequence 1 beside the live one."""
        projection = self.projections[name]
        for (pname, _), running in self._running.items():
            if pname == name and running.gen.state == "building":
                return running.gen
        gen = self.store.create_generation(projection, "building")
        await self._launch(projection, gen, folds=True)
        return gen

    def pause(self) -> None:
        """Hold the fold after the batch in hand: views stay where they are until `resume`."""
        self._folding.clear()

    def resume(self) -> None:
        self._folding.set()

    async def stop(self) -> None:
        """Stop reading; the batch being folded is committed first."""
        self._stopping.set()
        self._folding.set()  # a held batch is folded and committed, then the loop ends
        tasks = [t for r in self._running.values() for t in r.tasks]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        await stop_tasks(self._aux)  # cancels again if a cancellation is swallowed (backbone/tasks.py)
        self._fold_thread.shutdown(wait=True)
        self._prepare_thread.shutdown(wait=True)

    async def _launch(self, projection: Projection, gen: Generation, *, folds: bool) -> None:
        running = _Running(projection, gen, folds=folds)
        checkpoints = self.store.checkpoints(gen.schema)
        self.committed.start(gen.schema, {s: checkpoints.get(s, 0) for s in projection.streams})
        for stream in projection.streams:
            running.feeds[stream] = _Feed(checkpoint=checkpoints.get(stream, 0))
        self._running[(projection.name, gen.generation)] = running
        if folds:
            for stream in projection.streams:
                running.tasks.append(
                    asyncio.create_task(self._fold_feed(running, stream), name=f"fold-{gen.schema}-{stream}")
                )

    async def _check_caught_up(self, running: _Running, stream: str) -> None:
        """An empty or fully folded stream never delivers a record; ask the broker instead."""
        if self.nc is None or not self.nc.is_connected:
            return
        feed = running.feeds[stream]
        feed.checked_at = time.monotonic()
        try:
            info = await self.nc.jetstream().stream_info(stream)
        except Exception:
            return
        last_seq = info.state.last_seq
        if info.state.messages == 0 and last_seq > feed.checkpoint:
            # Everything up to last_seq left the stream unfolded (aged out before a rebuild,
            # or purged): nothing will ever be delivered up to it, so the checkpoint moves
            # there, or a min_seq token up to last_seq would wait in vain.
            await asyncio.get_running_loop().run_in_executor(
                self._fold_thread, self._advance, running.gen.schema, stream, last_seq
            )
            feed.checkpoint = last_seq
        if last_seq <= feed.checkpoint or not await self._any_after(stream, feed.checkpoint):
            feed.caught_up = True
            feed.pending = 0
            if running.gen.state == "building":
                await self._maybe_promote(running)

    async def _any_after(self, stream: str, seq: int) -> bool:
        """Whether `stream` holds a message after `seq` (the last ones may have been deleted:
        last_seq then stays beyond anything that will ever be delivered). True if unsure."""
        assert self.nc is not None
        body = json.dumps({"seq": seq + 1, "next_by_subj": ">"}).encode()
        try:
            msg = await self.nc.request(f"$JS.API.DIRECT.GET.{stream}", body, timeout=2)
        except Exception:
            return True
        return (msg.headers or {}).get("Status") != "404"

    async def _maybe_promote(self, running: _Running) -> None:
        if not all(f.caught_up for f in running.feeds.values()):
            return
        name = running.projection.name
        old = next(
            (r for (n, _), r in self._running.items() if n == name and r.gen.state == "live"), None
        )
        report = await asyncio.to_thread(self._compare, old, running)
        await asyncio.to_thread(self.store.promote, running.gen, old.gen if old else None, report)
        log.info("projection %s: generation %d is live (%s)", name, running.gen.generation, report)
        if old is not None:
            self._running.pop((name, old.gen.generation), None)
            # Stop the old fold loops before their schema goes: each ends once its batch in
            # flight is done with and its reader (socket, consumer, buffer) is closed
            # (pipeline.py). Dropped first, that batch failed on the dropped schema. stop_tasks
            # cancels again if a cancellation is swallowed (backbone/tasks.py).
            await stop_tasks(old.tasks)
            await asyncio.to_thread(self.store.drop_retired, old.gen)

    def _compare(self, old: _Running | None, new: _Running) -> str:
        """Compare the rebuilt tables with the live ones when both stand at the same checkpoints."""
        if old is None:
            return json.dumps({"compared": False, "why": "no live generation"})
        with self._write_lock:
            same_point = {s: f.checkpoint for s, f in old.feeds.items()} == {
                s: f.checkpoint for s, f in new.feeds.items()
            }
            if not same_point or not old.folds:
                return json.dumps({"compared": False, "why": "live generation is at other checkpoints"})
            tables = new.projection.tables
            a = self.store.table_digest(old.gen.schema, tables)
            b = self.store.table_digest(new.gen.schema, tables)
        return json.dumps({"compared": True, "equal": a == b, "live": a, "rebuilt": b})

    def _advance(self, schema: str, stream: str, seq: int) -> None:
        self.folder.advance(schema, stream, seq)

    # -- checkpoints -------------------------------------------------------------
    async def _checkpoint_when_idle(self) -> None:
        """Write the WAL into the file once no fold has committed for `idle_checkpoint_s`.

        A restart then replays little WAL, and the automatic checkpoint (at
        `checkpoint_threshold`, run by the commit that crosses it, which waits for it)
        lands less often on a live fold.
        """
        done_at = 0.0
        while True:
            await asyncio.sleep(self.idle_checkpoint_s / 2)
            last = self.folder.tx.last_commit
            if last <= done_at or time.monotonic() - last < self.idle_checkpoint_s:
                continue
            done_at = last
            if self.store.wal_bytes() > 0:
                await asyncio.get_running_loop().run_in_executor(self._fold_thread, self._checkpoint)

    async def trim(self, projection: Projection, schema: str, stream: str, first_seq: int) -> int:
        """Retention (services/projector/retention.py): drop rows whose messages aged out of `stream`."""
        return await asyncio.get_running_loop().run_in_executor(
            self._fold_thread, self.folder.trim, projection, schema, stream, first_seq
        )

    def _checkpoint(self) -> None:
        if self.folder.tx.holding:  # a catch-up transaction is open: its COMMIT comes within HOLD_S
            return
        with self._write_lock:
            try:
                self.store.checkpoint()
            except Exception as exc:  # e.g. a long read still open; the next idle period retries
                log.debug("idle checkpoint skipped: %s", exc)

    # -- rejects stream ------------------------------------------------------
    async def _publish_rejects(self) -> None:
        """Side effect of live folding only: a rebuild never re-emits (dedup id per stream seq)."""
        while True:
            name, r = await self._reject_queue.get()
            headers = {
                "Nats-Msg-Id": f"reject.{name}.{r.stream}.{r.seq}",
                "Fleetlog-Projection": name,
                "Fleetlog-Stream": r.stream,
                "Fleetlog-Seq": str(r.seq),
                "Fleetlog-Subject": r.subject,
                "Fleetlog-Reason": " ".join(r.reason.split())[:2000],
            }
            for attempt in range(20):
                if self.nc is None:
                    break
                try:
                    await self.nc.jetstream().publish(subjects.reject(name), r.data, headers=headers, timeout=5)
                    break
                except Exception as exc:
                    log.debug("rejects publish failed (%s), retry %d", exc, attempt)
                    await asyncio.sleep(min(0.1 * 2**attempt, 5))

    # -- what queries need -----------------------------------------------------
    def live(self, name: str) -> _Running:
        for (pname, _), running in self._running.items():
            if pname == name and running.gen.state == "live":
                return running
        raise KeyError(f"no live generation of projection {name!r}")

    def running(self) -> list[_Running]:
        return list(self._running.values())

    def checkpoints(self, name: str) -> dict[str, int]:
        """The live generation's folded seq per stream, in memory: it moves only after the fold
        that reached it committed, so it is never ahead of what a read can see."""
        return {s: f.checkpoint for s, f in self.live(name).feeds.items()}

    async def wait_for(self, name: str, token: dict[str, int] | None, timeout_s: float) -> None:
        """Read-your-writes: wait until the live generation folded every seq in `token`."""
        if not token:
            return
        deadline = time.monotonic() + timeout_s
        while True:
            running = self.live(name)
            missing = {
                s: seq for s, seq in token.items() if s in running.feeds and running.feeds[s].checkpoint < seq
            }
            if not missing:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                have = {s: running.feeds[s].checkpoint for s in missing}
                raise StaleError(
                    f"stale: view {name} has folded {have}, the request needs {missing}; "
                    f"still behind after {timeout_s}s"
                )
            self._advanced.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._advanced.wait(), min(left, 0.05))

