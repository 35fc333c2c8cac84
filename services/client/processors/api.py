"""Session-processor bookkeeping's client API: `fleet.processors.*`.

* **Bookkeeping**: one row per (processor, session file) — processed_at, items_extracted,
  file_hash, username — each write a `proc.session` event on the row's compacted
  subject; a delete is a tombstone on the same subject. Names and meanings are the
  store's this replaces (`mark_processed`, `is_processed`, `scan_unprocessed_for`, ...).
  A client reads its own writes: every query carries this client's last write as
  `min_seq` (or the token given).
* **The runner** (`run`, `serve_runs`; services/client/processors/runner.py) and **the
  lock** (`lock.LockSide`: at most one holder per processor, decided by
  JetStream; the runner's marks are fenced by it).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec
from fleetlog.schemas import encode_event, new_event_id, now_iso
from fleetlog.schemas.processors import (
    ProcActivity,
    ProcActivityQuery,
    ProcessorRunRecorded,
    ProcessorSessionDeleted,
    ProcessorSessionMarked,
    ProcRunList,
    ProcRunRequest,
    ProcRunsQuery,
    ProcRunStats,
    ProcSession,
    ProcSessionList,
    ProcSessionsQuery,
    ProcSummaryList,
    ProcSummaryQuery,
)
from fleetlog.services.backbone.errors import FleetValidationError, QueryError, check_identity
from fleetlog.services.client.processors import runner as processor_runner
from fleetlog.services.client.processors.files import (
    SessionFile,
    compute_file_hash,
    list_session_files,
    parse_jsonl,
    select_unprocessed,
    utcnow,
)
from fleetlog.services.client.processors.lock import LockSide, ProcessorLock, ProcessorLockBusy, ProcessorLockLost
from fleetlog.services.client.processors.registry import Processor
from fleetlog.services.writepath.publisher import Receipt, Token

if TYPE_CHECKING:
    from fleetlog.services.client.seam import FleetClient

__all__ = ["ProcessorLock", "ProcessorLockBusy", "ProcessorLockLost", "ProcessorsAPI", "compute_file_hash",
           "parse_jsonl"]

STREAM = "FLEET_PROCESSORS"
CHUNK_FILES = 2_000  # session files per `sessions` request: each answer stays well under 1 MB ...
CHUNK_BYTES = 256 * 1024  # ... and so does the request
PAGE = 2_000


def _naive_utc(field: str, value: object) -> datetime:
    if not isinstance(value, datetime):
        raise FleetValidationError(field, f"must be a datetime (naive UTC or aware), got {type(value).__name__}")
    return value if value.tzinfo is None else value.astimezone(UTC).replace(tzinfo=None)


def _text(field: str, value: object, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        raise FleetValidationError(field, f"must be a {'' if empty else 'non-empty '}string, got {value!r}")
    return value


def _state(row: ProcSession) -> dict[str, Any]:
    return {"username": row.username, "processed_at": row.processed_at, "items_extracted": row.items_extracted,
            "file_hash": row.file_hash}


class ProcessorsAPI(LockSide):
    """`fleet.processors`: bookkeeping and the runner here, the lock in `LockSide`."""

    def __init__(self, fleet: FleetClient, clock: Callable[[], float] = time.time) -> None:
        super().__init__(fleet, clock)
        # Attributes, so a caller (the bench) can count or replace them.
        self.compute_file_hash: Callable[[Path], str] = compute_file_hash
        self.parse_jsonl = parse_jsonl

    # -- writes --------------------------------------------------------------
    def _mark_event(self, processor: str, session_file: str, username: str, items_count: int, file_hash: str,
                    read_at: datetime | None, fence: int | None = None) -> ProcessorSessionMarked:
        check_identity("processor", processor)
        if isinstance(items_count, bool) or not isinstance(items_count, int) or items_count < 0:
            raise FleetValidationError("items_count", f"must be an integer >= 0, got {items_count!r}")
        return ProcessorSessionMarked(
            id=new_event_id(), ts=now_iso(), processor=processor,
            session_file=_text("session_file", session_file), username=_text("username", username, empty=True),
            items_extracted=items_count, file_hash=_text("file_hash", file_hash, empty=True),
            processed_at=utcnow() if read_at is None else _naive_utc("read_at", read_at), fence=fence,
        )

    def _note(self, token: Token) -> Token:
        self._seen = max(self._seen, token.get(STREAM, 0))
        return token

    async def mark_processed(self, processor: str, session_file: str, username: str, items_count: int,
                             file_hash: str, read_at: datetime | None = None) -> Token:
        """Upsert the row of (processor, session_file): processed_at = read_at (default now, UTC),
        items_extracted, file_hash and username all overwritten. Returns the consistency token."""
        self._fleet.emit(self._mark_event(processor, session_file, username, items_count, file_hash, read_at))
        return self._note(await self._fleet.flush())

    async def mark_locked(self, lock: ProcessorLock, session_file: str, username: str, items_count: int,
                          file_hash: str, read_at: datetime | None = None) -> int:
        """`mark_processed`, stored only while `lock` holds (JetStream decides); returns the seq,
        else ProcessorLockLost and nothing is stored."""
        event = self._mark_event(lock.processor, session_file, username, items_count, file_hash, read_at,
                                 fence=lock.fence)
        return await self._fenced(lock, event.subject(), encode_event(event), event.id)

    async def delete_for_processors(self, names: Iterable[str]) -> int:
        """Delete every row of these processors (a tombstone per row); the number deleted."""
        if isinstance(names, str):
            raise FleetValidationError("names", "must be a list of processor names, not one string")
        wanted = [check_identity("names", n) for n in dict.fromkeys(names)]
        count = 0
        for processor in wanted:
            for session_file in sorted(await self.processed_session_files(processor)):
                self._fleet.emit(ProcessorSessionDeleted(id=new_event_id(), ts=now_iso(), processor=processor,
                                                         session_file=session_file))
                count += 1
        if count:
            self._note(await self._fleet.flush())
        return count

    # -- reads ---------------------------------------------------------------
    async def _rows(self, processor: str, session_files: list[str],
                    min_seq: Token | Receipt | None = None) -> dict[str, ProcSession]:
        files = list(dict.fromkeys(session_files))
        token = self._token(min_seq)
        out: dict[str, ProcSession] = {}
        start = 0
        while start < len(files):
            end, size = start, 0
            while end < len(files) and end - start < CHUNK_FILES and size + len(files[end]) + 3 <= CHUNK_BYTES:
                size += len(files[end]) + 3
                end += 1
            end = max(end, start + 1)
            req = ProcSessionsQuery(processor=processor, session_files=files[start:end], min_seq=token)
            answer = await self._fleet.request("fleetlog.processors.sessions", req, ProcSessionList)
            out.update((r.session_file, r) for r in answer.items)
            start = end
        return out

    async def get_states_for_session_files(self, processor: str, session_files: Iterable[str], *,
                                           min_seq: Token | Receipt | None = None) -> dict[str, dict[str, Any]]:
        """{session_file: {username, processed_at, items_extracted, file_hash}} (files with no row absent)."""
        if isinstance(session_files, str):
            raise FleetValidationError("session_files", "must be a list of session files, not one string")
        rows = await self._rows(processor, list(session_files), min_seq)
        return {k: _state(r) for k, r in rows.items()}

    async def is_processed(self, processor: str, session_file: str, file_hash: str, *,
                           min_seq: Token | Receipt | None = None) -> bool:
        """A row exists and its hash equals `file_hash`."""
        row = (await self._rows(processor, [session_file], min_seq)).get(session_file)
        return row is not None and row.file_hash == file_hash

    async def processed_session_files(self, processor: str, *, min_seq: Token | Receipt | None = None) -> set[str]:
        token = self._token(min_seq)
        out: set[str] = set()
        after: str | None = None
        while True:
            req = ProcSessionsQuery(processor=processor, after=after, limit=PAGE, min_seq=token)
            page = await self._fleet.request("fleetlog.processors.sessions", req, ProcSessionList)
            out.update(r.session_file for r in page.items)
            if page.next_cursor is None:
                return out
            after = page.next_cursor

    async def _activity(self, processor: str, since: datetime | None,
                        min_seq: Token | Receipt | None) -> ProcActivity:
        req = ProcActivityQuery(processor=processor, since=None if since is None else _naive_utc("since", since),
                                min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.activity", req, ProcActivity)

    async def max_processed_at(self, processor: str, *, min_seq: Token | Receipt | None = None) -> datetime | None:
        """The latest processed_at of the processor's rows (naive UTC; None: no rows)."""
        return (await self._activity(processor, None, min_seq)).last_processed_at

    async def activity_since(self, processor: str, since: datetime, *,
                             min_seq: Token | Receipt | None = None) -> dict[str, Any]:
        """{"last_processed_at": latest processed_at >= since (or None), "items_extracted": their sum}."""
        got = await self._activity(processor, _naive_utc("since", since), min_seq)
        return {"last_processed_at": got.last_processed_at, "items_extracted": got.items_extracted}

    async def scan_unprocessed_for(self, processor: str, session_dir: str | Path, *,
                                   min_seq: Token | Receipt | None = None) -> list[tuple[str, Path]]:
        """[(username, path)] of the session files to process (the rule: files.py)."""
        todo, _ = await self.scan_rows(processor, session_dir, min_seq=min_seq)
        return [(f.username, f.path) for f in todo]

    async def scan_rows(self, processor: str, session_dir: str | Path, *, min_seq: Token | Receipt | None = None,
                        ) -> tuple[list[SessionFile], dict[str, dict[str, Any]]]:
        """The scan's candidates and the rows it read (the runner compares their hashes)."""
        check_identity("processor", processor)
        files = await asyncio.to_thread(list_session_files, Path(session_dir))
        if not files:
            return [], {}
        rows = await self.get_states_for_session_files(processor, [f.key for f in files], min_seq=min_seq)
        todo = await asyncio.to_thread(select_unprocessed, files, rows, self.compute_file_hash)
        return todo, rows

    # -- runs ----------------------------------------------------------------
    async def run(self, processor: Processor | str, session_dir: str | Path, *,
                  max_sessions_per_run: int | None = None, time_budget_seconds: float = 150.0,
                  user_resolver: Callable[[str], tuple[Any, str | None] | None] | None = None,
                  clock: Callable[[], float] | None = None) -> dict[str, Any]:
        """Run `processor` over session_dir under its lock; the stats (see runner.run)."""
        return await processor_runner.run(self, processor, session_dir, max_sessions_per_run=max_sessions_per_run,
                                          time_budget_seconds=time_budget_seconds, user_resolver=user_resolver,
                                          clock=clock)

    async def serve_runs(self, session_dir: str | Path, *, ready: asyncio.Event | None = None) -> None:
        """Answer `fleetlog.processors.run` requests for session_dir until cancelled."""
        await processor_runner.serve_runs(self, await self._fleet.nats(), session_dir, ready=ready)

    async def request_run(self, processor: str, *, max_sessions_per_run: int | None = None,
                          time_budget_seconds: float = 150.0, timeout: float | None = None) -> dict[str, Any]:
        """Ask the machine that serves runs (`serve_runs`) to run `processor`; its stats.
        UnknownProcessor / ProcessorLockBusy as a local `run` would raise."""
        req = ProcRunRequest(processor=processor, max_sessions_per_run=max_sessions_per_run,
                             time_budget_seconds=time_budget_seconds)
        wait = timeout if timeout is not None else time_budget_seconds + 60
        try:
            stats = await self._fleet.request(processor_runner.RUN_SUBJECT, req, ProcRunStats, wait)
        except QueryError as exc:
            if exc.code == "404":
                raise processor_runner.UnknownProcessor(processor, str(exc)) from None
            if exc.code == "409":
                raise ProcessorLockBusy(str(exc)) from None
            raise
        return msgspec.structs.asdict(stats)

    async def record_run(self, event: ProcessorRunRecorded) -> Token:
        """Store a run's audit record (acked); the runner's, or a foreign runner's."""
        self._fleet.emit(event)
        return self._note(await self._fleet.flush())

    async def runs(self, processor: str, limit: int = 20, before_seq: int | None = None, *,
                   run_id: str | None = None, min_seq: Token | Receipt | None = None) -> ProcRunList:
        """Run records, newest first (`run_id`: that one only)."""
        req = ProcRunsQuery(processor=processor, run_id=run_id, limit=max(1, min(1000, int(limit))),
                            before_seq=before_seq, min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.runs", req, ProcRunList)

    async def summary(self, *, min_seq: Token | Receipt | None = None) -> ProcSummaryList:
        req = ProcSummaryQuery(now=self.clock(), min_seq=self._token(min_seq))
        return await self._fleet.request("fleetlog.processors.summary", req, ProcSummaryList)
