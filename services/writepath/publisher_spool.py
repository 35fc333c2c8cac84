"""The publisher's disk side: events that cannot be acked go to the `Spool`, and the spool
is drained in order when the broker is back (DESIGN §3.1).

`SpoolSide` is mixed into `Publisher` (services/writepath/publisher.py), which owns the queue, the
in-flight table and the wire; this module holds what happens on disk: spilling, the
ordered drain that commits only the acked prefix, and the dead letter for events the
broker keeps refusing.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading

from fleetlog.services.writepath.receipt import PublisherStats, Receipt
from fleetlog.services.writepath.spool import Spool, SpoolRecord
from fleetlog.services.writepath.wire import PubWire

__all__ = ["BURST", "MAX_BROKER_REFUSALS", "DrainChunk", "SpoolSide"]

log = logging.getLogger("fleetlog.publisher")

# After this many refusals *by the broker* (an API error, not a transport
# failure) an event is set aside in dead-letter.jsonl rather than retried forever
# and holding up everything queued behind it.
MAX_BROKER_REFUSALS = 10

# At most this many events framed into one socket write.
BURST = 512


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
    _stats: PublisherStats
    _stats_lock: threading.Lock
    _progress: asyncio.Event
    _wire: PubWire
    _max_inflight: int

    def _send(self, receipts: list[Receipt], chunk: DrainChunk | None) -> None:
        raise NotImplementedError  # Publisher._send

    async def _slots(self) -> bool:
        raise NotImplementedError  # Publisher._slots

    def _to_spool(self, receipts: list[Receipt]) -> None:
        records = []
        for r in receipts:
            try:
                records.append(SpoolRecord(r.subject, r.id, r.encoded(), r.attempts))
            except (TypeError, ValueError, OverflowError) as exc:  # checked at the call: not expected
                self._dead_letter(r, f"could not be encoded: {exc}")
        kept = self._spool.append(records)
        with self._stats_lock:
            self._stats.spooled += kept

    def _spill_queue(self) -> None:
        if self._queue:
            batch = []
            while self._queue:
                batch.append(self._queue.popleft())
            self._to_spool(batch)

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
                    self._dead_letter(receipt, "refused by JetStream while draining the spool")
                else:
                    if receipt.attempts:
                        self._refusals[receipt.id] = receipt.attempts
                    break
            done += 1
            nbytes += size
            last = (seg, off)
        if done:
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
