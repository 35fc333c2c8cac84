"""The publisher's disk side: events that cannot be acked go to the `Spool`, and the spool
is drained in order when the broker is back (DESIGN §3.1).

`SpoolSide` also holds the publisher's last acts when the process ends without `close()`
(a bounded flush when its task is cancelled, the synchronous spill at exit).

`SpoolSide` is mixed into `Publisher` (services/writepath/publisher.py), which owns the queue, the
in-flight table and the wire; this module holds what happens on disk: spilling, the
ordered drain that commits only the acked prefix, and the dead letter for events the
broker keeps refusing.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import threading
import time

from fleetlog.schemas.streams import STREAMS
from fleetlog.services.writepath import exitsafe
from fleetlog.services.writepath.receipt import PublisherStats, Receipt
from fleetlog.services.writepath.spool import Spool, SpoolRecord
from fleetlog.services.writepath.wire import PubWire
from nats.aio.client import Client

__all__ = ["BURST", "MAX_BROKER_REFUSALS", "RETRY_EVERY_S", "DrainChunk", "SpoolSide", "fleet_identity"]

log = logging.getLogger("fleetlog.publisher")

# After this many refusals *by the broker* (an API error, not a transport
# failure) an event is set aside in dead-letter.jsonl rather than retried forever
# and holding up everything queued behind it.
MAX_BROKER_REFUSALS = 10

# At most this many events framed into one socket write.
BURST = 512

# Transient refusals (a cluster's stream leader away: 503, ack timeout) are sent again this
# often, for the publisher's retry_s, before they go to the spool.
RETRY_EVERY_S = 0.25


async def fleet_identity(nc: Client) -> str | None:
    """The broker's fleet, as a spool records it: the creation time of its first stream.

    Stable for as long as the fleet's streams exist, the same on every server of a cluster,
    different for another broker (or one whose streams were deleted and made again: its
    old spools are not its events). None when the stream is not there (not yet ensured).
    """
    name = STREAMS[0].name
    try:
        info = await nc.jetstream().stream_info(name)
    except Exception as exc:  # any failure means: identity unknown
        log.warning("could not read the fleet identity (%s info: %s): spools are keyed by URL only", name, exc)
        return None
    created = info.created
    return None if created is None else f"{name}@{created.isoformat()}"


class DrainChunk:
    """The acks still awaited for one run of spooled records being re-published."""

    __slots__ = ("done", "failed", "left")

    def __init__(self, n: int) -> None:
        self.left = n
        self.failed = False
        self.done = asyncio.Event()


class SpoolSide:
    """Spilling to the spool and draining it in order; needs the publisher's state below."""

    _spool: Spool
    _queue: collections.deque[Receipt]
    _pending: dict[bytes, tuple[Receipt, DrainChunk | None]]
    _refusals: dict[str, int]  # broker refusals of spooled records, by event id
    _refusal_reasons: dict[str, str]  # and why, when the broker said (permission denied)
    _stats: PublisherStats
    _stats_lock: threading.Lock
    _progress: asyncio.Event
    _wire: PubWire
    _max_inflight: int
    _durable_receipts: dict[str, Receipt]
    _exit_flush_s: float
    _spilled_at_exit: bool
    _sealed: bool
    _closed: bool
    _loop: asyncio.AbstractEventLoop | None
    _loop_thread: int
    _retry: list[Receipt]  # refused as transient (a cluster's leader away), to be sent again
    _retry_since: dict[str, float]  # event id -> first transient refusal
    _retry_at: float
    _retry_wait: float
    _retry_s: float

    def _retry_later(self, receipt: Receipt) -> bool:
        """Hold a transiently refused receipt for a retry (same Nats-Msg-Id); False once it has
        waited `retry_s`: the outage lasts, it goes to the spool."""
        now = time.monotonic()
        first = self._retry_since.setdefault(receipt.id, now)
        if now - first >= self._retry_s:
            del self._retry_since[receipt.id]
            return False
        if not self._retry:
            # Each round that fails again waits twice as long (to 2 s): a leader election of a few
            # seconds costs a handful of rounds, not a resend storm. An ack resets it.
            self._retry_at = now + self._retry_wait
            self._retry_wait = min(self._retry_wait * 2, 2.0)
        self._retry.append(receipt)
        self._stats.retried += 1
        return True

    def _unretry(self) -> None:
        """Put the receipts waiting for a retry back at the head of the queue (they came first)."""
        if self._retry:
            self._queue.extendleft(reversed(self._retry))
            self._retry.clear()

    foreign_spools: list[str]

    def _send(self, receipts: list[Receipt], chunk: DrainChunk | None) -> None:
        raise NotImplementedError  # Publisher._send

    def _poke(self) -> None:
        raise NotImplementedError  # Publisher._poke

    async def _slots(self) -> bool:
        raise NotImplementedError  # Publisher._slots

    _slot_free: asyncio.Event
    _ack_timeout_s: float

    def _failed(self, receipt: Receipt, chunk: DrainChunk | None, *, broker_refused: bool, reason: str = "",
                transient: bool = False) -> None:
        raise NotImplementedError  # Publisher._failed

    # -- in-flight publishes that fail (connection lost, ack timeout) -------------
    def _fail_all_pending(self) -> None:
        """Everything in flight is in doubt (connection lost): spool it. A late ack is ignored;
        a copy that did land is deduplicated by Nats-Msg-Id and by the projections."""
        entries = list(self._pending.values())
        self._pending.clear()
        for receipt, chunk in entries:
            self._failed(receipt, chunk, broker_refused=False)
        self._slot_free.set()
        self._progress.set()

    async def _reap(self) -> None:
        """Ack timeouts: the oldest pending publishes are first in the dict."""
        while True:
            await asyncio.sleep(0.25)
            now = time.monotonic()
            expired = []
            for token, (receipt, _chunk) in self._pending.items():
                if receipt.deadline > now:
                    break
                expired.append(token)
            for token in expired:
                entry = self._pending.pop(token, None)
                if entry is not None:
                    self._failed(entry[0], entry[1], broker_refused=False, transient=True)
            if expired:
                self._slot_free.set()
                self._progress.set()

    # -- the process ends without close() (services/writepath/exitsafe.py) --------
    async def _exit_flush(self) -> None:
        """Cancelled without close() (`asyncio.run()` ending, normally or not): deliver for up to
        exit_flush_s, then spool what is left, synchronously, before the loop closes.

        The wire's connection stays open until the loop closes (its task being cancelled does
        not close the transport), so acks still arrive (`Fleet.connect` waited for its handshake).
        With anything spooled, the queue goes behind it, to disk: order first; the
        next client drains the spool."""
        deadline = time.monotonic() + self._exit_flush_s
        try:
            while (self._queue or self._pending or self._retry) and not self._spool.pending and self._wire.connected:
                if time.monotonic() >= deadline:
                    break
                if not self._pending:
                    self._unretry()
                room = self._max_inflight - len(self._pending)
                if self._queue and room > 0:
                    self._send(self._take(min(len(self._queue), room, BURST)), None)
                await asyncio.sleep(0.005)
        except BaseException:  # cancelled again, or SystemExit: stop waiting, spool now
            pass
        finally:
            # The spool stays open (and this publisher registered): events recorded after the
            # loop ended are spooled by the atexit hook.
            self._spill_now()

    # -- orphans: the spools of processes that died ------------------------------
    async def _take_orphans(self) -> None:
        """This fleet's orphaned spools, at connect. File work (a dead spool can hold a GiB):
        off the event loop. A failure never keeps this publisher from publishing."""
        try:
            adopted, self.foreign_spools = await asyncio.to_thread(self._spool.adopt_orphans)
        except Exception as exc:
            log.error("adopting orphaned spools failed: %r (they stay where they are)", exc)
            return
        self._count_adopted(adopted)

    async def adopt(self, name: str) -> int:
        """Take over one orphaned spool whatever fleet it was stamped for (its fleet is gone:
        `fleetlog spool drain --adopt`); the sender then delivers it. The count taken."""
        adopted, _ = await asyncio.to_thread(self._spool.adopt_orphans, name)
        self._count_adopted(adopted)
        return adopted

    def _count_adopted(self, adopted: int) -> None:
        if adopted:
            with self._stats_lock:
                self._stats.spooled += adopted
            self._poke()

    def _take(self, n: int) -> list[Receipt]:
        queue = self._queue
        return [queue.popleft() for _ in range(n)]

    def _seal(self) -> None:
        """From now on record() writes to the spool itself (or, after close(), refuses)."""
        self._sealed = True

    def _after_close(self, receipt: Receipt) -> Receipt:
        """record() once this publisher was closed or spilled at exit (`_enqueue`)."""
        with self._stats_lock:
            self._stats.accepted += 1
        if self._closed and not self._spilled_at_exit:
            with self._stats_lock:
                self._stats.after_close += 1
            raise RuntimeError(f"fleetlog: record() after close(): this Fleet is closed; event {receipt.id} "
                               f"on {receipt.subject} was not recorded")
        self._to_spool([receipt])  # at exit: straight to disk, nobody sends any more
        return receipt

    def spill_at_exit(self) -> int:
        """Spool what is not acked (`_spill_now`); from then on record() writes to the spool
        itself, until `close_spool_at_exit`. No loop needed: it may be long gone. A loop still
        running in another thread (an application's own, in a daemon thread) does it there,
        so that its sender is not changing the queue meanwhile."""
        if self._spilled_at_exit:
            return 0
        self._spilled_at_exit = True
        loop = self._loop
        if loop is not None and loop.is_running() and threading.get_ident() != self._loop_thread:
            done = threading.Event()
            box = [0]

            def spill() -> None:
                box[0] = self._spill_now()
                self._seal()
                done.set()

            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(spill)
                if done.wait(self._exit_flush_s):
                    return box[0]
        self._seal()
        return self._spill_now()

    def close_spool_at_exit(self) -> int:
        """The exit hook's last pass: what arrived in the queue meanwhile, then the spool is released."""
        self._seal()
        n = self._spill_now()
        exitsafe.unregister(self)
        self._spool.close()
        return n

    def _spill_now(self) -> int:
        """Write the unacked in-flight events, then the queue, to the spool, synchronously;
        only then take them out of memory (whatever interrupts this leaves them somewhere).
        In-flight events may have landed too: the copy is deduplicated (Nats-Msg-Id, event id)."""
        self._unretry()  # held for a retry (a cluster's leader away): back at the head of the queue
        tokens = list(self._pending)
        inflight = [self._pending[t][0] for t in tokens if self._pending[t][1] is None]  # chunks: on disk
        queued = list(self._queue)  # one C call: atomic against other threads' appends
        self._to_spool(inflight + queued)
        for t in tokens:
            self._pending.pop(t, None)
        for _ in range(len(queued)):
            self._queue.popleft()
        return len(inflight) + len(queued)

    def _to_spool(self, receipts: list[Receipt]) -> int:
        """Append to the spool in order; how many were kept (the rest hit the byte cap)."""
        records = []
        for r in receipts:
            try:
                records.append(SpoolRecord(r.subject, r.id, r.encoded(), r.attempts))
            except (TypeError, ValueError, OverflowError) as exc:  # checked at the call: not expected
                self._dead_letter(r, f"could not be encoded: {exc}")
        kept = self._spool.append(records)
        with self._stats_lock:
            self._stats.spooled += kept
        return kept

    def _spill_queue(self) -> None:
        self._unretry()
        if self._queue:
            batch = list(self._queue)  # on disk first, then out of memory (`_spill_now`)
            self._to_spool(batch)
            for _ in range(len(batch)):
                self._queue.popleft()

    async def _drain_spool(self) -> bool:
        """Publish the oldest spooled records; commit what was acked in order. True if all went."""
        records = self._spool.peek(1000)
        if not records:
            return True
        chunk = DrainChunk(len(records))
        receipts = [
            Receipt(r.msg_id, r.subject, r.payload, max(r.attempts, self._refusals.get(r.msg_id, 0)))
            for r, _seg, _off, _size in records
        ]
        sent = 0
        while sent < len(receipts):
            if not self._wire.connected:
                # Never sent: count the rest as failed (they stay spooled).
                chunk.left -= len(receipts) - sent
                chunk.failed = True
                break
            if await self._slots():
                n = min(len(receipts) - sent, self._max_inflight - len(self._pending), BURST)
                self._send(receipts[sent : sent + n], chunk)
                sent += n
        if chunk.left > 0:
            await chunk.done.wait()
        # Commit the longest acked prefix; the rest stays spooled, in order.
        done = 0
        nbytes = 0
        last = (0, 0)
        for receipt, (_rec, seg, off, size) in zip(receipts, records, strict=True):
            if receipt.seq is None:
                if receipt.attempts >= MAX_BROKER_REFUSALS:
                    self._refusals.pop(receipt.id, None)
                    self._durable_receipts.pop(receipt.id, None)
                    self._dead_letter(receipt, self._refusal_reasons.pop(
                        receipt.id, "refused by JetStream while draining the spool"))
                else:
                    if receipt.attempts:
                        self._refusals[receipt.id] = receipt.attempts
                    break
            done += 1
            nbytes += size
            last = (seg, off)
        if done:
            if self._durable_receipts:
                for receipt in receipts[:done]:
                    own = self._durable_receipts.pop(receipt.id, None)
                    if own is not None:  # the caller's receipt gets its position now
                        own.stream, own.seq, own.payload = receipt.stream, receipt.seq, None
            self._spool.commit(last[0], last[1], done, nbytes)
            self._progress.set()
        return not chunk.failed

    def _dead_letter(self, receipt: Receipt, reason: str) -> None:
        with self._stats_lock:
            self._stats.dead_lettered += 1
        log.error("event %s on %s set aside after %d refusals: %s", receipt.id, receipt.subject,
                  receipt.attempts, reason)
        try:
            payload = receipt.encoded()
        except (TypeError, ValueError, OverflowError):
            payload = b""
        self._spool.set_aside(receipt.id, receipt.subject, payload, reason)
