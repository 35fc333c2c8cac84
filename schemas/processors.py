"""Batch-processor bookkeeping: per-file markers, run records and the processor lock.

A processor (an ingest job, a converter, an indexer) walks files and records, per
file, the latest thing it knows (`proc.file` on `fleet.proc.<p>.file.<file_hash>`,
compacted: one message per file); per run, a state-carrying record
(`proc.run` on `fleet.proc.<p>.run.<run_id>`); and one lock per processor
(`proc.lock` on `fleet.proc.<p>.lock`) that at most one holder has at a time,
decided by JetStream's expected last subject sequence. The lock's fencing token is
the stream sequence of its `acquired` message; markers and run records written
with the lock are published only while the lock subject is where the holder left
it, so a holder that lost its lock cannot write.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Final

import msgspec

from . import subjects
from ._base import Event, Identity, Text
from .answers import Answer

__all__ = [
    "DONE_STATUSES",
    "FILE_STATUSES",
    "LOCK_STATES",
    "RUN_STATUSES",
    "ProcFile",
    "ProcFileList",
    "ProcFileQuery",
    "ProcFilesQuery",
    "ProcLock",
    "ProcLockQuery",
    "ProcRun",
    "ProcRunList",
    "ProcRunQuery",
    "ProcRunsQuery",
    "ProcSeen",
    "ProcSeenQuery",
    "ProcSummary",
    "ProcSummaryList",
    "ProcSummaryQuery",
    "ProcessorEvent",
    "ProcessorFileMarked",
    "ProcessorLockChanged",
    "ProcessorRunRecorded",
]

# Canonical file statuses (others are stored as given); done and skipped count as processed.
FILE_STATUSES: Final = ("pending", "processing", "done", "failed", "skipped")
DONE_STATUSES: Final = ("done", "skipped")
RUN_STATUSES: Final = ("running", "completed", "failed", "cancelled")
LOCK_STATES: Final = ("acquired", "renewed", "released")
Limit = Annotated[int, msgspec.Meta(ge=1, le=1000)]


class ProcessorEvent(Event, kw_only=True, frozen=True):
    STREAM: ClassVar[str] = "FLEET_PROCESSORS"

    processor: Identity


class ProcessorFileMarked(ProcessorEvent, tag="proc.file", kw_only=True, frozen=True):
    """The latest known status of one file for one processor (compacted per file)."""

    file_path: str
    file_hash: Identity
    status: Text
    size: int | None = None
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    run_id: str | None = None

    def subject(self) -> str:
        return subjects.proc_file(self.processor, self.file_hash)


class ProcessorRunRecorded(ProcessorEvent, tag="proc.run", kw_only=True, frozen=True):
    """A processor run's whole state (state-carrying: the last message is the run)."""

    run_id: Identity
    status: Text
    started_at: int | None = None
    finished_at: int | None = None
    files_total: int = 0
    files_ok: int = 0
    files_failed: int = 0
    detail: dict[str, Any] = msgspec.field(default_factory=dict)
    holder: str | None = None

    def subject(self) -> str:
        return subjects.proc_run(self.processor, self.run_id)


class ProcessorLockChanged(ProcessorEvent, tag="proc.lock", kw_only=True, frozen=True):
    """State-carrying lock record, written with an expected last subject sequence.

    `fence` is the stream seq of the `acquired` message this holder's tenure began
    with (None on that message itself: it is its own seq)."""

    holder: str | None
    state: Text  # "acquired" | "renewed" | "released"
    lease_expires_at: float | None = None
    fence: int | None = None

    def subject(self) -> str:
        return subjects.proc_lock(self.processor)


# ---- views, queries and answers (fleetlog.processors.*) ----


class ProcFile(msgspec.Struct, kw_only=True):
    processor: str
    file_hash: str
    file_path: str
    status: str
    size: int | None
    detail: dict[str, Any]
    run_id: str | None
    updated_at: int  # epoch seconds of the marker's ts
    seq: int


class ProcRun(msgspec.Struct, kw_only=True):
    processor: str
    run_id: str
    status: str
    started_at: int | None
    finished_at: int | None
    files_total: int
    files_ok: int
    files_failed: int
    detail: dict[str, Any]
    holder: str | None
    seq: int


class ProcLock(Answer, kw_only=True):
    """A processor's lock. `held`: acquired or renewed and the lease not past (the server's clock)."""

    processor: str
    holder: str | None = None
    state: str | None = None  # None: never locked
    fence: int | None = None
    lease_expires_at: float | None = None
    held: bool = False
    seq: int | None = None  # the lock subject's last seq (what fenced writes are guarded on)


class ProcFileQuery(msgspec.Struct, kw_only=True):
    processor: str
    file_hash: str
    min_seq: dict[str, int] | None = None


class ProcFilesQuery(msgspec.Struct, kw_only=True):
    """Files of a processor by file_hash, optionally of some statuses; `after` is the cursor."""

    processor: str
    statuses: list[str] | None = None
    run_id: str | None = None
    after: str | None = None
    limit: Limit = 100
    min_seq: dict[str, int] | None = None


class ProcFileList(Answer, kw_only=True):
    items: list[ProcFile]
    next_cursor: str | None = None
    total_count: int = 0


class ProcSeenQuery(msgspec.Struct, kw_only=True):
    processor: str
    file_hashes: Annotated[list[str], msgspec.Meta(max_length=10_000)]  # the client sends chunks
    min_seq: dict[str, int] | None = None


class ProcSeen(Answer, kw_only=True):
    statuses: dict[str, str]  # file_hash -> status, for the hashes that have a marker


class ProcRunQuery(msgspec.Struct, kw_only=True):
    processor: str
    run_id: str
    min_seq: dict[str, int] | None = None


class ProcRunsQuery(msgspec.Struct, kw_only=True):
    """Runs, most recently updated first (a run moves up when it finishes)."""

    processor: str
    limit: Limit = 20
    before_seq: int | None = None
    min_seq: dict[str, int] | None = None


class ProcRunList(Answer, kw_only=True):
    items: list[ProcRun]
    next_cursor: int | None = None


class ProcLockQuery(msgspec.Struct, kw_only=True):
    processor: str
    now: float | None = None
    min_seq: dict[str, int] | None = None


class ProcSummaryQuery(msgspec.Struct, kw_only=True):
    now: float | None = None
    min_seq: dict[str, int] | None = None


class ProcSummary(msgspec.Struct, kw_only=True):
    processor: str
    files: dict[str, int]  # status -> count
    runs: int
    last_run: ProcRun | None  # the most recently updated run
    lock_holder: str | None  # who holds the lock now (None: free)


class ProcSummaryList(Answer, kw_only=True):
    items: list[ProcSummary]
