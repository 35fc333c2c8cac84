"""Batch-processor bookkeeping's client API: `fleet.processors.*` (files, runs, the lock).

* **Files**: `mark()` is a fire-and-forget fact (the latest status of one file for one
  processor; compacted per file). `seen()` / `unprocessed()` answer "which of these
  files did I do already" in one request.
* **The lock**: at most one holder per processor, decided by JetStream: `acquire`
  reads the lock subject's last message (direct get) and publishes with
  `Nats-Expected-Last-Subject-Sequence`, so of any number of racing acquirers one
  wins. The `acquired` message's stream seq is the fencing token. A lease that
  passed lets another holder acquire (a new, higher fence).
* **Fenced writes**: `mark_locked` and the run records written with a lock are
  published with the expected-sequence guard on the *lock* subject: stored only while
  the lock subject is where the holder last left it. A holder that lost its lock gets
  `ProcessorLockLost` and nothing is stored.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso, subjects
from fleetlog.schemas.processors import (
    DONE_STATUSES,
    RUN_STATUSES,
    ProcessorFileMarked,
    ProcessorLockChanged,
    ProcessorRunRecorded,
    ProcFile,
    ProcFileList,
    ProcFileQuery,
    ProcFilesQuery,
    ProcLock,
    ProcLockQuery,
    ProcRun,
    ProcRunList,
    ProcRunQuery,
    ProcRunsQuery,
    ProcSeen,
    ProcSeenQuery,
    ProcSummaryList,
    ProcSummaryQuery,
)

from .errors import FleetError, FleetValidationError
from .guarded import Guarded, StoredMsg, WrongLastSequence
from .publisher import Receipt, Token
from .runs import session_token

if TYPE_CHECKING:
    from .client import Fleet

__all__ = ["ProcessorLock", "ProcessorLockBusy", "ProcessorLockLost", "ProcessorsAPI"]

STREAM = "FLEET_PROCESSORS"
MAX_RACES = 100
_HELD = ("acquired", "renewed")
_lock_decoder = msgspec.json.Decoder(ProcessorLockChanged)
_run_decoder = msgspec.json.Decoder(ProcessorRunRecorded)


class ProcessorLockBusy(FleetError):
    """Another holder has the processor's lock (from `locked()`)."""


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


def _identity(field: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise FleetValidationError(field, f"must be a non-empty string, got {value!r}")
    if len(value) > 256:
        raise FleetValidationError(field, f"must be at most 256 characters, got {len(value)}")
    return value


def _lease(lease_s: float) -> float:
    if isinstance(lease_s, bool) or not isinstance(lease_s, int | float) or not lease_s > 0:
        raise FleetValidationError("lease_s", f"must be a number > 0, got {lease_s!r}")
    return float(lease_s)


def _count(field: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise FleetValidationError(field, f"must be an integer >= 0, got {value!r}")
    return value


def _run_status(status: str) -> str:
    if status not in RUN_STATUSES:
        raise ValueError(f"Unknown run status: {status!r} (one of {', '.join(RUN_STATUSES)})")
    return status


def path_hash(file_path: str) -> str:
    """The default file identity: sha256 of the path text (use `hash_file` for content)."""
    return hashlib.sha256(file_path.encode()).hexdigest()


def hash_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """sha256 of a file's content: the same content is the same file wherever it lies."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _run_view(e: ProcessorRunRecorded, seq: int) -> ProcRun:
    return ProcRun(processor=e.processor, run_id=e.run_id, status=e.status, started_at=e.started_at,
                   finished_at=e.finished_at, files_total=e.files_total, files_ok=e.files_ok,
                   files_failed=e.files_failed, detail=e.detail, holder=e.holder, seq=seq)


class ProcessorsAPI:
    def __init__(self, fleet: Fleet, clock: Callable[[], float] = time.time) -> None:
        self._fleet = fleet
        self.clock = clock
        self._seen = 0
        self.hash_file = hash_file
        self.path_hash = path_hash

    def _token(self, min_seq: Token | Receipt | None) -> dict[str, int] | None:
        return session_token(min_seq, STREAM, self._seen)

    async def _guarded(self) -> Guarded:
        return Guarded(await self._fleet.nats())

    # -- files ---------------------------------------------------------------
    def _marker(self, processor: str, file_path: str, status: str, file_hash: str | None, size: int | None,
                detail: Mapping[str, Any] | None, run_id: str | None) -> ProcessorFileMarked:
        _identity("processor", processor)
        if not isinstance(file_path, str):
            raise FleetValidationError("file_path", f"must be a string, got {type(file_path).__name__}")
        if not isinstance(status, str) or not status:
            raise FleetValidationError("status", f"must be a non-empty string, got {status!r}")
        if size is not None:
            _count("size", size)
        if detail is not None and not isinstance(detail, Mapping):
            raise FleetValidationError("detail", f"must be a dict, got {type(detail).__name__}")
        return ProcessorFileMarked(
            id=new_event_id(), ts=now_iso(), processor=processor, file_path=file_path,
            file_hash=_identity("file_hash", path_hash(file_path) if file_hash is None else file_hash),
            status=status, size=size, detail=dict(detail or {}), run_id=run_id,
        )

    def mark(self, processor: str, file_path: str, status: str, *, file_hash: str | None = None,
             size: int | None = None, detail: Mapping[str, Any] | None = None, run_id: str | None = None) -> Receipt:
        """Record a file's status (fire-and-forget). `file_hash` defaults to `path_hash(file_path)`."""
        return self._fleet.emit(self._marker(processor, file_path, status, file_hash, size, detail, run_id))

    async def mark_locked(self, lock: ProcessorLock, file_path: str, status: str, *, file_hash: str | None = None,
                          size: int | None = None, detail: Mapping[str, Any] | None = None,
                          run_id: str | None = None) -> int:
        """`mark`, stored only while `lock` holds (awaited); returns the marker's seq, else ProcessorLockLost."""
        event = self._marker(lock.processor, file_path, status, file_hash, size, detail, run_id)
        return await self._fenced(lock, event.subject(), encode_event(event), event.id)

    async def file(self, processor: str, file_hash: str, *, min_seq: Token | Receipt | None = None) -> ProcFile | None:
        req = ProcFileQuery(processor=processor, file_hash=file_hash, min_seq=self._token(min_seq))
        answer = await self._fleet.request("fleetlog.processors.file", req, ProcFileList)
        return answer.items[0] if answer.items else None

    async def files(self, processor: str, statuses: list[str] | None = None, run_id: str | None = None,
                    after: str | None = None, limit: int = 100, *,
                    min_seq: Token | Receipt | None = None) -> ProcFileList:
        """A processor's files ordered by file_hash; `next_cursor` pages on (as `after`)."""
        req = ProcFilesQuery(processor=processor, statuses=list(statuses) if statuses else None, run_id=run_id,
                             after=after, limit=max(1, min(1000, int(limit))), min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.files", req, ProcFileList)

    async def seen(self, processor: str, file_hashes: list[str], *,
                   min_seq: Token | Receipt | None = None) -> dict[str, str]:
        """file_hash -> status for each hash that has a marker (up to 10,000 hashes per call)."""
        req = ProcSeenQuery(processor=processor, file_hashes=list(file_hashes), min_seq=self._token(min_seq))
        return (await self._fleet.request("fleetlog.processors.seen", req, ProcSeen)).statuses

    async def unprocessed(self, processor: str, file_hashes: list[str], *,
                          min_seq: Token | Receipt | None = None) -> list[str]:
        """The hashes (in the order given) not marked done or skipped."""
        statuses = await self.seen(processor, file_hashes, min_seq=min_seq)
        return [h for h in file_hashes if statuses.get(h) not in DONE_STATUSES]

    # -- runs ----------------------------------------------------------------
    async def start_run(self, processor: str, run_id: str | None = None, files_total: int = 0,
                        detail: Mapping[str, Any] | None = None, lock: ProcessorLock | None = None) -> ProcRun:
        """Record a run as running (idempotent by run_id: an existing run is returned unchanged)."""
        _identity("processor", processor)
        run_id = _identity("run_id", new_event_id() if run_id is None else run_id)
        _count("files_total", files_total)
        g = await self._guarded()
        existing = await g.last(STREAM, subjects.proc_run(processor, run_id))
        if existing is not None:
            return _run_view(_run_decoder.decode(existing.data), existing.seq)
        event = ProcessorRunRecorded(
            id=new_event_id(), ts=now_iso(), processor=processor, run_id=run_id, status="running",
            started_at=int(self.clock()), files_total=files_total, detail=dict(detail or {}),
            holder=lock.holder if lock is not None else None,
        )
        payload = encode_event(event)
        if lock is not None:
            seq = await self._fenced(lock, event.subject(), payload, event.id)
        else:
            try:
                _, seq, _ = await g.publish(event.subject(), payload, msg_id=event.id, expected_last_seq=0)
            except WrongLastSequence:  # created meanwhile by someone else
                return await self.start_run(processor, run_id, files_total, detail)
            self._seen = max(self._seen, seq)
        return _run_view(event, seq)

    async def finish_run(self, processor: str, run_id: str, status: str = "completed", *,
                         files_ok: int | None = None, files_failed: int | None = None,
                         detail: Mapping[str, Any] | None = None, lock: ProcessorLock | None = None) -> ProcRun | None:
        """Finish a run once (None: unknown run). The same status again returns it unchanged;
        another status after finishing raises ValueError. Counts left None keep the run's."""
        _run_status(status)
        if status == "running":
            raise ValueError("finish_run needs a final status (completed, failed or cancelled)")
        g = await self._guarded()
        subject = subjects.proc_run(processor, run_id)
        for _ in range(MAX_RACES):
            last = await g.last(STREAM, subject)
            if last is None:
                return None
            run = _run_decoder.decode(last.data)
            if run.finished_at is not None:
                if run.status == status:
                    return _run_view(run, last.seq)
                raise ValueError(f"Cannot finish processor run {run_id!r}: already {run.status}")
            event = ProcessorRunRecorded(
                id=new_event_id(), ts=now_iso(), processor=processor, run_id=run_id, status=status,
                started_at=run.started_at, finished_at=int(self.clock()), files_total=run.files_total,
                files_ok=run.files_ok if files_ok is None else _count("files_ok", files_ok),
                files_failed=run.files_failed if files_failed is None else _count("files_failed", files_failed),
                detail={**run.detail, **(detail or {})}, holder=run.holder,
            )
            payload = encode_event(event)
            if lock is not None:
                seq = await self._fenced(lock, subject, payload, event.id)
                return _run_view(event, seq)
            try:
                _, seq, _ = await g.publish(subject, payload, msg_id=event.id, expected_last_seq=last.seq)
            except WrongLastSequence:
                continue
            self._seen = max(self._seen, seq)
            return _run_view(event, seq)
        raise FleetError(f"finish_run: lost {MAX_RACES} races on {subject}")

    async def run(self, processor: str, run_id: str, *, min_seq: Token | Receipt | None = None) -> ProcRun | None:
        req = ProcRunQuery(processor=processor, run_id=run_id, min_seq=self._token(min_seq))
        answer = await self._fleet.request("fleetlog.processors.run", req, ProcRunList)
        return answer.items[0] if answer.items else None

    async def runs(self, processor: str, limit: int = 20, before_seq: int | None = None, *,
                   min_seq: Token | Receipt | None = None) -> ProcRunList:
        req = ProcRunsQuery(processor=processor, limit=max(1, min(1000, int(limit))), before_seq=before_seq,
                            min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.runs", req, ProcRunList)

    async def summary(self, *, min_seq: Token | Receipt | None = None) -> ProcSummaryList:
        req = ProcSummaryQuery(now=self.clock(), min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.summary", req, ProcSummaryList)

    # -- the lock ------------------------------------------------------------
    @staticmethod
    def new_holder() -> str:
        return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"

    async def _read_lock(self, g: Guarded, processor: str) -> tuple[StoredMsg | None, ProcessorLockChanged | None]:
        last = await g.last(STREAM, subjects.proc_lock(processor))
        if last is None:
            return None, None
        try:
            return last, _lock_decoder.decode(last.data)
        except (msgspec.DecodeError, msgspec.ValidationError):
            return last, None  # garbage on the lock subject: the lock is free

    def _held(self, event: ProcessorLockChanged | None) -> bool:
        return (event is not None and event.state in _HELD and event.lease_expires_at is not None
                and event.lease_expires_at > self.clock())

    async def acquire(self, processor: str, holder: str | None = None, lease_s: float = 60) -> ProcessorLock | None:
        """Take the lock (None: someone else holds it). The same holder again renews its tenure."""
        _identity("processor", processor)
        holder = _identity("holder", self.new_holder() if holder is None else holder)
        lease = _lease(lease_s)
        g = await self._guarded()
        subject = subjects.proc_lock(processor)
        for _ in range(MAX_RACES):
            last, current = await self._read_lock(g, processor)
            fence = None
            if last is not None and current is not None and self._held(current):
                if current.holder != holder:
                    return None
                fence = current.fence if current.fence is not None else last.seq
            expires = self.clock() + lease
            event = ProcessorLockChanged(id=new_event_id(), ts=now_iso(), processor=processor, holder=holder,
                                         state="acquired" if fence is None else "renewed",
                                         lease_expires_at=expires, fence=fence)
            try:
                _, seq, _ = await g.publish(subject, encode_event(event), msg_id=event.id,
                                            expected_last_seq=last.seq if last is not None else 0)
            except WrongLastSequence:
                continue
            self._seen = max(self._seen, seq)
            return ProcessorLock(processor, holder, seq if fence is None else fence, seq, expires)
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
            raise ProcessorLockBusy(f"the lock of {processor!r} is held by someone else")
        every = renew_every_s if renew_every_s is not None else lease_s / 3

        async def keep() -> None:
            while not lock.lost:
                await asyncio.sleep(every)
                with contextlib.suppress(FleetError):
                    await self.renew(lock, lease_s)

        keeper = asyncio.create_task(keep())
        try:
            yield lock
        finally:
            keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await keeper
            if not lock.lost:
                with contextlib.suppress(FleetError):
                    await self.release(lock)
