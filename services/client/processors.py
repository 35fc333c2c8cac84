"""Batch-processor bookkeeping's client API: `fleet.processors.*` (files, runs, the lock).

* **Files**: `mark()` is a fire-and-forget fact (the latest status of one file for one
  processor; compacted per file). `seen()` / `unprocessed()` answer "which of these
  files did I do already" in one request.
* **Runs**: state-carrying records, each write guarded on the run's own subject
  (start once, finish once).
* **The lock** (`processor_lock.LockSide`): at most one holder per processor, decided
  by JetStream; the `acquired` message's stream seq is the fencing token.
  `mark_locked` is fenced by JetStream (guarded on the lock subject); a run record
  written with a lock goes in one atomic batch with the lock's re-assertion, each
  guarded on its own subject.
  A holder that lost its lock gets `ProcessorLockLost` and nothing is stored.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Mapping
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
    ProcRun,
    ProcRunList,
    ProcRunQuery,
    ProcRunsQuery,
    ProcSeen,
    ProcSeenQuery,
    ProcSummaryList,
    ProcSummaryQuery,
)
from fleetlog.services.backbone.errors import FleetError, FleetRefused, FleetValidationError, check_identity
from fleetlog.services.backbone.guarded import BatchItem, Guarded, StoredMsg, WrongLastSequence
from fleetlog.services.client.processor_lock import LockSide, ProcessorLock, ProcessorLockBusy, ProcessorLockLost
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["ProcessorLock", "ProcessorLockBusy", "ProcessorLockLost", "ProcessorsAPI", "hash_file", "path_hash"]

STREAM = "FLEET_PROCESSORS"
SEEN_MAX = 10_000  # hashes per `seen` request (the endpoint's limit) ...
SEEN_BYTES = 640 * 1024  # ... and their encoded size, under NATS's default 1 MB max_payload
MAX_RACES = 100
_run_decoder = msgspec.json.Decoder(ProcessorRunRecorded)


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


def _decoded_run(msg: StoredMsg | None) -> ProcessorRunRecorded | None:
    """The run a run subject's last message holds; None for none, or for garbage (as the view)."""
    if msg is None:
        return None
    try:
        return _run_decoder.decode(msg.data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


def _run_view(e: ProcessorRunRecorded, seq: int) -> ProcRun:
    return ProcRun(processor=e.processor, run_id=e.run_id, status=e.status, started_at=e.started_at,
                   finished_at=e.finished_at, files_total=e.files_total, files_ok=e.files_ok,
                   files_failed=e.files_failed, detail=e.detail, holder=e.holder, seq=seq)


class ProcessorsAPI(LockSide):
    """`fleet.processors`: file markers and runs here, the lock in `LockSide`."""

    def __init__(self, fleet: FleetClient, clock: Callable[[], float] = time.time) -> None:
        super().__init__(fleet, clock)
        self.hash_file = hash_file
        self.path_hash = path_hash

    # -- files ---------------------------------------------------------------
    def _marker(self, processor: str, file_path: str, status: str, file_hash: str | None, size: int | None,
                detail: Mapping[str, Any] | None, run_id: str | None) -> ProcessorFileMarked:
        check_identity("processor", processor)
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
            file_hash=check_identity("file_hash", path_hash(file_path) if file_hash is None else file_hash),
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
        """file_hash -> status for each hash that has a marker (any number of hashes: sent in as few
        requests as fit NATS's max payload)."""
        hashes = list(dict.fromkeys(file_hashes))
        token = self._token(min_seq)
        out: dict[str, str] = {}
        start = 0
        while start < len(hashes):
            # As many as fit a request (hashes of 64 hex characters: all 10,000 in one).
            end, size = start, 0
            while end < len(hashes) and end - start < SEEN_MAX and size + len(hashes[end]) + 3 <= SEEN_BYTES:
                size += len(hashes[end]) + 3
                end += 1
            end = max(end, start + 1)
            req = ProcSeenQuery(processor=processor, file_hashes=hashes[start:end], min_seq=token)
            out.update((await self._fleet.request("fleetlog.processors.seen", req, ProcSeen)).statuses)
            start = end
        return out

    async def unprocessed(self, processor: str, file_hashes: list[str], *,
                          min_seq: Token | Receipt | None = None) -> list[str]:
        """The hashes (in the order given) not marked done or skipped."""
        statuses = await self.seen(processor, file_hashes, min_seq=min_seq)
        return [h for h in file_hashes if statuses.get(h) not in DONE_STATUSES]

    # -- runs ----------------------------------------------------------------
    async def start_run(self, processor: str, run_id: str | None = None, files_total: int = 0,
                        detail: Mapping[str, Any] | None = None, lock: ProcessorLock | None = None) -> ProcRun:
        """Record a run as running (idempotent by run_id: an existing run is returned unchanged).

        With `lock`, the write is refused (ProcessorLockLost) unless the lock is still the
        holder's when it is made: a check of the lock subject just before the publish, which
        itself is guarded on the run subject (JetStream takes one expected sequence per
        message; the run's own guard is what keeps "start once" under races)."""
        check_identity("processor", processor)
        run_id = check_identity("run_id", new_event_id() if run_id is None else run_id)
        _count("files_total", files_total)
        g = await self._guarded()
        subject = subjects.proc_run(processor, run_id)
        for _ in range(MAX_RACES):
            existing = await g.last(STREAM, subject)
            found = _decoded_run(existing)
            if existing is not None and found is not None:
                return _run_view(found, existing.seq)
            event = ProcessorRunRecorded(
                id=new_event_id(), ts=now_iso(), processor=processor, run_id=run_id, status="running",
                started_at=int(self.clock()), files_total=files_total, detail=dict(detail or {}),
                holder=lock.holder if lock is not None else None,
            )
            seq = await self._run_write(g, lock, event, existing.seq if existing is not None else 0)
            if seq is not None:
                return _run_view(event, seq)
        raise FleetError(f"start_run: lost {MAX_RACES} races on {subject}")

    async def finish_run(self, processor: str, run_id: str, status: str = "completed", *,
                         files_ok: int | None = None, files_failed: int | None = None,
                         detail: Mapping[str, Any] | None = None, lock: ProcessorLock | None = None) -> ProcRun | None:
        """Finish a run once (None: unknown run). The same status again returns it unchanged;
        another status after finishing raises FleetRefused (a ValueError). Counts left None keep the run's.
        `lock` as for `start_run`."""
        _run_status(status)
        if status == "running":
            raise ValueError("finish_run needs a final status (completed, failed or cancelled)")
        g = await self._guarded()
        subject = subjects.proc_run(processor, run_id)
        for _ in range(MAX_RACES):
            last = await g.last(STREAM, subject)
            run = _decoded_run(last)
            if last is None or run is None:
                return None
            if run.finished_at is not None:
                if run.status == status:
                    return _run_view(run, last.seq)
                raise FleetRefused(f"Cannot finish processor run {run_id!r}: already {run.status}")
            event = ProcessorRunRecorded(
                id=new_event_id(), ts=now_iso(), processor=processor, run_id=run_id, status=status,
                started_at=run.started_at, finished_at=int(self.clock()), files_total=run.files_total,
                files_ok=run.files_ok if files_ok is None else _count("files_ok", files_ok),
                files_failed=run.files_failed if files_failed is None else _count("files_failed", files_failed),
                detail={**run.detail, **(detail or {})}, holder=run.holder,
            )
            seq = await self._run_write(g, lock, event, last.seq)
            if seq is not None:
                return _run_view(event, seq)
        raise FleetError(f"finish_run: lost {MAX_RACES} races on {subject}")

    async def _run_write(self, g: Guarded, lock: ProcessorLock | None, event: ProcessorRunRecorded,
                         expected: int) -> int | None:
        """Publish a run record guarded on its subject; None when that subject moved (re-read).

        With `lock`: one atomic batch of the lock's re-assertion (guarded on the lock subject
        where the holder left it) and the run record (guarded on the run subject). JetStream
        stores both or neither, so the record lands only inside the holder's tenure."""
        if lock is None:
            try:
                _, seq, _ = await g.publish(event.subject(), encode_event(event), msg_id=event.id,
                                            expected_last_seq=expected)
            except WrongLastSequence:
                return None
            self._seen = max(self._seen, seq)
            return seq
        for _ in range(MAX_RACES):
            if lock.lost or lock.lease_expires_at <= self.clock():
                lock.lost = True
                raise ProcessorLockLost(f"the lock of {lock.processor!r} is no longer held by {lock.holder!r}")
            held = ProcessorLockChanged(id=new_event_id(), ts=now_iso(), processor=lock.processor,
                                        holder=lock.holder, state="renewed",
                                        lease_expires_at=lock.lease_expires_at, fence=lock.fence)
            items = [BatchItem(held.subject(), encode_event(held), held.id, lock.seq),
                     BatchItem(event.subject(), encode_event(event), event.id, expected)]
            try:
                _, seq = await g.publish_batch(items, batch_id=event.id)
            except WrongLastSequence:
                await self._check_lock(g, lock)  # ProcessorLockLost unless the lock moved by our own hand
                run_now = await g.last(STREAM, event.subject())
                if (run_now.seq if run_now is not None else 0) != expected:
                    return None  # the run subject moved: the caller re-reads
                continue
            lock.seq = seq - 1  # the re-assertion is the lock subject's last message now
            self._seen = max(self._seen, seq)
            return seq
        raise FleetError(f"run write under a lock: lost {MAX_RACES} races on {event.subject()}")

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
