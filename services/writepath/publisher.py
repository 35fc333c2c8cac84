"""The fire-and-forget write path (DESIGN §3.1).

`submit()` only enqueues and returns a `Receipt`: microseconds, never blocks,
never raises for transport trouble, callable from any thread. A background
sender publishes with JetStream acks (a reply inbox per publisher, at most
`publish_max_inflight` unacked), `Nats-Msg-Id` = event id. Whatever cannot be
acked (broker away, ack timeout, disconnect) goes to the local `Spool` and is
re-published in order when the broker is back; while the spool holds anything,
new events queue behind it so order is kept. `flush()` waits until everything
is acked and returns the consistency token.

On a cluster a stream's leader can be away for a few seconds (its node lost, an election):
publishes then time out or come back 503 (no responders) while the connection is fine.
Those are transient: they are sent again, with the same `Nats-Msg-Id` (a copy that did
land is acked as a duplicate), first after `RETRY_EVERY_S`, each further round waiting
twice as long (to 2 s), for `retry_s`; only if the outage lasts longer do they go to the
spool. A lost connection still spools what was in flight at once (the wire then fails
over to the next URL and the drain re-publishes it). On one server a 503 means the
stream is missing: it too is retried for `retry_s` (a stream being created) and spooled.

Why not `js.publish_async`: measured here at ~14,500 msgs/s (a future, a
semaphore and json.loads per message). The sender frames each run of queued
events as HPUB commands written in one go on its own connection (`PubWire`),
and acks are matched by the token in their reply subject. It is the same
protocol: a publish with a reply subject into a stream, acked by JetStream.
Core-NATS publish without an ack is never used.

Events from typed APIs (`submit_event`) arrive as structs, already checked at
the call; the sender encodes them (a run at a time, off the caller's path).

Durable mode (`durable=True`): `submit()` writes the encoded event to the spool file before
it returns (and fsyncs it with `fsync=True`); the sender publishes from the spool. A
SIGKILL then loses nothing `submit()` returned for. How the other ways a process ends
are caught: services/writepath/exitsafe.py.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import threading
import time
from pathlib import Path

from fleetlog.schemas import Event
from fleetlog.services.backbone.link import Link, within
from fleetlog.services.writepath import exitsafe
from fleetlog.services.writepath.publisher_acks import AckSide
from fleetlog.services.writepath.publisher_spool import (
    BURST,
    RETRY_EVERY_S,
    DrainChunk,
    fleet_identity,
)
from fleetlog.services.writepath.receipt import Position, PublisherStats, Receipt, Token
from fleetlog.services.writepath.spool import Spool
from fleetlog.services.writepath.wire import PubWire, frame_hpub
from nats.aio.client import Client

__all__ = ["Position", "Publisher", "PublisherStats", "Receipt", "Token"]

log = logging.getLogger("fleetlog.publisher")

# A short run of events waits this long for more before it is sent (not on flush/close):
# fewer, larger writes cost less on both sides and interrupt the caller less often.
_LINGER_S = 0.002


class Publisher(AckSide):
    """Fire-and-forget publishing with acks, a disk spool and flush (module docstring)."""

    def __init__(
        self,
        link: Link,
        spool_root: Path,
        *,
        max_inflight: int = 8192,
        queue_max: int = 200_000,
        ack_timeout_s: float = 5.0,
        spool_max_bytes: int = 1 << 30,
        exit_flush_s: float = 3.0,
        durable: bool = False,
        fsync: bool = False,
        retry_s: float = 10.0,
    ) -> None:
        self._max_inflight = max_inflight
        self._retry_s = retry_s
        self._retry: list[Receipt] = []
        self._retry_since: dict[str, float] = {}  # event id -> first transient refusal
        self._retry_at = 0.0
        self._retry_wait = RETRY_EVERY_S
        self._queue_max = queue_max
        self._ack_timeout_s = ack_timeout_s
        self._exit_flush_s = exit_flush_s
        self._durable = durable
        # Durable receipts by event id, to give them their position once the spool drain is acked.
        self._durable_receipts: dict[str, Receipt] = {}
        self._spool = Spool(spool_root, spool_max_bytes, link.servers, fsync=fsync)
        self._spilled_at_exit = False
        # Set once close() or the exit spill ran: from then on record() writes to the spool itself.
        self._sealed = False
        self._closed = False
        self.foreign_spools: list[str] = []
        self._queue: collections.deque[Receipt] = collections.deque()
        # In flight, by reply token, oldest first (the reaper relies on that order).
        self._pending: dict[bytes, tuple[Receipt, DrainChunk | None]] = {}
        self._tokens = itertools.count()
        self._stats = PublisherStats()
        self._acked_max: Token = {}
        # Broker refusals of spooled records, by event id (the spool file is append-only).
        self._refusals: dict[str, int] = {}
        self._refusal_reasons: dict[str, str] = {}  # why a spooled record was refused, by event id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._wake = asyncio.Event()
        self._slot_free = asyncio.Event()
        self._progress = asyncio.Event()
        self._idle = False
        self._closing = False
        self._flushing = 0
        self._accepted_in_loop = 0
        self._tasks: list[asyncio.Task[None]] = []
        self._stats_lock = threading.Lock()
        self._wire = PubWire(link.servers, f"{link.name}-publisher", self._on_ack, self._on_acks_done,
                             self._fail_all_pending, self._on_denied)
        # The wire connects once the client's link is up (its streams are ensured by then).
        link.on_connect(self._on_link_connect)

    # -- lifecycle ---------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        exitsafe.register(self)
        self._tasks = [
            asyncio.create_task(self._run(), name="fleetlog-publisher"),
            asyncio.create_task(self._reap(), name="fleetlog-publisher-reaper"),
        ]

    async def _on_link_connect(self, nc: Client) -> None:
        # The spool now belongs to the fleet behind this broker; only then may the orphans of
        # that fleet be adopted (never another fleet's: they would be drained into this one).
        self._spool.stamp(await fleet_identity(nc))
        await self._take_orphans()
        self._wire.start()

    @property
    def connected(self) -> bool:
        return self._wire.connected

    async def wait_connected(self, timeout_s: float) -> bool:
        """Wait (bounded) for the publisher's own connection, once the link is up."""
        return await self._wire.wait_connected(timeout_s)

    # -- producer side (any thread) -----------------------------------------
    def submit(self, event_id: str, subject: str, payload: bytes) -> Receipt:
        """Enqueue an encoded, validated event."""
        return self._enqueue(Receipt(event_id, subject, payload))

    def submit_event(self, event: Event, subject: str) -> Receipt:
        """Enqueue an event already checked against every wire rule; the sender encodes it."""
        return self._enqueue(Receipt(event.id, subject, None, 0, event))

    def _enqueue(self, receipt: Receipt) -> Receipt:
        if self._sealed:
            return self._after_close(receipt)
        if threading.get_ident() == self._loop_thread:
            self._accepted_in_loop += 1  # only this thread writes it: no lock needed
        else:
            with self._stats_lock:
                self._stats.accepted += 1
        if self._durable:
            self._durable_receipts[receipt.id] = receipt
            if self._to_spool([receipt]):  # on disk (the OS has it) before record() returns
                receipt.payload = receipt.event = None  # the spool has it: memory stays flat in an outage
            else:
                self._durable_receipts.pop(receipt.id, None)  # dropped: spool full (counted, logged)
        elif len(self._queue) >= self._queue_max:
            # Memory is bounded: past the cap, events go straight to disk.
            self._to_spool([receipt])
        else:
            self._queue.append(receipt)
        if self._idle:
            self._idle = False
            self._poke()
        exitsafe.check_sigterm()
        return receipt

    def _poke(self) -> None:
        loop = self._loop
        if loop is None:
            return
        if threading.get_ident() == self._loop_thread:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # the loop is closed: the atexit hook spools the queue
                loop.call_soon_threadsafe(self._wake.set)

    # -- sender ------------------------------------------------------------
    def _outstanding(self) -> int:
        return len(self._queue) + len(self._pending) + len(self._retry) + self._spool.pending

    async def _run(self) -> None:
        try:
            await self._send_loop()
        except BaseException:  # cancelled, or SystemExit/KeyboardInterrupt raised in this task
            if not self._closing:
                await self._exit_flush()
            raise

    async def _send_loop(self) -> None:
        backoff = 0.05
        wire = self._wire
        while True:
            if self._sealed:
                return  # spilled at exit from another thread: the spool has it all now
            if self._retry and time.monotonic() >= self._retry_at:
                self._unretry()
            if not wire.connected:
                self._spill_queue()
                await wire.wait_connected(0.25)
                continue
            if self._spool.pending:
                self._spill_queue()  # keep order: new events wait behind the spool
                if await self._drain_spool():
                    backoff = 0.05
                else:
                    await asyncio.sleep(backoff)
                    backoff = min(backoff * 2, 2.0)
                continue
            if not self._queue:
                if self._closing and not self._pending and not self._retry:
                    return
                self._idle = True
                if self._queue:
                    self._idle = False
                    continue
                self._wake.clear()
                await within(self._wake.wait(), RETRY_EVERY_S if self._retry else 0.5)
                self._idle = False
                continue
            if len(self._queue) < BURST and not self._closing and not self._flushing:
                await asyncio.sleep(_LINGER_S)
            if not await self._slots():
                continue
            n = min(len(self._queue), self._max_inflight - len(self._pending), BURST)
            queue = self._queue
            self._send([queue.popleft() for _ in range(n)], None)
            await asyncio.sleep(0)  # let the acks and the caller in between bursts

    async def _slots(self) -> bool:
        """Wait (briefly) for room in flight and in the socket buffer; True if there is some."""
        await self._wire.writable()
        if len(self._pending) < self._max_inflight:
            return True
        self._slot_free.clear()
        await within(self._slot_free.wait(), 0.5)
        return len(self._pending) < self._max_inflight

    def _send(self, receipts: list[Receipt], chunk: DrainChunk | None) -> None:
        """Frame every receipt as an acked HPUB and write them all at once (the wire is connected)."""
        wire = self._wire
        if not wire.connected:
            for receipt in receipts:
                self._failed(receipt, chunk, broker_refused=False)
            return
        inbox = wire.inbox
        max_payload = wire.max_payload
        pending = self._pending
        tokens = self._tokens
        deadline = time.monotonic() + self._ack_timeout_s
        frames = []
        for receipt in receipts:
            try:
                payload = receipt.encoded()
            except (TypeError, ValueError, OverflowError) as exc:  # checked at the call: not expected
                self._refused(receipt, chunk, f"could not be encoded: {exc}")
                continue
            if len(payload) > max_payload:
                self._refused(receipt, chunk, f"{len(payload)} bytes exceed the server's max_payload {max_payload}")
                continue
            token = b"%x" % next(tokens)
            receipt.deadline = deadline
            pending[token] = (receipt, chunk)
            frames.append(frame_hpub(receipt.subject.encode(), inbox + token, receipt.id.encode(), payload))
        if frames:
            wire.write(b"".join(frames))

    # -- flush / close ---------------------------------------------------------
    async def flush(self, timeout: float | None = 30.0) -> Token:
        """Wait until every event submitted so far is acked (or set aside); return the token.

        Raises TimeoutError (nothing is lost: the events stay queued or spooled).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        self._flushing += 1
        try:
            await self._flush_wait(deadline, timeout)
        finally:
            self._flushing -= 1
        return self.acked_token()

    async def _flush_wait(self, deadline: float | None, timeout: float | None) -> None:
        self._poke()
        while self._outstanding():
            if self._tasks and self._tasks[0].done():  # no sender (cancelled at exit): nothing moves
                raise TimeoutError(f"flush: the publisher has stopped; {self._outstanding()} events "
                                   f"not acked ({self._spool.pending} spooled on disk, kept for later)")
            self._progress.clear()
            wait = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if wait <= 0:
                raise TimeoutError(
                    f"flush: {self._outstanding()} events not yet acked after {timeout}s "
                    f"({self._spool.pending} spooled on disk, kept for later)"
                )
            await within(self._progress.wait(), wait)

    async def close(self, timeout: float = 10.0) -> None:
        """Drain within timeout; whatever is left stays in the spool for the next publisher."""
        if self._closed:
            return
        if exitsafe.exiting():
            timeout = min(timeout, self._exit_flush_s)  # SIGTERM or interpreter exit: bounded
        with contextlib.suppress(TimeoutError):
            await self.flush(timeout)
        self._closing = True
        self._poke()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._wire.close()  # what is still in flight is spooled as the connection ends
        # Sealed first: what other threads record from here on is not left in the queue.
        # Closed by the exit path (a FleetSync at interpreter shutdown), it goes to the spool
        # (daemon threads may still record) until the exit hook's last pass closes it.
        self._spilled_at_exit = exitsafe.exiting()
        self._closed = True
        self._seal()
        self._fail_all_pending()
        self._spill_queue()
        if self._spilled_at_exit:
            return
        exitsafe.unregister(self)
        self._spool.close()

    def stats(self) -> PublisherStats:
        s = self._stats
        return PublisherStats(
            accepted=s.accepted + self._accepted_in_loop, acked=s.acked, duplicates=s.duplicates, retried=s.retried,
            spooled=s.spooled,
            dropped_spool_full=self._spool.dropped,
            dead_lettered=s.dead_lettered, after_close=s.after_close,
            queued=len(self._queue) + len(self._retry), inflight=len(self._pending),
            spool_pending=self._spool.pending,
        )
