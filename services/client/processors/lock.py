"""The processor lock: at most one holder per processor, decided by JetStream (`LockSide`).

`acquire` reads the lock subject's last message (direct get) and publishes with
`Nats-Expected-Last-Subject-Sequence`, so of any number of racing acquirers one
wins; while a lease holds, every other acquire gets None (the same holder name
too: two processes sharing a name still exclude each other). The `acquired`
message's stream seq is the fencing token. `_fenced` publishes a write only while
the lock subject is where the holder last left it (its own renewals followed), so
a holder that lost its lock cannot write (the runner's marks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, subjects
from fleetlog.schemas.processors import ProcessorLockChanged, ProcLock, ProcLockQuery
from fleetlog.services.backbone.errors import FleetError, FleetValidationError, check_identity
from fleetlog.services.backbone.guarded import Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.client.seam import session_token
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["LockSide", "ProcessorLock", "ProcessorLockBusy", "ProcessorLockLost"]

log = logging.getLogger("fleetlog.processors")

STREAM = "FLEET_PROCESSORS"
MAX_RACES = 100
_HELD = ("acquired", "renewed")
_lock_decoder = msgspec.json.Decoder(ProcessorLockChanged)


class ProcessorLockBusy(FleetError):
    """Another holder has the processor's lock (from `locked()`, and so from a run: "already running")."""


class ProcessorLockLost(FleetError):
    """The lock moved on (released, overtaken after its lease, or the lease passed): nothing was written."""


@dataclass
class ProcessorLock:
    """A held lock. `fence` is fixed for the tenure; `seq` follows the holder's own renewals."""

    processor: str
    holder: str
    fence: int
    seq: int
    lease_expires_at: float
    lost: bool = False


def _lease(lease_s: float) -> float:
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not lease_s > 0:
        raise FleetValidationError("lease_s", f"must be a number > 0, got {lease_s!r}")
    return float(lease_s)


class LockSide:
    """The lock half of `ProcessorsAPI` (and what both halves share: client, clock, session)."""

    def __init__(self, fleet: FleetClient, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self.clock = clock
        self._seen = 0

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        return session_token(min_seq, STREAM, self._seen)

    async def _guarded(self) -> Guarded:
        return Guarded(await self._fleet.nats())

    @staticmethod
    def new_holder() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def _read_lock(self, g: Guarded, processor: str) -> tuple[StoredMsg | None, ProcessorLockChanged | None]:
        last = await g.last(STREAM, subjects.proc_lock(processor))
        if last is None:
            return None, None
        try:
            event = _lock_decoder.decode(last.data)
        except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
            event = None
        if event is None or event.subject() != last.subject:
            # Not a lock change of this processor (garbage, or a reply nats-server stored there
            # for whoever named the subject as a reply: docs/security.md, "Replies as a deputy").
            # The processors view forgets a subject whose last message it refused, so the lock is
            # free, as there; the next change is guarded on this seq and replaces it, and a
            # holder learns it lost the lock at its next renewal or fenced write.
            log.warning("processor lock %s: the last message (seq %d) is not a lock change: the lock is free",
                        processor, last.seq)
            return last, None
        return last, event

    def _held(self, event: ProcessorLockChanged | None) -> bool:
        return (event is not None and event.state in _HELD and event.lease_expires_at is not None
                and event.lease_expires_at > self.clock())

    async def acquire(self, processor: str, holder: str | None = None, lease_s: float = 60) -> ProcessorLock | None:
        """Take the lock; None while anyone holds it — the same holder name included, so two
        processes sharing a name still exclude each other (a tenure is renewed with `renew`)."""
        check_identity("processor", processor)
        holder = check_identity("holder", self.new_holder() if holder is None else holder)
        lease = _lease(lease_s)
        g = await self._guarded()
        subject = subjects.proc_lock(processor)
        for _ in range(MAX_RACES):
            last, current = await self._read_lock(g, processor)
            if self._held(current):
                return None
            expires = self.clock() + lease
            event = ProcessorLockChanged(id=new_event_id(), ts=now_iso(), processor=processor, holder=holder,
                                         state="acquired", lease_expires_at=expires)
            try:
                _, seq, _ = await g.publish(subject, encode_event(event), msg_id=event.id,
                                            expected_last_seq=last.seq if last is not None else 0)
            except WrongLastSequence:
                continue
            self._seen = max(self._seen, seq)
            return ProcessorLock(processor, holder, seq, seq, expires)
        raise FleetError(f"acquire: lost {MAX_RACES} races on {subject}")

    async def renew(self, lock: ProcessorLock, lease_s: float = 60) -> bool:
        """Extend the lease; False (and `lock.lost`) when the lock moved on or the lease had passed."""
        return await self._change(lock, "renewed", _lease(lease_s))

    async def release(self, lock: ProcessorLock) -> bool:
        """Give the lock up; False when it was no longer ours."""
        return await self._change(lock, "released", None)

    async def _change(self, lock: ProcessorLock, state: str, lease: float | None) -> bool:
        g = await self._guarded()
        for _ in range(MAX_RACES):
            last, current = await self._read_lock(g, lock.processor)
            if not self._mine(last, current, lock):
                lock.lost = True
                return False
            assert last is not None
            expires = self.clock() + lease if lease is not None else None
            event = ProcessorLockChanged(id=new_event_id(), ts=now_iso(), processor=lock.processor,
                                         holder=lock.holder, state=state, lease_expires_at=expires, fence=lock.fence)
            try:
                _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id,
                                            expected_last_seq=last.seq)
            except WrongLastSequence:
                continue
            self._seen = max(self._seen, seq)
            lock.seq = seq
            if expires is not None:
                lock.lease_expires_at = expires
            else:
                lock.lost = True  # released: no longer ours
            return True
        raise FleetError(f"lock {state}: lost {MAX_RACES} races on {subjects.proc_lock(lock.processor)}")

    def _mine(self, last: StoredMsg | None, current: ProcessorLockChanged | None, lock: ProcessorLock) -> bool:
        if last is None or current is None or not self._held(current) or current.holder != lock.holder:
            return False
        return (current.fence if current.fence is not None else last.seq) == lock.fence

    async def _fenced(self, lock: ProcessorLock, subject: str, payload: bytes, msg_id: str) -> int:
        """Publish only while the lock subject is where `lock` last saw it (JetStream decides)."""
        g = await self._guarded()
        lock_subject = subjects.proc_lock(lock.processor)
        for _ in range(MAX_RACES):
            if lock.lost or lock.lease_expires_at <= self.clock():
                lock.lost = True
                raise ProcessorLockLost(f"the lock of {lock.processor!r} is no longer held by {lock.holder!r}")
            try:
                _, seq, _ = await g.publish(subject, payload, msg_id=msg_id, expected_last_seq=lock.seq,
                                            expected_subject=lock_subject)
            except WrongLastSequence:
                last, current = await self._read_lock(g, lock.processor)
                if not self._mine(last, current, lock):
                    lock.lost = True
                    continue
                assert last is not None and current is not None and current.lease_expires_at is not None
                lock.seq, lock.lease_expires_at = last.seq, current.lease_expires_at  # our own renewal
                continue
            self._seen = max(self._seen, seq)
            return seq
        raise FleetError(f"fenced write: lost {MAX_RACES} races on {lock_subject}")

    async def lock(self, processor: str, *, min_seq: Token | Receipt | None = None) -> ProcLock:
        req = ProcLockQuery(processor=processor, now=self.clock(), min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.lock", req, ProcLock)

    @contextlib.asynccontextmanager
    async def locked(self, processor: str, holder: str | None = None, lease_s: float = 60,
                     renew_every_s: float | None = None) -> AsyncIterator[ProcessorLock]:
        """`async with fleet.processors.locked("ingest") as lock:` — acquire or ProcessorLockBusy; the
        lease is renewed in the background (every lease/3 s) and the lock released at the end.
        If a renewal finds the lock gone, `lock.lost` is set and fenced writes raise."""
        lock = await self.acquire(processor, holder, lease_s)
        if lock is None:
            # "already running": the store's words, which callers match on
            raise ProcessorLockBusy(f"processor {processor!r} is already running (its lock is held by someone else)")
        every = renew_every_s if renew_every_s is not None else lease_s / 3
        if not 0 < every < lease_s:
            raise FleetValidationError("renew_every_s", f"must be > 0 and < lease_s ({lease_s}), got {every!r}")

        async def keep() -> None:
            while not lock.lost:
                await asyncio.sleep(every)
                try:
                    await self.renew(lock, lease_s)
                except Exception as exc:  # broker away for a moment: try again next round
                    log.warning("processor lock %s: renewal failed: %s", processor, exc)

        keeper = asyncio.create_task(keep())
        try:
            yield lock
        finally:
            keeper.cancel()
            # gather: the keeper's own cancellation is a result, a cancellation of this task
            # still propagates; no keeper error can replace the body's.
            await asyncio.gather(keeper, return_exceptions=True)
            if not lock.lost:
                try:
                    await self.release(lock)
                except Exception as exc:  # the lease runs out by itself
                    log.warning("processor lock %s: release failed: %s", processor, exc)
